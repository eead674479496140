"""Integration tests on the real embedded SmolLM2-135M with a handful of TruthfulQA questions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

pytestmark = pytest.mark.integration


def test_probes_end_to_end_best_head_beats_chance(smol, tmp_path):
    from locaudit.activations import cached_activations
    from locaudit.config import DataConfig, ModelConfig
    from locaudit.data.examples import probe_examples
    from locaudit.stages import run_probe

    dcfg = DataConfig(limit_questions=60, seed=0)
    result = run_probe(ModelConfig(), dcfg, tmp_path / "probe", lm=smol, progress=False)
    rows = (tmp_path / "probe" / "probes.csv").read_text().splitlines()
    assert rows[0] == "layer,head,name,val_acc" and len(rows) == 1 + 30 * 9
    assert (tmp_path / "probe" / "top_heads.txt").read_text().split()[0] == result.ranking[0].name
    # held-out check: refit the best head's probe on train questions, score it on *test* questions
    split = dcfg.load_split()
    best = result.ranking[0]
    train = probe_examples(split.train, seed=0, pool=list(split.train) + list(split.val) + list(split.test))
    test = probe_examples(split.test, seed=2, pool=list(split.train) + list(split.val) + list(split.test))
    acts = cached_activations(smol, [e.text for e in train + test], progress=False)
    x = acts[:, best.layer, best.head]
    y = np.array([e.label for e in train + test])
    n = len(train)
    clf = LogisticRegression(max_iter=1000).fit(x[:n], y[:n])
    acc = clf.score(x[n:], y[n:])
    majority = max(y[n:].mean(), 1 - y[n:].mean())
    assert acc > majority and acc > 0.55, (acc, majority)


def test_short_fit_raises_heldout_preference_accuracy(smol):
    from locaudit.data.examples import preference_pairs
    from locaudit.data.truthfulqa import load_truthfulqa, split_questions
    from locaudit.heads import random_heads
    from locaudit.interventions import LocalizedRank1
    from locaudit.training import FitConfig, fit

    split = split_questions(load_truthfulqa(), seed=0, limit=100)
    edit = LocalizedRank1(random_heads(16, 0, smol.arch.n_layers, smol.arch.n_heads), smol.arch)
    cfg = FitConfig(fmt="plain", epochs=2, max_train_pairs=48, max_val_pairs=40, tau=0.1)
    r = fit(smol, edit, preference_pairs(split.train), preference_pairs(split.val), cfg, n_heads=16, progress=False)
    start = [h for h in r.history if "val_loss" in h][0]
    assert start["val_pref_acc"] == 0.5 and abs(start["val_loss"] - 25.0) < 1e-3  # identity at init: h = 0
    assert r.best["val_pref_acc"] > start["val_pref_acc"]
    assert r.best["val_loss"] < start["val_loss"]
