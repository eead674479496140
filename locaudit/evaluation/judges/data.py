"""The judges' labelled data: TruthfulQA's human labels (deduplicated), the CSV's reference answers, the verdicts
humans give generic answers, the seeded validation splits and the accuracy figures measured on them."""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from locaudit.data.truthfulqa import find_data_dir, load_truthfulqa
from locaudit.errors import LocauditError
from locaudit.evaluation.judges.base import SUFFIX, check_kind

LABEL_FILES = {"truth": "finetune_truth.jsonl", "info": "finetune_info.jsonl"}
SEED = 0
HELDOUT_FRAC = 0.1


@dataclass(frozen=True)
class Labelled:
    """Deduplicated human labels for one judge kind: parallel tuples plus counts describing the dedup."""

    kind: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    labels: np.ndarray  # int8, 1 = " yes"
    stats: dict

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> Labelled:
        idx = np.asarray(idx, dtype=int)
        return Labelled(self.kind, tuple(self.questions[i] for i in idx), tuple(self.answers[i] for i in idx),
                        self.labels[idx], dict(self.stats, n_pairs=len(idx)))


def qkey(question: str) -> str:
    """Question identity used for matching: case- and whitespace-insensitive."""
    return " ".join(str(question).split()).lower()


def norm_answer(text: str) -> str:
    """Answer identity used for exact matches: lower case, single spaces, no trailing '.', '!' or spaces."""
    return " ".join(str(text).lower().split()).strip(" .!")


def parse_prompt(prompt: str, kind: str) -> tuple[str, str]:
    """Split a GPT-judge training prompt "Q: q\\nA: a\\nTrue:" into (q, a), both stripped."""
    suffix = "\n" + SUFFIX[kind]
    if not prompt.startswith("Q:") or not prompt.rstrip().endswith(suffix.strip()) or "\nA:" not in prompt:
        raise ValueError("not 'Q: ...\\nA: ...\\n" + SUFFIX[kind] + "'")
    body = prompt.rstrip()[: -len(SUFFIX[kind])]
    q, _, a = body[2:].partition("\nA:")
    return q.strip(), a.strip()


def load_labelled(kind: str, data_dir=None) -> Labelled:
    """Read finetune_{kind}.jsonl and deduplicate (question, answer) pairs: majority label, exact ties dropped."""
    check_kind(kind)
    path = find_data_dir(data_dir) / LABEL_FILES[kind]
    if not path.is_file():
        raise LocauditError(f"{path} is missing; the judges need TruthfulQA's {LABEL_FILES[kind]} in the data directory")
    votes: dict[tuple[str, str], list[int]] = {}
    question: dict[str, str] = {}  # qkey -> first spelling seen
    n_rows = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                q, a = parse_prompt(row["prompt"], kind)
                completion = row["completion"].strip()
                if completion not in ("yes", "no"):
                    raise ValueError(f"completion {row['completion']!r} is not ' yes' or ' no'")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
                raise LocauditError(f"{path} line {lineno}: not a TruthfulQA judge example ({e}); restore the file") from None
            votes.setdefault((question.setdefault(qkey(q), q), a), []).append(completion == "yes")
            n_rows += 1
    if not votes:
        raise LocauditError(f"{path} has no labelled examples; restore the file")
    qs, ans, ys = [], [], []
    conflicts = ties = 0
    for (q, a), v in votes.items():
        yes = sum(v)
        conflicts += 0 < yes < len(v)
        if 2 * yes == len(v):
            ties += 1
            continue
        qs.append(q), ans.append(a), ys.append(int(2 * yes > len(v)))
    stats = {"n_rows": n_rows, "n_distinct_pairs": len(votes), "n_conflicting_pairs": conflicts,
             "n_tied_pairs_dropped": ties, "n_pairs": len(ys), "n_questions": len({qkey(q) for q in qs}),
             "dedup_rule": "majority label per distinct (question, answer); exact ties dropped"}
    return Labelled(kind, tuple(qs), tuple(ans), np.asarray(ys, dtype=np.int8), stats)


def load_references(data_dir=None) -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """qkey -> (question, correct answers incl. the best answer, incorrect answers) from TruthfulQA.csv."""
    return {qkey(q.question): (q.question, tuple(dict.fromkeys((*q.correct, q.best_answer))), tuple(dict.fromkeys(q.incorrect)))
            for q in load_truthfulqa(data_dir)}


def own_labels(data: Labelled) -> dict[tuple[str, str], int]:
    """(question key, normalised answer) -> the human majority label of that answer to that question in `data`
    (pairs whose yes and no counts tie are left out). Reference answers take these labels (`JudgeModel.fit`)."""
    votes: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for q, a, y in zip(data.questions, data.answers, data.labels):
        votes[(qkey(q), norm_answer(a))][int(y)] += 1
    return {k: int(yes > no) for k, (no, yes) in votes.items() if yes != no}


GENERIC_MIN_QUESTIONS = 20  # a text given as an answer to at least this many questions ...
GENERIC_AGREEMENT = 0.9  # ... whose human labels agree at least this often has a question-independent verdict


def reference_pairs(refs: dict) -> set[tuple[str, str]]:
    """(question key, normalised answer) of every CSV reference answer in `refs`."""
    return {(k, norm_answer(a)) for k, (_, c, i) in refs.items() for a in (*c, *i)}


def generic_verdicts(data: Labelled, refs: dict) -> dict[str, int]:
    """Normalised text -> the human verdict on a generic answer: a text that the labelled data gives, other than
    as a copy of the question's own CSV reference answers, to at least GENERIC_MIN_QUESTIONS questions, with at
    least GENERIC_AGREEMENT of its labels agreeing. The labels of finetune_info.jsonl call "I have no comment."
    uninformative on 700 of the 702 questions where a model gave it; only their copies of the CSV's reference
    answers (every one marked informative, "I have no comment." on 103 questions) say otherwise."""
    ref_pairs = reference_pairs(refs)
    votes: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    questions: dict[str, set] = collections.defaultdict(set)
    for q, a, y in zip(data.questions, data.answers, data.labels):
        k, t = qkey(q), norm_answer(a)
        if (k, t) not in ref_pairs:
            votes[t][int(y)] += 1
            questions[t].add(k)
    return {t: int(yes > no) for t, (no, yes) in votes.items()
            if len(questions[t]) >= GENERIC_MIN_QUESTIONS and max(no, yes) >= GENERIC_AGREEMENT * (no + yes)}


def relabel_reference_copies(data: Labelled, refs: dict, verdicts: dict[str, int]) -> tuple[Labelled, int]:
    """`data` with every labelled pair that copies one of its question's reference answers and has a generic
    verdict (`generic_verdicts`) relabelled to that verdict; returns (data, number of labels changed)."""
    ref_pairs = reference_pairs(refs)
    labels = data.labels.copy()
    for i, (q, a) in enumerate(zip(data.questions, data.answers)):
        t = norm_answer(a)
        if t in verdicts and (qkey(q), t) in ref_pairs:
            labels[i] = verdicts[t]
    changed = int((labels != data.labels).sum())
    return Labelled(data.kind, data.questions, data.answers, labels, dict(data.stats, n_reference_copies_relabelled=changed)), changed


def needed_texts(data: Sequence[Labelled], refs: dict) -> list[str]:
    """Every question and answer text of `data` and `refs`, once each, in first-seen order (what a fit embeds)."""
    texts = []
    for d in data:
        texts += list(d.questions) + list(d.answers)
    for q, c, i in refs.values():
        texts += [q, *c, *i]
    return list(dict.fromkeys(texts))


# ------------------------------------------------------------------------------------ validation splits

def answer_split(data: Labelled, frac: float = HELDOUT_FRAC, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of deduplicated pairs into (train, held-out) indices: held-out answers, seen questions."""
    perm = np.random.default_rng(seed).permutation(len(data))
    n = max(1, round(frac * len(data)))
    return np.sort(perm[n:]), np.sort(perm[:n])


def question_split(data: Labelled, frac: float = HELDOUT_FRAC, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of pairs by question into (train, held-out) indices: no question on both sides."""
    keys = sorted({qkey(q) for q in data.questions})
    perm = np.random.default_rng(seed).permutation(len(keys))
    held = {keys[i] for i in perm[: max(1, round(frac * len(keys)))]}
    is_held = np.array([qkey(q) in held for q in data.questions])
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def restrict(data: Labelled, refs: dict, keys: set[str] | None) -> tuple[Labelled, dict]:
    """`data` and `refs` cut to the questions whose qkey is in `keys` (None: all)."""
    if keys is None:
        return data, refs
    idx = [i for i, q in enumerate(data.questions) if qkey(q) in keys]
    return data.subset(idx), {k: v for k, v in refs.items() if k in keys}


def sample_questions(data: Labelled, refs: dict, limit_questions: int | None, seed: int) -> tuple[Labelled, dict]:
    """`data` and `refs` cut to a seeded sample of `limit_questions` questions (None: all), for quick checks."""
    if limit_questions is None:
        return data, refs
    keys = sorted({qkey(q) for q in data.questions})
    if limit_questions < 10:
        raise LocauditError(f"limit_questions={limit_questions} is too few for a question split; use at least 10")
    if limit_questions < len(keys):
        rng = np.random.default_rng(seed)
        keys = [keys[i] for i in sorted(rng.choice(len(keys), size=limit_questions, replace=False))]
    data, refs = restrict(data, refs, set(keys))
    data.stats["n_questions"] = len(keys)
    return data, refs


def heldout_metrics(y: np.ndarray, p: np.ndarray, y_train: np.ndarray) -> dict:
    """acc, bacc (mean per-class recall) and majority_acc (always the training majority label) of P(yes) `p`
    thresholded at 0.5 against labels `y`, and n."""
    y = np.asarray(y, int)
    pred = (np.asarray(p) > 0.5).astype(int)
    recalls = [float((pred[y == c] == c).mean()) for c in (0, 1) if (y == c).any()]
    majority = int(np.mean(y_train) > 0.5)
    return {"acc": float((pred == y).mean()), "bacc": float(np.mean(recalls)), "majority_acc": float((y == majority).mean()),
            "n": len(y)}
