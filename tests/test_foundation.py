"""Models/adapter, heads, data, activations, probes and ITI on tiny random models of every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locaudit.errors import LocauditError
from locaudit.heads import Head, parse_heads, random_heads, all_heads
from locaudit.interventions import ITI


def logits(lm, text="Q: hello there\nA: yes"):
    ids = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return lm.model(**ids).logits


def test_adapter_shapes(tiny):
    a = tiny.arch
    assert a.n_layers == 3 and a.n_heads == 4
    assert a.W(0).shape == (a.d_model, a.n_heads * a.head_dim)
    # W(l) @ o reproduces the projection's output (mind GPT-2's transposed Conv1D)
    o = torch.randn(2, a.n_heads * a.head_dim)
    proj = a.out_proj(1)
    bias = proj.bias if proj.bias is not None else 0
    assert torch.allclose(proj(o), o @ a.W(1).t() + bias, atol=1e-5)


def test_head_slicing_is_exact(tiny):
    """The captured o^l split by head equals a manual recomputation from the attention module."""
    from locaudit.activations import capture_last_token

    # texts sharing a long prefix (one question's answers) run it once; a lone text; a text that is a prefix
    # of another; batches that mix groups
    texts = ["Q: a b c A: d", "Q: longer text here A: yes it is", "Q: longer text here A: no", "Q: longer text here A: no, it is not",
             "Q: longer text here A:", "Q: other question entirely? A: maybe so"]
    acts = capture_last_token(tiny, texts, batch_size=2, progress=False)
    assert np.array_equal(acts, capture_last_token(tiny, texts, batch_size=2, progress=False, chunk_groups=1)) or \
        np.allclose(acts, capture_last_token(tiny, texts, batch_size=2, progress=False, chunk_groups=1), atol=1e-5)
    # manual: run each text alone, record the out_proj input at the last token
    arch = tiny.arch
    for i, t in enumerate(texts):
        seen = {}
        hs = [arch.out_proj(l).register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(l, a[0][0, -1].clone()))
              for l in range(arch.n_layers)]
        logits(tiny, t)
        for h in hs:
            h.remove()
        for l in range(arch.n_layers):
            for h in range(arch.n_heads):
                manual = seen[l][arch.head_slice(h)]
                assert torch.allclose(torch.from_numpy(acts[i, l, h]), manual, atol=1e-5)


def test_iti_hook_equals_baked_bias(tiny):
    arch = tiny.arch
    heads = parse_heads("L0H1,L2H3,L2H0", arch.n_layers, arch.n_heads)
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(3, arch.head_dim, generator=g), dim=-1)
    iti = ITI(heads, u, torch.tensor([0.5, 1.0, 2.0]), alpha=3.0, placement="all")
    base = logits(tiny)
    with iti.attach(tiny):
        hooked = logits(tiny)
    assert torch.allclose(logits(tiny), base)  # hooks removed
    assert (hooked - base).abs().max() > 1e-3  # the intervention does something
    iti.merge(tiny)
    assert torch.allclose(logits(tiny), hooked, atol=1e-4)


def test_unsupported_architecture():
    from transformers import BertConfig, BertLMHeadModel
    from locaudit.models import arch_for

    m = BertLMHeadModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, is_decoder=True))
    with pytest.raises(LocauditError, match="unsupported architecture 'bert'.*llama"):
        arch_for(m)


@pytest.mark.parametrize("bad", ["L3-H1", "LxH2", "", "L1H", "H1L2", "L1H2,", "l1h2"])
def test_bad_head_names(bad):
    with pytest.raises(LocauditError):
        parse_heads(bad, 4, 4)


def test_head_parsing():
    hs = parse_heads("L2H1, L0H3", 3, 4)
    assert hs.names == ["L0H3", "L2H1"] and hs.by_layer() == {0: [3], 2: [1]}
    with pytest.raises(LocauditError, match="out of range"):
        parse_heads("L99H3", 3, 4)
    with pytest.raises(LocauditError, match="out of range"):
        parse_heads("L1H4", 3, 4)
    with pytest.raises(LocauditError, match="twice"):
        parse_heads("L1H1,L1H1", 3, 4)


def test_random_heads_reproducible():
    a, b = random_heads(5, 7, 30, 9), random_heads(5, 7, 30, 9)
    assert a == b and len(set(a.heads)) == 5
    assert random_heads(5, 8, 30, 9) != a
    assert all(0 <= h.layer < 30 and 0 <= h.head < 9 for h in a)
    # uniform over all heads: every head is drawn at a similar rate over many seeds
    counts = np.zeros(12)
    for s in range(3000):
        for h in random_heads(3, s, 3, 4):
            counts[h.layer * 4 + h.head] += 1
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    assert len(all_heads(3, 4)) == 12


def test_split_disjoint_and_seeded(questions):
    from locaudit.data.truthfulqa import split_questions

    s = split_questions(questions, seed=0)
    ids = [set(q.id for q in p) for p in (s.train, s.val, s.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(map(len, ids)) == 817 and len(ids[0]) == round(0.6 * 817)
    assert split_questions(questions, seed=0).hash == s.hash != split_questions(questions, seed=1).hash
    small = split_questions(questions, seed=0, limit=20)
    assert (len(small.train), len(small.val), len(small.test)) == (12, 4, 4)
    with pytest.raises(LocauditError, match="empty"):
        split_questions(questions, limit=2)


def test_pair_and_mc_counts(questions):
    from locaudit.data.examples import mc_items, preference_pairs, probe_examples

    q = questions[0]
    pairs = preference_pairs([q])
    assert len(pairs) == len(q.correct) * len(q.incorrect)
    assert len({(p.chosen, p.rejected) for p in pairs}) == len(pairs)
    assert sum(len(x.correct) * len(x.incorrect) for x in questions) == len(preference_pairs(questions)) == 12365
    items = mc_items(questions)
    assert all(sum(i.mc1_labels) == 1 for i in items)
    assert sum(1 for x in questions if x.mc1) == 817  # matched to mc_task.json modulo whitespace
    ex = probe_examples([q], "iti", seed=0)
    assert ex[0].text.startswith(f"Q: {q.question} A: ") and {e.label for e in ex} == {0, 1}
    ex2 = probe_examples([q], "iti_end_q", seed=0, pool=questions)
    assert all(e.text.count("Q: ") == 2 for e in ex2)


def test_checksum_mismatch(tmp_path, questions):
    import shutil
    from locaudit.data.truthfulqa import load_truthfulqa
    from tests.conftest import SHARED

    for f in SHARED.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "TruthfulQA.csv").chmod(0o644)
    with open(tmp_path / "TruthfulQA.csv", "a") as f:
        f.write("x")
    with pytest.raises(LocauditError, match="checksum mismatch"):
        load_truthfulqa(tmp_path)


def test_activation_cache_hit(tiny_llama, monkeypatch):
    from locaudit import activations

    texts = ["Q: one A: two", "Q: three A: four"]
    first = activations.cached_activations(tiny_llama, texts, progress=False)
    calls = []
    monkeypatch.setattr(activations, "capture_last_token", lambda *a, **k: calls.append(1))
    second = activations.cached_activations(tiny_llama, texts, progress=False)
    assert not calls and np.array_equal(first, second)


def test_probes_find_planted_signal():
    from locaudit.probes import train_probes

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2, 3, 4)).astype(np.float32)
    y = rng.integers(0, 2, 400)
    x[:, 1, 2, 0] += 3 * (2 * y - 1)  # only L1H2 carries the label
    r = train_probes(x[:300], y[:300], x[300:], y[300:], progress=False)
    assert r.ranking[0] == Head(1, 2) and r.val_acc[1, 2] > 0.9
    assert np.median(r.val_acc) < 0.65
    assert np.allclose(np.linalg.norm(r.directions, axis=-1), 1, atol=1e-5)
    assert r.directions[1, 2, 0] > 0.9 and r.sigmas[1, 2] > 2


def test_shared_prefix_groups():
    from locaudit.activations import shared_prefix_groups

    enc = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [9, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12], [1, 2, 3, 4, 5, 6, 7, 8]]
    groups = {tuple(g): n for n, g in shared_prefix_groups(enc, min_shared=8)}
    # the three texts starting 1..8 share 7 tokens (the shortest keeps one of its own); [9, 9] is alone
    assert groups == {(3, 0, 2): 7, (1,): 0}
