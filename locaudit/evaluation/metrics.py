"""One call that evaluates an edit the way ITI and Wang & Veitch report it.

For the model with `edit` attached, on a set of TruthfulQA questions:
- generate greedy answers (`generation.generate_answers`) and have two judges score them: `truth` / `info` are
  the mean judge probabilities P(yes), `truth_pct` / `info_pct` the percentage of answers judged true /
  informative (P >= 0.5, ITI's `acc`);
- `truth_info` = truth * info, the product of the two means (the paper's True*Info); `truth_info_pct` =
  truth_pct * info_pct / 100, ITI's product of rates;
- MC1 / MC2 (`mc.mc_scores`), and CE / KL on general text (`lm_metrics.TextMetrics`) when given one.

Where an ITI edit acts is its own `placement` (see `interventions`): generation, MC scoring and CE/KL each
declare their positions, so one attached edit is placed as ITI places it in each.

A judge is any `locaudit.evaluation.judges.Judge`: `score(questions, answers) -> array of P(yes)` and `info() -> dict`
describing it (that package has the real ones). Judges read the answers only; they never see the edit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from locaudit.data.examples import mc_items
from locaudit.data.formats import PromptFormat
from locaudit.data.truthfulqa import Question
from locaudit.errors import LocauditError
from locaudit.evaluation.generation import MAX_NEW_TOKENS, generate_answers, save_answers
from locaudit.evaluation.judges import Judge
from locaudit.evaluation.lm_metrics import TextMetrics
from locaudit.evaluation.mc import mc_scores
from locaudit.models import LoadedModel

THRESHOLD = 0.5  # ITI / TruthfulQA: an answer counts as true (informative) when P(yes) >= 0.5


def edit_label(edit) -> str:
    """Short name of an edit for answers.jsonl: its head-set label, else its kind ('none' when unedited)."""
    if edit is None:
        return "none"
    cfg = edit.config()
    return str(cfg.get("label") or cfg.get("kind", "edit"))


def _judge(judge: Judge, questions: Sequence[str], answers: Sequence[str], name: str) -> np.ndarray:
    p = np.asarray(judge.score(list(questions), list(answers)), dtype=np.float64).reshape(-1)
    if p.shape != (len(answers),):
        raise ValueError(f"{name} judge returned {p.size} scores for {len(answers)} answers")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name} judge returned scores outside [0, 1]")
    return p


def judged_fields(truth_p: np.ndarray | None, info_p: np.ndarray | None) -> dict:
    """truth, truth_pct, info, info_pct, truth_info, truth_info_pct from per-answer judge probabilities
    (all None without judges)."""
    if truth_p is None or info_p is None:
        return dict.fromkeys(("truth", "truth_pct", "info", "info_pct", "truth_info", "truth_info_pct"))
    truth_p, info_p = np.asarray(truth_p, dtype=np.float64), np.asarray(info_p, dtype=np.float64)
    truth, info = float(truth_p.mean()), float(info_p.mean())
    truth_pct, info_pct = float(100.0 * (truth_p >= THRESHOLD).mean()), float(100.0 * (info_p >= THRESHOLD).mean())
    return {"truth": truth, "truth_pct": truth_pct, "info": info, "info_pct": info_pct,
            "truth_info": truth * info, "truth_info_pct": truth_pct * info_pct / 100.0}


def judge_answers(judges: tuple[Judge, Judge], questions: Sequence[str], answers: Sequence[str]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(truth_p, info_p): each judge's P(yes) per answer, checked to be one probability per answer."""
    return (_judge(judges[0], questions, answers, "truth"), _judge(judges[1], questions, answers, "info"))


def evaluate(lm: LoadedModel, edit, questions: Sequence[Question], fmt: PromptFormat | str = "qa",
             judges: tuple[Judge, Judge] | None = None, mc: bool = True, text_metrics: TextMetrics | None = None,
             batch_size: int = 16, out_dir: Path | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
             edit_name: str | None = None, progress: bool = True) -> dict:
    """Evaluate `lm` with `edit` attached (None: unedited) on `questions`.

    Returns truth, truth_pct, info, info_pct, truth_info, truth_info_pct (None without judges), mc1, mc2 (None
    without mc), ce, kl (None without text_metrics), n_questions, seconds, timings (per stage), judge (each
    judge's info()), edit (its label) and per_question (qid, answer, truth_p, info_p, mc1, mc2 lists). With
    `out_dir`, writes `out_dir/answers.jsonl` (qid, question, edit, answer, truth_p, info_p, mc1, mc2).
    """
    from locaudit.interventions import NoEdit

    fmt = fmt if isinstance(fmt, PromptFormat) else PromptFormat(fmt)
    if not questions:
        raise LocauditError("no questions to evaluate: the question set is empty")
    edit_obj = edit if edit is not None else NoEdit()
    label = edit_name or edit_label(edit)
    texts = [q.question for q in questions]
    timings: dict[str, float] = {}
    t_start = time.time()

    with edit_obj.attach(lm):
        t0 = time.time()
        answers = generate_answers(lm, texts, fmt, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress="generate" if progress else None)
        timings["generate"] = time.time() - t0
        mc_res = None
        if mc:
            t0 = time.time()
            mc_res = mc_scores(lm, mc_items(questions), fmt, batch_size=batch_size, progress="mc" if progress else None)
            timings["mc"] = time.time() - t0

    truth_p = info_p = None
    if judges is not None:
        t0 = time.time()
        truth_p, info_p = judge_answers(judges, texts, answers)
        timings["judge"] = time.time() - t0

    text_res = None
    if text_metrics is not None:
        t0 = time.time()
        text_res = text_metrics.evaluate(edit_obj)
        timings["text"] = time.time() - t0

    result = {
        **judged_fields(truth_p, info_p),
        "mc1": None if mc_res is None else mc_res["mc1"], "mc2": None if mc_res is None else mc_res["mc2"],
        "ce": None if text_res is None else text_res["ce"], "kl": None if text_res is None else text_res["kl"],
        "n_questions": len(questions), "edit": label, "format": fmt.name,
        "judge": None if judges is None else {"truth": judges[0].info(), "info": judges[1].info()},
        "per_question": {
            "qid": [q.id for q in questions], "question": texts, "answer": answers,
            "truth_p": None if truth_p is None else truth_p.tolist(),
            "info_p": None if info_p is None else info_p.tolist(),
            "mc1": None if mc_res is None else mc_res["mc1_per_item"].tolist(),
            "mc2": None if mc_res is None else mc_res["mc2_per_item"].tolist(),
        },
        "timings": timings,
    }
    if text_res is not None:
        result["text"] = {"n_docs": text_res["n_docs"], "n_tokens": text_res["n_tokens"]}
    result["seconds"] = time.time() - t_start
    if out_dir is not None:
        per = result["per_question"]
        rows = []
        for i, q in enumerate(questions):
            row = {"qid": q.id, "question": q.question, "edit": label, "answer": answers[i]}
            for k in ("truth_p", "info_p", "mc1", "mc2"):
                if per[k] is not None:
                    row[k] = per[k][i]
            rows.append(row)
        save_answers(Path(out_dir) / "answers.jsonl", rows)
    return result
