"""Where ITI shifts o^l: `placement="iti"` (ITI's own protocol) against `"all"` (every position).

Every forward pass of MC scoring, generation and CE/KL is recorded at each attention output projection, just
before and just after the ITI hook, together with its input ids; the difference is exactly the shift at each
position. Which positions a forward *should* shift is worked out from its input ids alone (prefix, prompt,
answer or generated rows), never from the declaration under test.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from locaudit.errors import LocauditError
from locaudit.evaluation.generation import greedy_generate
from locaudit.evaluation.lm_metrics import TextMetrics
from locaudit.heads import parse_heads
from locaudit.interventions import (
    ITI, FullRank1, LocalizedRank1, NoEdit, declared_positions, edit_positions, load_intervention,
)
from locaudit.scoring import Encoded, answer_logprobs, batch_answer_logprobs, collate, prefix_kv
from tests.conftest import FAMILIES, make_tiny

SPEC = "L0H1,L1H2,L2H0,L2H3"


def random_iti(lm, placement, alpha=4.0, seed=1) -> ITI:
    arch = lm.arch
    heads = parse_heads(SPEC, arch.n_layers, arch.n_heads)
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(len(heads), arch.head_dim, generator=g), dim=-1)
    sigma = torch.rand(len(heads), generator=g) + 0.5
    return ITI(heads, u, sigma, alpha=alpha, placement=placement)


def ids_of(lm, text):
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


@contextlib.contextmanager
def recording(lm, edit):
    """Attach `edit` and record every forward: its input ids, and per layer the o^l seen just before and
    just after the edit's hook (their difference is the shift it added)."""
    arch = lm.arch
    forwards: list[dict] = []
    handles = [lm.model.get_input_embeddings().register_forward_pre_hook(
        lambda m, a: forwards.append({"ids": a[0].detach().clone(), "before": {}, "shift": {}}))]
    with edit.attach(lm):
        for l in range(arch.n_layers):
            def before(m, a, l=l):
                forwards[-1]["before"][l] = a[0].detach().clone()

            def after(m, a, l=l):
                forwards[-1]["shift"][l] = a[0].detach() - forwards[-1]["before"][l]
            handles.append(arch.out_proj(l).register_forward_pre_hook(before, prepend=True))
            handles.append(arch.out_proj(l).register_forward_pre_hook(after))
        try:
            yield forwards
        finally:
            for h in handles:
                h.remove()


def assert_shifted(lm, edit, forward, expected: torch.Tensor, what: str):
    """The forward's shift is alpha sigma u exactly at `expected` (B, T) positions and exactly 0 elsewhere."""
    B, T = forward["ids"].shape
    assert expected.shape == (B, T), what
    shifts = edit.layer_shifts(lm.arch)
    for l in range(lm.arch.n_layers):
        d = forward["shift"][l]
        v = shifts.get(l, torch.zeros(d.shape[-1]))
        want = expected[..., None].float() * v.to(d.dtype)
        assert torch.allclose(d, want, atol=1e-6, rtol=0), f"{what}, layer {l}"
        if l in shifts:  # the shift is non-zero wherever expected, so 'changed' and 'expected' coincide
            assert torch.equal(d.abs().amax(-1) > 0, expected.bool()), f"{what}, layer {l}"


def rows_of(ids: torch.Tensor, pad: int, left: bool = False) -> list[tuple[int, ...]]:
    out = []
    for row in ids.tolist():
        real = [t for t in row if t != pad]
        n = len(real)
        assert (row[len(row) - n:] if left else row[:n]) == real, "padding only on one side"
        out.append(tuple(real))
    return out


# ------------------------------------------------------------------------------------------------ MC scoring

def mc_examples(lm):
    """A shared prefix, three prompts, answers of 1..9 tokens (so answer rows are padded), some prompts with
    several answers."""
    prefix = [lm.tokenizer.bos_token_id] + ids_of(lm, "Answer truthfully.\n\n")
    qs = ["Q: Is the sky blue?\nA:", "Q: What is 2+2?\nA:", "Q: Why?\nA:"]
    ans = [" Yes, on a clear day.", " No.", " 4", " Four, of course.", " Because.", "4"]  # "4": one token
    pairs = [(0, 0), (0, 1), (1, 2), (1, 3), (1, 1), (1, 5), (2, 4), (2, 2), (2, 5)]
    return prefix, [Encoded(tuple(ids_of(lm, qs[q])), tuple(ids_of(lm, ans[a]))) for q, a in pairs]


def naive_answer_logprob(lm, prefix, e: Encoded, shift_answer_only: bool) -> float:
    """Summed answer log-prob from one full unpadded, uncached pass, the edit shifting the answer tokens only
    (ITI's MC protocol) or every position."""
    ids = list(prefix) + list(e.prompt) + list(e.answer)
    n = len(prefix) + len(e.prompt)
    mask = torch.tensor([[False] * n + [True] * len(e.answer)]) if shift_answer_only else None
    with torch.no_grad(), edit_positions(lm, mask):
        logp = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logp[n + j - 1, t] for j, t in enumerate(e.answer)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["iti", "all"])
def test_mc_scoring_shifts_answer_tokens_only(family, placement):
    lm = make_tiny(family)
    pad = lm.tokenizer.pad_token_id
    prefix, examples = mc_examples(lm)
    edit = random_iti(lm, placement)
    with recording(lm, edit) as forwards:
        total, count = answer_logprobs(lm, prefix, examples, batch_size=2)
    prompts = {e.prompt for e in examples}
    fed_answers = [e.answer[:-1] for e in dict.fromkeys(examples) if len(e.answer) > 1]
    assert rows_of(forwards[0]["ids"], pad) == [tuple(prefix)]  # the shared prefix, once
    seen_answers, kinds = [], []
    for k, f in enumerate(forwards):
        rows = rows_of(f["ids"], pad)
        if k == 0:
            kind, answer_pos = "prefix", torch.zeros_like(f["ids"], dtype=torch.bool)
        elif all(r in prompts for r in rows):
            kind, answer_pos = "prompt", torch.zeros_like(f["ids"], dtype=torch.bool)
        else:
            assert all(r in fed_answers for r in rows), rows
            kind, answer_pos = "answer", f["ids"] != pad
            seen_answers += rows
        kinds.append(kind)
        expected = answer_pos if placement == "iti" else torch.ones_like(answer_pos)
        assert_shifted(lm, edit, f, expected, f"{kind} forward {k}")
    assert sorted(seen_answers) == sorted(fed_answers)  # every answer token was fed (and shifted) once
    assert "prompt" in kinds and "answer" in kinds

    # values: equal to one full pass per example shifting the same positions
    base, _ = answer_logprobs(lm, prefix, examples, batch_size=2)
    with edit.attach(lm):
        for i, e in enumerate(examples):
            ref = naive_answer_logprob(lm, prefix, e, placement == "iti")
            assert float(total[i]) == pytest.approx(ref, abs=2e-4)
            assert count[i] == len(e.answer)
    if placement == "iti":
        n_single = 0
        for i, e in enumerate(examples):
            # a one-token answer is predicted at the (unshifted) last prompt token: ITI leaves its score alone
            if len(e.answer) == 1:
                n_single += 1
                assert float(total[i]) == pytest.approx(float(base[i]), abs=1e-6)
            else:
                assert abs(float(total[i]) - float(base[i])) > 1e-4
        assert n_single == 2
    else:
        assert all(abs(float(t) - float(b)) > 1e-4 for t, b in zip(total, base))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_training_batch_path_places_iti_like_mc(family):
    """`batch_answer_logprobs` (collated batch, grouped prompts) shifts the same positions and gives the same
    log-probs as `answer_logprobs`."""
    lm = make_tiny(family)
    pad = lm.tokenizer.pad_token_id
    prefix, examples = mc_examples(lm)
    edit = random_iti(lm, "iti")
    with edit.attach(lm), torch.no_grad():
        ref, _ = answer_logprobs(lm, prefix, examples, batch_size=16)
    batch = collate(examples, pad, lm.device)
    with recording(lm, edit) as forwards, torch.no_grad():
        kv = prefix_kv(lm, prefix)
        total, count = batch_answer_logprobs(lm, batch, kv)
    assert len(forwards) == 3  # prefix, the distinct prompts, the answers
    assert_shifted(lm, edit, forwards[0], torch.zeros(1, len(prefix), dtype=torch.bool), "prefix")
    assert_shifted(lm, edit, forwards[1], torch.zeros_like(batch["prompt_mask"], dtype=torch.bool), "prompts")
    assert_shifted(lm, edit, forwards[2], batch["answer_mask"].bool(), "answers")
    assert torch.allclose(total.double(), ref, atol=2e-4)  # both in the examples' order
    assert count.tolist() == [len(e.answer) for e in examples]


# ------------------------------------------------------------------------------------------------ generation

PROMPT_HEAD = "An instruction shared by all.\n\nQ: "
QUESTIONS = ["Is the sky blue?", "What is 2+2?", "Who wrote Hamlet?", "Why do cats purr so loudly?", "Hi"]


def gen_prompts(lm):
    return [[lm.tokenizer.bos_token_id] + ids_of(lm, PROMPT_HEAD + q + "\nA:") for q in QUESTIONS]


def naive_generate(lm, prompt, n, shift_from_last_prompt_token: bool) -> list[int]:
    """Batch 1, no cache, no shared prefix: the whole sequence recomputed at every step, the edit shifting the
    last prompt token and every generated token (ITI's 'lt' with a KV cache), or every position."""
    seq = list(prompt)
    for _ in range(n):
        mask = None
        if shift_from_last_prompt_token:
            mask = torch.tensor([[False] * (len(prompt) - 1) + [True] * (len(seq) - len(prompt) + 1)])
        with torch.no_grad(), edit_positions(lm, mask):
            seq.append(int(lm.model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["iti", "all"])
@pytest.mark.parametrize("share", [True, False])
def test_generation_shifts_last_prompt_token_and_generated_tokens(family, placement, share):
    lm = make_tiny(family)
    pad = lm.tokenizer.pad_token_id
    prompts = gen_prompts(lm)
    edit = random_iti(lm, placement)
    kw = dict(max_new_tokens=6, stop_ids=[], finished=None)
    with recording(lm, edit) as forwards:
        out = greedy_generate(lm, prompts, batch_size=2, share_prefix=share, **kw)
    n_prefix = len([lm.tokenizer.bos_token_id] + ids_of(lm, PROMPT_HEAD)) if share else 0
    assert all(prompts[0][:n_prefix] == p[:n_prefix] for p in prompts)
    rests = {tuple(p[n_prefix:]) for p in prompts}
    kinds = []
    for k, f in enumerate(forwards):
        B, T = f["ids"].shape
        if share and k == 0:
            assert rows_of(f["ids"], pad) == [tuple(prompts[0][:n_prefix])]
            kind, where = "prefix", torch.zeros(B, T, dtype=torch.bool)
        elif T > 1:  # a prefill: left-padded prompt remainders; the last column is each row's last prompt token
            assert all(r in rests for r in rows_of(f["ids"], pad, left=True))
            kind, where = "prefill", torch.zeros(B, T, dtype=torch.bool)
            where[:, -1] = True
        else:  # a decoding step: each row's newly generated token
            kind, where = "decode", torch.ones(B, T, dtype=torch.bool)
        kinds.append(kind)
        expected = where if placement == "iti" else torch.ones(B, T, dtype=torch.bool)
        assert_shifted(lm, edit, f, expected, f"{kind} forward {k}")
    assert kinds.count("prefill") == 3 and kinds.count("decode") == 5 and kinds.count("prefix") == int(share)
    # tokens: the same as the naive reference, one prompt at a time
    with edit.attach(lm):
        ref = [naive_generate(lm, p, 6, placement == "iti") for p in prompts]
    assert out == ref


def test_placements_generate_differently(tiny_llama):
    lm = tiny_llama
    prompts = gen_prompts(lm)
    kw = dict(max_new_tokens=8, stop_ids=[], finished=None, batch_size=5)
    outs = {}
    for name, edit in (("none", NoEdit()), ("iti", random_iti(lm, "iti")), ("all", random_iti(lm, "all"))):
        with edit.attach(lm):
            outs[name] = greedy_generate(lm, prompts, **kw)
    assert outs["iti"] != outs["all"] and outs["iti"] != outs["none"]


# ------------------------------------------------------------------------------------------------ CE / KL

def _parent(model, child):
    return next(m for m in model.modules() if any(c is child for c in m.children()))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_ce_kl_shift_every_position_under_both_placements(family):
    lm = make_tiny(family)
    docs = ["The quick brown fox jumps over the lazy dog.", "Rivers carry water to the sea.", "Short."]
    tm = TextMetrics(lm, docs, max_tokens=24, batch_size=2)
    # layer 0's attention output (W^0 o^0, after the edit): nothing upstream is edited, so its change from the
    # unedited run is exactly W^0 (shift) at every shifted position
    attn0 = _parent(lm.model, lm.arch.out_proj(0))
    seen: list[torch.Tensor] = []
    h = attn0.register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        tm.evaluate(NoEdit())
        base, seen[:] = list(seen), []
        results = {}
        for placement in ("iti", "all"):
            edit = random_iti(lm, placement)
            results[placement] = tm.evaluate(edit)
            v = edit.layer_shifts(lm.arch)[0]
            Wv = lm.arch.W(0).float() @ v
            assert len(seen) == len(base) == len(tm.batches)
            for b, e in zip(base, seen):
                assert torch.allclose(e - b, Wv.expand_as(b), atol=1e-5), placement
            seen[:] = []
    finally:
        h.remove()
    assert results["iti"]["ce"] == results["all"]["ce"] and results["iti"]["kl"] == results["all"]["kl"]
    assert results["iti"]["kl"] > 1e-3


# ------------------------------------------------------------------------------------------------ the API

def logits(lm, text="Q: hello there\nA: yes"):
    ids = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return lm.model(**ids).logits


def test_merge_only_for_placement_all(tiny):
    iti = random_iti(tiny, "iti")
    with pytest.raises(LocauditError, match="placement 'iti'.*only placement 'all' can be merged"):
        iti.merge(tiny)
    edit = random_iti(tiny, "all")
    base = logits(tiny)
    with edit.attach(tiny):
        hooked = logits(tiny)
    assert (hooked - base).abs().max() > 1e-3
    with iti.attach(tiny):  # nothing declared (plain text): ITI placement shifts every position too
        assert torch.equal(logits(tiny), hooked)
    edit.merge(tiny)
    assert torch.allclose(logits(tiny), hooked, atol=1e-4)


def test_default_placement_and_save_load(tiny_llama, tmp_path):
    lm = tiny_llama
    edit = random_iti(lm, "iti")
    assert ITI(edit.heads, edit.u, edit.sigma, 1.0).placement == "iti"
    for placement in ("iti", "all"):
        e = random_iti(lm, placement)
        e.save(tmp_path / placement)
        assert json.loads((tmp_path / placement / "edit.json").read_text())["placement"] == placement
        loaded = load_intervention(tmp_path / placement, lm.arch)
        assert loaded.placement == placement and loaded.config() == e.config()
    # an edit saved before placements existed shifted every position: it loads as placement 'all'
    meta = json.loads((tmp_path / "iti" / "edit.json").read_text())
    del meta["placement"]
    (tmp_path / "iti" / "edit.json").write_text(json.dumps(meta))
    assert load_intervention(tmp_path / "iti", lm.arch).placement == "all"
    meta["placement"] = "everywhere"
    (tmp_path / "iti" / "edit.json").write_text(json.dumps(meta))
    with pytest.raises(LocauditError, match="unknown ITI placement 'everywhere'"):
        load_intervention(tmp_path / "iti", lm.arch)
    with pytest.raises(LocauditError, match="unknown ITI placement"):
        ITI(edit.heads, edit.u, edit.sigma, 1.0, placement="last")


def test_from_probes_passes_placement(tiny_llama):
    import numpy as np

    arch = tiny_llama.arch

    class Probes:
        directions = np.random.default_rng(0).normal(size=(arch.n_layers, arch.n_heads, arch.head_dim))
        sigmas = np.ones((arch.n_layers, arch.n_heads))

    heads = parse_heads(SPEC, arch.n_layers, arch.n_heads)
    assert ITI.from_probes(heads, Probes, 2.0).placement == "iti"
    e = ITI.from_probes(heads, Probes, 2.0, placement="all")
    assert e.placement == "all" and torch.allclose(e.u[0].double(), torch.from_numpy(Probes.directions[0, 1]))


def test_declarations_nest_and_are_checked(tiny_llama):
    lm = tiny_llama
    ids = lm.tokenizer("Q: hello there", return_tensors="pt")["input_ids"]
    T = ids.shape[1]
    edit = random_iti(lm, "iti")
    assert declared_positions(lm) is None
    with edit.attach(lm), torch.no_grad():
        full = lm.model(ids).logits
        with edit_positions(lm, torch.zeros(1, T, dtype=torch.bool)):
            none = lm.model(ids).logits
            with edit_positions(lm, None):
                assert torch.equal(lm.model(ids).logits, full)
            assert torch.equal(declared_positions(lm), torch.zeros(1, T, dtype=torch.bool))
            with edit_positions(lm, torch.ones(1, T + 1, dtype=torch.bool)):
                with pytest.raises(LocauditError, match="do not match"):
                    lm.model(ids)
        last = torch.zeros(1, T, dtype=torch.bool)
        last[0, -1] = True
        with edit_positions(lm, last):
            shifted_last = lm.model(ids).logits
    assert declared_positions(lm) is None
    with torch.no_grad():
        base = lm.model(ids).logits
    assert torch.equal(none, base)  # nothing declared for shifting: exactly the unedited model
    assert torch.allclose(shifted_last[0, :-1], base[0, :-1], atol=0)  # earlier positions untouched (causal)
    assert (shifted_last[0, -1] - base[0, -1]).abs().max() > 1e-3
    assert (shifted_last[0, -1] - full[0, -1]).abs().max() > 1e-4  # 'all' also shifted what the last token reads
    with pytest.raises(LocauditError, match=r"\(batch, tokens\)"):
        with edit_positions(lm, torch.ones(T, dtype=torch.bool)):
            pass


@pytest.mark.parametrize("make", [
    lambda lm: LocalizedRank1(parse_heads("L0H1,L2H3", 3, 4), lm.arch, seed=1),
    lambda lm: FullRank1(lm.arch, seed=2),
])
def test_weight_edits_ignore_declared_positions(tiny_llama, make):
    lm = tiny_llama
    edit = make(lm)
    with torch.no_grad():
        for p in edit.parameters():
            p.normal_(0, 0.3)
    ids = lm.tokenizer("Q: hello there", return_tensors="pt")["input_ids"]
    with edit.attach(lm), torch.no_grad():
        everywhere = lm.model(ids).logits
        with edit_positions(lm, torch.zeros_like(ids, dtype=torch.bool)):
            assert torch.equal(lm.model(ids).logits, everywhere)
    with torch.no_grad():
        assert (lm.model(ids).logits - everywhere).abs().max() > 1e-3
