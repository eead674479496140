"""A task's preference pairs as whole token rows, run through the model in ordinary forward passes.

The heuristics need activations (and gradients) at chosen positions of whole sequences, so they do not use
scoring's two-level key/value layout: each answer is one row, shared prefix + prompt + answer, right-padded
(causal attention: padding after a row's tokens never reaches them). Pair i gives rows 2i (y+) and 2i+1 (y-).
In a row whose prompt (prefix included) has P tokens and whose answer has A, the hidden state at position t
predicts token t+1, so the answer-predicting positions are P-1 .. P+A-2 and the last token is at P+A-1.
The summed answer log-probs of these rows are exactly `scoring.answer_logprobs`'s (same tokens, same order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from locaudit.errors import LocauditError
from locaudit.models import LoadedModel, logits_from_hidden
from locaudit.scoring import right_padded
from locaudit.training import EncodedPairs, encode_pairs


@dataclass(frozen=True, eq=False)
class PairRows:
    """Rows 2i (y+) and 2i+1 (y-) of a batch of pairs: ids and mask (R, T), prompt and answer lengths (R,)."""

    ids: torch.Tensor
    mask: torch.Tensor
    prompt_len: torch.Tensor
    answer_len: torch.Tensor

    @property
    def predicting(self) -> torch.Tensor:
        """(R, T) bool: the positions whose hidden state predicts an answer token (P-1 .. P+A-2)."""
        t = torch.arange(self.ids.shape[1], device=self.ids.device)
        start = (self.prompt_len - 1)[:, None]
        return (t >= start) & (t < start + self.answer_len[:, None])

    @property
    def last(self) -> torch.Tensor:
        """(R,) position of each row's last token (the last answer token)."""
        return self.prompt_len + self.answer_len - 1

    def answer_position(self, token: int) -> torch.Tensor:
        """(R,) position of answer token `token` of each row (Python indexing: -1 the last, 0 the first; checked
        against the pairs by `check_answer_token`)."""
        return self.prompt_len + (token if token >= 0 else self.answer_len + token)


def check_answer_token(enc: EncodedPairs, token: int) -> int:
    """`token` as an index valid in every answer of `enc`, or one LocauditError."""
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
        raise LocauditError(f"answer token index must be an integer (-1: the last answer token), got {token!r}")
    short = min(len(e.answer) for e in enc.chosen + enc.rejected)
    if not -short <= token < short:
        raise LocauditError(f"answer token index {token} is out of range: the shortest answer has {short} "
                            f"token(s); use an index in {-short}..{short - 1}")
    return int(token)


def task_pairs(lm: LoadedModel, task, items: Sequence) -> EncodedPairs:
    """The preference pairs of `items`, tokenised in the task's prompt format (as its `evaluate` scores them)."""
    if not items:
        raise LocauditError("no items given; pass the task's training (or validation) items, e.g. task.split().train")
    pairs = task.pairs(items)
    if not pairs:
        raise LocauditError("these items hold no preference pairs; pass items with chosen and rejected answers")
    return encode_pairs(lm, pairs, task.prompt_format(lm))


def pair_batches(enc: EncodedPairs, batch_size: int, device) -> Iterator[tuple[list[int], PairRows]]:
    """(pair indices, their rows) in batches of `batch_size` pairs, longest first (little padding)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise LocauditError(f"batch size must be a positive integer, got {batch_size!r}")
    pre = list(enc.prefix)
    length = [max(len(c), len(r)) for c, r in zip(enc.chosen, enc.rejected)]
    order = sorted(range(len(enc)), key=lambda i: -length[i])
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        es = [e for i in idx for e in (enc.chosen[i], enc.rejected[i])]
        ids, mask = right_padded([pre + list(e.prompt) + list(e.answer) for e in es], pad_id=0)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        yield idx, PairRows(ids.to(device), mask.to(device), t([len(pre) + len(e.prompt) for e in es]),
                            t([len(e.answer) for e in es]))


def row_logprobs(lm: LoadedModel, rows: PairRows) -> torch.Tensor:
    """(R,) summed log-probs of each row's answer tokens, differentiable through whatever is hooked."""
    hidden = lm.model.base_model(input_ids=rows.ids, attention_mask=rows.mask, use_cache=False).last_hidden_state
    r, t = rows.predicting.nonzero(as_tuple=True)
    logits = logits_from_hidden(lm.model, hidden[r, t])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lp = logits.gather(-1, rows.ids[r, t + 1][:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.zeros(rows.ids.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, r, lp)


def pair_margins(lp: torch.Tensor) -> torch.Tensor:
    """m = log p(y+|x) - log p(y-|x) per pair, from the rows' summed answer log-probs."""
    return lp[0::2] - lp[1::2]


@torch.inference_mode()
def margins(lm: LoadedModel, enc: EncodedPairs, batch_size: int = 8) -> np.ndarray:
    """m per pair (float64, pair order), under whatever edit is attached (every position: none declared)."""
    out = np.zeros(len(enc))
    for idx, rows in pair_batches(enc, batch_size, lm.device):
        out[idx] = pair_margins(row_logprobs(lm, rows)).double().cpu().numpy()
    return out
