"""PEFT LoRA adapter directories on the attention output projections W^l (or, written only, the MLP output
projections W_down^l): the file format, both ways.

A PEFT adapter directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with, for each targeted module NAME, `base_model.model.NAME.lora_A.weight` (r x in)
and `base_model.model.NAME.lora_B.weight` (out x r); PEFT adds scaling * B (A x) to the module's output, with
scaling = lora_alpha / r. For r = 1 that is the rank-1 update W^l <- W^l + scale B^l A^l that locaudit's
weight edits are, with A^l: 1 x H*d (the input side, o^l) and B^l: d_model x 1 (the output side), whatever the
family's storage convention (GPT-2's Conv1D included: PEFT's factors are in the (out, in) convention too; only
`fan_in_fan_out` tells it the base weight is stored transposed).

Adapters are written on either projection (`TARGETS`) but read back only on W^l: a rank-1 update of W_down^l
is no edit locaudit can evaluate except the NeuronRank1 it came from, whose neuron set PEFT's format drops.

This module knows only the format, on plain tensors: `write_adapter` and `read_adapter`. Turning edits into
factors is `locaudit.export`; turning factors into an edit is `locaudit.interventions.import_peft`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from locaudit.errors import LocauditError
from locaudit.models import Arch, LoadedModel
from locaudit.storage import read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight")
SUPPORTED = ("locaudit reads only PEFT LoRA adapters of rank 1 (r = 1) on the attention output projections, "
             "without DoRA, LoRA bias, trained biases, extra modules or rank/alpha patterns, e.g. those "
             "`locaudit export --peft` writes")


@dataclass(frozen=True)
class RankOneLoRA:
    """W^l <- W^l + scale * B^l A^l for each layer l in A (= the layers in B); A[l]: (1, H*d), B[l]: (d_model, 1)
    (written on W_down^l instead, A[l]: (1, n_neurons))."""

    A: dict[int, torch.Tensor]
    B: dict[int, torch.Tensor]
    scale: float

    @property
    def layers(self) -> list[int]:
        return sorted(self.A)

    def delta(self, layer: int) -> torch.Tensor:
        """The (d_model, H*d) update of W^l."""
        return self.scale * self.B[layer].float() @ self.A[layer].float()


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


# target -> (the projections, in words; the arch's modules of that projection, one per layer)
TARGETS: dict[str, tuple[str, Callable[[Arch], tuple[nn.Module, ...]]]] = {
    "attention": ("attention output projections", lambda arch: arch.out_projs),
    "mlp": ("MLP output projections", lambda arch: arch.down_projs),
}


def proj_names(lm: LoadedModel, target: str = "attention") -> dict[int, str]:
    """{l: the dotted name of the target projection's module of layer l inside lm.model} (W^l for "attention",
    W_down^l for "mlp"; what PEFT's target_modules and keys use)."""
    words, modules = TARGETS[target]
    index = {id(m): l for l, m in enumerate(modules(lm.arch))}
    names = {index[id(m)]: name for name, m in lm.model.named_modules() if id(m) in index}
    if len(names) != lm.arch.n_layers:
        raise LocauditError(f"cannot name the {words} of {lm.name} (found {len(names)} of "
                            f"{lm.arch.n_layers}); export from a model loaded by locaudit")
    return names


def out_proj_names(lm: LoadedModel) -> dict[int, str]:
    """{l: the dotted name of W^l's module inside lm.model}."""
    return proj_names(lm, "attention")


def check_out_dir(out: Path) -> Path:
    """An export target must be a new or empty directory (an export never mixes with other files)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LocauditError(f"{out} already exists and is not an empty directory; give a new directory or delete it")
    parent = out.parent if str(out.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise LocauditError(f"cannot create {out}: {parent} is not a writable directory; give a writable path")
    return out


def write_dir(out: Path, write: Callable[[Path], None]) -> Path:
    """Atomically create the directory `out`: `write(tmp)` fills a hidden sibling directory, whose files are
    synced and which is then renamed to `out`, so `out` either does not exist (or stays empty) or is complete."""
    out = check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        os.replace(tmp, out)  # replaces an empty directory too
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_adapter(out: Path, lm: LoadedModel, lora: RankOneLoRA, target: str = "attention") -> Path:
    """Write `lora` as a PEFT LoRA adapter for lm.model on the `target` projections (see TARGETS) into the new
    directory `out` (atomically).

    target_modules lists the edited modules' full names, so PEFT wraps exactly those; lora_alpha = scale with
    r = 1 gives PEFT's scaling = scale, so the factors are stored unchanged. GPT-2's Conv1D stores W and
    W_down alike transposed, hence fan_in_fan_out for both."""
    names = proj_names(lm, target)
    targets = [names[l] for l in lora.layers]
    clashes = [n for n, _ in lm.model.named_modules() if n not in targets and any(n.endswith("." + t) for t in targets)]
    if clashes:  # PEFT matches list entries as name suffixes too
        raise LocauditError(f"module {clashes[0]} of {lm.name} would also match the adapter's target modules; "
                            f"this model's layout cannot be exported")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": lm.name,
        "r": 1, "lora_alpha": float(lora.scale), "lora_dropout": 0.0, "bias": "none",
        "target_modules": targets, "fan_in_fan_out": lm.arch.family.conv1d, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    tensors = {}
    for l in lora.layers:
        tensors[f"base_model.model.{names[l]}.lora_A.weight"] = lora.A[l].detach().float().cpu().contiguous()
        tensors[f"base_model.model.{names[l]}.lora_B.weight"] = lora.B[l].detach().float().cpu().contiguous()

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_dir(out, write)


# Settings that change what an adapter does beyond W^l += scaling B A; each must be off (False/None/empty).
_MUST_BE_OFF = ("use_dora", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern", "target_parameters",
                "layer_replication", "trainable_token_indices", "use_qalora", "alora_invocation_tokens")


def read_adapter(path: Path, arch: Arch) -> RankOneLoRA:
    """Read a PEFT rank-1 LoRA adapter on W^l; anything else raises one LocauditError line saying what is supported."""
    path = Path(path)
    config = read_json(path / ADAPTER_CONFIG)

    def unsupported(what: str) -> LocauditError:
        return LocauditError(f"PEFT adapter {path} {what}; {SUPPORTED}")

    if not isinstance(config, dict):
        raise unsupported("has an adapter_config.json that is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise unsupported(f"is a {config.get('peft_type')!r} adapter, not LoRA")
    if config.get("r") != 1:
        raise unsupported(f"has rank r = {config.get('r')!r}")
    on = [k for k in _MUST_BE_OFF if config.get(k)]
    if on:
        raise unsupported(f"sets {on[0]} = {config[on[0]]!r}")
    if config.get("bias", "none") != "none":
        raise unsupported(f"trains biases (bias = {config['bias']!r})")
    alpha = config.get("lora_alpha", 8)  # PEFT's default
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise unsupported(f"has lora_alpha = {alpha!r}, not a number")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise unsupported(f"has no {ADAPTER_WEIGHTS} (pickled adapter_model.bin files are not read; re-save "
                          f"the adapter with safetensors)")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise LocauditError(f"{weights} is unreadable ({' '.join(str(e).split())[:160]}); re-save the adapter") from None
    layer_of = _layer_parser(arch, arch.family.out_proj)
    mlp_layer_of = _layer_parser(arch, arch.family.down_proj)
    factors: dict[str, dict[int, torch.Tensor]] = {"A": {}, "B": {}}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise unsupported(f"has the tensor {key}, which is not a LoRA factor")
        layer = layer_of(m["module"])
        if layer is None and mlp_layer_of(m["module"]) is not None:
            raise unsupported(f"targets {m['module']}, which is not an attention output projection but an MLP "
                              f"output projection W_down^l (a neuron edit's export: evaluate that edit from its "
                              f"edit directory, whose neuron set the adapter does not record)")
        if layer is None:
            raise unsupported(f"targets {m['module']}, which is not an attention output projection "
                              f"(*.{arch.family.out_proj}) of this {arch.model_type} model's {arch.n_layers} layers")
        factors[m["side"]][layer] = t
    if not factors["A"]:
        raise unsupported("has no LoRA weights")
    if set(factors["A"]) != set(factors["B"]):
        raise unsupported("lacks lora_A or lora_B for some module")
    width = arch.n_heads * arch.head_dim
    for l in sorted(factors["A"]):
        a, b = factors["A"][l], factors["B"][l]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != 1 or b.shape[1] != 1:
            raise unsupported(f"has factors of shape {tuple(a.shape)} / {tuple(b.shape)} on layer {l}, not rank 1")
        if tuple(a.shape) != (1, width) or tuple(b.shape) != (arch.d_model, 1):
            raise LocauditError(f"PEFT adapter {path} does not fit this model: layer {l} factors are "
                                f"{tuple(a.shape)} / {tuple(b.shape)}, W^l here is ({arch.d_model}, {width}); "
                                f"use the model it was trained on")
    # PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; both are lora_alpha at r = 1.
    return RankOneLoRA(A={l: a.float() for l, a in factors["A"].items()},
                       B={l: b.float() for l, b in factors["B"].items()}, scale=float(alpha))


def _layer_parser(arch: Arch, proj: str) -> Callable[[str], int | None]:
    """Module name -> l when it is layer l's module at the path `proj` from a block (`<blocks path>.<l>.<proj>`,
    any of the family's block paths), else None."""
    blocks = "|".join(re.escape(p) for p in arch.family.layers)
    pattern = re.compile(rf"(?:{blocks})\.(?P<l>\d+)\.{re.escape(proj)}")

    def layer(name: str) -> int | None:
        m = pattern.fullmatch(name)
        return int(m["l"]) if m and int(m["l"]) < arch.n_layers else None

    return layer
