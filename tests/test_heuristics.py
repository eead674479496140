"""Heuristics (locaudit.heuristics): attribution patching against finite differences and exact identities,
mean-difference steering hooks and vectors against computations by hand, alpha choice and CAA's layer sweep.

References here are computed independently of the library's batched code: one plain forward per answer (no
padding, no batching), with hooks written in the test on the modules `Arch` names.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import FAMILIES, make_tiny
from locaudit.errors import LocauditError
from locaudit.heuristics import (Attribution, MeanDiffSteering, attribution_patching, choose_alpha, layer_sweep,
                                 mean_diff_vectors, site_units)
from locaudit.heuristics.rows import margins, task_pairs
from locaudit.interventions import edit_positions, load_intervention
from locaudit.scoring import encode, encode_prefix
from locaudit.tasks import load_task
from locaudit.tasks.base import preference_scores
from locaudit.units import parse_units


def write_varied(path, n=12, seed=0):
    """Preference pairs with prompts and answers of different token lengths (so batches are padded)."""
    rng = np.random.default_rng(seed)
    answers = [(" yes", " no"), (" a", " bcd"), (" sure thing", " never"), (" ok", " x")]
    rows = []
    for i in range(n):
        c, r = answers[i % len(answers)]
        prompt = "".join(rng.choice(list("qwrtyuiopsdfghjklzxcvnm"), int(rng.integers(3, 11)))) + ":"
        rows.append({"prompt": prompt, "chosen": c, "rejected": r})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def answer_rows(lm, task, items):
    """(pair index, sign, token ids, prompt length P with prefix, answer length A) per answer: y+ sign +1, y- -1."""
    fmt, tok = task.prompt_format(lm), lm.tokenizer
    prefix = list(encode_prefix(tok, fmt))
    out = []
    for j, p in enumerate(task.pairs(items)):
        for ans, sign in ((p.chosen, 1.0), (p.rejected, -1.0)):
            e = encode(tok, fmt, p.question, ans)
            out.append((j, sign, prefix + list(e.prompt) + list(e.answer), len(prefix) + len(e.prompt), len(e.answer)))
    return out


def answer_logprob(lm, ids, P, A):
    logits = lm.model(torch.tensor([ids], device=lm.device)).logits[0]
    lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return sum(lp[t, ids[t + 1]] for t in range(P - 1, P + A - 1))


def site_hook(lm, kind, layer, fn):
    """fn(x) -> new x (None: unchanged) at a site: W^l's input (heads), W_down^l's input (neurons), block l's output (layer)."""
    arch = lm.arch
    if kind == "layers":
        return arch.block(layer).register_forward_hook(lambda m, a, out: fn(out))
    module = arch.out_proj(layer) if kind == "heads" else arch.down_proj(layer)

    def pre(m, a):
        x = fn(a[0])
        return None if x is None else (x,) + tuple(a[1:])
    return module.register_forward_pre_hook(pre)


def unit_slice(lm, kind, index):
    d = lm.arch.head_dim
    return {"heads": slice(index * d, (index + 1) * d), "neurons": slice(index, index + 1), "layers": slice(None)}[kind]


def naive_mean_margin(lm, rows, n_pairs, kind=None, layer=None, sl=None, change=None):
    """Mean over pairs of m, one forward per answer; `change(x_unit) -> new x_unit` applied to the unit's
    entries at the answer-predicting positions P-1..P+A-2 when given."""
    m = np.zeros(n_pairs)
    for j, sign, ids, P, A in rows:
        handle = None
        if change is not None:
            def fn(x, P=P, A=A):
                x = x.clone()
                x[0, P - 1:P + A - 1, sl] = change(x[0, P - 1:P + A - 1, sl])
                return x
            handle = site_hook(lm, kind, layer, fn)
        try:
            with torch.no_grad():
                m[j] += sign * float(answer_logprob(lm, ids, P, A))
        finally:
            if handle is not None:
                handle.remove()
    return m.mean()


def unit_mean(lm, rows, kind, layer, sl):
    """Mean of a unit's entries over the answer-predicting positions of every answer row."""
    acc = []
    for _, _, ids, P, A in rows:
        seen = {}

        def keep(x, P=P, A=A):
            seen["x"] = x[0, P - 1:P + A - 1, sl].clone()
        h = site_hook(lm, kind, layer, keep)
        try:
            with torch.no_grad():
                lm.model(torch.tensor([ids]))
        finally:
            h.remove()
        acc.append(seen["x"])
    return torch.cat(acc).mean(0)


def index_of(name):
    """(layer, unit index) of L<l>, L<l>H<h> or L<l>N<i>."""
    m = re.fullmatch(r"L(\d+)(?:[HN](\d+))?", name)
    return int(m.group(1)), int(m.group(2) or 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_is_the_first_order_change_of_the_margin(family, tmp_path):
    """Every unit kind, both baselines: the attribution equals the derivative of the pairs' mean margin along
    a <- a + eps (baseline - a) at the answer-predicting positions. float64, but the norms of some families
    round to float32 inside, so the derivative is taken by Richardson-extrapolated central differences at
    eps = 0.02 (truncation error O(eps^4)), whose rounding noise is ~1e-5."""
    lm = make_tiny(family)
    lm.model.double()
    task = load_task(write_varied(tmp_path / "p.jsonl"))
    items = task.split(0).train[:2]
    rows = answer_rows(lm, task, items)

    def derivative(kind, layer, sl, target):
        def central(eps):
            plus, minus = (naive_mean_margin(lm, rows, len(items), kind, layer, sl,
                                             lambda x, s=s: x + s * eps * (target - x)) for s in (1.0, -1.0))
            return (plus - minus) / (2 * eps)
        return (4 * central(0.01) - central(0.02)) / 3

    for baseline in ("zero", "mean"):
        att = attribution_patching(lm, task, items, baseline=baseline, batch_size=1 if baseline == "zero" else 2)
        assert att.heads.shape == (3, 4) and att.neurons.shape == (3, lm.arch.n_neurons) and att.layers.shape == (3,)
        assert abs(att.heads).max() > 1e-2  # the comparison below is between non-trivial numbers
        units = [("heads", att.top_heads(1)[0]), ("heads", att.ranking("heads")[-1]),
                 ("neurons", att.top_neurons(1)[0]), ("layers", "L0" if baseline == "zero" else "L1")]
        for kind, name in units:
            layer, index = index_of(name)
            sl = unit_slice(lm, kind, index)
            target = torch.zeros(()) if baseline == "zero" else unit_mean(lm, rows, kind, layer, sl)
            value = att.effects(kind)[layer, 0 if kind == "layers" else index]
            assert value == pytest.approx(derivative(kind, layer, sl, target), rel=2e-4, abs=2e-4), (baseline, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_exact_identities(family, tmp_path):
    """Linear identities that hold exactly: the heads of layer l add up to -grad_y . (y - bias) at the output y of
    W^l (o^l -> 0 is the ablation of all heads at once), the neurons to the same at W_down^l; and zero-ablating
    the last residual stream is invisible to first order (the final norm is scale-invariant: grad_r . r = 0)."""
    lm = make_tiny(family)
    arch = lm.arch
    task = load_task(write_varied(tmp_path / "p.jsonl"))
    items = task.split(0).train[:4]
    att = attribution_patching(lm, task, items, batch_size=3)
    ref = {kind: np.zeros(arch.n_layers) for kind in ("heads", "neurons")}
    for j, sign, ids, P, A in answer_rows(lm, task, items):
        leaves, handles = {}, []
        for kind in ref:
            for l in range(arch.n_layers):
                module = arch.out_proj(l) if kind == "heads" else arch.down_proj(l)

                def fn(m, a, y, key=(kind, l), module=module):
                    z = torch.zeros_like(y, requires_grad=True)
                    bias = module.bias if module.bias is not None else torch.zeros(())
                    leaves[key] = (z, (y - bias).detach())
                    return y + z
                handles.append(module.register_forward_hook(fn))
        with torch.enable_grad():
            lp = answer_logprob(lm, ids, P, A)
        for h in handles:
            h.remove()
        keys = list(leaves)
        grads = torch.autograd.grad(sign * lp, [leaves[k][0] for k in keys])
        for (kind, l), g in zip(keys, grads):
            y = leaves[(kind, l)][1]
            ref[kind][l] -= float((g[0, P - 1:P + A - 1] * y[0, P - 1:P + A - 1]).sum()) / len(items)
    np.testing.assert_allclose(att.heads.sum(1), ref["heads"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(att.neurons.sum(1), ref["neurons"], rtol=1e-4, atol=1e-6)
    assert abs(att.layers[-1]) < 1e-3 * abs(att.layers).max()


def test_attribution_margin_and_rankings(tmp_path):
    lm = make_tiny("qwen2")
    task = load_task(write_varied(tmp_path / "p.jsonl"))
    items = task.split(0).train
    enc = task_pairs(lm, task, items)
    _, scores, _ = preference_scores(lm, None, task.pairs(items), task.prompt_format(lm), average=False)
    np.testing.assert_allclose(margins(lm, enc, batch_size=3), scores["margin"], atol=1e-4)  # m as scoring has it
    heads = np.array([[0.1, -0.5, 0.0, 0.2], [0.5, 0.05, -0.3, 0.0], [0.0, 0.0, 0.0, -0.7]])
    att = Attribution(heads, np.zeros((3, 5)), np.array([0.2, -0.9, 0.1]), 4, "zero")
    assert att.top_heads(4) == ["L2H3", "L0H1", "L1H0", "L1H2"]  # |value| first, ties by layer
    assert att.top_layers(2) == ["L1", "L0"] and att.ranking("neurons")[:2] == ["L0N0", "L0N1"]
    assert att.head_set(2).names == ["L0H1", "L2H3"] and att.head_set(2).label == "atp2"
    for bad in (0, 13, 2.5, True):
        with pytest.raises(LocauditError, match="top-k for heads must be an integer in 1..12"):
            att.top_heads(bad)
    with pytest.raises(LocauditError, match="unknown ablation baseline 'random'; use one of zero, mean"):
        attribution_patching(lm, task, items, baseline="random")
    with pytest.raises(LocauditError, match="no items given"):
        attribution_patching(lm, task, [])


def capture(lm, kind, ids, layers):
    """Activation at a site of each layer for one batch (hooks added last, so they see any attached edit)."""
    seen = {}
    handles = [site_hook(lm, kind, l, lambda x, l=l: seen.__setitem__(l, x.detach().clone())) for l in layers]
    try:
        with torch.no_grad():
            lm.model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_adds_alpha_v_at_block_output_only_where_declared(family):
    lm = make_tiny(family)
    arch = lm.arch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (2, 7), generator=g)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 4:] = True
    mask[1, 2:6] = True
    v = torch.randn(arch.d_model, generator=g)
    layers = list(range(arch.n_layers))
    base = capture(lm, "layers", ids, layers)
    edit = MeanDiffSteering(arch, "residual", {1: v}, alpha=0.7)
    with edit.attach(lm), edit_positions(lm, mask):
        steered = capture(lm, "layers", ids, layers)
    assert torch.equal(steered[0], base[0])  # the block before is untouched
    torch.testing.assert_close(steered[1] - base[1], mask[..., None] * 0.7 * v, atol=1e-5, rtol=0)
    assert torch.equal(steered[1][~mask], base[1][~mask])
    assert not torch.allclose(steered[2][mask], base[2][mask])  # later blocks see the shift
    everywhere = MeanDiffSteering(arch, "residual", {1: v}, alpha=0.7, placement="all")
    with everywhere.attach(lm), edit_positions(lm, mask):
        shifted = capture(lm, "layers", ids, [1])
    torch.testing.assert_close(shifted[1] - base[1], (0.7 * v).expand(2, 7, -1), atol=1e-5, rtol=0)
    assert not arch.has_hooks()

    # a neuron set: W_down^1's input moves by alpha v on S, exactly nothing elsewhere
    u = torch.randn(arch.n_neurons, generator=g)
    neurons = MeanDiffSteering(arch, "neurons", {1: u}, alpha=-1.5, units={1: [3, 7]})
    assert neurons.unit_names() == ["L1N3", "L1N7"] and torch.count_nonzero(neurons.vector(1)) == 2
    m0 = capture(lm, "neurons", ids, [0, 1])
    with neurons.attach(lm), edit_positions(lm, mask):
        m1 = capture(lm, "neurons", ids, [0, 1])
    assert torch.equal(m1[0], m0[0])
    diff = m1[1] - m0[1]
    torch.testing.assert_close(diff[..., [3, 7]], mask[..., None] * -1.5 * u[[3, 7]], atol=1e-5, rtol=0)
    others = [i for i in range(arch.n_neurons) if i not in (3, 7)]
    assert torch.equal(m1[1][..., others], m0[1][..., others])


def by_hand_differences(lm, task, items, kind, layer, token=-1):
    """mean over pairs of a(x + y+) - a(x + y-) at answer token `token`, one plain forward per answer."""
    total = None
    for _, sign, ids, P, A in answer_rows(lm, task, items):
        with torch.no_grad():
            if kind == "layers":
                a = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0, token]
            else:
                a = capture(lm, kind, torch.tensor([ids]), [layer])[layer][0, token]
        total = sign * a if total is None else total + sign * a
    return total / len(items)


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_vector_is_the_mean_difference(family, tmp_path):
    lm = make_tiny(family)
    task = load_task(write_varied(tmp_path / "p.jsonl"))
    items = task.split(0).train[:5]
    res = mean_diff_vectors(lm, task, items, "residual", batch_size=2)
    assert sorted(res) == [0, 1, 2]
    for l in (0, 1):  # hidden_states[L] is after the final norm, so by hand stops at L-2
        torch.testing.assert_close(res[l], by_hand_differences(lm, task, items, "layers", l), atol=1e-5, rtol=1e-5)
    caa = MeanDiffSteering.at_layer(lm, task, items, 1, alpha=3.0)
    torch.testing.assert_close(caa.vector(1), res[1])
    assert caa.config() == {"kind": "meandiff", "site": "residual", "layers": [1], "units": ["L1"], "alpha": 3.0,
                            "placement": "iti", "label": "L1"}
    neurons = MeanDiffSteering.at_units(lm, task, items, "L2N5,L2N9,L0N1", alpha=1.0)
    for l, idx in ((0, [1]), (2, [5, 9])):
        hand = by_hand_differences(lm, task, items, "neurons", l)
        torch.testing.assert_close(neurons.vector(l)[idx], hand[idx], atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(neurons.vector(l)) == len(idx)
    assert neurons.unit_names() == ["L0N1", "L2N5", "L2N9"]
    letter = mean_diff_vectors(lm, task, items, "residual", [1], answer_token=-2)  # CAA's answer-letter position
    torch.testing.assert_close(letter[1], by_hand_differences(lm, task, items, "layers", 1, -2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(letter[1], res[1], atol=1e-3)
    with pytest.raises(LocauditError, match="answer token index -3 is out of range: the shortest answer has 2"):
        mean_diff_vectors(lm, task, items, answer_token=-3)


def test_steering_in_scoring_shifts_every_position_after_the_prompt(tmp_path):
    lm = make_tiny("llama")
    task = load_task(write_varied(tmp_path / "p.jsonl"))
    items = task.split(0).train[:4]
    edit = MeanDiffSteering.at_layer(lm, task, items, 0, alpha=4.0)
    _, scores, _ = preference_scores(lm, edit, task.pairs(items), task.prompt_format(lm), average=False)
    v = edit.vector(0)
    rows = answer_rows(lm, task, items)

    def by_hand(first):  # steer block 0's output from position `first(P)` on
        m = np.zeros(len(items))
        for j, sign, ids, P, A in rows:
            def fn(x, P=P):
                x = x.clone()
                x[0, first(P):] += 4.0 * v
                return x
            h = site_hook(lm, "layers", 0, fn)
            with torch.no_grad():
                m[j] += sign * float(answer_logprob(lm, ids, P, A))
            h.remove()
        return m

    np.testing.assert_allclose(scores["margin"], by_hand(lambda P: P), atol=1e-4)
    assert not np.allclose(scores["margin"], by_hand(lambda P: 0), atol=1e-3)  # the prompt is never shifted
    unsteered = task.evaluate(lm, None, items)
    assert edit.with_alpha(0.0).is_identity() and not edit.is_identity()  # alpha 0 is the identity ...
    zero = task.evaluate(lm, edit.with_alpha(0.0), items)
    np.testing.assert_array_equal(zero.scores["margin"], unsteered.scores["margin"])  # ... and scores as none


@pytest.fixture
def refusal():
    task = load_task("caa:refusal")
    return task, task.split(0, limit=15)


def test_choose_alpha_takes_the_best_statistic_on_validation(refusal):
    task, split = refusal
    lm = make_tiny("gpt2")
    steer = MeanDiffSteering.at_layer(lm, task, split.train, 1, alpha=1.0)
    grid = (0.0, 2.0, -2.0, 8.0)
    hand = [task.statistic(task.evaluate(lm, steer.with_alpha(a), split.val)) for a in grid]
    assert len(set(np.round(hand, 9))) == len(grid)  # steering moves p_match: the choice is not a tie-break
    up = choose_alpha(lm, task, steer.with_alpha, grid, split.val)
    assert up.values == pytest.approx(hand, abs=1e-12) and up.alphas == grid
    assert up.alpha == grid[int(np.argmax(hand))] and up.base == pytest.approx(hand[0], abs=1e-12)
    down = choose_alpha(lm, task, steer.with_alpha, grid, split.val, maximize=False)
    assert down.alpha == grid[int(np.argmin(hand))]
    for bad, msg in (((), "empty alpha grid"), ((1.0, float("nan")), "non-finite value nan")):
        with pytest.raises(LocauditError, match=msg):
            choose_alpha(lm, task, steer.with_alpha, bad, split.val)


def test_layer_sweep_has_one_effect_per_layer_and_its_best(refusal):
    task, split = refusal
    lm = make_tiny("llama")
    sweep = layer_sweep(lm, task, split.train, split.val, alpha=6.0)
    assert sweep.layers == (0, 1, 2) and sweep.effects.shape == (3,)
    base = task.statistic(task.evaluate(lm, None, split.val))
    vectors = mean_diff_vectors(lm, task, split.train)
    hand = [task.statistic(task.evaluate(lm, MeanDiffSteering(lm.arch, "residual", {l: vectors[l]}, 6.0), split.val))
            - base for l in range(3)]
    np.testing.assert_allclose(sweep.effects, hand, atol=1e-12)
    assert np.abs(sweep.effects).max() > 1e-4 and len(set(np.round(sweep.effects, 9))) == 3
    assert sweep.best_layer == int(np.argmax(hand)) and sweep.effect(sweep.best_layer) == pytest.approx(max(hand))
    back = layer_sweep(lm, task, split.train, split.val, alpha=-6.0, vectors=vectors, layers=[2, 0])
    assert back.layers == (0, 2)
    assert back.best_layer == (0, 2)[int(np.argmin(back.effects))]
    with pytest.raises(LocauditError, match="layer 3 is out of range: this model has layers 0..2"):
        layer_sweep(lm, task, split.train, split.val, layers=[3])


def test_steering_rejects_bad_input():
    lm = make_tiny("llama")
    arch = lm.arch
    v = torch.zeros(arch.d_model)
    for args, kw, msg in [
        (("residual", {1: torch.zeros(5)}, 1.0), {}, "has 5 entries but this model's residual site has 32"),
        (("residual", {4: v}, 1.0), {}, "layer 4 is out of range"),
        (("residual", {1: v}, float("inf")), {}, "alpha must be a finite number"),
        (("residual", {1: v}, 1.0), {"placement": "late"}, "unknown steering placement 'late'"),
        (("mlp", {1: v}, 1.0), {}, "unknown activation site 'mlp'"),
        (("neurons", {1: torch.zeros(64)}, 1.0), {"units": {1: [64]}}, "unit 64 of layer 1 is out of range"),
    ]:
        with pytest.raises(LocauditError, match=msg):
            MeanDiffSteering(arch, *args, **kw)
    edit = MeanDiffSteering(arch, "residual", {1: v}, 2.0)
    assert edit.is_identity()  # a zero vector changes nothing
    with pytest.raises(LocauditError, match="not folded into the weights"):
        edit.merge(lm)
    assert site_units("L1N3, L0N2", arch) == ("neurons", {0: [2], 1: [3]})
    assert site_units(["L2"], arch) == ("residual", {2: [0]})
    assert site_units("L1A", arch) == ("heads", {1: [0, 1, 2, 3]})  # the audit's grammar: every head of a layer
    for bad in ("L1N3,L1H0", "L1X3", "L1N64", "L0H1,L0H1", "L3"):  # the same one-line errors as the audit's parser
        with pytest.raises(LocauditError) as e:
            site_units(bad, arch)
        with pytest.raises(LocauditError) as ref:
            parse_units(bad, arch)
        assert str(e.value) == str(ref.value) and "\n" not in str(e.value)
    with pytest.raises(LocauditError, match=r"mixes neurons \(L1N3\) and heads \(L1H0\)"):
        site_units("L1N3,L1H0", arch)


def test_steering_edit_saves_and_loads(tmp_path):
    lm = make_tiny("gpt_neox")
    arch = lm.arch
    g = torch.Generator().manual_seed(3)
    for edit in (MeanDiffSteering(arch, "neurons", {0: torch.randn(arch.n_neurons, generator=g),
                                                    2: torch.randn(arch.n_neurons, generator=g)}, -2.5,
                                  units={0: [1], 2: [4, 0]}, placement="all", label="mine"),
                 MeanDiffSteering(arch, "heads", {1: torch.randn(32, generator=g)}, 1.5, units={1: [2]}),
                 MeanDiffSteering(arch, "residual", {2: torch.randn(32, generator=g)}, 0.5)):
        out = tmp_path / edit.site.name
        edit.save(out)
        back = MeanDiffSteering.load(out, arch)
        assert back.config() == edit.config()
        for l in edit.layers:
            assert torch.equal(back.vector(l), edit.vector(l))
    assert edit.config()["units"] == ["L2"]
    for name in ("neurons", "heads", "residual"):  # load_intervention knows the kind ("meandiff", registered)
        back = load_intervention(tmp_path / name, arch)
        assert isinstance(back, MeanDiffSteering)
        assert back.config() == MeanDiffSteering.load(tmp_path / name, arch).config()
    assert MeanDiffSteering.load(tmp_path / "heads", arch).unit_names() == ["L1H2"]
    assert torch.count_nonzero(MeanDiffSteering.load(tmp_path / "heads", arch).vector(1)[:16]) == 0
    with pytest.raises(LocauditError, match="is not a saved steering edit"):
        MeanDiffSteering.load(tmp_path / "nothing", arch)
