"""packed: K edits fitted in one pass (`locaudit.packed.fit_packed`) against the same K edits fitted one after
another (`training.fit`): the same steps on the same batches, and the same results (asserted); RATIO is the
sequential wall time over the packed one (of the largest mixed pack).

- Packs: "mixed", a study's mix of K edits from fresh LoRA starts: full rank-1 LoRA (edit 0), then random single
  heads and random 16-head sets in turn, taus cycling through 0.05, 0.1, 0.2, 0.5, 1.0 (the full LoRA edits
  layer 0, so every layer runs K times); "tau-grid", the five taus of one single head three quarters of the way
  up (the layers below it run once per batch). Learning rates by set size (`default_lr`); `fmt="qa"` (the
  six-shot prefix); the fixed schedule: `steps` optimizer steps of `batch` pairs, then one validation.
- Timed (wall clock, and the process's CPU time, which a busy shared machine distorts less): the K `fit` calls,
  and the one `fit_packed` call; pi0's log-probs are computed once beforehand (both read them from the disk cache,
  as a study does), model load excluded. One fit and one pack of one step run untimed first (kernel selection,
  allocator growth).
- Checked: in float32, each packed fit's steps, status and best step equal its own fit's, and every train and
  validation loss agrees to 1e-4 (relative; batched and per-edit matmuls round differently); in bfloat16 (8-bit
  mantissa, which Adam amplifies within a few steps), the steps and the first step's loss, to 5e-2. The largest
  differences (losses, parameters) are recorded either way.

    python -m bench.packed [--quick] [--device cpu|cuda] [--dtype float32|bfloat16] [--threads N]
                           [--models NAME ...] [--tokenizer DIR] [--data-dir DIR]

CPU (default): the embedded SmolLM2-135M, float32, 2 steps of 4 pairs (--quick: 1 step of 2 pairs).
CUDA: bfloat16; the embedded SmolLM2-135M where its package is installed, else a randomly initialised model of its
shape, and a randomly initialised Llama-2-7B-shaped model (all 32 layers; `random-llama-7b-8l` keeps 8 if memory
is short), built in memory (`bench.gpu.SHAPES`; their speed is that of the real models, their outputs are
meaningless), 8 steps of 4 pairs. Random models need a tokenizer directory (`--tokenizer`, default: the
dequantised SmolLM2's). Writes bench/results/packed-<device>[-quick].json, the device named in it.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bench.common import RESULTS, SEED, _quiet, cpu_model, loadavg, log, machine_info, print_ratio, warm_up
from bench.gpu import SHAPES
from locaudit.config import DataConfig
from locaudit.data.examples import preference_pairs
from locaudit.errors import LocauditError
from locaudit.experiments import make_edit
from locaudit.heads import Head, random_heads, single_head
from locaudit.models import _dequantised_cache, embedded_gguf, load_model, wrap_model
from locaudit.packed import fit_packed
from locaudit.training import FitConfig, fit, prepare_pairs

TAUS = (0.05, 0.1, 0.2, 0.5, 1.0)
RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SETTINGS = {  # (device, quick) -> packs (kind, K), steps, pairs per batch, validation pairs
    ("cpu", False): {"packs": (("mixed", 4), ("mixed", 16), ("tau-grid", 5)), "steps": 2, "batch": 4, "val": 4},
    ("cpu", True): {"packs": (("mixed", 4), ("mixed", 16), ("tau-grid", 5)), "steps": 1, "batch": 2, "val": 2},
    ("cuda", False): {"packs": (("mixed", 4), ("mixed", 16), ("tau-grid", 5)), "steps": 8, "batch": 4, "val": 16},
    ("cuda", True): {"packs": (("mixed", 4), ("mixed", 16), ("tau-grid", 5)), "steps": 4, "batch": 4, "val": 8},
}
RANDOM = {"random-smollm2-135m": ("smollm2-135m", None), "random-llama-7b": ("llama-7b", None),
          "random-llama-7b-8l": ("llama-7b", 8), "random-tiny": ("tiny", None)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else cpu_model()


def default_tokenizer() -> str:
    return str(_dequantised_cache(embedded_gguf("smollm2-135m")))


def build_random(name: str, tokenizer_dir: str, device: str, dtype: torch.dtype):
    """A randomly initialised Llama of a real shape (`bench.gpu.SHAPES`), on the device, in `dtype`."""
    shape, layers = RANDOM[name]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kw = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return wrap_model(model, tok, name)


def load(name: str, device: str, dtype: torch.dtype, tokenizer_dir: str | None):
    if name in RANDOM:
        lm = build_random(name, tokenizer_dir or default_tokenizer(), device, dtype)
    else:
        lm = load_model(name, device=device, dtype=dtype)
    if device == "cpu":
        warm_up(lm)
    return lm


def _mixed(lm, K: int) -> list[dict]:
    """A study's mix: full rank-1 LoRA, then random single heads and random 16-head sets in turn, taus cycling."""
    a = lm.arch
    specs = []
    for i in range(K):
        tau = TAUS[i % len(TAUS)]
        if i == 0:
            specs.append({"heads": None, "n_heads": None, "tau": tau, "label": "full rank-1 LoRA", "lowest_layer": 0})
            continue
        k = 1 if i % 2 else min(16, a.n_total_heads)
        heads = random_heads(k, SEED + i, a.n_layers, a.n_heads)
        specs.append({"heads": heads, "n_heads": k, "tau": tau, "lowest_layer": min(h.layer for h in heads),
                      "label": heads.names[0] if k == 1 else f"16 random heads (seed {SEED + i})"})
    return specs


def _tau_grid(lm, K: int) -> list[dict]:
    """The tau grid of one location: a single head three quarters of the way up, K taus (the layers below it
    run once per batch in a pack)."""
    heads = single_head(Head(3 * lm.arch.n_layers // 4, 0))
    taus = [TAUS[i % len(TAUS)] * (1 + i // len(TAUS)) for i in range(K)]
    return [{"heads": heads, "n_heads": 1, "tau": t, "label": heads.names[0], "lowest_layer": min(h.layer for h in heads)}
            for t in taus]


PACKS = {"mixed": _mixed, "tau-grid": _tau_grid}


def pack_specs(lm, kind: str, K: int) -> list[dict]:
    """The K edits of a pack of this kind (`PACKS`)."""
    return PACKS[kind](lm, K)


def new_edit(lm, spec: dict, seed: int):
    return make_edit(lm, spec["heads"], seed=seed)


def _max_rel(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-12))) if x.size else 0.0


def compare(solo, pk, dtype: torch.dtype) -> dict:
    """Largest relative differences between the sequential and packed fits, and the check that they agree: in
    float32 the steps, status and best step exactly and every loss to `RTOL`; in bfloat16, whose rounding Adam
    amplifies within a few steps, the steps and the first step's loss (the edit still at its start)."""
    rtol = RTOL[dtype]
    diffs = {"train_loss": 0.0, "val_loss": 0.0, "params": 0.0}
    for i, (s, p) in enumerate(zip(solo, pk)):
        keys = ("steps", "status", "best step") if dtype == torch.float32 else ("steps",)
        a, b = [(s.steps, s.status, s.best["step"])[:len(keys)], (p.steps, p.status, p.best["step"])[:len(keys)]]
        assert a == b, f"edit {i}: sequential {keys} {a} vs packed {b}"
        first = [h["train_loss"] for h in s.history if "train_loss" in h][0], [h["train_loss"] for h in p.history if "train_loss" in h][0]
        assert _max_rel([first[1]], [first[0]]) < rtol, f"edit {i}: first train loss {first[0]} sequential, {first[1]} packed"
        for key in ("train_loss", "val_loss"):
            diffs[key] = max(diffs[key], _max_rel([h[key] for h in p.history if key in h],
                                                  [h[key] for h in s.history if key in h]))
        ss, ps = s.edit.state_dict(), p.edit.state_dict()
        diffs["params"] = max(diffs["params"], max(float((ps[k] - ss[k]).abs().max() / ss[k].abs().max().clamp_min(1e-12))
                                                   for k in ss))
    if dtype == torch.float32:
        assert diffs["train_loss"] < rtol and diffs["val_loss"] < rtol, f"packed fits differ from sequential ones: {diffs}"
    return diffs


def measure(lm, split, kind: str, K: int, st: dict, device: str, dtype: torch.dtype) -> dict:
    specs = pack_specs(lm, kind, K)
    train, val = preference_pairs(split.train), preference_pairs(split.val)
    cfgs = [FitConfig(tau=s["tau"], batch_size=st["batch"], max_steps=st["steps"], max_train_pairs=st["batch"] * st["steps"],
                      max_val_pairs=st["val"], fmt="qa", seed=SEED) for s in specs]
    nh = [s["n_heads"] for s in specs]
    prepare_pairs(lm, train, val, cfgs[0], progress=False)  # pi0 once, untimed: both runs read it from the cache
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    solo = [fit(lm, new_edit(lm, s, SEED + i), train, val, c, n_heads=n, progress=False)
            for i, (s, c, n) in enumerate(zip(specs, cfgs, nh))]
    sync(device)
    t_seq, c_seq = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    pk = fit_packed(lm, [new_edit(lm, s, SEED + i) for i, s in enumerate(specs)], train, val, cfgs, n_heads=nh,
                    progress=False)
    sync(device)
    t_pack, c_pack = time.perf_counter() - t0, time.process_time() - c0
    diffs = compare(solo, pk, dtype)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    out = {"pack": kind, "K": K, "steps": st["steps"], "batch_pairs": st["batch"], "val_pairs": st["val"],
           "sequential_s": t_seq, "packed_s": t_pack, "ratio": t_seq / t_pack,
           "sequential_cpu_s": c_seq, "packed_cpu_s": c_pack, "cpu_time_ratio": c_seq / c_pack,
           "sequential_s_per_edit_step": t_seq / (K * st["steps"]), "packed_s_per_step": t_pack / st["steps"],
           "pack_lowest_layer": min(s.get("lowest_layer", 0) for s in specs), "edits": [{k: v for k, v in s.items() if k != "heads"} for s in specs],
           "lr": [r.config.lr for r in pk], "max_rel_diff": diffs, "cuda_peak_gib": peak,
           "loadavg_after": loadavg(),
           "train_loss_last": [[h["train_loss"] for h in r.history if "train_loss" in h][-1] for r in pk]}
    log(f"{kind} K={K}: sequential {t_seq:.1f}s, packed {t_pack:.1f}s, ratio {t_seq / t_pack:.2f} (process CPU time "
        f"{c_seq:.1f}s / {c_pack:.1f}s = {c_seq / c_pack:.2f}); max rel diff {diffs}")
    return out


def warm(lm, split, device: str) -> None:
    """One step each way, untimed (kernel selection, allocator growth, the first pi0 entries)."""
    specs = pack_specs(lm, "mixed", 2)
    cfg = FitConfig(batch_size=2, max_steps=1, max_train_pairs=2, max_val_pairs=2, fmt="qa", seed=SEED + 99)
    train, val = preference_pairs(split.train), preference_pairs(split.val)
    fit(lm, new_edit(lm, specs[1], 0), train, val, cfg, n_heads=1, progress=False)
    fit_packed(lm, [new_edit(lm, s, 0) for s in specs], train, val, cfg, n_heads=[s["n_heads"] for s in specs],
               progress=False)
    sync(device)


def run(args) -> dict:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if device == "cuda" else torch.float32
    models = args.models
    if not models:
        try:
            embedded_gguf("smollm2-135m")
            models = ["smollm2-135m"]
        except LocauditError:
            models = ["random-smollm2-135m"]
        if device == "cuda":
            models.append("random-llama-7b")
    st = SETTINGS[(device, args.quick)]
    split = DataConfig(data_dir=args.data_dir, seed=SEED).load_split()
    record = {"device": device, "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
              "torch_threads": torch.get_num_threads(), "settings": st, "results": []}
    for name in models:
        t = time.perf_counter()
        lm = load(name, device, dtype, args.tokenizer)
        log(f"{name}: loaded in {time.perf_counter() - t:.1f}s ({lm.arch.n_layers} layers, {lm.arch.n_heads} heads)")
        warm(lm, split, device)
        for kind, K in st["packs"]:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            r = measure(lm, split, kind, K, st, device, dtype)
            r["model"] = name
            r["layers"] = lm.arch.n_layers
            record["results"].append(r)
            write(record, device, args.quick)  # after each measurement, so a run cut short keeps what it measured
        del lm
        if device == "cuda":
            torch.cuda.empty_cache()
    largest = max(record["results"], key=lambda r: (r["model"] == models[0], r["pack"] == "mixed", r["K"]))
    record["ratio"] = largest["ratio"]
    return record


def write(record: dict, device: str, quick: bool):
    slug = "cpu" if device == "cpu" else record["device_name"].lower().replace("nvidia ", "").replace(" ", "-")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"packed-{slug}{'-quick' if quick else ''}.json"
    full = {"benchmark": "packed", "quick": quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": "python -m bench.packed" + (" --quick" if quick else "") + f" --device {device}",
            "machine": machine_info(), "torch": torch.__version__, **record}
    path.write_text(json.dumps(full, indent=2, default=str) + "\n")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.packed", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and pairs")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    ap.add_argument("--models", nargs="+", help=f"embedded/HF model specs or {', '.join(RANDOM)}")
    ap.add_argument("--tokenizer", help="tokenizer directory for the random models (default: the dequantised SmolLM2's)")
    ap.add_argument("--data-dir", help="TruthfulQA directory (default: locaudit's usual search)")
    args = ap.parse_args(argv)
    _quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    record = run(args)
    path = write(record, args.device, args.quick)
    log(f"wrote {path}")
    print_ratio("packed", record["ratio"])


if __name__ == "__main__":
    main()
