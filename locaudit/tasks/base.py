"""What every behaviour (task) provides, and the preference scoring they share.

A task owns a behaviour's data and its score. Its items (one prompt each, with one or more preferred /
dispreferred answers) are split by prompt into train / validation / test; training uses the items' preference
pairs, probes use their labelled answers, and `evaluate(lm, edit, items)` returns one score per item under a
metric name, so that every statistic can be paired across edits and bootstrapped over items.

Preference scores of an item, from the edited model pi and the unedited pi0 (log-probs of whole answers,
averaged over answer tokens where the task says so):
- `margin`: log pi(y+|x) - log pi(y-|x), the edited model's own preference;
- `h`: the IPO log-ratio margin (log pi(y+) - log pi0(y+)) - (log pi(y-) - log pi0(y-));
- `ipo_loss`: (h - 1 / (2 tau))^2, the held-out IPO loss at the fit's tau;
- `pref_acc`: 1 where the edited model prefers y+ (margin > 0), 1/2 on a tie.
An item with several pairs scores the mean over its pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from locaudit.data.examples import PreferencePair, ProbeExample
from locaudit.data.formats import PromptFormat
from locaudit.data.truthfulqa import stratified_order
from locaudit.errors import LocauditError
from locaudit.interventions import Intervention, NoEdit
from locaudit.models import LoadedModel
from locaudit.scoring import answer_logprobs, encode, encode_prefix
from locaudit.storage import stable_hash
from locaudit.training import TIE_TOL, reference_logprobs, EncodedPairs


@dataclass(frozen=True)
class Item:
    """One prompt of a behaviour with its preferred / dispreferred answers. `group` (and `subgroup`) stratify
    the split: CAA's behaviour-matching letter, a JSONL file's optional "group"."""

    id: int
    prompt: str
    pairs: tuple[tuple[str, str], ...]  # (chosen y+, rejected y-)
    group: str = ""
    subgroup: str = ""


@dataclass(frozen=True)
class TaskSplit:
    """Disjoint train / validation / test items, split by prompt; `hash` names the split in caches and trials."""

    train: tuple
    val: tuple
    test: tuple
    seed: int

    @property
    def hash(self) -> str:
        return stable_hash({k: [i.id for i in getattr(self, k)] for k in ("train", "val", "test")})

    def part(self, name: str) -> tuple:
        if name not in ("train", "val", "test"):
            raise LocauditError(f"unknown split part '{name}'; use train, val or test")
        return getattr(self, name)


@dataclass(frozen=True)
class ItemScores:
    """Per-item scores of one edit on a list of items (`scores[name][j]` belongs to item `ids[j]`), plus
    scores that are not per item (CE/KL on reference text, say) in `summary`."""

    ids: tuple[int, ...]
    scores: dict[str, np.ndarray]
    summary: dict = field(default_factory=dict)

    def mean(self, name: str) -> float:
        return float(np.mean(self.scores[name]))

    def as_dict(self) -> dict:
        return {"ids": list(self.ids), "scores": {k: [float(x) for x in v] for k, v in self.scores.items()},
                "summary": self.summary}

    @classmethod
    def from_dict(cls, d: dict) -> "ItemScores":
        return cls(tuple(d["ids"]), {k: np.asarray(v, dtype=np.float64) for k, v in d["scores"].items()},
                   d.get("summary", {}))


@runtime_checkable
class Task(Protocol):
    """A behaviour: its data, split by prompt, and its per-item score (higher `primary` = more of the behaviour
    the preference pairs prefer)."""

    name: str
    primary: str  # the score the audit's verdict rests on
    metrics: tuple[str, ...]  # every per-item score `evaluate` returns

    def items(self) -> list: ...

    def split(self, seed: int = 0, limit: int | None = None) -> TaskSplit: ...

    def prompt_format(self, lm: LoadedModel) -> PromptFormat: ...

    def pairs(self, items: Sequence) -> list[PreferencePair]: ...

    def probe_examples(self, items: Sequence, seed: int = 0) -> list[ProbeExample]: ...

    def evaluate(self, lm: LoadedModel, edit: Intervention | None, items: Sequence, *, tau: float = 0.1,
                 batch_size: int = 16, progress: bool = False) -> ItemScores: ...

    def statistic(self, scores: ItemScores, idx: np.ndarray | None = None) -> float | np.ndarray:
        """The number the verdict compares across edits (rows of `idx`: bootstrap resamples of items)."""
        ...

    def spec(self) -> str:
        """What names this task on the command line and in stored results."""
        ...


def split_items(items: Sequence, seed: int = 0, limit: int | None = None, train_frac: float = 0.6,
                val_frac: float = 0.2, what: str = "items") -> TaskSplit:
    """Seeded split by prompt, stratified by (group, subgroup): `limit` first draws a stratified subset; each part
    keeps the stratified random order, so its first n items are a stratified sample too."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LocauditError(f"seed must be an integer >= 0, got {seed!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit <= 0):
        raise LocauditError(f"the item limit must be a positive integer, got {limit!r}")
    strata = lambda it: (getattr(it, "group", ""), getattr(it, "subgroup", ""))
    its = list(items)
    rng = np.random.default_rng(seed)
    if limit is not None and limit < len(its):
        its = [its[i] for i in stratified_order(its, rng, strata)[:limit]]
    order = stratified_order(its, rng, strata)
    n_train, n_val = int(round(train_frac * len(its))), int(round(val_frac * len(its)))
    parts = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
    for name, p in zip(("train", "validation", "test"), parts):
        if not p:
            raise LocauditError(f"{len(its)} {what} leave the {name} part empty; use at least 5 {what}")
    train, val, test = (tuple(its[i] for i in p) for p in parts)
    return TaskSplit(train, val, test, seed)


def item_pairs(items: Sequence[Item]) -> list[PreferencePair]:
    return [PreferencePair(it.id, it.prompt, c, r) for it in items for c, r in it.pairs]


def answer_probe_examples(items: Sequence[Item], fmt: PromptFormat, tokenizer=None) -> list[ProbeExample]:
    """Probe examples from labelled answers: prompt + y+ (label 1) and prompt + y- (label 0), each answer once."""
    out = []
    for it in items:
        prompt = fmt.prompt(it.prompt, tokenizer)
        seen = set()
        for c, r in it.pairs:
            for text, label in ((c, 1), (r, 0)):
                if text not in seen:
                    seen.add(text)
                    out.append(ProbeExample(it.id, prompt + fmt.answer(text), label))
    return out


def _pair_logprobs(lm: LoadedModel, edit: Intervention, pairs: Sequence[PreferencePair], fmt: PromptFormat,
                   batch_size: int, progress: bool):
    """Summed answer log-probs (edited and pi0) and answer lengths for chosen and rejected answers."""
    chosen = [encode(lm.tokenizer, fmt, p.question, p.chosen) for p in pairs]
    rejected = [encode(lm.tokenizer, fmt, p.question, p.rejected) for p in pairs]
    enc = EncodedPairs(encode_prefix(lm.tokenizer, fmt), chosen, rejected)
    ref = reference_logprobs(lm, enc, batch_size=batch_size, progress=progress)
    if edit is None or edit.is_identity():
        lp_c, lp_r = ref["lp_c"], ref["lp_r"]
    else:
        with torch.inference_mode(), edit.attach(lm):
            lp, _ = answer_logprobs(lm, enc.prefix, chosen + rejected, batch_size,
                                    progress="scoring" if progress else None)
        lp_c, lp_r = lp[:len(pairs)], lp[len(pairs):]
    return (lp_c.double().numpy(), ref["n_c"].double().numpy(), lp_r.double().numpy(), ref["n_r"].double().numpy(),
            ref["lp_c"].double().numpy(), ref["lp_r"].double().numpy())


def preference_scores(lm: LoadedModel, edit: Intervention | None, pairs: Sequence[PreferencePair],
                      fmt: PromptFormat, *, tau: float = 0.1, average: bool = True, batch_size: int = 16,
                      progress: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-pair preference scores (module docstring) and the raw summed log-probs, as
    (qids, scores, logprobs): scores margin, h, ipo_loss, pref_acc; logprobs lp_c, lp_r, n_c, n_r."""
    if not pairs:
        raise LocauditError("no preference pairs to score")
    lp_c, n_c, lp_r, n_r, ref_c, ref_r = _pair_logprobs(lm, edit or NoEdit(), pairs, fmt, batch_size, progress)
    if average:
        own = lp_c / n_c - lp_r / n_r
        h = (lp_c - ref_c) / n_c - (lp_r - ref_r) / n_r
    else:
        own = lp_c - lp_r
        h = (lp_c - ref_c) - (lp_r - ref_r)
    acc = np.where(np.abs(own) <= TIE_TOL, 0.5, (own > 0).astype(np.float64))
    scores = {"margin": own, "h": h, "ipo_loss": (h - 1.0 / (2.0 * tau)) ** 2, "pref_acc": acc}
    return (np.array([p.qid for p in pairs]), scores, {"lp_c": lp_c, "lp_r": lp_r, "n_c": n_c, "n_r": n_r})


def per_item(ids: Sequence[int], qids: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean of each per-pair score over each item's pairs, in the order of `ids`."""
    pos = {q: j for j, q in enumerate(ids)}
    idx = np.array([pos[q] for q in qids])
    count = np.bincount(idx, minlength=len(ids)).astype(np.float64)
    if (count == 0).any():
        raise LocauditError("an item has no preference pairs to score")
    return {k: np.bincount(idx, weights=v, minlength=len(ids)) / count for k, v in scores.items()}


class PreferenceItemsTask:
    """Shared behaviour of tasks whose items are `Item`s scored by preference: split, pairs, probe examples and
    `evaluate` with margin / h / ipo_loss / pref_acc per item. Subclasses load the items and may add scores."""

    name = "preferences"
    primary = "pref_acc"
    metrics: tuple[str, ...] = ("pref_acc", "margin", "h", "ipo_loss")
    average_logprobs = True
    what = "prompts"

    def items(self) -> list[Item]:  # pragma: no cover - abstract
        raise NotImplementedError

    def split(self, seed: int = 0, limit: int | None = None) -> TaskSplit:
        return split_items(self.items(), seed, limit, what=self.what)

    def prompt_format(self, lm: LoadedModel) -> PromptFormat:  # pragma: no cover - abstract
        raise NotImplementedError

    def pairs(self, items: Sequence[Item]) -> list[PreferencePair]:
        return item_pairs(items)

    def probe_examples(self, items: Sequence[Item], seed: int = 0, lm: LoadedModel | None = None) -> list[ProbeExample]:
        fmt = self.prompt_format(lm) if lm is not None else PromptFormat("raw")
        return answer_probe_examples(items, fmt, lm.tokenizer if lm is not None else None)

    def extra_scores(self, logprobs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Task-specific per-pair scores from the edited model's summed log-probs (none by default)."""
        return {}

    def evaluate(self, lm: LoadedModel, edit: Intervention | None, items: Sequence[Item], *, tau: float = 0.1,
                 batch_size: int = 16, progress: bool = False) -> ItemScores:
        """Per-item preference scores of `lm` with `edit` attached (None: unedited) on `items`."""
        if not items:
            raise LocauditError(f"no {self.what} to evaluate")
        qids, scores, lps = preference_scores(lm, edit, self.pairs(items), self.prompt_format(lm), tau=tau,
                                              average=self.average_logprobs, batch_size=batch_size, progress=progress)
        scores.update(self.extra_scores(lps))
        ids = [it.id for it in items]
        return ItemScores(tuple(ids), per_item(ids, qids, scores))

    def statistic(self, scores: ItemScores, idx: np.ndarray | None = None) -> float | np.ndarray:
        """The verdict's statistic: the mean of the primary score over items (rows of `idx`: bootstrap resamples)."""
        return mean_statistic(scores.scores[self.primary], idx)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def mean_statistic(values: np.ndarray, idx: np.ndarray | None = None) -> float | np.ndarray:
    return float(values.mean()) if idx is None else values[idx].mean(-1)
