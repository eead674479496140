"""The audit of one claim: its plan, resumable trials, statistics by hand, and planted localizations.

Planted models: a one-layer Llama with 24 heads whose MLP writes nothing, so the preference between the answers
" a" and " b" is read off the residual stream along one direction d = gamma * (U_a - U_b) (final RMSNorm gain
times the unembedding difference). The logit difference is d . r / rms(r), so an edit that writes only
orthogonally to d can rescale it but never flip its sign. In the *localized* model every head but h* has its
columns of W (the attention output projection) projected off d: only the edit at h* can change which answer the
model prefers. In the *spread* model no head is touched: every head can write along d.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FAMILIES, byte_tokenizer, make_tiny, random_llama
from locaudit.audit import AuditConfig, audit, plan
from locaudit.errors import LocauditError
from locaudit.units import parse_units
from locaudit.models import wrap_model
from locaudit.stats import null_test
from locaudit.training import FitConfig

FAST = FitConfig(max_steps=8, eval_every=4, patience=2, batch_size=4)


def write_pairs(path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"prompt": "".join(rng.choice(list("qwrtyuiopsdfghjklzxcvnm"), 6)) + ":", "chosen": " a", "rejected": " b"}
            for _ in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("spec,n", [("L0H1,L2H3", 3), ("L0N5,L2N60", 3), ("L1", 2)])
def test_plan_draws_distinct_sets_of_the_claims_kind_and_size(spec, n):
    arch = make_tiny("llama").arch
    claim = parse_units(spec, arch)
    arms = plan(claim, arch, AuditConfig(n_random=n))
    assert [a.kind for a in arms] == (["none", "claim"] + ["random"] * n + ["full", "claim-steer"]
                                      + ["random-steer"] * n)
    sets = [tuple(a.units.names) for a in arms if a.kind == "random"]
    assert len(set(sets)) == n and tuple(claim.names) not in sets
    assert all(len(s) == len(claim) for s in sets) and all(a.units.kind == claim.kind for a in arms[2:2 + n])
    # the steering heuristic runs at exactly the claim and the random sets of the optimal edit
    assert {a.name[:-len("-steer")]: a.units for a in arms if a.steers} == {a.name: a.units for a in arms[1:2 + n]}
    assert [a.units for a in plan(claim, arch, AuditConfig(n_random=n))] == [a.units for a in arms]  # seeded
    unsteered = plan(claim, arch, AuditConfig(n_random=n, steering=False))
    assert [a.kind for a in unsteered] == [a.kind for a in arms[:3 + n]]
    if claim.kind != "layers":
        matched = plan(claim, arch, AuditConfig(n_random=3, match_layers=True))
        for a in matched[2:5]:
            assert sorted(a.units.by_layer()) == [0, 2] and all(len(v) == 1 for v in a.units.by_layer().values())


def test_plan_refuses_more_random_sets_than_exist():
    arch = make_tiny("llama").arch
    with pytest.raises(LocauditError, match="cannot draw 3 distinct random sets"):
        plan(parse_units("L0,L1", arch), arch, AuditConfig(n_random=3))


@pytest.mark.parametrize("family", FAMILIES)
def test_audit_runs_on_every_family(family, tmp_path):
    lm = make_tiny(family)
    res = audit("L0H1,L2H3", write_pairs(tmp_path / "p.jsonl"), tmp_path / "out", AuditConfig(n_random=2, fit=FAST),
                lm=lm, progress=False)
    assert [r["arm"] for r in res.rows] == ["none", "claim", "random-00", "random-01", "full", "claim-steer",
                                            "random-00-steer", "random-01-steer"]
    assert all(0.0 <= r["value"] <= 1.0 for r in res.rows)
    assert {r["steering"] for r in res.rows if r["kind"].endswith("steer")} == {"iti"}
    assert res.n_test == 8 and res.n_val == 8
    for name in ("results.json", "results.csv", "report.md", "report.html", "figures/null.png",
                 "figures/null_steer.png"):
        assert (tmp_path / "out" / name).is_file()


def test_statistics_are_those_of_the_stored_scores(tmp_path):
    lm = make_tiny("llama")
    res = audit("L1H0,L2H1", write_pairs(tmp_path / "p.jsonl"), tmp_path / "out",
                AuditConfig(n_random=4, fit=FitConfig(max_steps=16, eval_every=4, patience=2, batch_size=4, lr=0.05)),
                lm=lm, progress=False)
    value = {}
    for r in res.rows:
        name = {"none": "eval.json", "claim-steer": "steer.json", "random-steer": "steer.json"}.get(r["kind"], "tau0.1.json")
        t = json.loads((tmp_path / "out" / "trials" / r["arm"] / name).read_text())
        value[r["arm"]] = float(np.mean(t["test"]["scores"]["pref_acc"]))  # the statistic: mean per-item pref_acc
        assert r["value"] == pytest.approx(value[r["arm"]], abs=1e-12)
    live = [r["value"] for r in res.rows if r["kind"] == "random" and r["status"] != "stuck"]
    ref = null_test(value["claim"], live)
    assert res.null.percentile == pytest.approx(ref.percentile) and res.null.p_rank == pytest.approx(ref.p_rank)
    gain_full = value["full"] - value["none"]
    if abs(gain_full) > 1e-12:
        assert res.frac_full[0] == pytest.approx((value["claim"] - value["none"]) / gain_full)
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    assert stored["strength"] == res.strength and stored["null"]["n_random"] == len(live)


def test_audit_resumes_and_repeats(tmp_path):
    lm = make_tiny("qwen2")
    data = write_pairs(tmp_path / "p.jsonl")
    cfg = AuditConfig(n_random=2, fit=FAST)
    first = audit("L0H1", data, tmp_path / "a", cfg, lm=lm, progress=False)
    trials = sorted((tmp_path / "a" / "trials").glob("*/*.json"))
    stamps = [p.stat().st_mtime_ns for p in trials]
    again = audit("L0H1", data, tmp_path / "a", cfg, lm=lm, progress=False)  # every trial stored: nothing recomputed
    assert [p.stat().st_mtime_ns for p in trials] == stamps
    assert again.rows == first.rows
    (tmp_path / "a" / "trials" / "random-01" / "tau0.1.json").unlink()  # an interrupted audit: one trial missing
    resumed = audit("L0H1", data, tmp_path / "a", cfg, lm=lm, progress=False)
    assert [r["value"] for r in resumed.rows] == [r["value"] for r in first.rows]  # same seed, same result
    fresh = audit("L0H1", data, tmp_path / "b", cfg, lm=lm, progress=False)
    assert [r["value"] for r in fresh.rows] == [r["value"] for r in first.rows]
    with pytest.raises(LocauditError, match="different settings"):
        audit("L0H1", data, tmp_path / "a", AuditConfig(n_random=3, fit=FAST), lm=lm, progress=False)


def test_audit_rejects_bad_claims_in_one_line(tmp_path):
    lm = make_tiny("llama")
    with pytest.raises(LocauditError, match="L7H0"):
        audit("L7H0", write_pairs(tmp_path / "p.jsonl"), tmp_path / "o", AuditConfig(n_random=1, fit=FAST), lm=lm,
              progress=False)


def planted(star: int | None, seed: int = 0):
    """The planted models of the module docstring: only head `star` can move the preference (None: every head)."""
    tok = byte_tokenizer()
    m = random_llama(1, 48, 24, 32, seed, len(tok))
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.zero_()
        a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
        d = m.model.norm.weight * (m.lm_head.weight[a] - m.lm_head.weight[b])
        d = d / d.norm()
        W = m.model.layers[0].self_attn.o_proj.weight  # (d_model, heads * head_dim)
        P = torch.eye(48) - torch.outer(d, d)
        if star is not None:
            for h in range(24):
                if h != star:
                    W[:, 2 * h:2 * h + 2] = P @ W[:, 2 * h:2 * h + 2]
            assert (d @ W).reshape(24, 2).abs().sum(1).argmax() == star
    return wrap_model(m, tok, f"planted-{star}-{seed}")


PLANTED = AuditConfig(n_random=21, match_layers=True,
                      fit=FitConfig(max_steps=24, eval_every=4, patience=2, batch_size=8, lr=0.05))


def test_planted_single_head_is_singled_out(tmp_path):
    res = audit("L0H5", write_pairs(tmp_path / "p.jsonl", n=60), tmp_path / "o", PLANTED, lm=planted(5),
                progress=False)
    randoms = [r for r in res.rows if r["kind"] == "random"]
    assert res.row("claim")["value"] > max(r["value"] for r in randoms)
    # no random head can flip a preference: each keeps the unedited model's preference accuracy
    assert all(r["value"] == pytest.approx(res.row("none")["value"]) for r in randoms)
    assert res.null.percentile == 100.0 and res.null.p_rank < 0.05
    assert res.strength == "singled-out"
    assert res.frac_full[0] > 0.8
    # ITI at h* flips the preference and ITI at no other head can: the steering heuristic singles it out too
    steer = [r["value"] for r in res.rows if r["kind"] == "random-steer"]
    assert res.row("claim-steer")["value"] > max(steer) and res.steering.strength == "singled-out"


def test_spread_behaviour_is_not_singled_out(tmp_path):
    res = audit("L0H5", write_pairs(tmp_path / "p.jsonl", n=60), tmp_path / "o", PLANTED, lm=planted(None),
                progress=False)
    randoms = [r["value"] for r in res.rows if r["kind"] == "random" and r["status"] != "stuck"]
    assert len(randoms) >= 15
    assert np.median(randoms) > res.row("none")["value"] + 0.3  # random heads move the behaviour too
    assert res.null.p_rank > 0.05 and res.strength != "singled-out"
    assert max(r["value"] for r in res.rows if r["kind"] == "random-steer") >= res.row("claim-steer")["value"]
    assert res.steering.null.p_rank > 0.05 and res.steering.strength != "singled-out"  # ITI at random heads works too


def test_probe_claim_is_the_top_heads_of_task_probes(tmp_path):
    from locaudit.audit.claims import resolve_claim
    from locaudit.probes import probe_task
    from locaudit.tasks import load_task

    lm = make_tiny("gpt2")
    task = load_task(write_pairs(tmp_path / "p.jsonl"))
    split = task.split(0)
    resolved = resolve_claim("probe:3", lm, task, split, AuditConfig(), tmp_path / "o")
    claim = resolved.units
    ref = probe_task(lm, task, split, progress=False)
    assert claim.kind == "heads" and claim.names == ref.top(3).names
    assert min(ref.val_acc[l, h] for l, h in claim.pairs()) >= np.sort(ref.val_acc.reshape(-1))[-3]
    assert (tmp_path / "o" / "heuristic" / "probes.npz").is_file()
    assert np.array_equal(np.load(tmp_path / "o" / "heuristic" / "val_acc.npy"), ref.val_acc)
    assert resolved.heuristic["spec"] == "probe:3" and np.array_equal(resolved.probes.directions, ref.directions)
    for bad in ("probe:0", "probe:x", f"probe:{lm.arch.n_total_heads + 1}"):
        with pytest.raises(LocauditError, match="probe:K"):
            resolve_claim(bad, lm, task, split, AuditConfig())


@pytest.mark.parametrize("spec", ["L1N3,L2N40", "L2"])
def test_audit_of_neuron_and_layer_claims(spec, tmp_path):
    lm = make_tiny("gemma2")
    res = audit(spec, write_pairs(tmp_path / "p.jsonl"), tmp_path / "o", AuditConfig(n_random=2, fit=FAST), lm=lm,
                progress=False)
    assert res.claim == spec.split(",")
    kinds = "neurons" if "N" in spec else "layers"
    for r in res.rows:
        if r["kind"] in ("random", "random-steer"):
            assert len(r["units"]) == len(res.claim) and r["units"] != res.claim
    steering = {r["steering"] for r in res.rows if r["kind"].endswith("steer")}
    assert steering == {"meandiff" if kinds == "neurons" else "caa"}
    stored = json.loads((tmp_path / "o" / "trials" / "claim" / "tau0.1.json").read_text())
    edit = json.loads((tmp_path / "o" / stored["edit_dir"] / "edit.json").read_text())
    assert edit["kind"] == {"neurons": "neurons", "layers": "residual"}[kinds]


def test_cli_audit_on_a_saved_model(tmp_path, capsys):
    from locaudit.cli import main

    lm = make_tiny("llama")
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    data = write_pairs(tmp_path / "p.jsonl")
    out = tmp_path / "audit"
    args = ["audit", "--units", "L1N3,L2N7", "--task", str(data), "--model", str(model_dir), "--device", "cpu",
            "--dtype", "float32", "--preset", "smoke", "--random", "2", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["claim"] == ["L1N3", "L2N7"] and [a["arm"] for a in res["arms"]][:2] == ["none", "claim"]
    assert res["null"]["n_random"] + sum(a["status"] == "stuck" for a in res["arms"] if a["kind"] == "random") == 2
    assert res["verdict"] in capsys.readouterr().out
    assert main(args) == 0  # a rerun reads every stored trial
    assert capsys.readouterr().err.count("(stored)") == 8  # none, claim, 2 random, full, 3 steering arms
    bad = tmp_path / "never"
    for argv, msg in ((["--units", "L1N3,L2H1"], "one kind per claim"), (["--units", "L9N1"], "L9N1"),
                      (["--task", "caa:nope"], "unknown CAA behaviour"),
                      (["--units", "atp-mlp:4"], "unknown claim heuristic 'atp-mlp'"),
                      (["--units", "sweep:2"], "sweep takes no K"),
                      (["--units", "atp-neurons:193"], "K a number of neurons from 1 to 192")):
        a = list(args)
        for k in range(0, len(argv), 2):
            a[a.index(argv[k]) + 1] = argv[k + 1]
        a[a.index("--out") + 1] = str(bad)
        assert main(a) == 2
        err = capsys.readouterr().err
        lines = [l for l in err.replace("\r", "\n").splitlines() if l.startswith("locaudit:")]
        assert len(lines) == 1 and msg in lines[0] and "Traceback" not in err and not bad.exists()


def test_fits_that_never_left_their_plateau_are_not_optimal_edits(tmp_path):
    """A fit that stopped with its best validation loss less than min_delta below its start is "flat": a flat
    random set stays in the null (the planted tests' random heads are flat because they cannot move the
    behaviour), a flat claim gets "inconclusive", a flat full alignment "uninformative" (the audit re-reads its
    stored trials, edited here to make each fit flat)."""
    from locaudit.training import recorded_status as fit_status

    start = {"val_loss": 25.0}
    assert fit_status({"status": "converged", "best": {"val_loss": 24.9}, "val_start": start}, 0.01) == "flat"
    assert fit_status({"status": "step_cap", "best": {"val_loss": 24.7}, "val_start": start}, 0.01) == "step_cap"
    assert fit_status({"status": "stuck", "best": start, "val_start": start}, 0.01) == "stuck"
    assert fit_status({}, 0.01) is None

    lm = make_tiny("llama")
    data = write_pairs(tmp_path / "p.jsonl")
    cfg = AuditConfig(n_random=3, fit=FAST, steering=False)
    out = tmp_path / "a"
    first = audit("L0H1", data, out, cfg, lm=lm, progress=False)
    assert "flat" not in [r["status"] for r in first.rows]
    # FAST's 6-step cap stops every fit while it still improves: the verdict names them
    assert ("Caution: 5 of the fits compared (claim, random-00, random-01, random-02, full) stopped at the step cap"
            in first.verdict)

    def flatten(arm, status="converged"):
        path = out / "trials" / arm / "tau0.1.json"
        r = json.loads(path.read_text())
        r["fit"]["best"] = {**r["fit"]["best"], "val_loss": r["fit"]["val_start"]["val_loss"] * 0.995}
        r["fit"]["status"] = status
        path.write_text(json.dumps(r))

    flatten("random-01")
    res = audit("L0H1", data, out, cfg, lm=lm, progress=False)
    assert res.row("random-01")["status"] == "flat"
    assert res.null.n_random == 3  # a flat random set is a measurement: it stays in the null
    assert "Caution: 4 of the fits compared (claim, random-00, random-02, full) stopped" in res.verdict
    flatten("full")
    res = audit("L0H1", data, out, cfg, lm=lm, progress=False)
    assert res.strength == "uninformative" and "Full alignment's fit is flat" in res.verdict
    flatten("claim")
    res = audit("L0H1", data, out, cfg, lm=lm, progress=False)
    assert res.strength == "inconclusive" and "never left its starting plateau" in res.verdict


def test_an_audit_written_before_a_setting_existed_still_resumes(tmp_path):
    """audit.json (and a stored heuristic's key) from before `packing` and `fit.retry_flat` existed match the same
    audit now."""
    lm = make_tiny("llama")
    data = write_pairs(tmp_path / "p.jsonl")
    cfg = AuditConfig(n_random=1, fit=FAST, steering=False)
    audit("L0H1", data, tmp_path / "a", cfg, lm=lm, progress=False)
    path = tmp_path / "a" / "audit.json"
    rec = json.loads(path.read_text())
    del rec["config"]["packing"]
    del rec["config"]["fit"]["retry_flat"]
    path.write_text(json.dumps(rec))
    audit("L0H1", data, tmp_path / "a", cfg, lm=lm, progress=False)  # no "different settings"
    rec["config"]["n_random"] = 2
    path.write_text(json.dumps(rec))
    with pytest.raises(LocauditError, match="different settings"):
        audit("L0H1", data, tmp_path / "a", cfg, lm=lm, progress=False)
