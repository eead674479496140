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
