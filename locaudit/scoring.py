"""Answer log-probabilities: the one forward pass shared by MC scoring, pi0 caching and IPO training.

A scored example is (prompt ids, answer ids). Sequences are right-padded in length-sorted batches, the
transformer body runs once, and the LM head is applied only at the positions that predict answer tokens:
prompt positions never pay for the (vocab-sized) output layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from locaudit.data.formats import PromptFormat
from locaudit.models import LoadedModel, logits_from_hidden


@dataclass(frozen=True)
class Encoded:
    prompt: tuple[int, ...]
    answer: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.answer)


def encode(tokenizer, fmt: PromptFormat, question: str, answer: str) -> Encoded:
    """Tokenise prompt and answer separately so the answer's tokens are exactly known (no boundary merges)."""
    prompt_ids = tokenizer(fmt.prompt(question, tokenizer), add_special_tokens=fmt.uses_special_tokens)["input_ids"]
    answer_ids = tokenizer(fmt.answer(answer), add_special_tokens=False)["input_ids"]
    if not answer_ids:
        answer_ids = [tokenizer.eos_token_id]
    return Encoded(tuple(prompt_ids), tuple(answer_ids))


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(examples: Sequence[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded input ids and mask, plus flat (row, position, target) indices of every answer token."""
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


def batch_answer_logprobs(lm: LoadedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token log-probs, answer length) per row; differentiable w.r.t. any attached edit."""
    hidden = lm.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
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
def answer_logprobs(lm: LoadedModel, examples: Sequence[Encoded], batch_size: int = 16,
                    progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs and answer lengths for every example, in input order (float64 on CPU)."""
    from tqdm.auto import tqdm

    total = torch.zeros(len(examples), dtype=torch.float64)
    count = torch.zeros(len(examples), dtype=torch.float64)
    pad = lm.tokenizer.pad_token_id
    batches = list(iter_batches(examples, batch_size))
    for idx in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        s, c = batch_answer_logprobs(lm, collate([examples[i] for i in idx], pad, lm.device))
        total[idx] = s.double().cpu()
        count[idx] = c.double().cpu()
    return total, count
