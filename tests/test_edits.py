"""Optimal-edit machinery on tiny random models: locality, identity at init, merge == hook, the IPO loss,
frozen base weights, and that fitting a learnable toy preference set works."""

from __future__ import annotations

import math

import pytest
import torch

from locaudit.data.examples import PreferencePair
from locaudit.heads import parse_heads
from locaudit.interventions import FullRank1, LocalizedRank1, load_intervention
from locaudit.training import FitConfig, fit, margin, preference_loss
from tests.conftest import make_tiny


def logits(lm, text="Q: is the sky blue?\nA: yes it is"):
    ids = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return lm.model(**ids).logits


def randomise(edit, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in edit.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return edit


def test_identity_at_init(tiny):
    base = logits(tiny)
    for edit in (LocalizedRank1(parse_heads("L0H1,L2H3", 3, 4), tiny.arch), FullRank1(tiny.arch)):
        with edit.attach(tiny):
            assert torch.equal(logits(tiny), base)


def test_locality_single_head(tiny):
    """With S = {L1H2}, the residual change at layer 1 lies in the span of W^1 restricted to head 2."""
    arch = tiny.arch
    edit = randomise(LocalizedRank1(parse_heads("L1H2", 3, 4), arch))
    proj = arch.out_proj(1)
    captured = {}
    h = proj.register_forward_hook(lambda m, a, o: captured.setdefault("out", []).append(o.detach().clone()))
    logits(tiny)
    with edit.attach(tiny):
        logits(tiny)
    h.remove()
    base_out, edited_out = captured["out"]
    # only layer 1's own change is compared: recompute the unedited projection of the edited input
    delta = edited_out - proj(_input_of(tiny, edit, 1))
    W_h = arch.W(1)[:, arch.head_slice(2)]
    coef = torch.linalg.lstsq(W_h, delta.reshape(-1, arch.d_model).t()).solution
    resid = delta.reshape(-1, arch.d_model).t() - W_h @ coef
    assert delta.abs().max() > 1e-3
    assert resid.abs().max() < 1e-4 * max(1.0, float(delta.abs().max()))
    b = edit.b(1).view(arch.n_heads, arch.head_dim)
    assert torch.count_nonzero(b[[0, 1, 3]]) == 0 and torch.count_nonzero(b[2]) > 0


def _input_of(lm, edit, layer):
    seen = {}
    h = lm.arch.out_proj(layer).register_forward_pre_hook(lambda m, a: seen.setdefault("o", a[0].detach().clone()))
    with edit.attach(lm):
        logits(lm)
    h.remove()
    return seen["o"]


def test_merge_equals_hook_and_roundtrip(tiny, tmp_path):
    for n, edit in enumerate((randomise(LocalizedRank1(parse_heads("L0H1,L2H3,L2H0", 3, 4), tiny.arch), 1),
                              randomise(FullRank1(tiny.arch), 2), randomise(FullRank1(tiny.arch, layers=[0, 2]), 3))):
        fresh = make_tiny(tiny.arch.model_type)
        with edit.attach(fresh):
            hooked = logits(fresh)
        edit.save(tmp_path / f"{edit.kind}{n}")
        loaded = load_intervention(tmp_path / f"{edit.kind}{n}", fresh.arch)
        assert loaded.layers == edit.layers
        with loaded.attach(fresh):
            assert torch.allclose(logits(fresh), hooked, atol=1e-5)
        loaded.merge(fresh)
        assert torch.allclose(logits(fresh), hooked, atol=1e-3, rtol=1e-3)
        fresh.model.save_pretrained(tmp_path / f"merged-{edit.kind}{n}")
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"merged-{edit.kind}{n}", attn_implementation="eager")
        ids = fresh.tokenizer("Q: is the sky blue?\nA: yes it is", return_tensors="pt")
        with torch.no_grad():
            assert torch.allclose(reloaded(**ids).logits, hooked, atol=1e-3, rtol=1e-3)


def test_ipo_loss_by_hand():
    lp_c, n_c, lp_r, n_r = torch.tensor([-4.0]), torch.tensor([2.0]), torch.tensor([-9.0]), torch.tensor([3.0])
    ref_c, ref_r = torch.tensor([-5.0]), torch.tensor([-6.0])
    tau = 0.25
    h_avg = margin(lp_c, n_c, lp_r, n_r, ref_c, ref_r, average=True)
    assert math.isclose(float(h_avg), (1.0 / 2) - (-3.0 / 3))  # 0.5 + 1 = 1.5
    assert math.isclose(float(preference_loss(h_avg, "ipo", tau)), (1.5 - 2.0) ** 2)
    h_sum = margin(lp_c, n_c, lp_r, n_r, ref_c, ref_r, average=False)
    assert math.isclose(float(h_sum), 1.0 - (-3.0))
    assert math.isclose(float(preference_loss(h_sum, "ipo", tau)), (4.0 - 2.0) ** 2)
    assert math.isclose(float(preference_loss(h_sum, "dpo", tau)), -math.log(1 / (1 + math.exp(-tau * 4.0))), rel_tol=1e-6)


def toy_pairs(n, offset=0):
    """A learnable preference: prefer answers that say 'yes' over ones that say 'no'."""
    qs = [f"Is item {i + offset} good?" for i in range(n)]
    return [PreferencePair(i, q, "yes indeed.", "no way.") for i, q in enumerate(qs)]


def test_fit_learns_toy_preferences_and_keeps_base_frozen(tiny_llama):
    lm = tiny_llama
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    edit = LocalizedRank1(parse_heads("L1H0,L2H1", 3, 4), lm.arch)
    cfg = FitConfig(tau=0.5, epochs=4, batch_size=4, lr=1e-1, fmt="plain")
    r = fit(lm, edit, toy_pairs(16), toy_pairs(8, 100), cfg, progress=False)
    evals = [h for h in r.history if "val_loss" in h]
    assert evals[0]["val_pref_acc"] == 0.5  # identity at init: every pair is a tie
    assert r.best["val_loss"] < 0.5 * evals[0]["val_loss"]
    assert r.best["val_pref_acc"] == 1.0
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical base weights
    for l in edit.layers:  # b stays exactly zero outside S
        b = edit.b(l).view(4, -1)
        outside = [h for h in range(4) if h not in edit.head_idx[l]]
        assert torch.count_nonzero(b[outside]) == 0


def test_fit_full_lora(tiny_llama):
    edit = FullRank1(tiny_llama.arch)
    r = fit(tiny_llama, edit, toy_pairs(16), toy_pairs(8, 100), FitConfig(tau=0.5, epochs=2, lr=2e-2, fmt="plain"), progress=False)
    assert r.best["val_loss"] < [h for h in r.history if "val_loss" in h][0]["val_loss"]


def test_bad_fit_config():
    from locaudit.errors import LocauditError

    for kw in ({"tau": 0}, {"tau": -1}, {"objective": "kto"}, {"epochs": 0}, {"lr": -1.0}, {"batch_size": 0}):
        with pytest.raises(LocauditError):
            FitConfig(**kw)


def test_identity_start_is_exact_and_order_option(tiny_llama):
    """The analytic start row of a fit equals evaluating the identity edit; shuffle=False keeps input order."""
    from locaudit.data.formats import PromptFormat
    from locaudit.training import encode_pairs, evaluate_pairs, identity_eval, reference_logprobs

    lm = tiny_llama
    cfg = FitConfig(tau=0.5, epochs=1, batch_size=4, lr=1e-1, fmt="plain", shuffle=False)
    enc = encode_pairs(lm, toy_pairs(8, 100), PromptFormat("plain"))
    ref = reference_logprobs(lm, enc, progress=False)
    for edit in (LocalizedRank1(parse_heads("L1H0", 3, 4), lm.arch), FullRank1(lm.arch, layers=[1])):
        assert edit.is_identity()
        measured = evaluate_pairs(lm, edit, enc, ref, cfg)
        assert measured["loss"] == pytest.approx(identity_eval(cfg)["loss"], abs=1e-4)
        assert measured["pref_acc"] == identity_eval(cfg)["pref_acc"] == 0.5
    seen = []
    from locaudit import training

    real = training._pair_forward
    try:
        training._pair_forward = lambda lm_, enc_, ref_, idx, *a, **k: seen.append(list(idx)) or real(lm_, enc_, ref_, idx, *a, **k)
        fit(lm, LocalizedRank1(parse_heads("L1H0", 3, 4), lm.arch), toy_pairs(10), toy_pairs(4, 100), cfg, progress=False)
    finally:
        training._pair_forward = real
    assert seen[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # training batches in input order
