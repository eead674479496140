"""Heuristic claims and steering arms of the audit (locaudit.audit.claims, locaudit.audit.steering): each heuristic
claim is the heuristic's own top K, computed here by calling the heuristic directly; each steering arm's
multiplier is the validation argmax, recomputed here with edits built independently of the audit's code; the
steering comparison of results.json is the statistics of the stored trials; resume; one-line errors."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest

from conftest import make_tiny
from locaudit.audit import AuditConfig, audit
from locaudit.audit.claims import HEURISTICS, claim_kind, parse_heuristic, resolve_claim
from locaudit.errors import LocauditError
from locaudit.heuristics import MeanDiffSteering, attribution_patching, layer_sweep
from locaudit.interventions import ITI, load_intervention
from locaudit.probes import probe_task
from locaudit.stats import null_test
from locaudit.tasks import load_task
from locaudit.units import parse_units
from test_audit import FAST, write_pairs


def heuristic_json(out):
    return json.loads((out / "heuristic" / "heuristic.json").read_text())


def test_attribution_claims_are_the_heuristics_top_k(tmp_path):
    lm = make_tiny("qwen2")
    task = load_task(write_pairs(tmp_path / "p.jsonl"))
    split = task.split(0)
    cfg = AuditConfig()
    zero = attribution_patching(lm, task, split.train, baseline="zero", batch_size=8)
    mean = attribution_patching(lm, task, split.train, baseline="mean", batch_size=8)
    for spec, kind, k, ref in (("atp-heads:3", "heads", 3, zero), ("atp-neurons:5", "neurons", 5, zero),
                               ("atp-layers:2", "layers", 2, mean)):
        out = tmp_path / spec.replace(":", "_")
        claim = resolve_claim(spec, lm, task, split, cfg, out)
        top = ref.top(kind, k)
        assert claim.units.kind == kind and claim.units.names == parse_units(top, lm.arch).names
        assert claim.heuristic == {"spec": spec, "name": spec.split(":")[0], "k": k, "kind": kind,
                                   "what": HEURISTICS[spec.split(":")[0]].help, "files": "heuristic"}
        stored = heuristic_json(out)
        assert [u["unit"] for u in stored["top"]] == top  # best first, as the heuristic ranks them
        effects = ref.effects(kind)
        for u in stored["top"]:
            (l, i), = parse_units(u["unit"], lm.arch).pairs()
            assert u["score"] == pytest.approx(float(effects[l, i]), rel=1e-6, abs=1e-9)
        # the claim's units have the largest |E[delta m]| of their kind
        assert min(abs(u["score"]) for u in stored["top"]) >= np.sort(np.abs(effects).ravel())[-k] - 1e-9
        assert stored["baseline"] == ("mean" if kind == "layers" else "zero") and stored["n_pairs"] == ref.n_pairs
        for name in ("heads", "neurons", "layers"):
            np.testing.assert_allclose(np.load(out / "heuristic" / f"{name}.npy"), getattr(ref, name), rtol=1e-6,
                                       atol=1e-9)


def test_sweep_claim_is_the_best_steering_layer(tmp_path):
    lm = make_tiny("llama")
    task = load_task(write_pairs(tmp_path / "p.jsonl"))
    split = task.split(0)
    cfg = AuditConfig(meandiff_alphas=(1.0, 16.0), max_val_items=6)
    val = split.val[:6]
    sweeps = [layer_sweep(lm, task, split.train, val, alpha) for alpha in cfg.meandiff_alphas]
    values = np.stack([s.values for s in sweeps])
    assert np.ptp(values) > 0  # the sweep tells layers apart on this task
    # the best (multiplier, layer): highest statistic, ties to the smaller multiplier, then the lower layer
    best = max(((j, l) for j in range(2) for l in range(3)), key=lambda jl: (values[jl], -jl[0], -jl[1]))
    claim = resolve_claim("sweep", lm, task, split, cfg, tmp_path / "o")
    assert claim.units.kind == "layers" and claim.units.names == [f"L{best[1]}"]
    stored = heuristic_json(tmp_path / "o")
    assert stored["alpha"] == cfg.meandiff_alphas[best[0]] and stored["layers"] == [0, 1, 2]
    np.testing.assert_allclose(np.load(tmp_path / "o" / "heuristic" / "values.npy"), values, atol=1e-12)
    assert stored["base"] == pytest.approx(sweeps[0].base) and set(claim.vectors) == {"residual"}


def argmax_alpha(alphas, values):
    """choose_alpha's rule, by hand: the highest value, ties to the smaller |alpha|, then the earlier."""
    return alphas[min(range(len(alphas)), key=lambda j: (-values[j], abs(alphas[j]), j))]


@pytest.mark.parametrize("spec", ["L0H1,L2H3", "L1N3,L2N40"])
def test_steering_arms_take_the_validation_argmax(spec, tmp_path):
    lm = make_tiny("gpt2")
    data = write_pairs(tmp_path / "p.jsonl")
    cfg = AuditConfig(n_random=2, fit=FAST, alphas=(2.0, 8.0, 32.0), meandiff_alphas=(1.0, 8.0, 64.0))
    res = audit(spec, data, tmp_path / "o", cfg, lm=lm, progress=False)
    task = load_task(data)
    split = task.split(0)
    val, test = split.val, split.test

    def stat(edit, items):
        return float(task.statistic(task.evaluate(lm, edit, items)))

    steer = [r for r in res.rows if r["kind"] in ("claim-steer", "random-steer")]
    assert [r["arm"] for r in steer] == ["claim-steer", "random-00-steer", "random-01-steer"]
    heads = spec.startswith("L0H")
    probes = probe_task(lm, task, split, progress=False) if heads else None
    for r in steer:
        trial = json.loads((tmp_path / "o" / "trials" / r["arm"] / "steer.json").read_text())
        choice = trial["alpha_choice"]
        assert trial["steering"] == ("iti" if heads else "meandiff")
        assert choice["alphas"] == ([2.0, 8.0, 32.0] if heads else [1.0, 8.0, 64.0])
        assert trial["alpha"] == r["alpha"] == argmax_alpha(choice["alphas"], choice["values"])
        assert choice["base"] == pytest.approx(stat(None, val))
        # each alpha's validation statistic, with the edit built here from the heuristic's own pieces
        units = parse_units(r["units"], lm.arch)
        for alpha, value in zip(choice["alphas"], choice["values"]):
            edit = (ITI.from_probes(units.members, probes, alpha) if heads else
                    MeanDiffSteering.at_units(lm, task, split.train, r["units"], alpha))
            assert value == pytest.approx(stat(edit, val), abs=1e-9)
        # the stored edit, loaded back through load_intervention, is the chosen one and gives the test value
        edit = load_intervention(tmp_path / "o" / trial["edit_dir"], lm.arch)
        assert isinstance(edit, ITI if heads else MeanDiffSteering) and edit.alpha == r["alpha"]
        assert r["value"] == pytest.approx(stat(edit, test), abs=1e-9)
    stored = json.loads((tmp_path / "o" / "results.json").read_text())
    cmp = stored["steering"]
    ref = null_test(res.row("claim-steer")["value"], [r["value"] for r in steer[1:]])
    assert cmp["heuristic"] == ("iti" if heads else "meandiff") and cmp["strength"] == res.steering.strength
    assert cmp["null"]["n_random"] == 2 and cmp["null"]["percentile"] == pytest.approx(ref.percentile)
    assert cmp["null"]["p_rank"] == pytest.approx(ref.p_rank)
    base, full = res.row("none")["value"], res.row("full")["value"]
    point = (res.row("claim-steer")["value"] - base) / (full - base) if abs(full - base) > 1e-12 else None
    assert cmp["frac_full"]["point"] == (None if point is None else pytest.approx(point))
    assert cmp["verdict"] in (tmp_path / "o" / "report.md").read_text()
    assert (tmp_path / "o" / "figures" / "null_steer.png").is_file()
    csv_rows = (tmp_path / "o" / "results.csv").read_text().splitlines()
    assert csv_rows[0].split(",")[4] == "alpha" and csv_rows[-1].split(",")[4] == f"{steer[-1]['alpha']:g}"


def test_resume_with_steering_arms_and_a_heuristic_claim(tmp_path):
    lm = make_tiny("llama")
    data = write_pairs(tmp_path / "p.jsonl")
    cfg = AuditConfig(n_random=2, fit=FAST, meandiff_alphas=(1.0, 8.0))
    first = audit("atp-layers:1", data, tmp_path / "a", cfg, lm=lm, progress=False)
    assert first.heuristic["spec"] == "atp-layers:1"
    assert json.loads((tmp_path / "a" / "audit.json").read_text())["heuristic"] == first.heuristic
    # written before `packing` and `fit.retry_flat` existed, the heuristic keyed by the whole record as it was
    # then: the audit and its stored heuristic still match
    path = tmp_path / "a" / "audit.json"
    rec = json.loads(path.read_text())
    del rec["config"]["packing"], rec["config"]["fit"]["retry_flat"]
    path.write_text(json.dumps(rec))
    hpath = tmp_path / "a" / "heuristic" / "heuristic.json"
    h = json.loads(hpath.read_text())
    assert set(h["key"]["config"]) == {"seed", "limit_items", "max_val_items", "batch_size", "meandiff_alphas"}
    h["key"] = {k: v for k, v in rec.items() if k != "claim"}
    hpath.write_text(json.dumps(h))
    stored = sorted((tmp_path / "a").glob("trials/*/*.json")) + [tmp_path / "a" / "heuristic" / "heuristic.json"]
    stamps = {p: p.stat().st_mtime_ns for p in stored}
    for arm in ("claim-steer", "random-01-steer"):  # an interrupted audit: two steering trials missing
        (tmp_path / "a" / "trials" / arm / "steer.json").unlink()
    again = audit("atp-layers:1", data, tmp_path / "a", cfg, lm=lm, progress=False)
    assert again.rows == first.rows and again.steering.as_dict() == first.steering.as_dict()
    kept = {p: t for p, t in stamps.items() if "-steer" not in str(p) or "random-00" in str(p)}
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the heuristic and every stored trial read back
    with pytest.raises(LocauditError, match="different settings"):
        audit("atp-layers:1", data, tmp_path / "a", AuditConfig(n_random=2, fit=FAST, seed=1), lm=lm, progress=False)
    assert (tmp_path / "a" / "heuristic" / "heuristic.json").stat().st_mtime_ns == stamps[stored[-1]]
    off = audit("atp-layers:1", data, tmp_path / "b", AuditConfig(n_random=2, fit=FAST, steering=False), lm=lm,
                progress=False)
    assert off.steering is None and [r["value"] for r in off.rows] == [r["value"] for r in first.rows[:5]]
    # a heuristic depends on a few settings only (`heuristic_key`): an audit with other fit settings given a copy
    # of heuristic/ reads it back; one with another seed (another split) computes its own
    for name, fit, seed, reused in (("c", replace(FAST, max_steps=4), 0, True), ("d", FAST, 1, False)):
        shutil.copytree(tmp_path / "a" / "heuristic", tmp_path / name / "heuristic")
        copied = tmp_path / name / "heuristic" / "heuristic.json"
        before = copied.read_bytes()
        other = audit("atp-layers:1", data, tmp_path / name, replace(cfg, n_random=1, fit=fit, seed=seed,
                                                                     steering=False), lm=lm, progress=False)
        assert (copied.read_bytes() == before) is reused
        assert other.claim == first.claim or not reused


def test_bad_heuristic_specs_fail_in_one_line(tmp_path, capsys):
    lm = make_tiny("llama")  # 3 layers, 4 heads, 64 neurons a layer
    for spec, msg in (("atp-mlp:3", "unknown claim heuristic 'atp-mlp' in 'atp-mlp:3'; use one of probe:K, "
                                    "atp-heads:K, atp-neurons:K, atp-layers:K, sweep"),
                      ("sweeep", "unknown claim heuristic 'sweeep'"),
                      ("probe", "give probe:K with K a number of heads"),
                      ("atp-heads:x", "give atp-heads:K"), ("atp-heads:0", "give atp-heads:K"),
                      ("atp-neurons:-2", "give atp-neurons:K"), ("sweep:1", "sweep takes no K")):
        with pytest.raises(LocauditError) as e:
            parse_heuristic(spec)
        assert msg in str(e.value) and "\n" not in str(e.value)
    assert parse_heuristic("L1H0,L2H1") is None and parse_heuristic(" ATP-Layers:2 ")[1] == 2
    assert [claim_kind(s) for s in ("probe:2", "atp-neurons:7", "sweep", "L1A", "L2N3")] == \
        ["heads", "neurons", "layers", "heads", "neurons"]
    task = load_task(write_pairs(tmp_path / "p.jsonl"))
    split = task.split(0)
    for spec, n in (("probe:13", 12), ("atp-heads:13", 12), ("atp-neurons:193", 192), ("atp-layers:4", 3)):
        with pytest.raises(LocauditError, match=f"K a number of .* from 1 to {n}") as e:
            resolve_claim(spec, lm, task, split, AuditConfig(), tmp_path / "o")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()  # refused before anything ran or was written
    from locaudit.cli import main

    assert main(["audit", "--heads", "atp-neurons:4", "--task", str(tmp_path / "p.jsonl"), "--preset", "smoke",
                 "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "--heads atp-neurons:4 names neurons, not attention heads; give it with --units" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "never").exists()


def test_steering_grids_are_checked():
    for kw in ({"alphas": ()}, {"meandiff_alphas": (1.0, math.inf)}, {"alphas": ("5",)}):
        with pytest.raises(LocauditError, match="non-empty list of finite numbers"):
            AuditConfig(**kw)
    assert AuditConfig.from_preset("smoke").alphas == (15.0,)  # ITI's grid is the preset's
    assert AuditConfig.from_preset("smoke", steering=False).steering is False


def test_steering_strength_follows_the_null_and_needs_a_measurable_move(tmp_path):
    from locaudit.audit.verdict import _steering_verdict

    task = load_task(write_pairs(tmp_path / "p.jsonl"))

    def row(value, moved):
        return {"value": value, "alpha": 2.0, "ci": [value - 0.1, value + 0.1],
                "gain_ci": [0.05, 0.3] if moved else [-0.1, 0.1]}

    def strength(claim, randoms):
        null = null_test(claim["value"], [r["value"] for r in randoms])
        return _steering_verdict(task, "ITI", claim, randoms, None, 0.5, null, (math.nan,) * 3, [])

    still = [row(0.5, False) for _ in range(19)]
    assert strength(row(0.9, True), still)[0] == "singled-out"  # above all 19 random sets: rank p = 0.05
    assert strength(row(0.9, True), still[:3])[0] == "weak"  # 3 sets cannot give rank p <= 0.05
    assert strength(row(0.5, False), [row(0.9, True)] + still[1:])[0] == "none"
    label, text = strength(row(0.52, False), still)
    assert label == "uninformative" and "moves the behaviour measurably neither at the claim nor" in text
    assert strength(row(0.9, True), [])[0] == "inconclusive"
