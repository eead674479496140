"""Packed fits (`locaudit.packed`): K edits trained in one pass give what K separate `training.fit` calls give,
on tiny models of every family; the layers below the pack's lowest edited layer run once per batch; the first
step's loss checked by hand; the retry rule; bad packs refused.

Tolerance: float32 throughout, and the packed and solo paths compute the same sums in another order (one
batched matmul over K blocks instead of K matmuls, a per-block prefix instead of a broadcast one), so each
operation differs by a few ulps (~1e-7 relative), which a few Adam steps carry into the results. Observed over
the five families (4 steps): losses within 17% of rtol 1e-5 + atol 1e-6, so they are asserted at that; parameters
up to 9e-6 relative, on entries whose gradients are near zero (Adam's step lr * m / (sqrt(v) + eps) is most
sensitive there), using up to 60% of that tolerance, so they are asserted at rtol 1e-4 + atol 1e-5; statuses,
steps and best steps exactly.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from locaudit import packed
from locaudit.data.formats import PromptFormat
from locaudit.errors import LocauditError
from locaudit.heads import parse_heads
from locaudit.interventions import ITI, FullRank1, LocalizedRank1
from locaudit.packed import fit_packed, fit_packed_to_optimum, pack, packed_answer_logprobs
from locaudit.scoring import collate, encode, encode_prefix, prefix_kv
from locaudit.training import FitConfig, fit, fit_to_optimum
from tests.test_edits import randomise, toy_pairs

RTOL, ATOL = 1e-5, 1e-6  # losses
P_RTOL, P_ATOL = 1e-4, 1e-5  # parameters
BASE = FitConfig(tau=0.5, batch_size=4, lr=1e-1, fmt="qa", max_steps=4, eval_every=1, patience=50)


def _pack_spec(lm):
    """(edit factory, config) pairs: localized sets of 3 and 1 heads, full rank-1 LoRA at a lower learning rate
    and a shorter step cap, a tau grid of one location, and two fits forced to stop early at different steps
    (min_delta 0.9: a validation must cut the loss by 90% to count, so patience 1 stops at the first
    validation, step 1, and patience 2 at the second, step 2)."""
    a = lm.arch
    loc = lambda heads, seed: (lambda: LocalizedRank1(parse_heads(heads, a.n_layers, a.n_heads), a, seed=seed))  # noqa: E731
    return [
        (loc("L1H0,L2H1,L2H3", 1), BASE),
        (lambda: FullRank1(a, seed=3), replace(BASE, lr=3e-2, max_steps=3)),
        (loc("L1H2", 4), BASE),
        (loc("L1H2", 4), replace(BASE, tau=0.1)),
        (loc("L1H1", 5), replace(BASE, min_delta=0.9, patience=1)),
        (loc("L2H2", 6), replace(BASE, min_delta=0.9, patience=2, tau=0.2)),
    ]


def _close(x, y, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(x, dtype=float), np.asarray(y, dtype=float), rtol=rtol, atol=atol)


def _assert_same(solo, pk):
    assert (pk.status, pk.steps, pk.best["step"]) == (solo.status, solo.steps, solo.best["step"])
    assert [sorted(h) for h in pk.history] == [sorted(h) for h in solo.history]
    assert [h["step"] for h in pk.history] == [h["step"] for h in solo.history]
    for key in ("train_loss", "val_loss", "val_pref_acc", "lr"):
        _close([h[key] for h in pk.history if key in h], [h[key] for h in solo.history if key in h])
    _close(pk.best["val_loss"], solo.best["val_loss"])
    assert pk.config == solo.config and (pk.n_train_pairs, pk.n_val_pairs) == (solo.n_train_pairs, solo.n_val_pairs)
    s, p = solo.edit.state_dict(), pk.edit.state_dict()
    assert s.keys() == p.keys()
    for k in s:
        _close(p[k], s[k], P_RTOL, P_ATOL)


def test_pack_equals_sequential_fits(tiny):
    """Every family, the qa format (shared prefix, Gemma-2's soft-capped path too): parameters, train and
    validation losses, best step, status and steps of each packed fit equal its own `fit`."""
    spec = _pack_spec(tiny)
    train, val = toy_pairs(8, 95), toy_pairs(4, 200)
    solo = [fit(tiny, make(), train, val, cfg, progress=False) for make, cfg in spec]
    pk = fit_packed(tiny, [make() for make, _ in spec], train, val, [cfg for _, cfg in spec], progress=False)
    for s, p in zip(solo, pk):
        _assert_same(s, p)
    # the pack really mixed what it claims: early stops at two different steps, a shorter cap, two taus
    assert [(r.status, r.steps) for r in pk[4:]] == [("converged", 1), ("converged", 2)]
    assert pk[1].steps == 3 and pk[0].steps == 4 and pk[0].status == "step_cap"
    assert pk[2].history[1]["train_loss"] != pk[3].history[1]["train_loss"]


def test_pack_without_prefix_and_dpo(tiny_llama):
    """The plain format (no shared prefix: 2D masks), DPO and summed log-probs, layer 0 edited, the fixed
    schedule (epochs, validated twice per epoch), and edits that start away from the identity (validated at
    step 0 in one packed pass)."""
    lm = tiny_llama
    cfg = FitConfig(fmt="plain", objective="dpo", tau=0.1, lr=1e-2, average_logprobs=False, epochs=2, evals_per_epoch=2,
                    batch_size=3)
    moved = lambda heads, seed: (lambda: randomise(LocalizedRank1(parse_heads(heads, 3, 4), lm.arch), seed))  # noqa: E731
    makers = [lambda: FullRank1(lm.arch, seed=1), lambda: LocalizedRank1(parse_heads("L0H3", 3, 4), lm.arch, seed=2),
              lambda: LocalizedRank1(parse_heads("L0H0,L0H1,L1H1,L2H0", 3, 4), lm.arch, seed=3),
              moved("L1H1", 4), moved("L2H0,L2H2", 5)]
    train, val = toy_pairs(10, 95), toy_pairs(5, 200)
    solo = [fit(lm, m(), train, val, cfg, progress=False) for m in makers]
    pk = fit_packed(lm, [m() for m in makers], train, val, cfg, progress=False)
    for s, p in zip(solo, pk):
        _assert_same(s, p)
    assert pk[3].history[0]["val_loss"] != pk[4].history[0]["val_loss"] != pk[0].history[0]["val_loss"]
    assert [h["step"] for h in pk[0].history if "val_loss" in h] == [0, 2, 4, 6, 8]


def test_each_edit_gets_its_solo_gradient(tiny_llama, monkeypatch):
    """The gradient each edit's optimizer steps on in `fit_packed` is that of the edit's own mean loss, as in its
    own `fit` step (a mean over edits would scale them by 1/K, which Adam's scale invariance would hide from the
    fits' results)."""
    from locaudit.training import _pair_forward, prepare_pairs

    lm = tiny_llama
    base = replace(BASE, shuffle=False, batch_size=3, max_steps=1)
    cfgs = [replace(base, tau=0.5), replace(base, tau=0.1, objective="dpo"), replace(base, tau=0.2)]
    train, val = toy_pairs(6, 95), toy_pairs(2, 200)

    def make():
        edits = [randomise(LocalizedRank1(parse_heads("L1H0,L2H1", 3, 4), lm.arch), 1),
                 randomise(FullRank1(lm.arch, layers=[0, 2]), 2),
                 randomise(LocalizedRank1(parse_heads("L2H3", 3, 4), lm.arch), 3)]
        with torch.no_grad():
            for e in edits:
                for p in e.parameters():
                    p.mul_(0.2)
        return edits

    enc, ref, _, _ = prepare_pairs(lm, train, val, base, progress=False)
    solo = []
    for e, cfg in zip(make(), cfgs):
        with e.attach(lm):
            loss, _ = _pair_forward(lm, enc, ref, [0, 1, 2], cfg)  # the first batch, unshuffled
            loss.mean().backward()
        solo.append([p.grad.clone() for p in e.parameters()])
    seen = []
    step = torch.optim.AdamW.step

    def spy(opt, *a, **k):
        seen.append([p.grad.clone() for group in opt.param_groups for p in group["params"]])
        return step(opt, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    fit_packed(lm, make(), train, val, cfgs, progress=False)
    assert len(seen) == 3
    for got, want in zip(seen, solo):
        for g, w in zip(got, want):
            assert w.abs().max() > 1e-4  # a real gradient
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def _row_counter(module, counts):
    """Count the rows each forward of a decoder block puts out (after any pre-hook has repeated its input)."""
    def hook(mod, args, output):
        counts.append((output[0] if isinstance(output, tuple) else output).shape[0])
    return module.register_forward_hook(hook)


def test_layers_below_the_lowest_edit_run_once(tiny):
    """One packed step of K=3 edits whose lowest layer is 1: layer 0 runs the same forwards on the same rows as
    one solo step (the prefix, the prompts, the answers: 1, G, R rows); layer 1 runs them on K times the rows."""
    lm = tiny
    blocks = packed._blocks(lm)
    fmt = PromptFormat("qa")
    prefix = encode_prefix(lm.tokenizer, fmt)
    enc = [encode(lm.tokenizer, fmt, q, a) for q, a in [("Is fire hot?", "Yes."), ("Is fire hot?", "No, never."),
                                                         ("Why?", "Because.")]]
    batch = collate(enc, lm.tokenizer.pad_token_id, lm.device)
    edits = [LocalizedRank1(parse_heads("L1H0", 3, 4), lm.arch), LocalizedRank1(parse_heads("L2H1,L1H3", 3, 4), lm.arch),
             FullRank1(lm.arch, layers=[1, 2])]

    def rows(run):
        seen = {0: [], 1: []}
        handles = [_row_counter(blocks[l], seen[l]) for l in (0, 1)]
        try:
            run()
        finally:
            for h in handles:
                h.remove()
        return seen

    def solo():
        from locaudit.scoring import batch_answer_logprobs

        with edits[0].attach(lm):
            batch_answer_logprobs(lm, batch, prefix_kv(lm, prefix))

    def packed_step():
        with pack(lm, edits) as K:
            lp, n = packed_answer_logprobs(lm, batch, prefix_kv(lm, prefix), K)
        assert lp.shape == (3, 3) and n.tolist() == [len(e.answer) for e in enc]

    one, many = rows(solo), rows(packed_step)
    assert one[0] == [1, 2, 3]  # prefix (batch 1), the 2 distinct prompts, the 3 answers
    assert many[0] == one[0]
    assert many[1] == [3 * r for r in one[1]]


def _full_logprob(lm, ids, n_answer):
    logits = lm.model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[t - 1, ids[t]] for t in range(len(ids) - n_answer, len(ids)))


def test_first_step_loss_by_hand(tiny_llama):
    """The first train loss each packed edit records is IPO's ((h - 1/(2 tau))^2, h from mean answer log-probs
    of edited vs unedited model), each computed here by a plain full-sequence forward with the edit's own hooks."""
    lm = tiny_llama
    train, val = toy_pairs(2, 95), toy_pairs(2, 200)
    edits = [randomise(LocalizedRank1(parse_heads("L1H0,L2H1", 3, 4), lm.arch), 1),
             randomise(FullRank1(lm.arch, layers=[2]), 2)]
    with torch.no_grad():
        for e in edits:
            for p in e.parameters():
                p.mul_(0.3)
    taus = [0.5, 0.1]
    fmt = PromptFormat("qa")
    prefix = list(encode_prefix(lm.tokenizer, fmt))
    expected = []
    with torch.no_grad():
        for edit, tau in zip(edits, taus):
            losses = []
            for p in train:
                c, r = encode(lm.tokenizer, fmt, p.question, p.chosen), encode(lm.tokenizer, fmt, p.question, p.rejected)
                ids_c, ids_r = prefix + list(c.prompt) + list(c.answer), prefix + list(r.prompt) + list(r.answer)
                ref_c, ref_r = _full_logprob(lm, ids_c, len(c.answer)), _full_logprob(lm, ids_r, len(r.answer))
                with edit.attach(lm):
                    lp_c, lp_r = _full_logprob(lm, ids_c, len(c.answer)), _full_logprob(lm, ids_r, len(r.answer))
                h = (lp_c - ref_c) / len(c.answer) - (lp_r - ref_r) / len(r.answer)
                losses.append(float((h - 1 / (2 * tau)) ** 2))
            expected.append(sum(losses) / len(losses))
    cfgs = [FitConfig(tau=t, batch_size=2, lr=1e-2, fmt="qa", max_steps=1) for t in taus]
    results = fit_packed(lm, edits, train, val, cfgs, progress=False)
    got = [r.history[1]["train_loss"] for r in results]
    assert expected[0] != pytest.approx(expected[1], rel=1e-2)  # the two edits really differ
    assert got == pytest.approx(expected, rel=1e-5)
    assert all(not math.isclose(e, 1 / (2 * t) ** 2, rel_tol=1e-3) for e, t in zip(expected, taus))  # not h = 0


def test_retries_refit_only_stuck_edits_packed(tiny_llama, monkeypatch):
    lm = tiny_llama
    train, val = toy_pairs(8, 95), toy_pairs(4, 200)
    stuck = replace(BASE, fmt="plain", lr=1e4, max_steps=4, eval_every=2, patience=2, retries=2, retry_factor=1e-5)
    fine = replace(stuck, lr=1e-1)
    makers = [lambda: LocalizedRank1(parse_heads("L1H0,L2H1", 3, 4), lm.arch, seed=1),
              lambda: LocalizedRank1(parse_heads("L2H2", 3, 4), lm.arch, seed=2)]
    calls = []
    real = packed.fit_packed
    monkeypatch.setattr(packed, "fit_packed", lambda lm_, edits, *a, **k: calls.append(len(edits)) or real(lm_, edits, *a, **k))
    results = fit_packed_to_optimum(lm, makers, train, val, [stuck, fine], progress=False)
    assert calls == [2, 1]  # the retry round packs only the stuck edit
    solo = [fit_to_optimum(lm, m, train, val, c, progress=False) for m, c in zip(makers, [stuck, fine])]
    for s, p in zip(solo, results):
        _assert_same(s, p)
        assert [a["lr"] for a in p.attempts] == [a["lr"] for a in s.attempts]
    assert [a["lr"] for a in results[0].attempts] == [1e4] and results[0].moved and not results[1].attempts


def test_bad_packs_are_refused(tiny_llama):
    lm = tiny_llama
    train, val = toy_pairs(4), toy_pairs(2, 100)
    e = lambda: LocalizedRank1(parse_heads("L1H0", 3, 4), lm.arch)  # noqa: E731
    cfg = replace(BASE, fmt="plain", max_steps=1)
    with pytest.raises(LocauditError, match="must share .*batch_size=2"):
        fit_packed(lm, [e(), e()], train, val, [cfg, replace(cfg, batch_size=2)], progress=False)
    one = e()
    with pytest.raises(LocauditError, match="appears twice"):
        fit_packed(lm, [one, one], train, val, cfg, progress=False)
    iti = ITI(parse_heads("L1H0", 3, 4), torch.ones(1, 8), torch.ones(1), 1.0)
    with pytest.raises(LocauditError, match="kind 'iti' cannot be packed"):
        fit_packed(lm, [e(), iti], train, val, cfg, progress=False)
    with pytest.raises(LocauditError, match="3 entries for 2 edits"):
        fit_packed(lm, [e(), e()], train, val, [cfg] * 3, progress=False)
