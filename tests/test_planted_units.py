"""Planted localizations for neuron and layer claims, the counterparts of test_audit.py's planted heads.

The preference between the answers " a" and " b" is read off the residual stream r at the position of " "
(the answers' shared first token) along d = gamma * (U_a - U_b) (final RMSNorm gain times the unembedding
difference): the logit difference is d . r / rms(r), so what writes nothing along d cannot flip it.

Neurons. A one-layer Llama whose attention output projection W_O is projected off d and whose W_down has every
column but neuron n*'s projected off d. The optimal edit at neuron i adds s <a, m> W_down[:, i] b_i: only at n*
can it write along d. In the spread model nothing is projected: every neuron writes along d.

Layers. The behaviour depends on the prompt: prompts starting with "x" prefer " a", with "y" prefer " b" (half
each, the split stratified by that letter). A 22-layer Llama whose heads all attend from " " to the prompt's
first token, whose blocks 0..20 are the identity (W_O and W_down zero) and whose last block writes nothing along
d (its W_O and W_down projected off d). The edit r <- r + s <a, r> b after block l < 21 acts at every position:
at " " it adds the same vector to every prompt (r there is the embedding of " "), and what it changes elsewhere
reaches " " only through the last block, which writes nothing along d; so d . r at " " is the same for every
prompt, the model prefers the same answer everywhere and gets exactly half the balanced test items right, as
unedited. After block 21, r at " " carries the first token's value vector: the edit there can read x against y
with a and write along d with b. (Identity blocks alone are not enough: with the last block left whole, an
edit before it changes the first token's residual, hence what the last block's attention carries along d, and
every layer can tell the prompts apart.) The spread model is the same model with no block zeroed or projected:
every block reads the first token and writes along d.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import byte_tokenizer, random_llama
from locaudit.audit import AuditConfig, audit
from locaudit.models import wrap_model
from locaudit.training import FitConfig

TOK = byte_tokenizer()
V = len(TOK)
MIDDLE = "qwrtuiopsdfghjklzcvnm"  # the letters after the first one of an x / y prompt (neither x nor y)


def token(text: str) -> int:
    return TOK.convert_tokens_to_ids(text)


def llama(layers: int, width: int, heads: int, neurons: int, seed: int):
    """A random Llama on the byte tokenizer (conftest's `random_llama`)."""
    return random_llama(layers, width, heads, neurons, seed, V)


def preference_direction(m) -> torch.Tensor:
    """Unit d = gamma * (U_a - U_b): the only direction of r the preference " a" over " b" reads."""
    d = m.model.norm.weight * (m.lm_head.weight[token("a")] - m.lm_head.weight[token("b")])
    return (d / d.norm()).detach()


def off(d: torch.Tensor, W: torch.Tensor) -> None:
    """Project the columns of W (d_model, n) off d, in place."""
    W.copy_(W - torch.outer(d, d @ W))


def planted_neurons(star: int | None, seed: int = 0):
    """The module docstring's neuron model: only neuron `star` of layer 0 writes along d (None: every neuron)."""
    m = llama(layers=1, width=48, heads=4, neurons=32, seed=seed)
    d = preference_direction(m)
    block = m.model.layers[0]
    with torch.no_grad():
        if star is not None:
            off(d, block.self_attn.o_proj.weight)
            W = block.mlp.down_proj.weight  # (d_model, n_neurons): the arch's W_down
            kept = W[:, star].clone()
            off(d, W)
            W[:, star] = kept
            reach = (d @ W).abs()
            assert reach.argmax() == star and reach.max() > 0.1 and reach.sort().values[-2] < 1e-5
            assert (d @ block.self_attn.o_proj.weight).abs().max() < 1e-5
    lm = wrap_model(m, TOK, f"planted-neurons-{star}-{seed}")
    assert lm.arch.W_down(0).shape == (48, 32)
    return lm


def attend_to_first_token(block, emb: torch.Tensor) -> None:
    """Every head of `block` attends from " " to an x / y prompt's first token: queries and keys live only in the
    slowest rotary pair (it turns by 1e-3 rad per position, so position hardly matters), the query is the
    direction of " "'s embedding, the key g is orthogonal to the embedding of every other token a prompt holds
    and has <g, e> = 1 on the unit embeddings e of "x" and "y"."""
    unit = lambda t: emb[token(t)] / emb[token(t)].norm()
    others = [unit(c) for c in MIDDLE + ":Ġ"]
    M = torch.stack(others + [unit("x"), unit("y")])
    target = torch.cat([torch.zeros(len(others)), torch.ones(2)])
    g = torch.linalg.pinv(M) @ target
    assert torch.allclose(M @ g, target, atol=1e-4)
    attn = block.self_attn
    hd = attn.head_dim
    attn.q_proj.weight.zero_()
    attn.k_proj.weight.zero_()
    for h in range(attn.q_proj.weight.shape[0] // hd):
        attn.q_proj.weight[h * hd + hd // 2 - 1] = unit("Ġ")
        attn.k_proj.weight[h * hd + hd // 2 - 1] = g


def planted_layers(localized: bool, seed: int = 0, n_layers: int = 22):
    """The module docstring's layer model (`localized`), or the same model with every block left whole."""
    m = llama(layers=n_layers, width=32, heads=4, neurons=32, seed=seed)
    d = preference_direction(m)
    with torch.no_grad():
        for block in m.model.layers:
            attend_to_first_token(block, m.model.embed_tokens.weight)
        if localized:
            for block in m.model.layers[:-1]:
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
            last = m.model.layers[-1]
            off(d, last.self_attn.o_proj.weight)
            off(d, last.mlp.down_proj.weight)
    return wrap_model(m, TOK, f"planted-layers-{'last' if localized else 'spread'}-{seed}"), d


def write_all_a(path, n=60, seed=0):
    """Prompts of 6 random letters and ":", every one preferring " a" to " b"."""
    rng = np.random.default_rng(seed)
    rows = [{"prompt": "".join(rng.choice(list(MIDDLE + "xy"), 6)) + ":", "chosen": " a", "rejected": " b"}
            for _ in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_xy(path, n=60, seed=0):
    """Prompts "x" or "y" (alternately) then 5 letters of MIDDLE and ":"; x prefers " a", y " b"; group: the
    first letter, so every part of the split holds as many x as y prompts."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        first = "xy"[i % 2]
        chosen, rejected = (" a", " b") if first == "x" else (" b", " a")
        rows.append({"prompt": first + "".join(rng.choice(list(MIDDLE), 5)) + ":", "chosen": chosen,
                     "rejected": rejected, "group": first})
    assert len({r["prompt"] for r in rows}) == n
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


NEURONS = AuditConfig(n_random=21, match_layers=True,
                      fit=FitConfig(max_steps=48, eval_every=4, patience=2, batch_size=8, lr=0.1))
# layer claims: random single layers from every layer (a layer-matched draw could only return the claim); no
# steering arms (CAA at a layer adds one vector to every prompt, which cannot tell x from y either)
LAYERS = AuditConfig(n_random=21, steering=False,
                     fit=FitConfig(max_steps=16, eval_every=4, patience=2, batch_size=8, lr=0.1))


def test_planted_single_neuron_is_singled_out(tmp_path):
    res = audit("L0N7", write_all_a(tmp_path / "p.jsonl"), tmp_path / "o", NEURONS, lm=planted_neurons(7),
                progress=False)
    randoms = [r for r in res.rows if r["kind"] == "random"]
    assert len(randoms) == 21 and all(len(r["units"]) == 1 and r["units"][0].startswith("L0N") for r in randoms)
    assert res.row("claim")["value"] > max(r["value"] for r in randoms)
    # no other neuron writes along d: each random edit keeps the unedited model's preference accuracy
    assert all(r["value"] == pytest.approx(res.row("none")["value"]) for r in randoms)
    assert res.null.percentile == 100.0 and res.null.p_rank < 0.05
    assert res.strength == "singled-out"
    assert res.frac_full[0] > 0.8
    # mean-difference steering at a random neuron writes through its W_down column too: it cannot move anything
    # (at n* it need not help: its vector is read at the answer letter, whose activation has nothing to do with the
    # preference read at " ", so its sign there is arbitrary)
    steer = [r for r in res.rows if r["kind"] == "random-steer"]
    assert len(steer) == 21 and all(r["value"] == pytest.approx(res.row("none")["value"]) for r in steer)


def test_spread_neurons_are_not_singled_out(tmp_path):
    res = audit("L0N7", write_all_a(tmp_path / "p.jsonl"), tmp_path / "o", replace(NEURONS, steering=False),
                lm=planted_neurons(None), progress=False)
    randoms = [r["value"] for r in res.rows if r["kind"] == "random" and r["status"] != "stuck"]
    assert len(randoms) >= 15
    assert np.median(randoms) > res.row("none")["value"] + 0.3  # random neurons move the behaviour too
    assert res.null.p_rank > 0.05 and res.strength != "singled-out"


def residual_at_space(lm, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """r at the position of " " entering and leaving the last block."""
    seen = {}
    last = lm.arch.block(lm.arch.n_layers - 1)
    handle = last.register_forward_hook(lambda mod, args, out: seen.update(r=out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            hidden = lm.model(input_ids=torch.tensor([TOK(prompt + " ").input_ids]), output_hidden_states=True)
    finally:
        handle.remove()
    return hidden.hidden_states[-2][0, -1], seen["r"][0, -1]


def test_planted_last_layer_is_singled_out(tmp_path):
    lm, d = planted_layers(localized=True)
    # the construction's premises: r at " " entering the last block is the embedding of " " for every prompt; the
    # r leaving it has one d . r for all and tells x from y
    entering, leaving = zip(*(residual_at_space(lm, p) for p in ("xqwrtu:", "xpoiuz:", "ykjhgf:", "yzvcnm:")))
    space = lm.model.model.embed_tokens.weight[token("Ġ")]
    assert all(torch.allclose(r, space) for r in entering)
    assert max(abs(float(d @ (r - leaving[0]))) for r in leaving) < 1e-4
    assert (leaving[0] - leaving[1]).norm() < 0.05 * (leaving[0] - leaving[2]).norm()  # the first token decides

    res = audit("L21", write_xy(tmp_path / "xy.jsonl"), tmp_path / "o", LAYERS, lm=lm, progress=False)
    randoms = [r for r in res.rows if r["kind"] == "random"]
    assert sorted(int(r["units"][0][1:]) for r in randoms) == list(range(21))  # every other layer, once
    assert res.row("none")["value"] == 0.5  # one preference everywhere: right on the x or on the y half
    assert all(r["value"] == 0.5 for r in randoms)  # and no edit before the last block changes that
    assert res.row("claim")["value"] > 0.9
    assert res.null.percentile == 100.0 and res.null.p_rank < 0.05
    assert res.strength == "singled-out"
    assert res.frac_full[0] > 0.8


def test_spread_layers_are_not_singled_out(tmp_path):
    lm, _ = planted_layers(localized=False)
    res = audit("L21", write_xy(tmp_path / "xy.jsonl"), tmp_path / "o", LAYERS, lm=lm, progress=False)
    randoms = [r for r in res.rows if r["kind"] == "random" and r["status"] != "stuck"]
    assert len(randoms) >= 15
    # layers before the last tell the prompts apart too: they reach a good share of full alignment's gain
    assert res.row("full")["gain"] > 0.3
    assert np.median([r["frac_full"] for r in randoms]) > 0.5
    assert res.null.p_rank > 0.05 and res.strength != "singled-out"
