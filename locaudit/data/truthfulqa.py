"""TruthfulQA: find the files, verify them, parse the 817 questions, and split them by question.

Search order for the data directory: an explicit argument (`--data-dir`), `$LOCAUDIT_DATA`, the project's
`../shared/data/truthfulqa`, the user cache, and only then a download from the canonical repository.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from locaudit.errors import LocauditError
from locaudit.heads import show
from locaudit.storage import cache_dir, file_sha256, stable_hash

FILES = ("TruthfulQA.csv", "mc_task.json", "finetune_truth.jsonl", "finetune_info.jsonl")
CANONICAL = {
    "TruthfulQA.csv": "https://raw.githubusercontent.com/sylinrl/TruthfulQA/main/TruthfulQA.csv",
    "mc_task.json": "https://raw.githubusercontent.com/sylinrl/TruthfulQA/main/data/mc_task.json",
    "finetune_truth.jsonl": "https://raw.githubusercontent.com/sylinrl/TruthfulQA/main/data/finetune_truth.jsonl",
    "finetune_info.jsonl": "https://raw.githubusercontent.com/sylinrl/TruthfulQA/main/data/finetune_info.jsonl",
}
REQUIRED_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


@dataclass(frozen=True)
class Question:
    """One TruthfulQA question with its reference answers and MC targets ((answer, label) tuples)."""

    id: int
    question: str
    best_answer: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]
    category: str = ""
    type: str = ""
    mc1: tuple[tuple[str, int], ...] = ()
    mc2: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Split:
    """Disjoint train/validation/test question sets; `hash` identifies the split in caches and edit files."""

    train: tuple[Question, ...]
    val: tuple[Question, ...]
    test: tuple[Question, ...]
    seed: int
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def hash(self) -> str:
        return stable_hash({k: [q.id for q in getattr(self, k)] for k in ("train", "val", "test")})

    def part(self, name: str) -> tuple[Question, ...]:
        if name not in ("train", "val", "test"):
            raise LocauditError(f"unknown split '{name}'; use train, val or test")
        return getattr(self, name)


def _project_shared() -> list[Path]:
    here = Path(__file__).resolve().parents[2]  # repository root when installed in editable mode
    return [Path.cwd() / ".." / "shared" / "data" / "truthfulqa", here / ".." / "shared" / "data" / "truthfulqa"]


def find_data_dir(data_dir: str | os.PathLike | None = None, download: bool = True, _source: str = "--data-dir") -> Path:
    """Locate a TruthfulQA directory (see module docstring); download into the cache as a last resort."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise LocauditError(f"{_source} {show(str(path), 80)} is not a directory; point it at a TruthfulQA data directory "
                                f"(one holding TruthfulQA.csv)")
        missing = [f for f in ("TruthfulQA.csv",) if not (path / f).is_file()]
        if missing:
            raise LocauditError(f"{_source} {show(str(path), 80)} has no {missing[0]}; point it at a TruthfulQA data directory")
        return path
    env = os.environ.get("LOCAUDIT_DATA")
    if env:
        return find_data_dir(env, download=False, _source="$LOCAUDIT_DATA")
    for cand in _project_shared():
        if (cand / "TruthfulQA.csv").is_file():
            return cand.resolve()
    cached = cache_dir() / "truthfulqa"
    if all((cached / f).is_file() for f in FILES):
        return cached
    if not download:
        raise LocauditError("TruthfulQA not found; pass --data-dir DIR or set LOCAUDIT_DATA")
    return _download(cached)


def _download(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name, url in CANONICAL.items():
        if (target / name).is_file():
            continue
        tmp = target / f".{name}.part"
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            raise LocauditError(
                f"TruthfulQA not found locally and download of {name} failed ({e}); pass --data-dir DIR or set LOCAUDIT_DATA"
            ) from None
        os.replace(tmp, target / name)
    return target


def verify_checksums(data_dir: Path) -> None:
    """Check every file listed in SHA256SUMS (if the directory has one) against its recorded hash."""
    sums = Path(data_dir) / "SHA256SUMS"
    if not sums.is_file():
        return
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LocauditError(f"{sums} is unreadable ({type(e).__name__}); restore it or delete it to skip verification") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        digest = parts[0].lower()
        if len(parts) != 2 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise LocauditError(f"{sums} line {i} is not '<sha256> <file name>'; restore it or delete it to skip verification")
        path = Path(data_dir) / parts[1].strip().lstrip("*")
        if not path.is_file():
            raise LocauditError(f"{path} is listed in SHA256SUMS but missing; restore the TruthfulQA data directory")
        if file_sha256(path) != digest:
            raise LocauditError(f"checksum mismatch for {path}; the file is corrupt or modified, restore it from the canonical source")


def split_answers(cell: str) -> tuple[str, ...]:
    """`"a; b; c"` -> ("a", "b", "c"), stripping blanks (TruthfulQA's `; ` separator)."""
    return tuple(a.strip() for a in (cell or "").split(";") if a.strip())


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def load_truthfulqa(data_dir: str | os.PathLike | None = None, verify: bool = True) -> list[Question]:
    """Parse TruthfulQA.csv (and mc_task.json when present) into Questions, ids = CSV row order."""
    root = find_data_dir(data_dir)
    if verify:
        verify_checksums(root)
    csv_path = root / "TruthfulQA.csv"
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise LocauditError(f"{csv_path} lacks column(s) {', '.join(missing)}; expected TruthfulQA's header {', '.join(REQUIRED_COLUMNS)}")
            rows, starts, end = [], [], reader.line_num
            for r in reader:  # remember where each record starts: a quoted cell may span lines
                rows.append(r)
                starts.append(end + 1)
                end = reader.line_num
    except (UnicodeDecodeError, csv.Error) as e:
        raise LocauditError(f"{csv_path} is not a readable CSV ({_one_line(e)}); restore the TruthfulQA file") from None
    except OSError as e:
        raise LocauditError(f"cannot read {csv_path} ({e.strerror or type(e).__name__}); check the file and its permissions") from None
    mc = _load_mc(root / "mc_task.json")
    questions = []
    for i, (r, line) in enumerate(zip(rows, starts)):
        q = (r.get("Question") or "").strip()
        if not q:
            raise LocauditError(f"{csv_path} line {line}: empty Question; fix or remove that row")
        correct, incorrect = split_answers(r.get("Correct Answers")), split_answers(r.get("Incorrect Answers"))
        best = (r.get("Best Answer") or "").strip()
        if not correct:
            raise LocauditError(f"{csv_path} line {line}: question {show(q)} has no correct answer; every question needs one")
        if not best:
            raise LocauditError(f"{csv_path} line {line}: question {show(q)} has an empty Best Answer; fill it in or remove the row")
        if not incorrect:
            raise LocauditError(f"{csv_path} line {line}: question {show(q)} has no untruthful (incorrect) answer; every question needs one")
        targets = mc.get(_norm(q), {})
        questions.append(Question(
            id=i, question=q, best_answer=best, correct=correct, incorrect=incorrect,
            category=(r.get("Category") or "").strip(), type=(r.get("Type") or "").strip(),
            mc1=tuple(targets.get("mc1_targets", {}).items()), mc2=tuple(targets.get("mc2_targets", {}).items()),
        ))
    if not questions:
        raise LocauditError(f"{csv_path} has no questions")
    return questions


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def _targets(item: dict, key: str, where: str) -> dict[str, int]:
    t = item.get(key, {})
    if not isinstance(t, dict) or not all(isinstance(a, str) and type(l) in (int, bool) and int(l) in (0, 1)
                                          for a, l in t.items()):
        raise LocauditError(f"{where}: {key} must map answer text to 0 or 1; restore mc_task.json")
    if t and not any(t.values()):
        raise LocauditError(f"{where}: {key} has no true answer; restore mc_task.json")
    return {a: int(l) for a, l in t.items()}


def _load_mc(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LocauditError(f"{path} is not valid JSON (line {e.lineno}); restore mc_task.json") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LocauditError(f"{path} is unreadable ({type(e).__name__}); restore mc_task.json") from None
    if not isinstance(items, list):
        raise LocauditError(f"{path} is not a JSON list of questions; restore mc_task.json")
    out = {}
    for n, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("question"), str):
            raise LocauditError(f"{path} item {n}: expected an object with a 'question' string; restore mc_task.json")
        where = f"{path} item {n}"
        mc1 = _targets(it, "mc1_targets", where)
        if mc1 and sum(mc1.values()) != 1:
            raise LocauditError(f"{where}: mc1_targets must have exactly one true answer; restore mc_task.json")
        out[_norm(it["question"])] = {"mc1_targets": mc1, "mc2_targets": _targets(it, "mc2_targets", where)}
    return out


def _spread(groups: list[list[int]], rng: np.random.Generator) -> list[int]:
    """Merge ordered groups so that every prefix holds each group in proportion to its size (within one item):
    item j of a group of n gets the key (j + u) / n, u uniform in [0, 1) per group; ties break at random."""
    keyed = []
    for g in groups:
        u = rng.random()
        keyed += [((j + u) / len(g), rng.random(), x) for j, x in enumerate(g)]
    return [x for *_, x in sorted(keyed)]


def stratified_order(questions: list[Question], seed: int | np.random.Generator, strata=None) -> list[int]:
    """A seeded random order of `questions` (indices) in which every prefix, and every contiguous segment, is
    stratified by TruthfulQA's Type (within one question) and, inside each Type, by Category (within one
    question per category): shuffle each (Type, Category) stratum, spread the categories of each Type, then
    spread the Types. Taking the first n questions of this order is a stratified random sample of size n.
    `strata(item) -> (group, subgroup)` stratifies other items the same way (default: (type, category))."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    strata = strata or (lambda q: (q.type, q.category))
    by_type: dict[str, dict[str, list[int]]] = {}
    for i, q in enumerate(questions):
        t, c = strata(q)
        by_type.setdefault(t, {}).setdefault(c, []).append(i)
    per_type = []
    for t in sorted(by_type):
        cats = [list(rng.permutation(by_type[t][c])) for c in sorted(by_type[t])]
        per_type.append(_spread(cats, rng))
    return [int(i) for i in _spread(per_type, rng)]


def composition(questions) -> dict:
    """{"n", "type": {Type: count}, "category": {Category: count}} of a sample of questions."""
    qs = list(questions)
    count = lambda key: dict(sorted(collections.Counter(key(q) for q in qs).items(), key=lambda kv: (-kv[1], kv[0])))
    return {"n": len(qs), "type": count(lambda q: q.type or "?"), "category": count(lambda q: q.category or "?")}


def describe_composition(questions, top: int = 5) -> str:
    """One line: 'n=40: Adversarial 22 / Non-Adversarial 18; 24 categories (Misconceptions 5, Law 3, ...)'."""
    c = composition(questions)
    types = " / ".join(f"{t} {n}" for t, n in c["type"].items())
    cats = ", ".join(f"{k} {n}" for k, n in list(c["category"].items())[:top])
    more = ", ..." if len(c["category"]) > top else ""
    return f"n={c['n']}: {types}; {len(c['category'])} categories ({cats}{more})"


def split_questions(questions: list[Question], seed: int = 0, train_frac: float = 0.6, val_frac: float = 0.2,
                    limit: int | None = None) -> Split:
    """Seeded split by question, stratified by Type and Category: `train_frac` train, `val_frac` validation,
    the rest test.

    `limit` first draws a stratified seeded subset of that many questions (for quick runs); each part must stay
    non-empty. Each part keeps the stratified random order (`stratified_order`), so its first n questions (the
    study's `max_val_questions` / `max_test_questions`) are themselves a stratified random sample.
    """
    if not 0 < train_frac < 1 or not 0 < val_frac < 1 or train_frac + val_frac >= 1:
        raise LocauditError(f"split fractions train={train_frac}, val={val_frac} must be in (0,1) and leave room for test")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LocauditError(f"--seed must be an integer >= 0, got {seed!r}")
    qs = list(questions)
    rng = np.random.default_rng(seed)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit <= 0:
            raise LocauditError(f"--limit-questions must be a positive integer, got {limit!r}")
        if limit < len(qs):
            qs = [qs[i] for i in stratified_order(qs, rng)[:limit]]
    order = stratified_order(qs, rng)
    n_train = int(round(train_frac * len(qs)))
    n_val = int(round(val_frac * len(qs)))
    parts = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
    if any(len(p) == 0 for p in parts):
        empty = next(name for name, p in zip(("train", "validation", "test"), parts) if len(p) == 0)
        if limit is not None and limit < len(questions):
            raise LocauditError(f"--limit-questions {limit} leaves the {empty} split empty; use --limit-questions 5 or more")
        raise LocauditError(f"the data has only {len(qs)} questions, which leaves the {empty} split empty; "
                            f"give a TruthfulQA.csv with at least 5 questions")
    train, val, test = (tuple(qs[i] for i in p) for p in parts)
    return Split(train, val, test, seed, {"train_frac": train_frac, "val_frac": val_frac, "limit": limit,
                                          "stratified_by": ["type", "category"]})
