"""Answer log-probabilities: the one forward pass shared by MC scoring, pi0 caching and IPO training.

A scored example is (shared prefix ids, prompt ids, answer ids). Work is shared at two levels, so no token is
run twice within a batch:
- the *prefix* (BOS, and for the `qa` format the instruction and few-shot primer, ~230 tokens) is the same for
  every example: it runs once (`prefix_kv`, batch 1) and every row attends to its keys/values in place
  (`shared_prefix`), without a per-row copy;
- the *prompt* (`Q: {question}\\nA:`) is shared by all answers to one question (a preference pair's chosen and
  rejected answers, an MC question's choices): each distinct prompt of a batch runs once on top of the prefix,
  and every answer row then attends to the prefix and its own prompt's keys/values.
Rows are right-padded in length-sorted batches; padding between a prompt and its answer is masked out and
position ids count real tokens only, so every answer token sees exactly the context, at exactly the positions,
it would see in one full-sequence pass. The LM head is applied only at the positions that predict answer
tokens (the last prompt position predicts the first answer token): prompt positions never pay for the
vocab-sized output layer.

Edit positions (`interventions.edit_positions`): the prefix and prompt passes declare no position and the
answer pass declares its real answer tokens, so an ITI edit placed as ITI places it in MC scoring shifts the
answer tokens only (a weight edit acts everywhere regardless).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from locaudit.data.formats import PromptFormat
from locaudit.interventions import edit_positions
from locaudit.models import LoadedModel, cache_kwarg, logits_from_hidden
from locaudit.shared_prefix import own_mask, shared_prefix


# Bumped whenever the arithmetic of scoring changes (batching, attention path), so that cached log-probs
# (pi0) computed by an older version, equal only up to float rounding, are not mixed with new ones.
SCORING_VERSION = 3


@dataclass(frozen=True)
class Encoded:
    prompt: tuple[int, ...]
    answer: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.answer)


def encode_prefix(tokenizer, fmt: PromptFormat) -> tuple[int, ...]:
    """Token ids of the format's shared prefix, with the tokenizer's BOS where it adds one (may be empty)."""
    return tuple(tokenizer(fmt.prefix(), add_special_tokens=fmt.uses_special_tokens)["input_ids"])


def encode(tokenizer, fmt: PromptFormat, question: str, answer: str) -> Encoded:
    """Tokenise prompt (after the shared prefix) and answer separately, so the answer's tokens are exactly
    known and the full input is always `encode_prefix(...) + prompt + answer`."""
    text = fmt.prompt(question, tokenizer)[len(fmt.prefix()):]
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(fmt.answer(answer), add_special_tokens=False)["input_ids"]
    if not answer_ids:
        answer_ids = [tokenizer.eos_token_id]
    return Encoded(tuple(prompt_ids), tuple(answer_ids))


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def grouped_batches(examples: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Batches of `batch_size` examples, longest prompts first, with the answers to one prompt kept together
    (and sorted by length) so that each prompt runs once per batch."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].prompt), examples[i].prompt,
                                                         -len(examples[i].answer)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def right_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(list(s))
            mask[i, : len(s)] = 1
    return ids, mask


def collate(examples: Sequence[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    """One batch in the two-level layout.

    prompt_ids / prompt_mask: the G distinct prompts (right-padded); answer_ids / answer_mask: for each of the
    R examples, its answer without the last token (the last token is predicted, never fed), right-padded;
    group: each example's prompt row. Scored positions: the first answer token of example r is predicted at
    prompt row group[r], position len(prompt)-1 (`first_pos`); answer token j >= 1 at answer row `rest_rows`,
    position j-1 (`rest_pos`), with targets `first_tgt` / `rest_tgt`. Every prompt must be non-empty."""
    prompts: dict[tuple[int, ...], int] = {}
    for e in examples:
        if not e.prompt:
            raise ValueError("every scored example needs a non-empty prompt")
        prompts.setdefault(e.prompt, len(prompts))
    group = [prompts[e.prompt] for e in examples]
    plist = list(prompts)
    p_ids, p_mask = right_padded(plist, pad_id)
    a_ids, a_mask = right_padded([e.answer[:-1] for e in examples], pad_id)
    rest_rows, rest_pos, rest_tgt = [], [], []
    for r, e in enumerate(examples):
        for j in range(1, len(e.answer)):
            rest_rows.append(r)
            rest_pos.append(j - 1)
            rest_tgt.append(e.answer[j])
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    g = t(group)
    return {
        "prompt_ids": p_ids.to(device), "prompt_mask": p_mask.to(device),
        "answer_ids": a_ids.to(device), "answer_mask": a_mask.to(device), "group": g,
        "prompt_len": p_mask.sum(1).to(device),
        "first_pos": t([len(plist[i]) - 1 for i in group]), "first_tgt": t([e.answer[0] for e in examples]),
        "rest_rows": t(rest_rows), "rest_pos": t(rest_pos), "rest_tgt": t(rest_tgt),
    }


def batch_tokens(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Token counts of a collated batch (for throughput accounting): padded and real input tokens, and
    scored answer tokens."""
    return {"padded": int(batch["prompt_ids"].numel() + batch["answer_ids"].numel()),
            "real": int(batch["prompt_mask"].sum() + batch["answer_mask"].sum()),
            "answer": int(batch["first_tgt"].numel() + batch["rest_tgt"].numel())}


PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]


def prefix_kv(lm: LoadedModel, prefix: Sequence[int]) -> PrefixKV | None:
    """Per-layer (key, value) of the shared prefix, batch 1, under whatever edit is attached (so it must be
    recomputed when the edit changes: every training step, once per evaluation)."""
    if not prefix:
        return None
    ids = torch.tensor([list(prefix)], device=lm.device)
    with edit_positions(lm, torch.zeros_like(ids, dtype=torch.bool)):  # the prefix is context: never shifted
        out = lm.model.base_model(input_ids=ids, use_cache=True)
    cache = out["cache"] if "cache" in out.keys() else out.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def new_cache(lm: LoadedModel, kv: PrefixKV | None = None, rows: torch.Tensor | None = None):
    """A fresh cache holding the per-layer (keys, values) `kv` (only its batch rows `rows`, when given)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    for l, (k, v) in enumerate(kv or []):
        if rows is not None:
            k, v = k.index_select(0, rows), v.index_select(0, rows)
        cache.update(k, v, l)
    return cache


def forward_rows(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache):
    """Body forward of rows continuing `cache`; returns (last hidden states, per-layer kv of the rows' own
    tokens)."""
    body = lm.model.base_model
    out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kwarg(body): cache})
    cache = out["cache"] if "cache" in out.keys() else out.past_key_values
    return out.last_hidden_state, [(layer.keys, layer.values) for layer in cache.layers]


def answer_hidden(lm: LoadedModel, batch: dict[str, torch.Tensor], kv: PrefixKV | None = None) -> torch.Tensor:
    """Hidden states at every scored position of a collated batch, in the order first tokens (one per example),
    then `rest_*`. Level 1 runs the distinct prompts after the prefix `kv`; level 2 runs the answers after
    their prompts. The prefix is attended once per batch (`shared_prefix`), never copied into rows."""
    with shared_prefix(lm, kv) if kv else contextlib.nullcontext():
        return _answer_hidden(lm, batch, kv[0][0].shape[-2] if kv else 0)


def _answer_hidden(lm: LoadedModel, batch: dict[str, torch.Tensor], P: int) -> torch.Tensor:
    # with a prefix (P > 0) masks are 4D over the rows' own tokens (`own_mask`); without, plain 2D masks
    def mask_for(m2d, q_len):
        return own_mask(m2d, q_len) if P else m2d

    p_ids, p_mask = batch["prompt_ids"], batch["prompt_mask"]
    G, Tp = p_ids.shape
    dev = p_ids.device
    pos1 = torch.arange(P, P + Tp, device=dev).expand(G, Tp)
    with edit_positions(lm, torch.zeros_like(p_mask, dtype=torch.bool)):  # prompts: never shifted
        hp, kv1 = forward_rows(lm, p_ids, mask_for(p_mask, Tp), pos1, new_cache(lm))
    group = batch["group"]
    h_first = hp[group, batch["first_pos"]]
    a_ids, a_mask = batch["answer_ids"], batch["answer_mask"]
    if a_ids.shape[1] == 0 or batch["rest_rows"].numel() == 0:
        return h_first
    Ta = a_ids.shape[1]
    mask2 = torch.cat([p_mask.index_select(0, group), a_mask], dim=1)
    pos2 = P + batch["prompt_len"].index_select(0, group)[:, None] + torch.arange(Ta, device=dev)
    with edit_positions(lm, a_mask.bool()):  # the answer tokens
        ha, _ = forward_rows(lm, a_ids, mask_for(mask2, Ta), pos2, new_cache(lm, kv1, rows=group))
    return torch.cat([h_first, ha[batch["rest_rows"], batch["rest_pos"]]], dim=0)


def _token_logprobs(lm: LoadedModel, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target | hidden) for each scored position: the LM head runs on these positions only."""
    logits = logits_from_hidden(lm.model, hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def batch_answer_logprobs(lm: LoadedModel, batch: dict[str, torch.Tensor], kv: PrefixKV | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token log-probs, answer length) per example; differentiable w.r.t. any attached edit."""
    h = answer_hidden(lm, batch, kv)
    tgt = torch.cat([batch["first_tgt"], batch["rest_tgt"]])[: h.shape[0]]
    token_lp = _token_logprobs(lm, h, tgt)
    n = batch["group"].shape[0]
    rows = torch.cat([torch.arange(n, device=token_lp.device), batch["rest_rows"]])[: h.shape[0]]
    total = torch.zeros(n, device=token_lp.device, dtype=token_lp.dtype).index_add(0, rows, token_lp)
    count = torch.zeros(n, device=token_lp.device).index_add(0, rows, torch.ones_like(token_lp))
    return total, count


@torch.inference_mode()
def answer_logprobs(lm: LoadedModel, prefix: Sequence[int], examples: Sequence[Encoded], batch_size: int = 16,
                    progress: str | None = None, chunk_prompts: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs and answer lengths for every example, in input order (float64 on CPU).

    Inference only, so the two levels are batched independently, each sorted by its own length: the distinct
    prompts (in chunks of `chunk_prompts`, whose own keys/values are kept), then all their answers, each row
    attending to its prompt's stored keys/values. Padding then costs only masked attention keys, never
    whole rows of queries. Identical examples (a preference pair set repeats each answer once per pair)
    are scored once."""
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(examples))
    kv = prefix_kv(lm, prefix)
    P = kv[0][0].shape[-2] if kv else 0
    dev, pad = lm.device, lm.tokenizer.pad_token_id
    total = torch.zeros(len(unique), dtype=torch.float64)
    count = torch.zeros(len(unique), dtype=torch.float64)
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, e in enumerate(unique):
        if not e.prompt:
            raise ValueError("every scored example needs a non-empty prompt")
        by_prompt.setdefault(e.prompt, []).append(i)
    prompts = sorted(by_prompt, key=lambda p: (-len(p), p))

    def mask_for(m2d, q_len):
        return own_mask(m2d, q_len) if P else m2d

    def add(idx: list[int], lp: torch.Tensor) -> None:
        t = torch.tensor(idx, dtype=torch.long)
        total.index_add_(0, t, lp.double().cpu())
        count.index_add_(0, t, torch.ones(len(idx), dtype=torch.float64))

    bar = tqdm(total=len(unique), desc=progress, disable=progress is None, leave=False)
    with shared_prefix(lm, kv) if kv else contextlib.nullcontext():
        for c in range(0, len(prompts), chunk_prompts):
            chunk = prompts[c:c + chunk_prompts]
            own: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for b in range(0, len(chunk), batch_size):  # level 1: prompts, and every answer's first token
                ps = chunk[b:b + batch_size]
                ids, mask = right_padded(ps, pad)
                T = ids.shape[1]
                with edit_positions(lm, torch.zeros_like(ids, dtype=torch.bool)):  # prompts: never shifted
                    hp, kv1 = forward_rows(lm, ids.to(dev), mask_for(mask.to(dev), T),
                                           torch.arange(P, P + T, device=dev).expand(len(ps), T), new_cache(lm))
                ex = [(r, i) for r, p in enumerate(ps) for i in by_prompt[p]]
                rows = torch.tensor([r for r, _ in ex], device=dev)
                last = torch.tensor([len(ps[r]) - 1 for r, _ in ex], device=dev)
                tgt = torch.tensor([unique[i].answer[0] for _, i in ex], device=dev)
                add([i for _, i in ex], _token_logprobs(lm, hp[rows, last], tgt))
                for r, p in enumerate(ps):
                    own[p] = [(k[r:r + 1, :, :len(p)], v[r:r + 1, :, :len(p)]) for k, v in kv1]
            rest = sorted((i for p in chunk for i in by_prompt[p] if len(unique[i].answer) > 1),
                          key=lambda i: (-len(unique[i].answer), unique[i].prompt))
            for b in range(0, len(rest), batch_size):  # level 2: answers, sorted by length
                idx = rest[b:b + batch_size]
                ex = [unique[i] for i in idx]
                Tp = max(len(e.prompt) for e in ex)
                cache = new_cache(lm, [(stack_kv([own[e.prompt][l][0] for e in ex], Tp),
                                        stack_kv([own[e.prompt][l][1] for e in ex], Tp))
                                       for l in range(len(own[ex[0].prompt]))])
                p_mask = torch.tensor([[1] * len(e.prompt) + [0] * (Tp - len(e.prompt)) for e in ex], device=dev)
                a_ids, a_mask = right_padded([e.answer[:-1] for e in ex], pad)
                Ta = a_ids.shape[1]
                plen = torch.tensor([len(e.prompt) for e in ex], device=dev)
                with edit_positions(lm, a_mask.bool()):  # the answer tokens
                    ha, _ = forward_rows(lm, a_ids.to(dev), mask_for(torch.cat([p_mask, a_mask.to(dev)], 1), Ta),
                                         P + plen[:, None] + torch.arange(Ta, device=dev), cache)
                rr = [(r, j) for r, e in enumerate(ex) for j in range(1, len(e.answer))]
                h = ha[torch.tensor([r for r, _ in rr], device=dev), torch.tensor([j - 1 for _, j in rr], device=dev)]
                tgt = torch.tensor([ex[r].answer[j] for r, j in rr], device=dev)
                add([idx[r] for r, _ in rr], _token_logprobs(lm, h, tgt))
            bar.update(sum(len(by_prompt[p]) for p in chunk))
    bar.close()
    where = {e: i for i, e in enumerate(unique)}
    back = torch.tensor([where[e] for e in examples], dtype=torch.long)
    return total[back], count[back]


def stack_kv(parts: Sequence[torch.Tensor | None], T: int) -> torch.Tensor:
    """Concatenate (1, heads, t_i, d) tensors along the batch, right-padding each to T positions with zeros
    (None: a row with no positions of its own)."""
    like = next(x for x in parts if x is not None)
    out = like.new_zeros(len(parts), like.shape[1], T, like.shape[3])
    for r, x in enumerate(parts):
        if x is not None:
            out[r, :, : x.shape[2]] = x[0]
    return out
