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
    from locaudit.experiments import run_probe

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
