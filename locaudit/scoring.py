"""Answer log-probabilities: the one forward pass shared by MC scoring, pi0 caching and IPO training.

A scored example is (shared prefix ids, prompt ids, answer ids). The prefix (BOS, and for the `qa` format the
instruction and few-shot primer, ~230 tokens) is the same for every example, so it runs once per batch
(`prefix_kv`) and its keys/values are broadcast to the batch. The rest is right-padded in length-sorted
batches, and the LM head is applied only at the positions that predict answer tokens: prompt positions
never pay for the (vocab-sized) output layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from locaudit.data.formats import PromptFormat
from locaudit.models import LoadedModel, cache_kwarg, logits_from_hidden


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


def collate(examples: Sequence[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded input ids and mask, plus flat (row, position, target) indices of every answer token.
    Every prompt must be non-empty (the first answer token is predicted from the last prompt position)."""
    T = max(len(e) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    rows, pos, tgt = [], [], []
    for i, e in enumerate(examples):
        seq = e.prompt + e.answer
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        start = len(e.prompt)
        for j, tok in enumerate(e.answer):
            rows.append(i)
            pos.append(start + j - 1)  # hidden state at t predicts token t+1
            tgt.append(tok)
    return {
        "input_ids": ids.to(device), "attention_mask": mask.to(device),
        "rows": torch.tensor(rows, device=device), "pos": torch.tensor(pos, device=device),
        "tgt": torch.tensor(tgt, device=device),
    }


PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]


def prefix_kv(lm: LoadedModel, prefix: Sequence[int]) -> PrefixKV | None:
    """Per-layer (key, value) of the shared prefix, batch 1, under whatever edit is attached (so it must be
    recomputed when the edit changes: every training step, once per evaluation)."""
    if not prefix:
        return None
    ids = torch.tensor([list(prefix)], device=lm.device)
    out = lm.model.base_model(input_ids=ids, use_cache=True)
    cache = out["cache"] if "cache" in out.keys() else out.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def _expanded_cache(lm: LoadedModel, kv: PrefixKV, batch_size: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    for l, (k, v) in enumerate(kv):
        cache.update(k.expand(batch_size, *k.shape[1:]), v.expand(batch_size, *v.shape[1:]), l)
    return cache


def body(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, kv: PrefixKV | None = None) -> torch.Tensor:
    """Last hidden states of right-padded rows that continue the shared prefix `kv` (if any)."""
    if kv is None:
        return lm.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    B, T = input_ids.shape
    P = kv[0][0].shape[-2]
    mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
    pos = torch.arange(P, P + T, device=input_ids.device).expand(B, T)
    body_model = lm.model.base_model
    return body_model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                      **{cache_kwarg(body_model): _expanded_cache(lm, kv, B)}).last_hidden_state


def batch_answer_logprobs(lm: LoadedModel, batch: dict[str, torch.Tensor], kv: PrefixKV | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token log-probs, answer length) per row; differentiable w.r.t. any attached edit."""
    hidden = body(lm, batch["input_ids"], batch["attention_mask"], kv)
    h = hidden[batch["rows"], batch["pos"]]
    logits = logits_from_hidden(lm.model, h).float()
    token_lp = logits.gather(-1, batch["tgt"][:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    n = batch["input_ids"].shape[0]
    total = torch.zeros(n, device=token_lp.device, dtype=token_lp.dtype).index_add(0, batch["rows"], token_lp)
    count = torch.zeros(n, device=token_lp.device).index_add(0, batch["rows"], torch.ones_like(token_lp))
    return total, count


def iter_batches(examples: Sequence[Encoded], batch_size: int) -> Iterator[list[int]]:
    yield from length_batches([len(e) for e in examples], batch_size)


@torch.inference_mode()
def answer_logprobs(lm: LoadedModel, prefix: Sequence[int], examples: Sequence[Encoded], batch_size: int = 16,
                    progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs and answer lengths for every example, in input order (float64 on CPU)."""
    from tqdm.auto import tqdm

    kv = prefix_kv(lm, prefix)
    total = torch.zeros(len(examples), dtype=torch.float64)
    count = torch.zeros(len(examples), dtype=torch.float64)
    pad = lm.tokenizer.pad_token_id
    batches = list(iter_batches(examples, batch_size))
    for idx in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        s, c = batch_answer_logprobs(lm, collate([examples[i] for i in idx], pad, lm.device), kv)
        total[idx] = s.double().cpu()
        count[idx] = c.double().cpu()
    return total, count
