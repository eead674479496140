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

from conftest import FAMILIES, byte_tokenizer, make_tiny
from locaudit.audit import AuditConfig, audit, plan
from locaudit.errors import LocauditError
from locaudit.heads import parse_heads
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


def test_plan_draws_distinct_sets_of_the_claims_size():
    claim = parse_heads("L0H1,L2H3")
    arms = plan(claim, 3, 4, AuditConfig(n_random=5))
    assert [a.kind for a in arms] == ["none", "claim"] + ["random"] * 5 + ["full"]
    sets = [tuple(a.heads.heads) for a in arms if a.kind == "random"]
    assert len(set(sets)) == 5 and tuple(claim.heads) not in sets
    assert all(len(s) == 2 for s in sets)
    assert [a.heads for a in plan(claim, 3, 4, AuditConfig(n_random=5))] == [a.heads for a in arms]  # seeded
    matched = plan(claim, 3, 4, AuditConfig(n_random=5, match_layers=True))
    for a in matched[2:-1]:
        assert sorted(a.heads.by_layer()) == [0, 2] and all(len(v) == 1 for v in a.heads.by_layer().values())


def test_plan_refuses_more_random_sets_than_exist():
    with pytest.raises(LocauditError, match="cannot draw 3 distinct random sets"):
        plan(parse_heads("L0H0"), 1, 3, AuditConfig(n_random=3))


@pytest.mark.parametrize("family", FAMILIES)
def test_audit_runs_on_every_family(family, tmp_path):
    lm = make_tiny(family)
    res = audit("L0H1,L2H3", write_pairs(tmp_path / "p.jsonl"), tmp_path / "out", AuditConfig(n_random=2, fit=FAST),
                lm=lm, progress=False)
    assert [r["arm"] for r in res.rows] == ["none", "claim", "random-00", "random-01", "full"]
    assert all(0.0 <= r["value"] <= 1.0 for r in res.rows)
    assert res.n_test == 8 and res.n_val == 8
    for name in ("results.json", "results.csv", "report.md", "report.html", "figures/null.png"):
        assert (tmp_path / "out" / name).is_file()


def test_statistics_are_those_of_the_stored_scores(tmp_path):
    lm = make_tiny("llama")
    res = audit("L1H0,L2H1", write_pairs(tmp_path / "p.jsonl"), tmp_path / "out",
                AuditConfig(n_random=4, fit=FitConfig(max_steps=16, eval_every=4, patience=2, batch_size=4, lr=0.05)),
                lm=lm, progress=False)
    value = {}
    for r in res.rows:
        name = "eval.json" if r["kind"] == "none" else "tau0.1.json"
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
    V = len(tok)
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=48, intermediate_size=32, num_hidden_layers=1, num_attention_heads=24,
                      num_key_value_heads=24, max_position_embeddings=512, vocab_size=V, bos_token_id=V - 3,
                      eos_token_id=V - 2, pad_token_id=V - 1)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
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


def test_spread_behaviour_is_not_singled_out(tmp_path):
    res = audit("L0H5", write_pairs(tmp_path / "p.jsonl", n=60), tmp_path / "o", PLANTED, lm=planted(None),
                progress=False)
    randoms = [r["value"] for r in res.rows if r["kind"] == "random" and r["status"] != "stuck"]
    assert len(randoms) >= 15
    assert np.median(randoms) > res.row("none")["value"] + 0.3  # random heads move the behaviour too
    assert res.null.p_rank > 0.05 and res.strength != "singled-out"


def test_probe_claim_is_the_top_heads_of_task_probes(tmp_path):
    from locaudit.audit.run import resolve_claim
    from locaudit.probes import probe_task
    from locaudit.tasks import load_task

    lm = make_tiny("gpt2")
    task = load_task(write_pairs(tmp_path / "p.jsonl"))
    split = task.split(0)
    claim = resolve_claim("probe:3", lm, task, split, AuditConfig(), tmp_path / "o")
    ref = probe_task(lm, task, split, progress=False)
    assert list(claim.heads) == list(ref.top(3).heads)
    order = np.argsort(-ref.val_acc.reshape(-1), kind="stable")[:3]
    assert sorted((h.layer * lm.arch.n_heads + h.head) for h in claim.heads) == sorted(order.tolist()) or \
        min(ref.val_acc[h.layer, h.head] for h in claim.heads) >= np.sort(ref.val_acc.reshape(-1))[-3]
    assert (tmp_path / "o" / "probes" / "probes.npz").is_file()
    for bad in ("probe:0", "probe:x", f"probe:{lm.arch.n_total_heads + 1}"):
        with pytest.raises(LocauditError, match="probe:K"):
            resolve_claim(bad, lm, task, split, AuditConfig())
