"""Where does the optimal edit's validation loss plateau on SmolLM2? Long IPO fits at S* (the top-16 probe
heads), a random 16-head set, the best probe head alone and full alignment, on the quick preset's split,
validated every `EVAL_EVERY` steps. Each fit runs until validation loss has not improved by 1% for
`--patience` validations (a long tail past the plateau, to see whether the loss drops again) or the step cap.
The curves size the presets' step cap and patience (`plateau_step` replays stricter criteria on them).

    .venv/bin/python -m bench.plateau --top16 L..,L.. --best-head L14H1 [--steps 200] [--patience 6]

Writes bench/results/plateau.json and plateau.png. Fits run in two single-thread processes (2 cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from dataclasses import replace
from pathlib import Path

from bench.common import RESULTS, machine_info

EVAL_EVERY = 8


def _fit_one(job: dict) -> dict:
    import torch

    from locaudit.data.examples import preference_pairs
    from locaudit.heads import parse_heads
    from locaudit.methods import make_edit
    from locaudit.stages import load
    from locaudit.study import load_preset
    from locaudit.training import fit

    torch.set_num_threads(1)
    preset = load_preset("quick")
    lm = load(preset.model)
    split = preset.data.load_split()
    heads = None if job["heads"] is None else parse_heads(job["heads"], lm.arch.n_layers, lm.arch.n_heads)
    cfg = replace(preset.fit, max_steps=job["steps"], eval_every=EVAL_EVERY, patience=job["patience"], min_delta=0.01,
                  max_train_pairs=job["train_pairs"], max_val_pairs=job["val_pairs"])
    edit = make_edit(lm, heads, seed=preset.data.seed)
    t = time.time()
    r = fit(lm, edit, preference_pairs(split.train), preference_pairs(split.val), cfg,
            n_heads=None if heads is None else len(heads), progress=False)
    curve = [(h["step"], h["val_loss"], h["val_pref_acc"]) for h in r.history if "val_loss" in h]
    return {"name": job["name"], "heads": job["heads"], "lr": r.config.lr, "seconds": time.time() - t,
            "seconds_per_step": (time.time() - t) / max(1, r.steps), "val_curve": curve,
            "train_curve": [(h["step"], h["train_loss"]) for h in r.history if "train_loss" in h],
            "best": r.best, "status": r.status, "steps": r.steps, "n_train_pairs": r.n_train_pairs,
            "n_val_pairs": r.n_val_pairs}


def plateau_step(curve: list, min_delta: float, patience: int) -> dict:
    """Where early stopping with (min_delta, patience) would stop on this curve, and the loss it would keep,
    against the curve's minimum: the presets' rule (`training.Plateau`), replayed on a full curve."""
    from locaudit.training import Plateau

    rule = Plateau(min_delta, patience, reference=curve[0][1])
    kept = curve[0]
    for step, loss, acc in curve[1:]:
        if loss < kept[1]:
            kept = (step, loss, acc)
        if rule.update(loss):
            return {"stop_step": step, "kept_step": kept[0], "kept_loss": kept[1]}
    return {"stop_step": None, "kept_step": kept[0], "kept_loss": kept[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--patience", type=int, default=6)
    ap.add_argument("--train-pairs", type=int, default=256)
    ap.add_argument("--val-pairs", type=int, default=32)
    ap.add_argument("--top16", required=True, help="S*: comma-separated top-16 probe heads of the quick split")
    ap.add_argument("--best-head", required=True)
    args = ap.parse_args()
    from locaudit.heads import random_heads

    rand = ",".join(random_heads(16, 0, 30, 9).names)
    common = {"steps": args.steps, "train_pairs": args.train_pairs, "val_pairs": args.val_pairs, "patience": args.patience}
    jobs = [{"name": "S* (top-16 probe heads)", "heads": args.top16, **common},
            {"name": "random 16-head set (seed 0)", "heads": rand, **common},
            {"name": f"single head {args.best_head}", "heads": args.best_head, **common},
            {"name": "full alignment (rank-1 LoRA, all layers)", "heads": None, **common}]
    t0 = time.time()
    fits = []
    with mp.get_context("spawn").Pool(2) as pool:
        for f in pool.imap_unordered(_fit_one, jobs):
            fits.append(f)
            print(f"{f['name']}: {f['status']} after {f['steps']} steps, best val loss {f['best']['val_loss']:.3f} at "
                  f"step {f['best']['step']} ({f['seconds']:.0f} s)", flush=True)
            (RESULTS / "plateau-partial.json").write_text(json.dumps(fits, indent=1) + "\n")
    fits.sort(key=lambda f: [j["name"] for j in jobs].index(f["name"]))
    (RESULTS / "plateau-partial.json").unlink(missing_ok=True)
    out = {"machine": machine_info(), "wall_seconds": time.time() - t0, "eval_every": EVAL_EVERY, "fits": fits,
           "criterion": {f"patience{p}_delta{d}": [plateau_step(f["val_curve"], d, p) for f in fits]
                         for p in (2, 3, 4) for d in (0.0, 0.01, 0.02)}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plateau.json").write_text(json.dumps(out, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for f in fits:
        s, l, a = zip(*f["val_curve"])
        ax[0].plot(s, l, label=f"{f['name']} (lr {f['lr']:.3g})")
        ax[1].plot(s, a, label=f["name"])
    ax[0].set(xlabel="step (batch 4)", ylabel="validation IPO loss", title="Validation loss")
    ax[1].set(xlabel="step (batch 4)", ylabel="validation preference accuracy", title="Preference accuracy")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "plateau.png", dpi=110)
    print(json.dumps(out["criterion"], indent=1))


if __name__ == "__main__":
    main()
