"""Answer-only scoring with a shared prefix equals full-sequence log-probs, for every family."""

from __future__ import annotations

import torch

from locaudit.data.formats import PromptFormat
from locaudit.scoring import answer_logprobs, encode, encode_prefix


def direct_logprob(lm, ids, n_answer):
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    T = len(ids)
    return sum(float(lp[t - 1, ids[t]]) for t in range(T - n_answer, T))


def test_prefix_scoring_matches_full_sequence(tiny):
    fmt = PromptFormat("qa")
    prefix = encode_prefix(tiny.tokenizer, fmt)
    assert len(prefix) > 100  # instruction + primer
    qs = [("What is 2+2?", "Four."), ("Why is the sky blue?", "Because of Rayleigh scattering of light."),
          ("Hi?", "No.")]
    enc = [encode(tiny.tokenizer, fmt, q, a) for q, a in qs]
    lp, n = answer_logprobs(tiny, prefix, enc, batch_size=2)
    for i, e in enumerate(enc):
        full = list(prefix) + list(e.prompt) + list(e.answer)
        assert n[i] == len(e.answer)
        assert abs(lp[i] - direct_logprob(tiny, full, len(e.answer))) < 1e-3


def test_plain_format_without_prefix(tiny_llama):
    fmt = PromptFormat("plain")
    prefix = encode_prefix(tiny_llama.tokenizer, fmt)
    e = encode(tiny_llama.tokenizer, fmt, "Is water wet?", "Yes.")
    lp, _ = answer_logprobs(tiny_llama, prefix, [e])
    full = list(prefix) + list(e.prompt) + list(e.answer)
    assert abs(lp[0] - direct_logprob(tiny_llama, full, len(e.answer))) < 1e-4


def test_shared_prompts_match_full_sequence(tiny):
    """Several answers to one prompt (run once per batch), one-token answers and a lone prompt, in one batch
    and split across batches, all equal the full-sequence log-probs."""
    from locaudit.scoring import collate, grouped_batches

    fmt = PromptFormat("qa")
    prefix = encode_prefix(tiny.tokenizer, fmt)
    qa = [("Is fire hot?", "Yes, very."), ("Is fire hot?", "No."), ("Is fire hot?", "It depends on the fire."),
          ("Why?", "Because."), ("Is fire hot?", "Y"), ("What is the capital of France?", "Paris is.")]
    enc = [encode(tiny.tokenizer, fmt, q, a) for q, a in qa]
    enc[4] = type(enc[4])(enc[4].prompt, enc[4].answer[:1])  # a one-token answer
    batch = collate(enc, tiny.tokenizer.pad_token_id, "cpu")
    assert batch["prompt_ids"].shape[0] == 3  # three distinct prompts, each run once
    for bs in (2, 6):
        lp, n = answer_logprobs(tiny, prefix, enc, batch_size=bs)
        for i, e in enumerate(enc):
            full = list(prefix) + list(e.prompt) + list(e.answer)
            assert n[i] == len(e.answer)
            assert abs(lp[i] - direct_logprob(tiny, full, len(e.answer))) < 1e-3
    # answers to one prompt stay together in a batch
    groups = grouped_batches(enc, 4)
    assert sorted(i for b in groups for i in b) == list(range(len(enc)))
    assert any({0, 1, 2} <= set(b) for b in groups)


def test_shared_prompt_scoring_is_differentiable(tiny_llama):
    """Gradients through both levels (prompt and answers) reach an attached edit, as training needs."""
    from locaudit.heads import parse_heads
    from locaudit.interventions import LocalizedRank1
    from locaudit.scoring import batch_answer_logprobs, collate, prefix_kv

    fmt = PromptFormat("qa")
    lm = tiny_llama
    edit = LocalizedRank1(parse_heads("L0H1,L2H3", lm.arch.n_layers, lm.arch.n_heads), lm.arch)
    with torch.no_grad():
        for p in edit.b_s.values():
            p.normal_(0, 0.1)
    enc = [encode(lm.tokenizer, fmt, "Is fire hot?", a) for a in ("Yes.", "No, it is cold.")]
    with edit.attach(lm):
        kv = prefix_kv(lm, encode_prefix(lm.tokenizer, fmt))
        lp, _ = batch_answer_logprobs(lm, collate(enc, lm.tokenizer.pad_token_id, "cpu"), kv)
        (lp[0] - lp[1]).backward()
    grads = [p.grad for p in edit.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
