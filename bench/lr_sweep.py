"""Learning-rate sweep for the optimal edit on SmolLM2-135M (the "Tuning" table of docs/method.md).

usage: python -m bench.lr_sweep FORMAT KIND:LR [KIND:LR ...]   with KIND in loc (16 random heads, seed 0),
one (one random head, seed 3), full (full rank-1 LoRA); e.g. `python -m bench.lr_sweep plain loc:3e-2 full:3e-2`.
Fits on 48 training / 40 validation pairs of a 100-question split (seed 0), tau 0.1, 2 epochs, and prints the
validation (step, IPO loss, preference accuracy) curve and wall time of each fit.
"""

from __future__ import annotations

import sys

from locaudit.data.examples import preference_pairs
from locaudit.data.truthfulqa import load_truthfulqa, split_questions
from locaudit.heads import random_heads
from locaudit.interventions import FullRank1, LocalizedRank1
from locaudit.models import load_model
from locaudit.training import FitConfig, fit


def main(argv: list[str]) -> None:
    fmt, runs = argv[0], [(a.split(":")[0], float(a.split(":")[1])) for a in argv[1:]]
    lm = load_model("smollm2-135m")
    split = split_questions(load_truthfulqa(), seed=0, limit=100)
    train, val = preference_pairs(split.train), preference_pairs(split.val)
    L, H = lm.arch.n_layers, lm.arch.n_heads
    for kind, lr in runs:
        edit = {"loc": lambda: LocalizedRank1(random_heads(16, 0, L, H), lm.arch),
                "one": lambda: LocalizedRank1(random_heads(1, 3, L, H), lm.arch),
                "full": lambda: FullRank1(lm.arch)}[kind]()
        cfg = FitConfig(fmt=fmt, epochs=2, max_train_pairs=48, max_val_pairs=40, tau=0.1, lr=lr)
        r = fit(lm, edit, train, val, cfg, progress=False)
        curve = [(h["step"], round(h["val_loss"], 3), round(h["val_pref_acc"], 3)) for h in r.history if "val_loss" in h]
        print(fmt, kind, lr, "seconds", round(r.seconds, 1), curve, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
