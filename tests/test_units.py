"""Units of a claim (heads, MLP neurons, whole layers) on tiny random models of every family: the name grammar and
its one-line errors, ranges checked against the model, random draws, the optimal edit of each kind (locality,
identity at init, hooked == merged, save/load), and that IPO fitting moves each kind."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from locaudit.errors import LocauditError
from locaudit.heads import parse_heads, random_heads, random_heads_like
from locaudit.interventions import LocalizedRank1, NeuronRank1, ResidualRank1, load_intervention
from locaudit.training import FitConfig, default_lr, fit
from locaudit.units import GRAMMAR, KINDS, UnitSet, all_units, as_units, check_names, parse_units, random_units
from locaudit.unitsets import LAYER_GRAMMAR, NEURON_GRAMMAR, parse_layers, parse_neurons
from locaudit.models import wrap_model
from tests.conftest import byte_tokenizer, make_tiny
from tests.test_edits import logits, randomise, toy_pairs


# ------------------------------------------------------------------------------------------------ names

def test_parse_each_kind():
    ns = parse_units("L3N100,L3N7")
    assert ns.kind == "neurons" and ns.names == ["L3N7", "L3N100"] and ns.by_layer() == {3: [7, 100]}
    assert ns.spec() == "L3N7,L3N100" and len(ns) == 2 and ns.label == "custom"
    ls = parse_units("L12")
    assert ls.kind == "layers" and ls.names == ["L12"] and ls.by_layer() == {12: [0]}
    hs = parse_units("L14H1, L12H3", label="claim")
    assert hs.kind == "heads" and hs.names == ["L12H3", "L14H1"] and hs.label == "claim"
    assert hs.members == parse_heads("L12H3,L14H1", label="claim")  # the HeadSet itself, unchanged
    assert parse_units(["L2", "L0"]).names == ["L0", "L2"]
    assert isinstance(ns, UnitSet) and as_units(ns) is ns and as_units(hs.members) == hs
    assert as_units(parse_neurons("L1N2")).kind == "neurons" and as_units(parse_layers("L1")).kind == "layers"
    with pytest.raises(LocauditError, match="str is not a set of units"):
        as_units("L1N2")


@pytest.mark.parametrize("spec, message", [
    ("L3H1,L3N7", "claim 'L3H1,L3N7' mixes heads (L3H1) and neurons (L3N7); name units of one kind per claim"),
    ("L3,L3N7", "mixes layers (L3) and neurons (L3N7)"),
    ("L3X", "malformed unit name 'L3X'"),
    ("l3n1", "malformed unit name 'l3n1'"),
    ("L3N-1", "malformed unit name 'L3N-1'"),
    ("L3N٣", "malformed unit name 'L3N٣'"),
    ("", "empty unit list"),
    ("L3N1,", "empty unit name in 'L3N1,' (a stray comma?)"),
    ("L3N1,L3N01", "neuron L3N1 is listed twice in 'L3N1,L3N01'"),
    ("L4,L04", "layer L4 is listed twice"),
    ("L1H1,L1H1", "head L1H1 is listed twice"),
    ("L1N1234567890", "impossibly large index"),
    ("L1A", "'L1A' names every head of layer 1, which needs the model's head count"),
])
def test_grammar_errors_are_one_line(spec, message):
    with pytest.raises(LocauditError) as e:
        parse_units(spec)
    text = str(e.value)
    assert message in text and "\n" not in text
    if "malformed" in message or "empty" in message:
        assert GRAMMAR in text  # the grammar of every kind, with examples
    if "L1A" not in spec:  # what needs no model fails the same way before a model is loaded
        with pytest.raises(LocauditError) as early:
            check_names(spec)
        assert str(early.value) == text


def test_check_names_needs_no_model():
    assert [check_names(s).name for s in ("L3H1,L2A", "L0N5", "L7", ["L1", "L2"])] == ["heads", "neurons", "layers",
                                                                                        "layers"]
    with pytest.raises(LocauditError, match="head L1H0 is listed twice"):
        parse_units("L1H0,L1A", make_tiny("llama").arch)  # an expanded L<l>A is checked with the model


def test_kind_parsers_name_their_grammar():
    for parse, bad, grammar in ((parse_neurons, "L3H1", NEURON_GRAMMAR), (parse_layers, "L3N1", LAYER_GRAMMAR)):
        with pytest.raises(LocauditError, match="malformed") as e:
            parse(bad)
        assert repr(bad) in str(e.value) and grammar in str(e.value)


def test_ranges_checked_against_the_model(tiny):
    a = tiny.arch
    L, H, N = a.n_layers, a.n_heads, a.n_neurons
    assert parse_units(f"L{L - 1}N{N - 1},L0N0", a).names == ["L0N0", f"L{L - 1}N{N - 1}"]
    for spec, message in ((f"L0N{N}", f"neuron L0N{N} is out of range: this model has layers 0..{L - 1} and MLP neurons 0..{N - 1}"),
                          (f"L{L}N0", f"neuron L{L}N0 is out of range"),
                          (f"L{L}", f"layer L{L} is out of range: this model has layers 0..{L - 1}"),
                          (f"L0H{H}", f"head L0H{H} is out of range"),
                          (f"L{L}A", f"head L{L}H0 is out of range")):
        with pytest.raises(LocauditError, match=spec if "A" not in spec else "out of range") as e:
            parse_units(spec, a)
        assert message in str(e.value)
        with pytest.raises(LocauditError, match="out of range"):  # a set parsed without the model, checked later
            parse_units(spec.replace("A", "H0")).validate(a)
    whole = parse_units("L1A", a)
    assert whole.kind == "heads" and whole.names == [f"L1H{h}" for h in range(H)]
    with pytest.raises(LocauditError, match="head L1H0 is listed twice"):
        parse_units("L1H0,L1A", a)
    assert [len(all_units(k, a)) for k in KINDS] == [L * H, L * N, L]
    assert all_units("heads", a).members == parse_heads(",".join(f"L{l}H{h}" for l in range(L) for h in range(H)), label="all")
    with pytest.raises(LocauditError, match="unknown unit kind 'mlp'"):
        all_units("mlp", a)


# ------------------------------------------------------------------------------------------------ draws

def test_random_draws(tiny):
    a = tiny.arch
    for claim in (parse_units("L0N3,L0N9,L2N1", a), parse_units("L0H1,L2H3,L2H0", a), parse_units("L1,L2", a)):
        per = KINDS[claim.kind].per_layer(a)
        draws = [random_units(claim, s, a) for s in range(6)]
        for d in draws:
            assert d.kind == claim.kind and len(d) == len(claim) and len(set(d.names)) == len(d)
            d.validate(a)
        assert random_units(claim, 3, a) == draws[3] and draws[3].label == f"random{len(claim)}-s3"  # seeded
        assert len({tuple(d.names) for d in draws}) > 1  # seeds differ
        if claim.kind == "layers":  # each layer is one unit: a layer-matched draw is the claim itself
            with pytest.raises(LocauditError, match="can only return the claim itself .*whole layers"):
                random_units(claim, 0, a, match_layers=True)
            continue
        matched = [random_units(claim, s, a, match_layers=True) for s in range(6)]
        for m in matched:
            assert {l: len(ix) for l, ix in m.by_layer().items()} == {l: len(ix) for l, ix in claim.by_layer().items()}
            assert all(0 <= i < per for _, i in m.pairs())
        assert matched[2] == random_units(claim, 2, a, match_layers=True) and matched[2].label == "random3-layers-s2"
        assert len({tuple(m.names) for m in matched}) > 1
    hs = parse_heads("L0H1,L2H3,L2H0", a.n_layers, a.n_heads)
    for s in range(4):  # heads: exactly the draws (and labels) of heads.py
        assert random_units(hs, s, a).members == random_heads(3, s, a.n_layers, a.n_heads)
        assert random_units(hs, s, a, match_layers=True).members == random_heads_like(hs, s, a.n_layers, a.n_heads)
    with pytest.raises(LocauditError, match="can only return the claim itself .*every head"):
        random_units(parse_units("L1A", a), 0, a, match_layers=True)
    with pytest.raises(LocauditError, match="seed must be an integer >= 0"):
        random_units(hs, -1, a)
    with pytest.raises(LocauditError, match="out of range"):
        random_units(parse_units(f"L{a.n_layers}N0"), 0, a)


def test_lr_size(tiny_llama):
    a = tiny_llama.arch  # 3 layers of 4 heads of d = 8, d_model 32, 64 neurons
    assert parse_units("L0H1,L2H3", a).lr_size(a) == 2
    assert all_units("heads", a).lr_size(a) is None  # as fit_optimal_edit did: every head takes lr_all
    assert parse_units("L1A", a).lr_size(a) == 4
    assert parse_units("L0N1", a).lr_size(a) == 1
    assert parse_units(",".join(f"L0N{i}" for i in range(9)), a).lr_size(a) == 2  # ceil(9 / 8)
    assert parse_units("L1", a).lr_size(a) == 4 and parse_units("L0,L2", a).lr_size(a) == 8  # d_model / d per layer
    assert all_units("neurons", a).lr_size(a) is None and all_units("layers", a).lr_size(a) is None
    cfg = FitConfig()
    assert default_lr(parse_units("L0N1", a).lr_size(a), cfg) == pytest.approx(cfg.lr_one)


# ------------------------------------------------------------------------------------------------ edits

def test_make_edit_per_kind(tiny):
    a = tiny.arch
    heads = parse_heads("L0H1,L2H3", a.n_layers, a.n_heads)
    from_units = as_units(heads).make_edit(a, seed=5, scale=2.0)
    direct = LocalizedRank1(heads, a, seed=5, scale=2.0)  # identical numbers to the edit built before units
    assert type(from_units) is LocalizedRank1 and from_units.scale == 2.0
    assert all(torch.equal(p, q) for p, q in zip(from_units.state_dict().values(), direct.state_dict().values()))
    assert type(parse_units("L1N3", a).make_edit(a)) is NeuronRank1
    assert type(parse_units("L1", a).make_edit(a)) is ResidualRank1
    base = logits(tiny)
    for spec in ("L0N1,L2N5", "L0,L2"):
        edit = parse_units(spec, a).make_edit(a, seed=1)
        assert edit.is_identity()
        with edit.attach(tiny):
            assert tiny.arch.has_hooks()
            assert torch.equal(logits(tiny), base)  # b = 0 at initialisation
        assert not tiny.arch.has_hooks()
    with pytest.raises(LocauditError, match="out of range"):
        parse_units(f"L0N{a.n_neurons}").make_edit(a)


def _mlp_in_out(lm, proj, edit):
    """W_down's input before the edit's pre-hook (registered first, it runs first) and its output, in one forward."""
    seen = {}
    grab = proj.register_forward_pre_hook(lambda m, args: seen.setdefault("m", args[0].detach().clone()))
    keep = proj.register_forward_hook(lambda m, args, out: seen.setdefault("out", out.detach().clone()))
    with edit.attach(lm):
        logits(lm)
    grab.remove()
    keep.remove()
    return seen["m"], seen["out"]


def wider_llama():
    """A tiny Llama of another shape (d_model 48, 96 neurons): edits of the tiny models do not fit it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return wrap_model(AutoModelForCausalLM.from_config(cfg), tok, "tiny-wider")


def test_neuron_edit_locality(tiny):
    """MLP output changes by exactly s <a, m> W_down b, inside the span of the chosen neurons' columns of W_down."""
    a = tiny.arch
    ns = parse_units("L1N2,L1N7", a)
    edit = randomise(ns.make_edit(a, scale=1.5), 4)
    proj = a.down_proj(1)
    m, out = _mlp_in_out(tiny, proj, edit)  # m: the unedited input of W_down^1; out: the edited MLP output
    b = edit.b(1)
    expected = proj(m) + 1.5 * (m @ edit.a["1"]).unsqueeze(-1) * (a.W_down(1) @ b)
    assert torch.allclose(out, expected, atol=1e-5)
    delta = (out - proj(m)).reshape(-1, a.d_model).t()
    cols = a.W_down(1)[:, [2, 7]]
    resid = delta - cols @ torch.linalg.lstsq(cols, delta).solution
    assert delta.abs().max() > 1e-3 and resid.abs().max() < 1e-4 * float(delta.abs().max())
    others = [i for i in range(a.n_neurons) if i not in (2, 7)]
    assert torch.count_nonzero(b[others]) == 0 and torch.count_nonzero(b[[2, 7]]) == 2
    # b outside the chosen neurons is not a parameter: the only trainable b entries are the chosen ones
    assert [tuple(p.shape) for p in edit.b_s.values()] == [(2, 1)] and [tuple(p.shape) for p in edit.a.values()] == [(a.n_neurons,)]


def test_neuron_edit_gradients_only_on_chosen(tiny_llama):
    lm, a = tiny_llama, tiny_llama.arch
    edit = randomise(parse_units("L0N3,L2N5,L2N6", a).make_edit(a), 2)
    ids = lm.tokenizer("yes indeed it is", return_tensors="pt")
    with edit.attach(lm):
        full_b = {l: edit.b(l) for l in edit.layers}
        for v in full_b.values():
            v.retain_grad()
        # the same forward, but with the hook reading the retained full vectors
        edit.b = lambda l: full_b[l]
        lm.model(**ids).logits.square().mean().backward()
    del edit.b
    for l, chosen in ((0, [3]), (2, [5, 6])):
        assert edit.a[str(l)].grad.abs().max() > 0
        assert torch.equal(edit.b_s[str(l)].grad.view(-1), full_b[l].grad[chosen])  # chosen entries: their gradient
        assert full_b[l].grad.abs().max() > 0


def test_neuron_merge_equals_hook_and_roundtrip(tiny, tmp_path):
    a = tiny.arch
    edit = randomise(parse_units("L0N1,L2N3,L2N0", a).make_edit(a, scale=0.5), 1)
    with edit.attach(tiny):
        hooked = logits(tiny)
    assert not torch.allclose(hooked, logits(tiny), atol=1e-3)
    edit.save(tmp_path / "n", extra={"note": "kept"})
    fresh = make_tiny(a.model_type)
    loaded = load_intervention(tmp_path / "n", fresh.arch)
    assert type(loaded) is NeuronRank1 and loaded.config() == edit.config() and loaded.scale == 0.5
    assert loaded.neurons.names == ["L0N1", "L2N0", "L2N3"]
    with loaded.attach(fresh):
        assert torch.allclose(logits(fresh), hooked, atol=1e-5)
    loaded.merge(fresh)
    assert not fresh.arch.has_hooks()
    assert torch.allclose(logits(fresh), hooked, atol=1e-4, rtol=1e-4)


def test_neuron_file_with_b_outside_is_rejected(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    a = tiny_llama.arch
    randomise(parse_units("L1N4", a).make_edit(a)).save(tmp_path / "e")
    t = load_file(str(tmp_path / "e" / "edit.safetensors"))
    t["b.1"][9] = 1.0
    save_file(t, str(tmp_path / "e" / "edit.safetensors"))
    with pytest.raises(LocauditError, match="non-zero b.1 outside the neurons of S"):
        load_intervention(tmp_path / "e", a)
    randomise(parse_units("L1N4", a).make_edit(a)).save(tmp_path / "f")
    with pytest.raises(LocauditError, match="does not fit this model"):
        load_intervention(tmp_path / "f", wider_llama().arch)


def _block_outputs(lm, edit=None):
    outs = []
    ctx = edit.attach(lm) if edit is not None else torch.no_grad()
    with ctx:  # capture hooks registered after the edit's: they see each block's edited output
        hooks = [lm.arch.block(l).register_forward_hook(lambda m, args, o: outs.append(o.detach().clone()))
                 for l in range(lm.arch.n_layers)]
        with torch.no_grad():
            final = lm.model(**lm.tokenizer("Q: is the sky blue?\nA: yes it is", return_tensors="pt")).logits
        for h in hooks:
            h.remove()
    return outs, final


def test_residual_edit_changes_the_stream_from_its_block_on(tiny):
    a = tiny.arch
    edit = randomise(parse_units("L1", a).make_edit(a, scale=0.7), 3)
    base, base_logits = _block_outputs(tiny)
    edited, edited_logits = _block_outputs(tiny, edit)
    assert torch.equal(edited[0], base[0])  # blocks before l: identical
    r = base[1]  # block 1's own output is unchanged before the edit (its input is): shifted by exactly s <a, r> b
    assert torch.allclose(edited[1], r + 0.7 * (r @ edit.a["1"]).unsqueeze(-1) * edit.b["1"], atol=1e-6)
    assert not torch.allclose(edited[2], base[2], atol=1e-4) and not torch.allclose(edited_logits, base_logits, atol=1e-4)


def test_residual_edit_gradients_save_load_and_no_merge(tiny, tmp_path):
    a = tiny.arch
    ids = tiny.tokenizer("yes indeed it is", return_tensors="pt")
    edit = parse_units("L0,L2", a).make_edit(a)
    with edit.attach(tiny):
        tiny.model(**ids).logits.square().mean().backward()
    # at initialisation (b = 0) only b has a gradient: <a, r> b does not depend on a while b = 0
    assert all(edit.b[k].grad.abs().max() > 0 and not edit.a[k].grad.any() for k in ("0", "2"))
    randomise(edit, 6)
    edit.zero_grad()
    with edit.attach(tiny):
        tiny.model(**ids).logits.square().mean().backward()
    assert all(p.grad.abs().max() > 0 for p in edit.parameters())
    with edit.attach(tiny):
        hooked = logits(tiny)
    edit.save(tmp_path / "r")
    loaded = load_intervention(tmp_path / "r", a)
    assert type(loaded) is ResidualRank1 and loaded.config() == {"kind": "residual", "layers": ["L0", "L2"],
                                                                 "label": "custom", "scale": 1.0}
    with loaded.attach(tiny):
        assert torch.allclose(logits(tiny), hooked, atol=1e-6)
    with pytest.raises(LocauditError, match="is an activation edit") as e:
        loaded.merge(tiny)
    assert "\n" not in str(e.value) and "L0,L2" in str(e.value)
    with pytest.raises(LocauditError, match="does not fit this model"):
        load_intervention(tmp_path / "r", wider_llama().arch)


class _TupleBlock(nn.Module):
    """A block returning (hidden states, extra), as decoder layers of older transformers releases do."""

    def forward(self, x):
        return x * 2, "extra"


def test_residual_edit_on_tuple_outputs():
    block = _TupleBlock()
    arch = SimpleNamespace(n_layers=1, d_model=4, model_type="toy", block=lambda l: block)
    edit = ResidualRank1(parse_layers("L0"), arch)
    with torch.no_grad():
        edit.b["0"].copy_(torch.tensor([1.0, -1.0, 0.5, 0.0]))
    x = torch.randn(2, 3, 4)
    handles = edit._hooks(SimpleNamespace(arch=arch))
    out, extra = block(x)
    for h in handles:
        h.remove()
    r = x * 2
    assert extra == "extra" and torch.allclose(out, r + (r @ edit.a["0"]).unsqueeze(-1) * edit.b["0"])


# ------------------------------------------------------------------------------------------------ fitting

@pytest.mark.parametrize("spec", ["L1H0,L2H1", "L1N3,L1N40,L2N9", "L1"])
def test_ipo_fit_reduces_loss_for_each_kind(tiny_llama, spec):
    lm = tiny_llama
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    units = parse_units(spec, lm.arch)
    edit = units.make_edit(lm.arch)
    cfg = FitConfig(tau=0.5, epochs=3, batch_size=4, lr=5e-2, fmt="plain")
    r = fit(lm, edit, toy_pairs(16), toy_pairs(8, 100), cfg, progress=False)
    evals = [h for h in r.history if "val_loss" in h]
    assert r.best["val_loss"] < 0.8 * evals[0]["val_loss"] and r.best["val_pref_acc"] > 0.5
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # base weights frozen
    if units.kind == "neurons":  # b stays exactly zero outside the chosen neurons
        for l, chosen in units.by_layer().items():
            b = edit.b(l)
            assert torch.count_nonzero(b[[i for i in range(lm.arch.n_neurons) if i not in chosen]]) == 0
            assert torch.count_nonzero(b[chosen]) == len(chosen)
