"""Single-stage entry points (`locaudit.stages`) on a tiny random model: `run_fit` takes objects (a model, a
DataConfig, a HeadSet or None for full alignment, a FitConfig) and writes the edit it fitted."""

from __future__ import annotations

import json

import pytest
import torch

from locaudit.config import DataConfig
from locaudit.errors import LocauditError
from locaudit.heads import parse_heads
from locaudit.interventions import load_intervention
from locaudit.stages import run_fit
from locaudit.training import FitConfig
from tests.conftest import SHARED

CFG = FitConfig(tau=0.2, epochs=1, batch_size=4, lr=5e-2, fmt="plain", max_train_pairs=8, max_val_pairs=4, seed=1,
                retries=0)


def _data() -> DataConfig:
    if not SHARED.is_dir():
        pytest.skip("TruthfulQA not found in ../shared")
    return DataConfig(data_dir=str(SHARED), limit_questions=30, seed=1)


@pytest.mark.parametrize("heads", ["L0H1,L2H3", None])
def test_run_fit_takes_objects(tiny_llama, tmp_path, heads):
    hs = None if heads is None else parse_heads(heads, 3, 4)
    summary = run_fit(tiny_llama, _data(), hs, CFG, tmp_path / "fit", progress=False)
    meta = json.loads((tmp_path / "fit" / "edit.json").read_text())
    assert (tmp_path / "fit" / "training_curve.png").is_file()
    assert meta["kind"] == ("full" if hs is None else "localized") and meta["edit_label"] == summary["edit_label"]
    assert summary["edit_label"] == ("full" if hs is None else hs.label)
    assert summary["tau"] == 0.2 and summary["lr"] == 5e-2 and summary["seed"] == 1
    assert summary["n_train_pairs"] == 8 and summary["n_val_pairs"] == 4 and summary["data"]["limit_questions"] == 30
    edit = load_intervention(tmp_path / "fit", tiny_llama.arch)
    if hs is not None:
        assert edit.heads == hs
    assert edit.is_identity() == (summary["best"]["step"] == 0)
    assert all(torch.isfinite(t).all() for t in edit.tensors().values())


def test_run_fit_checks_heads_against_the_model(tiny_llama, tmp_path):
    with pytest.raises(LocauditError, match="L5H0"):
        run_fit(tiny_llama, _data(), parse_heads("L5H0"), CFG, tmp_path / "fit", progress=False)
    assert not (tmp_path / "fit").exists()  # refused before anything is written
