"""quick: the whole study preset through `locaudit.study.run_study`, stage by stage, and how close the IPO
training stage gets to the machine's matmul throughput.

- Preset: `quick` (`locaudit/presets/quick.toml`), or the TOML file in `$LOCAUDIT_BENCH_PRESET` (e.g. an older
  quick preset, to compare code on the same work); `--quick` always uses `smoke` so bench-quick stays within
  its time budget. The run goes to a temporary directory with a cold pi0 / activation cache (the dequantised
  model and trained judges are reused; `stage_seconds.judges` says if they had to be trained). Arms run in
  `run_study`'s default number of worker processes (one single-thread worker per core).
- Prints `STAGE <name> <seconds>` for every entry of `run.json`'s `stage_seconds` (per-arm stages summed over
  workers; `arms_wall` and `total` are wall clock).
- Peak: the best fp32 `torch.mm` FLOP/s over square 1024 and 2048 matmuls (2 n^3 FLOPs each), on one thread
  (what each worker has) and on all threads.
- Training FLOPs, counted from the data (every fit of a study trains on the same pairs in the same seeded
  batch order, so the tokens of one fit are replayed with `training.bucketed_batches` and `scoring.collate`
  without running the model): every step runs the shared prefix (batch 1), the batch's distinct prompts and its
  2 x 4 answers with gradients. T = prefix + padded prompt and answer tokens. Counted as 6 x N x T (N = all
  model parameters, tied embedding once), the usual estimate, and refined: base weights are frozen (backward
  ~2 N per token, not 4 N) and the LM head runs only at answer positions: 4 x N_body x T + 4 x V x d x A.
- RATIO quick = (refined training FLOPs / one thread's peak FLOP/s) / summed seconds of the `ipo_train` stage:
  the fraction of its core's matmul peak a worker reaches while training.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import Timer, cli, cold_cache, log


def peak_matmul_flops(repeats: int = 8, threads: int | None = None) -> dict:
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    out = {}
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        out[str(n)] = 2 * n ** 3 / best
    used = torch.get_num_threads()
    torch.set_num_threads(old)
    return {"flops_per_s": max(out.values()), "by_size": out, "threads": used}


def fit_tokens(lm, preset) -> dict:
    """Tokens one fit of `preset` processes: training steps (with grad) and the final validation pass."""
    import math

    import numpy as np

    from locaudit.data.examples import preference_pairs
    from locaudit.data.formats import PromptFormat
    from locaudit.scoring import batch_tokens, collate
    from locaudit.training import _subsample, bucketed_batches, encode_pairs

    cfg = preset.fit
    split = preset.data.load_split()
    train = encode_pairs(lm, _subsample(preference_pairs(split.train), cfg.max_train_pairs, cfg.seed), PromptFormat(cfg.fmt))
    val = encode_pairs(lm, _subsample(preference_pairs(split.val), cfg.max_val_pairs, cfg.seed + 1), PromptFormat(cfg.fmt))
    rng = np.random.default_rng(cfg.seed)
    lengths = [max(len(c), len(r)) for c, r in zip(train.chosen, train.rejected)]
    out = {"train": {"prefix": 0, "padded": 0, "real": 0, "answer": 0, "steps": 0},
           "val": {"prefix": 0, "padded": 0, "real": 0, "answer": 0}}
    pad = lm.tokenizer.pad_token_id
    for _ in range(cfg.epochs):
        for idx in bucketed_batches(lengths, cfg.batch_size, rng):
            n = batch_tokens(collate([train.chosen[i] for i in idx] + [train.rejected[i] for i in idx], pad, "cpu"))
            t = out["train"]
            t["prefix"] += len(train.prefix)
            t["steps"] += 1
            for k in ("padded", "real", "answer"):
                t[k] += n[k]
    evals = cfg.epochs * cfg.evals_per_epoch
    for s0 in range(0, len(val), 16):
        idx = list(range(s0, min(s0 + 16, len(val))))
        n = batch_tokens(collate([val.chosen[i] for i in idx] + [val.rejected[i] for i in idx], pad, "cpu"))
        for k in ("padded", "real", "answer"):
            out["val"][k] += evals * n[k]
    out["val"]["prefix"] = evals * len(val.prefix)
    out["steps_per_fit"] = out["train"]["steps"]
    assert out["train"]["steps"] == cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    return out


def model_params(lm) -> dict:
    emb = lm.model.get_input_embeddings().weight
    head = lm.model.get_output_embeddings().weight
    total = sum(p.numel() for p in lm.model.parameters())
    return {"n_params": total, "n_body": total - emb.numel() - (0 if head is emb else head.numel()),
            "vocab": head.shape[0], "d_model": head.shape[1], "tied": head is emb}


def eval_breakdown(run_dir: Path) -> dict:
    """Per evaluation stage (baseline, iti, ipo_eval), the summed `timings` of its trials: generate, mc, judge,
    text; plus the number of trials and the summed fit seconds recorded in IPO trials."""
    from locaudit.methods import METHODS

    out: dict = {}
    for f in sorted(run_dir.glob("trials/*/*.json")):
        r = json.loads(f.read_text())
        method = METHODS.get(r.get("method"))
        d = out.setdefault(method.stage if method else "other", {"trials": 0})
        d["trials"] += 1
        for k, v in (r.get("timings") or {}).items():
            d[k] = d.get(k, 0.0) + float(v)
    return out


def choose_preset(quick: bool):
    import os

    from locaudit.study import load_preset

    if quick:
        return load_preset("smoke"), "smoke (bench --quick always uses smoke)"
    path = os.environ.get("LOCAUDIT_BENCH_PRESET")
    if path:
        return load_preset(path), f"{path} ($LOCAUDIT_BENCH_PRESET)"
    return load_preset("quick"), "quick"


def run(quick: bool) -> dict:
    from locaudit.stages import load
    from locaudit.study import run_study

    preset, preset_note = choose_preset(quick)
    preset = replace(preset, model=replace(preset.model, device="cpu", dtype="float32"))
    log(f"quick: preset {preset_note}; real judges (locaudit.evaluation.judges via run_study)")
    peak1, peak = peak_matmul_flops(threads=1), peak_matmul_flops()
    log(f"quick: peak fp32 matmul {peak1['flops_per_s'] / 1e9:.1f} GFLOP/s on 1 thread, "
        f"{peak['flops_per_s'] / 1e9:.1f} on {peak['threads']}")
    with tempfile.TemporaryDirectory(prefix="locaudit-bench-study-") as tmp, cold_cache(), Timer() as t:
        run_study(preset, Path(tmp) / "run", progress=False)
        run_json = json.loads((Path(tmp) / "run" / "run.json").read_text())
        evals = eval_breakdown(Path(tmp) / "run")
        fits = len(list((Path(tmp) / "run" / "edits").glob("*/*")))
    stages = run_json["stage_seconds"]
    for name, sec in stages.items():
        print(f"STAGE {name} {sec:.2f}", flush=True)
    for name, d in evals.items():
        log(f"quick: {name}: " + ", ".join(f"{k} {v:.1f}" + ("s" if k != "trials" else "") for k, v in d.items()))
    lm = load(preset.model)
    m, tok = model_params(lm), fit_tokens(lm, preset)
    tr, va = tok["train"], tok["val"]
    T_train, T_val = tr["prefix"] + tr["padded"], va["prefix"] + va["padded"]
    head = m["vocab"] * m["d_model"]
    per_fit = {"train_6NT": 6 * m["n_params"] * T_train,
               "train_refined": 4 * m["n_body"] * T_train + 4 * head * tr["answer"],
               "val_refined": 2 * m["n_body"] * T_val + 2 * head * va["answer"]}
    secs = stages["ipo_train"]  # summed over the fits, whichever worker ran them
    util = {"refined_train_plus_val_over_one_thread_peak": fits * (per_fit["train_refined"] + per_fit["val_refined"])
            / secs / peak1["flops_per_s"],
            "train_6NT_over_one_thread_peak": fits * per_fit["train_6NT"] / secs / peak1["flops_per_s"]}
    log(f"quick: {fits} fits of {tr['steps']} steps, {T_train} training tokens each; training stage "
        f"{secs:.0f}s (summed over workers) = {100 * util['refined_train_plus_val_over_one_thread_peak']:.0f}% of one "
        f"thread's matmul peak (refined count)")
    return {
        "what": "whole study preset via run_study; stage seconds; IPO training stage's fraction of matmul peak",
        "preset": preset_note, "judges": "real judges via run_study", "wall_seconds": t.seconds,
        "workers": run_json.get("workers"), "stage_seconds": stages, "eval_breakdown_seconds": evals,
        "n_val_questions": run_json.get("n_val_questions"), "n_test_questions": run_json.get("n_test_questions"),
        "arch": run_json.get("arch"), "peak_one_thread": peak1, "peak_all_threads": peak, "model_params": m,
        "fits": fits, "tokens_per_fit": tok, "flops_per_fit": per_fit, "utilization": util,
        "ratio": util["refined_train_plus_val_over_one_thread_peak"],
        "ratio_definition": "(fits x refined FLOPs per fit / one thread's peak matmul FLOP/s) / summed ipo_train seconds",
    }


def main():
    cli("quick", run)


if __name__ == "__main__":
    main()
