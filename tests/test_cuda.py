"""The GPU path: the same computations on CUDA, in float32 and bfloat16, agree with the CPU reference.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
`python -m pytest -q tests/test_cuda.py`. `LOCAUDIT_TEST_DEVICE=cpu` runs the same checks with the CPU standing
in for the device (the bfloat16 ones included), to try them without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from locaudit.data.formats import PromptFormat
from locaudit.scoring import answer_logprobs, encode, encode_prefix
from tests.conftest import FAMILIES, make_tiny

DEVICE = os.environ.get("LOCAUDIT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

QA = [("Is fire hot?", "Yes, very."), ("Is fire hot?", "No."), ("Why is the sky blue?", "Rayleigh scattering."),
      ("What is the capital of France?", "Paris is the capital of France.")]
QUESTIONS = ["Is fire hot?", "Why is the sky blue?", "Who wrote Hamlet?", "What is 2+2?", "Where is Rome?"]


def on(lm, device, dtype):
    lm.model.to(device=device, dtype=dtype)
    return lm


@pytest.fixture(params=FAMILIES)
def pair(request):
    """(CPU float32 reference, the same weights on CUDA float32)."""
    return make_tiny(request.param), on(make_tiny(request.param), DEVICE, torch.float32)


def _scores(lm):
    fmt = PromptFormat("qa")
    enc = [encode(lm.tokenizer, fmt, q, a) for q, a in QA]
    return answer_logprobs(lm, encode_prefix(lm.tokenizer, fmt), enc, batch_size=3)[0]


def test_scoring_matches_cpu(pair):
    cpu, gpu = pair
    assert torch.allclose(_scores(gpu), _scores(cpu), atol=1e-3, rtol=1e-4)


def test_scoring_bf16_close_to_fp32(pair):
    _, gpu = pair
    ref = _scores(gpu)
    bf = _scores(on(gpu, DEVICE, torch.bfloat16))
    assert torch.isfinite(bf).all()
    assert (bf - ref).abs().max() < 0.05 * ref.abs().max() + 0.5  # bf16 keeps ~3 significant digits


def test_generation_matches_cpu_and_one_by_one(pair):
    from locaudit.evaluation.generation import encode_prompts, greedy_generate

    cpu, gpu = pair
    prompts = encode_prompts(gpu, QUESTIONS, "qa")
    batched = greedy_generate(gpu, prompts, max_new_tokens=8, batch_size=3)
    assert batched == [greedy_generate(gpu, [p], max_new_tokens=8, share_prefix=False)[0] for p in prompts]
    assert batched == greedy_generate(cpu, prompts, max_new_tokens=8, batch_size=3)


def test_edit_hook_equals_merge_and_trains_on_cuda(pair):
    from locaudit.data.examples import PreferencePair
    from locaudit.heads import parse_heads
    from locaudit.interventions import LocalizedRank1
    from locaudit.training import FitConfig, fit

    _, gpu = pair
    a = gpu.arch
    heads = parse_heads("L0H1,L2H3", a.n_layers, a.n_heads)
    train = [PreferencePair(i, q, "Yes, it is true.", "No, it is false.") for i, q in enumerate(QUESTIONS * 2)]
    edit = LocalizedRank1(heads, a)
    res = fit(gpu, edit, train, train[:4], FitConfig(epochs=3, batch_size=2, lr=0.3, fmt="plain"), progress=False)
    assert res.best["val_loss"] < res.history[0]["val_loss"]
    ids = torch.tensor([list(range(5, 25))], device=DEVICE)
    with torch.no_grad():
        with edit.attach(gpu):
            hooked = gpu.model(ids).logits
        edit.merge(gpu)
        merged = gpu.model(ids).logits
    assert torch.allclose(hooked, merged, atol=1e-4, rtol=1e-4)
