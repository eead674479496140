"""Choosing packed training by measurement (`locaudit.packing`): a grid of fits at one location gives the same
edits packed or one by one (tolerances of tests/test_packed.py), "off" is exactly the sequential path, "auto"
measures once per device and keeps the decision for later grids, workers and reruns, and the study fits its tau
grids through it and records the decision in run.json."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from locaudit import packing
from locaudit.errors import LocauditError
from locaudit.heads import parse_heads
from locaudit.interventions import LocalizedRank1
from locaudit.methods import fit_optimal_edits, make_edit
from locaudit.packing import PackingChoice, fit_grid
from locaudit.training import FitConfig, fit_to_optimum
from locaudit.units import parse_units
from tests.test_edits import toy_pairs
from tests.test_packed import P_ATOL, P_RTOL, _assert_same, _close

BASE = FitConfig(tau=0.5, batch_size=4, lr=1e-1, fmt="qa", max_steps=4, eval_every=1, patience=50)
GRID = [replace(BASE, tau=t) for t in (0.1, 0.3, 0.5)]


def _new(lm):
    a = lm.arch
    return lambda: LocalizedRank1(parse_heads("L1H0,L2H1", a.n_layers, a.n_heads), a, seed=2)


def _data():
    return toy_pairs(8, 95), toy_pairs(4, 200)


def test_off_is_the_sequential_path_exactly(tiny_llama):
    train, val = _data()
    got, choice = fit_grid(tiny_llama, _new(tiny_llama), train, val, GRID, mode="off", progress=False)
    want = [fit_to_optimum(tiny_llama, _new(tiny_llama), train, val, c, progress=False) for c in GRID]
    assert choice == PackingChoice(packing.device_name(tiny_llama), False, "off")
    for g, w in zip(got, want):
        assert g.history == w.history
        for k, v in w.edit.state_dict().items():
            assert torch.equal(g.edit.state_dict()[k], v)


def test_on_equals_the_sequential_fits(tiny):
    """Every family: the packed tau grid gives each tau's own fit (parameters, losses, best step, status)."""
    train, val = _data()
    got, choice = fit_grid(tiny, _new(tiny), train, val, GRID, mode="on", progress=False)
    want = [fit_to_optimum(tiny, _new(tiny), train, val, c, progress=False) for c in GRID]
    assert choice.packed and choice.mode == "on"
    assert [g.config.tau for g in got] == [0.1, 0.3, 0.5]
    for g, w in zip(got, want):
        _assert_same(w, g)


def test_auto_measures_once_per_device_and_keeps_the_decision(tiny_llama, tmp_path, monkeypatch):
    train, val = _data()
    calls, packed_calls = [], []
    real_measure, real_packed = packing.measure, packing.fit_packed_to_optimum

    def spy_measure(*a, **k):
        calls.append(1)
        c = real_measure(*a, **k)
        return replace(c, packed=True, sequential_s=2.0 * c.packed_s)  # as a GPU would measure

    def spy_packed(*a, **k):
        packed_calls.append(1)
        return real_packed(*a, **k)

    monkeypatch.setattr(packing, "measure", spy_measure)
    monkeypatch.setattr(packing, "fit_packed_to_optimum", spy_packed)
    first, choice = fit_grid(tiny_llama, _new(tiny_llama), train, val, GRID, store=tmp_path, label="L1H0,L2H1",
                             progress=False)
    assert (len(calls), len(packed_calls)) == (1, 1)
    assert choice.packed and choice.k == 3 and choice.steps == packing.MEASURE_STEPS and choice.speedup == 2.0
    stored = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert stored["device"] == packing.device_name(tiny_llama) and stored["speedup"] == 2.0
    assert stored["measured_on"] == "L1H0,L2H1"
    assert "2.00x" in choice.line() and "packed (one pass per grid)" in choice.line()
    # a later grid (another worker, a rerun) reads the decision instead of measuring again
    again, choice2 = fit_grid(tiny_llama, _new(tiny_llama), train, val, GRID, store=tmp_path, progress=False)
    assert len(calls) == 1 and len(packed_calls) == 2 and choice2 == choice
    for a, b in zip(first, again):
        for k, v in a.edit.state_dict().items():
            assert torch.equal(b.edit.state_dict()[k], v)  # same decision, same path: identical edits
    assert (stored["kind"], stored["lowest_layer"]) == ("localized", 1)
    # edits from another layer (on a CPU packing pays only through the layers below): measured on their own
    a = tiny_llama.arch
    high = lambda: LocalizedRank1(parse_heads("L2H1", a.n_layers, a.n_heads), a, seed=2)  # noqa: E731
    _, choice3 = fit_grid(tiny_llama, high, train, val, GRID, store=tmp_path, label="L2H1", progress=False)
    assert len(calls) == 2 and choice3.lowest_layer == 2 and len(list(tmp_path.glob("*.json"))) == 2
    for f in tmp_path.glob("*L2.json"):
        f.unlink()
    # a stored "one by one" decision takes the sequential path
    path = next(tmp_path.glob("*.json"))
    path.write_text(json.dumps({**stored, "packed": False, "sequential_s": stored["packed_s"]}))
    fit_grid(tiny_llama, _new(tiny_llama), train, val, GRID, store=tmp_path, progress=False)
    assert len(calls) == 2 and len(packed_calls) == 3


def test_measurement_times_both_paths_and_decides_by_the_threshold(tiny_llama):
    train, val = _data()
    c = packing.measure(tiny_llama, [_new(tiny_llama)] * 3, train, val, GRID, None, "L1H0,L2H1")
    assert c.mode == "auto" and c.k == 3 and c.steps == 2 and c.sequential_s > 0 and c.packed_s > 0
    assert c.packed == (c.sequential_s / c.packed_s >= packing.MIN_SPEEDUP)
    assert PackingChoice.from_dict(json.loads(json.dumps(c.as_dict()))) == c


def test_nothing_to_decide_for_one_fit_or_an_unpackable_edit(tiny_llama):
    train, val = _data()
    units = parse_units("L1N3,L2N5", tiny_llama.arch)  # neuron edits have no packed form
    res, choice = fit_optimal_edits(tiny_llama, units, train, val, GRID[:2], seed=1, progress=False)
    assert choice is None and [r.config.tau for r in res] == [0.1, 0.3]
    solo = fit_to_optimum(tiny_llama, lambda: make_edit(tiny_llama, units, seed=1), train, val, GRID[0],
                          n_heads=units.lr_size(tiny_llama.arch), progress=False)
    assert res[0].history == solo.history
    res, choice = fit_grid(tiny_llama, _new(tiny_llama), train, val, GRID[:1], progress=False)
    assert choice is None and len(res) == 1
    with pytest.raises(LocauditError, match="packing mode"):
        fit_grid(tiny_llama, _new(tiny_llama), train, val, GRID, mode="fast", progress=False)


def test_study_packs_its_tau_grids_and_says_so(tmp_path, monkeypatch):
    """A study with two taus per fitted arm: packing "on" and "off" give the same edits (to the packed tolerance),
    run.json records the decision, and an unknown mode is refused when the preset is built."""
    from locaudit.study import load_preset, run_study
    from tests.conftest import make_tiny
    from tests.study_child import HashJudge
    from tests.test_study import tiny_preset

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    p = tiny_preset()
    p = replace(p, study=replace(p.study, taus=(0.1, 0.3), n_single=0, n_random_sets=1, all_heads_arm=False),
                eval=replace(p.eval, mc=False, text_docs=0, val_side_metrics=False))
    lm = make_tiny("llama")
    runs = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        run_study(replace(p, study=replace(p.study, packing=mode)), out, progress=False, lm=lm,
                  judges=(HashJudge("truth"), HashJudge("info")), workers=1)
        runs[mode] = out
        rec = json.loads((out / "run.json").read_text())["packing"]
        assert [(r["mode"], r["packed"]) for r in rec] == [(mode, mode == "on")]
    from safetensors.torch import load_file

    edits = sorted(d.relative_to(runs["off"]) for d in runs["off"].glob("edits/*/tau*"))
    assert len(edits) == 8  # claim, one random set, full alignment, the best probe head: two taus each
    for rel in edits:
        off, on = (load_file(runs[m] / rel / "edit.safetensors") for m in ("off", "on"))
        assert off.keys() == on.keys()
        for k in off:
            _close(on[k], off[k], P_RTOL, P_ATOL)
    with pytest.raises(LocauditError, match="packing mode"):
        replace(load_preset("smoke").study, packing="fast")


def test_audit_packs_its_tau_grids(tmp_path):
    """An audit with two taus: packing "on" and "off" give the same arms' values (the fits agree to rounding,
    and the scores are smooth in them), results.json records the decision, and a resumed packed audit reads its
    stored trials."""
    from locaudit.audit import AuditConfig, audit
    from tests.conftest import make_tiny
    from tests.test_audit import FAST, write_pairs

    lm = make_tiny("llama")
    data = write_pairs(tmp_path / "p.jsonl")
    res = {}
    for mode in ("off", "on"):
        cfg = AuditConfig(n_random=2, fit=FAST, taus=(0.1, 0.3), steering=False, packing=mode)
        res[mode] = audit("L0H1,L2H3", data, tmp_path / mode, cfg, lm=lm, progress=False)
        assert [(d["mode"], d["packed"]) for d in res[mode].config["packing_decisions"]] == [(mode, mode == "on")]
        saved = json.loads((tmp_path / mode / "results.json").read_text())
        assert saved["config"]["packing"] == mode
    assert [r["arm"] for r in res["on"].rows] == [r["arm"] for r in res["off"].rows]
    _close([r["value"] for r in res["on"].rows], [r["value"] for r in res["off"].rows], 1e-4, 1e-5)
    assert [r["tau"] for r in res["on"].rows] == [r["tau"] for r in res["off"].rows]
    trials = sorted((tmp_path / "on" / "trials").glob("*/*.json"))
    stamps = [p.stat().st_mtime_ns for p in trials]
    again = audit("L0H1,L2H3", data, tmp_path / "on", AuditConfig(n_random=2, fit=FAST, taus=(0.1, 0.3),
                                                                   steering=False, packing="on"), lm=lm, progress=False)
    assert [p.stat().st_mtime_ns for p in trials] == stamps and again.rows == res["on"].rows
