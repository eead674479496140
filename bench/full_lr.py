"""Full alignment's learning rate under early stopping: the plateau fit at lr 0.03 peaked at step 24 and then
degraded (bench/results/plateau.json), so its optimum may lie at a lower rate. Fits full rank-1 LoRA with the
quick preset's convergence criterion at each `--lrs` value, in parallel single-thread processes.

    .venv/bin/python -m bench.full_lr --lrs 0.01,0.003

Writes bench/results/full_lr.json."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from dataclasses import replace

from bench.common import RESULTS, machine_info


def _fit(lr: float) -> dict:
    import torch

    from locaudit.data.examples import preference_pairs
    from locaudit.methods import make_edit
    from locaudit.stages import load
    from locaudit.study import load_preset
    from locaudit.training import fit

    torch.set_num_threads(1)
    preset = load_preset("quick")
    lm = load(preset.model)
    split = preset.data.load_split()
    cfg = replace(preset.fit, lr=lr, max_steps=200, patience=6)
    t = time.time()
    r = fit(lm, make_edit(lm, None, seed=preset.data.seed), preference_pairs(split.train), preference_pairs(split.val),
            cfg, progress=False)
    return {"lr": lr, "status": r.status, "steps": r.steps, "best": r.best, "seconds": time.time() - t,
            "val_curve": [(h["step"], h["val_loss"], h["val_pref_acc"]) for h in r.history if "val_loss" in h]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="0.01,0.003")
    lrs = [float(x) for x in ap.parse_args().lrs.split(",")]
    with mp.get_context("spawn").Pool(len(lrs)) as pool:
        fits = pool.map(_fit, lrs)
    for f in fits:
        print(f"lr {f['lr']:g}: {f['status']} after {f['steps']} steps, best val loss {f['best']['val_loss']:.3f} "
              f"(pref acc {f['best']['val_pref_acc']:.3f}) at step {f['best']['step']}", flush=True)
    (RESULTS / "full_lr.json").write_text(json.dumps({"machine": machine_info(), "fits": fits}, indent=1) + "\n")


if __name__ == "__main__":
    main()
