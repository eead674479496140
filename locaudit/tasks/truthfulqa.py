"""TruthfulQA as a task: the paper's behaviour, with the study's data, split, pairs, probes and scores.

Items are TruthfulQA questions, split by question and stratified by Type and Category (`split_questions`, the
same split the study uses, so numbers are unchanged). Preference pairs are (truthful, untruthful) answers of a
question; probe examples are ITI's `Q: {q} A: {a} Q: {other q}` lines. `evaluate` generates an answer per
question with the edit attached and scores it with the truth and informativeness judges (truth_p, info_p, and
their product per question), and MC1 / MC2 over the answer choices. The verdict's statistic is the paper's
True*Info, mean(truth_p) * mean(info_p) over the items (`statistic`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from locaudit.data.examples import PreferencePair, ProbeExample, preference_pairs, probe_examples
from locaudit.data.formats import PromptFormat
from locaudit.data.truthfulqa import Question, load_truthfulqa, split_questions
from locaudit.interventions import Intervention
from locaudit.models import LoadedModel
from locaudit.tasks.base import ItemScores, TaskSplit


class TruthfulQATask:
    """TruthfulQA (module docstring). `judges` (truth, info) are loaded on first use unless given."""

    name = "truthfulqa"
    primary = "truth_info"
    metrics = ("truth_info", "truth_p", "info_p", "mc1", "mc2")

    def __init__(self, data_dir: str | None = None, fmt: str = "qa", judges: tuple | None = None, judge: str = "default",
                 mc: bool = True, max_new_tokens: int = 50, probe_format: str = "iti_end_q"):
        self.data_dir, self.fmt, self.judge, self.mc = data_dir, PromptFormat(fmt), judge, mc
        self.max_new_tokens, self.probe_format = max_new_tokens, probe_format
        self._judges = judges
        self._questions: list[Question] | None = None

    def items(self) -> list[Question]:
        if self._questions is None:
            self._questions = load_truthfulqa(self.data_dir)
        return list(self._questions)

    def split(self, seed: int = 0, limit: int | None = None) -> TaskSplit:
        s = split_questions(self.items(), seed=seed, limit=limit)
        return TaskSplit(s.train, s.val, s.test, seed)

    def prompt_format(self, lm: LoadedModel | None = None) -> PromptFormat:
        return self.fmt

    def pairs(self, items: Sequence[Question]) -> list[PreferencePair]:
        return preference_pairs(items)

    def probe_examples(self, items: Sequence[Question], seed: int = 0, lm: LoadedModel | None = None) -> list[ProbeExample]:
        return probe_examples(items, self.probe_format, seed=seed)

    def judges(self, progress: bool = False) -> tuple:
        if self._judges is None:
            from locaudit.evaluation.judges import load_judges

            self._judges = load_judges(self.judge, data_dir=self.data_dir, progress=progress)
        return self._judges

    def evaluate(self, lm: LoadedModel, edit: Intervention | None, items: Sequence[Question], *, tau: float = 0.1,
                 batch_size: int = 16, progress: bool = False) -> ItemScores:
        """Judged answers and MC per question with `edit` attached (`tau` is unused: no preference loss here)."""
        from locaudit.evaluation.metrics import evaluate

        m = evaluate(lm, edit, list(items), self.fmt, judges=self.judges(progress), mc=self.mc, batch_size=batch_size,
                     max_new_tokens=self.max_new_tokens, progress=progress)
        per = m["per_question"]
        scores = {k: np.asarray(per[k], dtype=np.float64) for k in ("truth_p", "info_p", "mc1", "mc2") if per[k] is not None}
        scores["truth_info"] = scores["truth_p"] * scores["info_p"]
        return ItemScores(tuple(per["qid"]), scores, {"answers": per["answer"]})

    def statistic(self, scores: ItemScores, idx: np.ndarray | None = None) -> float | np.ndarray:
        """True*Info = mean truth x mean info (rows of `idx`: bootstrap resamples of item positions)."""
        t, i = scores.scores["truth_p"], scores.scores["info_p"]
        if idx is None:
            return float(t.mean() * i.mean())
        return t[idx].mean(-1) * i[idx].mean(-1)

    def spec(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return "<task truthfulqa>"
