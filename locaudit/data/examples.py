"""Example builders over a question set: probe examples, IPO preference pairs, and MC items.

All builders are deterministic functions of (questions, seed), so a cached artefact keyed by their inputs
can be reused safely.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from locaudit.data.truthfulqa import Question
from locaudit.data.formats import ensure_period
from locaudit.errors import LocauditError
from locaudit.heads import show

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


PAIR_FIELDS = ("question", "chosen", "rejected")
_PAIR_HELP = 'one JSON object per line: {"question": ..., "chosen": truthful answer, "rejected": untruthful answer}'


def jsonl_objects(path: Path, fix: str) -> Iterator[tuple[int, str, dict]]:
    """(line number, "FILE line N", object) for every non-blank line of a JSONL file; an unreadable file, a line
    that is not UTF-8, not JSON or not an object raises one LocauditError naming the line and ending in `fix`."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LocauditError(f"cannot read {path} ({e.strerror or type(e).__name__}); check the file and its permissions") from None
    for n, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path} line {n}"
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError:
            raise LocauditError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            msg = f" ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
            raise LocauditError(f"{where}: not valid JSON{msg}; {fix}") from None
        if not isinstance(obj, dict):
            raise LocauditError(f"{where}: expected a JSON object, got {type(obj).__name__}; {fix}")
        yield n, where, obj


def load_preference_jsonl(path: str | os.PathLike) -> list[PreferencePair]:
    """User-supplied preference pairs from a JSONL file, one object per line with the text fields `question`,
    `chosen` (the preferred, truthful answer) and `rejected`, and optionally an integer `qid` (pairs of one
    question share it; without it every distinct question text gets its own id, in order of appearance).

    Blank lines are skipped; anything else that is not such an object raises LocauditError naming the line.
    Texts are stripped and otherwise kept as written (no TruthfulQA period normalisation)."""
    path = Path(path)
    if not path.is_file():
        raise LocauditError(f"preference file {show(str(path), 80)} not found; give a JSONL file with {_PAIR_HELP}")
    pairs: list[PreferencePair] = []
    implicit: dict[str, int] = {}
    qid_text: dict[int, tuple[str, int]] = {}
    has_qid: bool | None = None
    for n, where, obj in jsonl_objects(path, f"write {_PAIR_HELP}"):
        missing = [k for k in PAIR_FIELDS if k not in obj]
        if missing:
            raise LocauditError(f"{where}: missing field(s) {', '.join(missing)}; write {_PAIR_HELP}")
        text = {}
        for k in PAIR_FIELDS:
            if not isinstance(obj[k], str) or not obj[k].strip():
                raise LocauditError(f"{where}: field '{k}' must be non-empty text, got {show(json.dumps(obj[k]))}")
            text[k] = obj[k].strip()
        if text["chosen"] == text["rejected"]:
            raise LocauditError(f"{where}: chosen and rejected answers are identical; a pair needs two different answers")
        if has_qid is None:
            has_qid = "qid" in obj
        elif has_qid != ("qid" in obj):
            raise LocauditError(f"{where}: 'qid' is given on some lines but not on this one; give it on every line or on none")
        if has_qid:
            qid = obj["qid"]
            if isinstance(qid, bool) or not isinstance(qid, int) or qid < 0:
                raise LocauditError(f"{where}: 'qid' must be an integer >= 0, got {show(json.dumps(qid))}")
            first = qid_text.setdefault(qid, (text["question"], n))
            if first[0] != text["question"]:
                raise LocauditError(f"{where}: qid {qid} is already used for a different question on line {first[1]}; "
                                    f"give each question its own qid")
        else:
            qid = implicit.setdefault(text["question"], len(implicit))
        pairs.append(PreferencePair(qid, text["question"], text["chosen"], text["rejected"]))
    if not pairs:
        raise LocauditError(f"{path} has no preference pairs; write {_PAIR_HELP}")
    return pairs
