"""quick: the whole study preset through `experiments.run_study`, stage by stage, and how close the IPO
training stage gets to the machine's matmul throughput.

- Preset: `quick` (`locaudit/presets/quick.toml`) when it exists, else `smoke`; `--quick` always uses `smoke`
  so bench-quick stays within its time budget. The run goes to a temporary directory with a cold pi0 /
  activation cache (the dequantised model and any trained judges are reused). `run_study` loads the model
  itself, so stage `load` includes model loading.
- Judges: the real ones (`locaudit.evaluation.judges.load_judges`, via `run_study`) when that module exists;
  otherwise a deterministic hash stand-in (the JSON says which).
- Prints `STAGE <name> <seconds>` for every entry of `run.json`'s `stage_seconds`.
- Peak: the best fp32 `torch.mm` FLOP/s over square 1024 and 2048 matmuls (2 n^3 FLOPs each), at the
  benchmark's thread count.
- Training FLOPs, counted by instrumenting the calls `fit` makes (no locaudit edit): every training step
  runs the shared prefix once (batch 1, with grad, under the edit), the batch's distinct prompts, then its
  2 x 4 answers (chosen and rejected, right-padded; `scoring.forward_rows` calls); T_train = sum over steps of
  (prefix tokens + padded prompt and answer tokens). Counted as
  6 x N x T_train with N = all model parameters (tied embedding counted once), the usual training estimate.
  Forward-only work inside the stage (pi0 log-probs, validation evaluations) is counted separately as
  2 x N x T_infer. Because base weights are frozen (no weight gradients, so backward is ~2 N per token, not 4 N)
  and the LM head runs only at answer positions, a refined count is also given:
  train 4 x N_body x T + 4 x V x d x A, inference 2 x N_body x T + 2 x V x d x A (A = answer tokens, N_body =
  parameters outside the embedding / LM head; attention score FLOPs ignored).
- RATIO quick = (6 N T_train / peak FLOP/s) / seconds of the `ipo_train` stage: the time training would take
  at the measured matmul peak over the time it took, i.e. the fraction of peak reached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.common import Timer, cli, cold_cache, log


def peak_matmul_flops(repeats: int = 8) -> dict:
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
    return {"flops_per_s": max(out.values()), "by_size": out, "threads": torch.get_num_threads()}


class HashJudge:
    """Deterministic stand-in judge (used only when locaudit.evaluation.judges does not exist yet)."""

    def __init__(self, name):
        self.name = name

    def score(self, questions, answers):
        return np.array([int(hashlib.sha256(f"{self.name}|{q}|{a}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
                         for q, a in zip(questions, answers)])

    def info(self):
        return {"version": f"bench-hash-{self.name}"}


@contextlib.contextmanager
def count_fit_tokens(counts: dict):
    """Count tokens processed inside `training.fit`, split into training (grad) and forward-only work."""
    from locaudit import scoring, training

    state = {"in_fit": 0}
    counts.update({"fits": 0, "train": {"prefix": 0, "rows_padded": 0, "rows_real": 0, "answer": 0, "steps": 0},
                   "infer": {"prefix": 0, "rows_padded": 0, "rows_real": 0, "answer": 0}, "model": None})

    def kind():
        return "train" if torch.is_grad_enabled() and not torch.is_inference_mode_enabled() else "infer"

    orig_fit = training.fit

    def fit(lm, *a, **k):
        if counts["model"] is None:
            emb = lm.model.get_input_embeddings().weight
            head = lm.model.get_output_embeddings().weight
            total = sum(p.numel() for p in lm.model.parameters())
            counts["model"] = {"n_params": total, "n_body": total - emb.numel() - (0 if head is emb else head.numel()),
                               "vocab": head.shape[0], "d_model": head.shape[1], "tied": head is emb}
        state["in_fit"] += 1
        counts["fits"] += 1
        try:
            return orig_fit(lm, *a, **k)
        finally:
            state["in_fit"] -= 1

    def wrap_prefix(orig):
        def prefix_kv(lm, prefix):
            if state["in_fit"]:
                c = counts[kind()]
                c["prefix"] += len(prefix)
                if kind() == "train":
                    c["steps"] += 1
            return orig(lm, prefix)
        return prefix_kv

    def wrap_rows(orig):
        def forward_rows(lm, ids, mask, pos, cache):
            if state["in_fit"]:
                c = counts[kind()]
                c["rows_padded"] += int(ids.numel())
                T = ids.shape[1]
                if mask.dim() == 2:  # (B, past + T): the last T columns are this call's tokens
                    c["rows_real"] += int(mask[:, -T:].sum())
                else:  # 4D own-token mask (B, 1, T, S): a real query token attends to itself, padding does not
                    j = torch.arange(T)
                    c["rows_real"] += int(mask[:, 0, j, mask.shape[-1] - T + j].sum())
            return orig(lm, ids, mask, pos, cache)
        return forward_rows

    def wrap_head(orig):
        def _token_logprobs(lm, hidden, targets):
            if state["in_fit"]:
                counts[kind()]["answer"] += int(targets.numel())
            return orig(lm, hidden, targets)
        return _token_logprobs

    saved = [(training, "fit", orig_fit), (training, "prefix_kv", training.prefix_kv),
             (scoring, "prefix_kv", scoring.prefix_kv), (scoring, "forward_rows", scoring.forward_rows),
             (scoring, "_token_logprobs", scoring._token_logprobs)]
    training.fit = fit
    training.prefix_kv = wrap_prefix(training.prefix_kv)
    scoring.prefix_kv = wrap_prefix(scoring.prefix_kv)
    scoring.forward_rows = wrap_rows(scoring.forward_rows)
    scoring._token_logprobs = wrap_head(scoring._token_logprobs)
    try:
        yield counts
    finally:
        for mod, name, f in saved:
            setattr(mod, name, f)


def eval_breakdown(run_dir: Path) -> dict:
    """Per evaluation stage (baseline, iti, ipo_eval), the summed `timings` of its trials: generate, mc, judge,
    text; plus the number of trials and the summed fit seconds recorded in IPO trials."""
    stage_of = {"none": "baseline", "iti": "iti", "ipo": "ipo_eval", "full": "ipo_eval"}
    out: dict = {}
    for f in sorted(run_dir.glob("trials/*/*.json")):
        r = json.loads(f.read_text())
        d = out.setdefault(stage_of.get(r.get("method"), "other"), {"trials": 0})
        d["trials"] += 1
        for k, v in (r.get("timings") or {}).items():
            d[k] = d.get(k, 0.0) + float(v)
    return out


def choose_preset(quick: bool):
    from locaudit.study import PRESET_DIR, load_preset

    if quick:
        return load_preset("smoke"), "smoke (bench --quick always uses smoke)"
    if (PRESET_DIR / "quick.toml").is_file():
        return load_preset("quick"), "quick"
    return load_preset("smoke"), "smoke (locaudit/presets/quick.toml does not exist yet)"


def run(quick: bool) -> dict:
    from locaudit.experiments import run_study

    preset, preset_note = choose_preset(quick)
    preset = replace(preset, model=replace(preset.model, device="cpu", dtype="float32"))
    try:
        import locaudit.evaluation.judges  # noqa: F401
        judges, judge_note = None, "real judges (locaudit.evaluation.judges via run_study)"
    except ImportError:
        judges = (HashJudge("truth"), HashJudge("info"))
        judge_note = "hash stand-in judges: locaudit.evaluation.judges does not exist yet"
    log(f"quick: preset {preset_note}; {judge_note}")
    peak = peak_matmul_flops()
    log(f"quick: peak fp32 matmul {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
    counts: dict = {}
    with tempfile.TemporaryDirectory(prefix="locaudit-bench-study-") as tmp, cold_cache(), \
            count_fit_tokens(counts), Timer() as t:
        run_study(preset, Path(tmp) / "run", progress=False, judges=judges)
        run_json = json.loads((Path(tmp) / "run" / "run.json").read_text())
        evals = eval_breakdown(Path(tmp) / "run")
    stages = run_json["stage_seconds"]
    for name, s in stages.items():
        print(f"STAGE {name} {s:.2f}", flush=True)
    for name, d in evals.items():
        log(f"quick: {name}: " + ", ".join(f"{k} {v:.1f}" + ("s" if k != "trials" else "") for k, v in d.items()))
    m, tr, inf = counts["model"], counts["train"], counts["infer"]
    T_train = tr["prefix"] + tr["rows_padded"]
    T_inf = inf["prefix"] + inf["rows_padded"]
    f_train_6nd = 6 * m["n_params"] * T_train
    f_inf_2nd = 2 * m["n_params"] * T_inf
    head = m["vocab"] * m["d_model"]
    f_train_refined = 4 * m["n_body"] * T_train + 4 * head * tr["answer"]
    f_inf_refined = 2 * m["n_body"] * T_inf + 2 * head * inf["answer"]
    secs = stages["ipo_train"]
    P = peak["flops_per_s"]
    util = {
        "train_6NT_over_stage": f_train_6nd / secs / P,
        "train_6NT_plus_infer_2NT_over_stage": (f_train_6nd + f_inf_2nd) / secs / P,
        "refined_train_plus_infer_over_stage": (f_train_refined + f_inf_refined) / secs / P,
    }
    log(f"quick: training tokens {T_train} in {tr['steps']} steps over {counts['fits']} fits; "
        f"{f_train_6nd / 1e12:.2f} TFLOP (6NT) in {secs:.1f}s = {100 * util['train_6NT_over_stage']:.1f}% of peak")
    return {
        "what": "whole study preset via run_study; stage seconds; IPO training stage's fraction of matmul peak",
        "preset": preset_note, "judges": judge_note, "wall_seconds": t.seconds,
        "stage_seconds": stages, "eval_breakdown_seconds": evals, "n_val_questions": run_json.get("n_val_questions"),
        "n_test_questions": run_json.get("n_test_questions"), "arch": run_json.get("arch"),
        "peak": peak, "model_params": m, "fits": counts["fits"],
        "tokens": {"train": tr, "infer": inf, "T_train": T_train, "T_infer": T_inf},
        "flops": {"train_6NT": f_train_6nd, "infer_2NT": f_inf_2nd, "train_refined": f_train_refined,
                  "infer_refined": f_inf_refined},
        "utilization": util,
        "ratio": util["train_6NT_over_stage"],
        "ratio_definition": "(6 N T_train / peak matmul FLOP/s) / ipo_train stage seconds",
    }


def main():
    cli("quick", run)


if __name__ == "__main__":
    main()
