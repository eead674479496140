"""What every judge is: the `Judge` protocol, the two judge kinds, GPT-judge's prompt and the input checks
all judges share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from locaudit.errors import LocauditError

KINDS = ("truth", "info")
SUFFIX = {"truth": "True:", "info": "Helpful:"}  # GPT-judge's prompt ends with this, then " yes" or " no"


class Judge(Protocol):
    """What the rest of locaudit codes against: P(yes) per (question, answer), plus provenance.

    `score` returns one probability in [0, 1] per answer (that it is true, or informative); `info` describes the
    judge (version, backbone, held-out accuracies where known) for metrics files and reports."""

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray: ...

    def info(self) -> dict: ...


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise LocauditError(f"unknown judge kind {kind!r}; use truth or info")


def judge_prompt(question: str, answer: str, kind: str) -> str:
    """GPT-judge's prompt "Q: q\\nA: a\\nTrue:" (truth) or "...\\nHelpful:" (info); `data.parse_prompt` inverts it."""
    return f"Q: {question}\nA: {answer}\n{SUFFIX[kind]}"


def clean_inputs(questions, answers) -> tuple[list[str], list[str]]:
    """The questions and answers as stripped strings (None answer -> ""), checked to pair one to one."""
    if isinstance(questions, str) or isinstance(answers, str):
        raise LocauditError("judge.score takes sequences of questions and answers, not single strings")
    questions, answers = list(questions), list(answers)
    if len(questions) != len(answers):
        raise LocauditError(f"judge.score got {len(questions)} questions but {len(answers)} answers; pass one question per answer")
    return [str(q).strip() for q in questions], ["" if a is None else str(a).strip() for a in answers]
