"""Example builders over a question set: probe examples, IPO preference pairs, and MC items.

All builders are deterministic functions of (questions, seed), so a cached artefact keyed by their inputs
can be reused safely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from locaudit.data.truthfulqa import Question
from locaudit.data.formats import ensure_period
from locaudit.errors import LocauditError

PROBE_FORMATS = ("iti_end_q", "iti")


@dataclass(frozen=True)
class ProbeExample:
    qid: int
    text: str
    label: int  # 1 truthful, 0 untruthful


@dataclass(frozen=True)
class PreferencePair:
    qid: int
    question: str
    chosen: str  # truthful answer y+
    rejected: str  # untruthful answer y-


@dataclass(frozen=True)
class MCItem:
    """TruthfulQA multiple choice: MC1 has exactly one true choice; MC2 may have several."""

    qid: int
    question: str
    mc1_choices: tuple[str, ...]
    mc1_labels: tuple[int, ...]
    mc2_choices: tuple[str, ...]
    mc2_labels: tuple[int, ...]


def _labelled_answers(q: Question) -> list[tuple[str, int]]:
    if q.mc2:
        return [(a, int(l)) for a, l in q.mc2]
    return [(ensure_period(a), 1) for a in q.correct] + [(ensure_period(a), 0) for a in q.incorrect]


def probe_examples(questions: Sequence[Question], fmt: str = "iti_end_q", seed: int = 0,
                   pool: Sequence[Question] | None = None) -> list[ProbeExample]:
    """One example per labelled answer (TruthfulQA's mc2 targets, as ITI): `Q: {q} A: {a}`, and for
    `iti_end_q` (the paper's probing input x, y, x_random) a seeded random other question appended."""
    if fmt not in PROBE_FORMATS:
        raise LocauditError(f"unknown probe format '{fmt}'; use one of {', '.join(PROBE_FORMATS)}")
    pool = list(pool if pool is not None else questions)
    rng = np.random.default_rng(seed)
    out = []
    for q in questions:
        for answer, label in _labelled_answers(q):
            text = f"Q: {q.question} A: {answer}"
            if fmt == "iti_end_q":
                other = pool[int(rng.integers(len(pool)))]
                text += f" Q: {other.question}"
            out.append(ProbeExample(q.id, text, label))
    if not out:
        raise LocauditError("no probe examples: the question set is empty; raise --limit-questions")
    return out


def preference_pairs(questions: Sequence[Question]) -> list[PreferencePair]:
    """Every (truthful, untruthful) combination of reference answers per question (the paper's pairs)."""
    pairs = [
        PreferencePair(q.id, q.question, ensure_period(c), ensure_period(r))
        for q in questions for c in q.correct for r in q.incorrect
    ]
    if not pairs:
        raise LocauditError("no preference pairs: the question set is empty; raise --limit-questions")
    return pairs


def mc_items(questions: Sequence[Question]) -> list[MCItem]:
    """MC items from mc_task.json targets; questions without them fall back to the CSV's answers
    (MC1: best answer vs incorrect answers; MC2: correct vs incorrect)."""
    items = []
    for q in questions:
        if q.mc1 and q.mc2:
            mc1 = list(q.mc1)
            mc2 = list(q.mc2)
        else:
            mc1 = [(ensure_period(q.best_answer), 1)] + [(ensure_period(a), 0) for a in q.incorrect]
            mc2 = _labelled_answers(q)
        items.append(MCItem(q.id, q.question, tuple(a for a, _ in mc1), tuple(int(l) for _, l in mc1),
                            tuple(a for a, _ in mc2), tuple(int(l) for _, l in mc2)))
    return items
