"""The default judge: MiniLM and TF-IDF neighbours of a new answer among the labelled and reference answers of
its question, plus question-independent signals, stacked by gradient boosting (`JudgeModel`); its validation on
held-out answers and held-out questions, the fit of the deployed truth and info judges, and `MiniLMJudge`, the
`Judge` that serves a fitted model (cached by `cache.default_judges`)."""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import re
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from locaudit.errors import LocauditError
from locaudit.evaluation.judges.base import KINDS, check_kind, clean_inputs
from locaudit.evaluation.judges.data import (
    HELDOUT_FRAC,
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
    qkey,
    question_split,
    relabel_reference_copies,
    sample_questions,
)
from locaudit.evaluation.judges.encoder import BACKBONE, Encoder, check_processes, embed_texts

DESIGN_VERSION = "minilm-knn-gb-2"  # bump when features, models or training change: it renames the cache
TAU = 0.05  # softmax temperature over cosine similarities for the similarity-weighted votes
K_LOCAL, K_GLOBAL, N_FOLDS = 5, 10, 5
_NEG = re.compile(r"\b(?:no|not|never|none|nothing|nobody|cannot|neither|nor)\b|n't\b", re.IGNORECASE)
_UNSURE = re.compile(r"no comment|don't know|do not know|not sure|cannot answer|can't answer|unknown|it depends", re.IGNORECASE)


# ------------------------------------------------------------------------------------ representations

@dataclass
class TextReps:
    """Per-text inputs of the features: embedding, TF-IDF views, normalised text and surface flags."""

    emb: np.ndarray
    char: object  # scipy CSR
    word: object
    norm: np.ndarray
    flags: np.ndarray  # [has negation, says unsure/no comment, n words, empty]

    @classmethod
    def build(cls, texts: Sequence[str], emb: np.ndarray, vecs, mats=None) -> TextReps:
        flags = np.array([[bool(_NEG.search(t)), bool(_UNSURE.search(t)), len(t.split()), not t.strip()] for t in texts],
                         dtype=np.float64).reshape(len(texts), 4)
        char, word = mats if mats is not None else (vecs[0].transform(texts), vecs[1].transform(texts))
        return cls(emb.astype(np.float32), char.astype(np.float32).tocsr(), word.astype(np.float32).tocsr(),
                   np.array([norm_answer(t) for t in texts], dtype=object), flags)

    def take(self, rows) -> TextReps:
        rows = np.asarray(rows, dtype=int)
        return TextReps(self.emb[rows], self.char[rows], self.word[rows], self.norm[rows], self.flags[rows])


def _fit_vectorizers(texts: Sequence[str]):
    from sklearn.feature_extraction.text import TfidfVectorizer

    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2, dtype=np.float32)
    word = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b|n't",
                           dtype=np.float32)
    mats = (char.fit_transform(texts), word.fit_transform(texts))
    for v in (char, word):  # the pruned-term set is large and unused: keep it out of the cache
        if hasattr(v, "stop_words_"):
            v.stop_words_ = None
    return (char, word), mats


def _sim_stats(sims: np.ndarray, labels: np.ndarray, prior: float) -> np.ndarray:
    """For each row of similarities to one question's bank (-inf = masked): max/top-3 to yes and to no, vote, 1-NN."""
    n, m = sims.shape
    out = np.zeros((n, 6))
    if m == 0:
        out[:, 4:] = prior
        return out
    pos = np.where(labels[None, :] == 1, sims, -np.inf)
    neg = np.where(labels[None, :] == 0, sims, -np.inf)

    def top(mat, k):
        s = np.sort(mat, axis=1)[:, -k:]
        fin = np.isfinite(s)
        return np.where(fin.any(1), np.where(fin, s, 0).sum(1) / np.maximum(fin.sum(1), 1), 0.0)

    kk = min(K_LOCAL, m)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
    s = np.take_along_axis(sims, order, 1)
    ok = np.isfinite(s)
    w = np.where(ok, np.exp((np.where(ok, s, 0) - np.where(ok[:, :1], s[:, :1], 0)) / TAU), 0.0)
    y = labels[order]
    vote = np.where(w.sum(1) > 0, (w * y).sum(1) / np.maximum(w.sum(1), 1e-12), prior)
    nn1 = np.where(ok[:, 0], y[:, 0], prior)
    mp, mn = top(pos, 1), top(neg, 1)
    out[:] = np.stack([mp, mn, mp - mn, top(pos, 3) - top(neg, 3), vote, nn1], 1)
    return out


LOCAL_FEATURES = (
    ["exact_yes", "exact_no"]
    + [f"emb_{s}" for s in ("max_yes", "max_no", "diff", "top3_diff", "vote", "nn1", "nearest_yes_neg", "nearest_no_neg")]
    + [f"{v}_{s}" for v in ("char", "word") for s in ("max_yes", "max_no", "diff", "top3_diff", "vote", "nn1")]
    + ["question_prior", "n_labelled", "has_negation", "unsure", "n_words", "empty"]
)
GLOBAL_FEATURES = ("global_vote", "global_max_sim", "global_logreg")
FALLBACK_FEATURES = GLOBAL_FEATURES + ("has_negation", "unsure", "n_words", "empty")


@contextlib.contextmanager
def _single_threaded():
    """Run BLAS/OpenMP on one thread: their spin-waiting threads make the small fits here 20-30x slower on a
    busy 2-core machine, and one thread costs little at these sizes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(1):
        yield


# ---------------------------------------------------------------------------------------- the model

class JudgeModel:
    """One fitted judge (truth or info): the bank of labelled + reference answers per question and two boosters."""

    def __init__(self, kind: str):
        self.kind = kind

    # --- construction ------------------------------------------------------------------------------
    def fit(self, data: Labelled, refs: dict, emb: dict[str, np.ndarray], seed: int = SEED, progress: bool = False) -> JudgeModel:
        """Fit on `data` plus the references of the questions in `refs` (only those: held-out questions stay unseen)."""
        with _single_threaded():
            return self._fit(data, refs, emb, seed, progress)

    def _fit(self, data: Labelled, refs: dict, emb: dict[str, np.ndarray], seed: int, progress: bool) -> JudgeModel:
        from sklearn.ensemble import HistGradientBoostingClassifier

        steps = tqdm(total=5, desc=f"fitting {self.kind} judge", disable=not progress, leave=False)
        # reference answers carry the labels the human data gives such answers: generic answers ("I have no
        # comment.") take the human verdict on that text, in the bank and where the labelled data copies a
        # reference; any other reference takes the question's own human label of it, else the CSV's verdict
        self.verdicts = verdicts = generic_verdicts(data, refs)
        data, self.n_copies_relabelled = relabel_reference_copies(data, refs, verdicts)
        bank_texts = list(dict.fromkeys(list(data.answers) + [a for _, c, i in refs.values() for a in (*c, *i)]))
        row = {t: i for i, t in enumerate(bank_texts)}
        self.vecs, mats = _fit_vectorizers(bank_texts)
        self.bank = TextReps.build(bank_texts, np.stack([emb[t] for t in bank_texts]), self.vecs, mats)
        steps.update()
        # per-question bank: (rows into self.bank, labels, labelled-item id or -1 for a reference)
        entries = collections.defaultdict(lambda: ([], [], []))
        qk = [qkey(q) for q in data.questions]
        for i, (k, a, y) in enumerate(zip(qk, data.answers, data.labels)):
            e = entries[k]
            e[0].append(row[a]), e[1].append(int(y)), e[2].append(i)
        human = own_labels(data)
        self.n_refs_relabelled = 0
        for k, (_, correct, incorrect) in refs.items():
            e = entries[k]
            for a, default in [(a, 1) for a in correct] + [(a, 0 if self.kind == "truth" else 1) for a in incorrect]:
                t = norm_answer(a)
                y = human.get((k, t), verdicts.get(t, default))
                self.n_refs_relabelled += y != default
                e[0].append(row[a]), e[1].append(y), e[2].append(-1)
        self.entries = {k: (np.array(r, int), np.array(lab, np.int8), np.array(ids, int)) for k, (r, lab, ids) in entries.items()}
        self.qemb = {k: emb[q] for k, q in zip(qk, data.questions)} | {k: emb[q] for k, (q, _, _) in refs.items()}
        self.prior = float(data.labels.mean())
        # question-independent part: every labelled answer with its label and question code
        self.lab_rows = np.array([row[a] for a in data.answers], int)
        self.lab_y = data.labels.astype(np.float64)
        codes = {k: c for c, k in enumerate(dict.fromkeys(qk))}
        self.lab_q = np.array([codes[k] for k in qk], int)
        x = self._logreg_inputs(self.bank.emb[self.lab_rows], np.stack([self.qemb[k] for k in qk]))
        oof_answer = self._oof_logreg(x, data.labels, None, seed)
        steps.update()
        oof_question = self._oof_logreg(x, data.labels, self.lab_q, seed)
        self.logreg = self._new_logreg().fit(x, data.labels)
        steps.update()
        # stacker: local features leave-one-out (an answer never sees itself), global ones out-of-fold
        items = np.arange(len(data))
        reps = self.bank.take(self.lab_rows)
        knn_self = self._global_knn(reps.emb, exclude_item=items)
        loc = self._local(qk, reps, exclude_item=items)
        self.stacker = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, random_state=seed)
        self.stacker.fit(np.hstack([loc, knn_self, oof_answer[:, None]]), data.labels)
        steps.update()
        # fallback for unseen questions: global features with the whole question left out
        knn_q = self._global_knn(reps.emb, exclude_q=self.lab_q)
        self.fallback = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=seed)
        self.fallback.fit(np.hstack([knn_q, oof_question[:, None], reps.flags]), data.labels)
        steps.update()
        steps.close()
        return self

    @staticmethod
    def _new_logreg():
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=1.0, max_iter=2000)

    @staticmethod
    def _logreg_inputs(a: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.hstack([a, a * q]).astype(np.float64)

    def _oof_logreg(self, x, y, groups, seed) -> np.ndarray:
        """Out-of-fold P(yes) from the embedding logistic regression; folds by item, or by question if `groups`."""
        from sklearn.model_selection import GroupKFold, KFold

        out = np.full(len(y), float(np.mean(y)))
        n_groups = len(np.unique(groups)) if groups is not None else len(y)
        folds = min(N_FOLDS, n_groups)
        if folds < 2 or len(np.unique(y)) < 2:
            return out
        splitter = KFold(folds, shuffle=True, random_state=seed).split(x) if groups is None else GroupKFold(folds).split(x, groups=groups)
        for tr, te in splitter:
            if len(np.unique(y[tr])) < 2:
                out[te] = float(np.mean(y[tr]))
                continue
            out[te] = self._new_logreg().fit(x[tr], y[tr]).predict_proba(x[te])[:, 1]
        return out

    # --- features ----------------------------------------------------------------------------------
    def _global_knn(self, emb: np.ndarray, exclude_item=None, exclude_q=None, bank=None) -> np.ndarray:
        """Similarity-weighted vote of the K nearest labelled answers (any question) and the top similarity;
        `bank` may pass in the labelled answers' embeddings, self.bank.emb[self.lab_rows], taken once."""
        import torch

        bank = self.bank.emb[self.lab_rows] if bank is None else bank
        out = np.zeros((len(emb), 2))
        k = min(K_GLOBAL, len(bank) - (exclude_item is not None))
        if k <= 0:
            out[:, 0] = self.prior
            return out
        for s in range(0, len(emb), 1024):
            sims = emb[s:s + 1024] @ bank.T
            if exclude_item is not None:
                ids = np.asarray(exclude_item[s:s + 1024])
                ok = ids >= 0
                sims[np.flatnonzero(ok), ids[ok]] = -np.inf
            if exclude_q is not None:
                sims[np.asarray(exclude_q[s:s + 1024])[:, None] == self.lab_q[None, :]] = -np.inf
            ts, top = (t.numpy() for t in torch.from_numpy(np.ascontiguousarray(sims)).topk(k, dim=1))  # 7x argpartition
            fin = np.isfinite(ts)
            mx = np.where(fin.any(1), np.max(np.where(fin, ts, -2), 1), 0.0)
            w = np.where(fin, np.exp((np.where(fin, ts, 0) - mx[:, None]) / TAU), 0.0)
            vote = np.where(w.sum(1) > 0, (w * self.lab_y[top]).sum(1) / np.maximum(w.sum(1), 1e-12), self.prior)
            out[s:s + len(sims)] = np.stack([vote, mx], 1)
        return out

    def _local(self, qkeys: Sequence[str], reps: TextReps, exclude_item=None) -> np.ndarray:
        """Features against the same question's bank (see LOCAL_FEATURES); `exclude_item` masks an answer's own label."""
        out = np.zeros((len(qkeys), len(LOCAL_FEATURES)))
        exclude = np.full(len(qkeys), -1) if exclude_item is None else np.asarray(exclude_item)
        groups = collections.defaultdict(list)
        for i, k in enumerate(qkeys):
            groups[k].append(i)
        for k, rows in groups.items():
            rows = np.array(rows)
            rb, lab, ids = self.entries.get(k, (np.zeros(0, int), np.zeros(0, np.int8), np.zeros(0, int)))
            ex = exclude[rows]
            mask = (ids[None, :] == ex[:, None]) & (ex[:, None] >= 0)
            is_lab = ids >= 0
            n_lab = is_lab.sum() - mask.sum(1)
            y_lab = (lab * is_lab).sum() - (mask * lab[None, :]).sum(1)
            prior = (y_lab + 2 * self.prior) / (n_lab + 2)
            same = (reps.norm[rows][:, None] == self.bank.norm[rb][None, :]) & ~mask
            cols = [(same & (lab[None, :] == 1)).any(1), (same & (lab[None, :] == 0)).any(1)]
            sims = reps.emb[rows] @ self.bank.emb[rb].T
            sims[mask] = -np.inf
            cols += list(_sim_stats(sims, lab, self.prior).T)
            negs = self.bank.flags[rb, 0]
            for want in (1, 0):
                s = np.where(lab[None, :] == want, sims, -np.inf)
                has = np.isfinite(s).any(1) if len(rb) else np.zeros(len(rows), bool)
                cols.append(np.where(has, negs[np.argmax(s, 1)] if len(rb) else 0, 0.0))
            for view in ("char", "word"):
                if len(rb):
                    sims = (getattr(reps, view)[rows] @ getattr(self.bank, view)[rb].T).toarray()
                else:
                    sims = np.zeros((len(rows), 0))
                sims[mask] = -np.inf
                cols += list(_sim_stats(sims, lab, self.prior).T)
            cols += [prior, n_lab] + list(reps.flags[rows].T)
            out[rows] = np.stack([np.broadcast_to(np.asarray(c, np.float64), (len(rows),)) for c in cols], 1)
        return out

    # --- use ---------------------------------------------------------------------------------------
    def known_questions(self) -> set[str]:
        """qkeys whose labelled or reference answers the judge has seen."""
        return set(self.entries)

    def predict(self, questions: Sequence[str], answers: Sequence[str], emb: dict[str, np.ndarray]) -> np.ndarray:
        """P(yes) per (question, answer); `emb` must hold embeddings of every answer and unseen question.

        Each distinct pair is scored by itself, so its score is bitwise the one it gets alone, whatever else is
        scored in the call: BLAS computes a row of a matrix product with other kernels, and other rounding, for
        other row counts (one row vs several), and the neighbour features turn such differences into others."""
        if not len(answers):
            return np.zeros(0)
        pairs = list(dict.fromkeys(zip(questions, answers)))
        bank = self.bank.emb[self.lab_rows]  # 18k x 384: taken once, not once per pair
        with _single_threaded():
            p = {pair: self._predict([pair[0]], [pair[1]], emb, bank)[0] for pair in pairs}
        return np.array([p[pair] for pair in zip(questions, answers)])

    def _predict(self, questions: Sequence[str], answers: Sequence[str], emb: dict[str, np.ndarray],
                 bank: np.ndarray | None = None) -> np.ndarray:
        keys = [qkey(q) for q in questions]
        a_emb = np.stack([emb[a] for a in answers])
        q_emb = np.stack([self.qemb[k] if k in self.qemb else emb[q] for k, q in zip(keys, questions)])
        reps = TextReps.build(list(answers), a_emb, self.vecs)
        glr = self.logreg.predict_proba(self._logreg_inputs(a_emb, q_emb))[:, 1]
        knn = self._global_knn(a_emb, bank=bank)
        known = np.array([k in self.entries for k in keys])
        out = np.zeros(len(answers))
        if known.any():
            idx = np.flatnonzero(known)
            loc = self._local([keys[i] for i in idx], reps.take(idx))
            out[idx] = self.stacker.predict_proba(np.hstack([loc, knn[idx], glr[idx, None]]))[:, 1]
        if (~known).any():
            idx = np.flatnonzero(~known)
            out[idx] = self.fallback.predict_proba(np.hstack([knn[idx], glr[idx, None], reps.flags[idx]]))[:, 1]
        return np.clip(out, 0.0, 1.0)



# ----------------------------------------------------------------------------------------- validation

def validate_split(data: Labelled, refs: dict, emb: dict, seed: int, frac: float, progress: bool) -> dict:
    """Held-out-answer and held-out-question metrics for one kind (see the package docstring). Held-out pairs that
    copy a reference answer with a generic verdict are scored against that verdict, as the judge is trained
    (`relabel_reference_copies`, with the verdicts of the training part only)."""
    out = {}

    def targets(model: JudgeModel, te) -> np.ndarray:
        held, n = relabel_reference_copies(data.subset(te), refs, model.verdicts)
        out[f"heldout_{split}_targets_relabelled"] = n
        return held.labels

    split = "answer"
    tr, te = answer_split(data, frac, seed)
    model = JudgeModel(data.kind).fit(data.subset(tr), refs, emb, seed, progress)
    m = heldout_metrics(targets(model, te), model.predict([data.questions[i] for i in te], [data.answers[i] for i in te], emb),
                        data.labels[tr])
    out.update({f"heldout_answer_{k}": v for k, v in m.items()})
    split = "question"
    tr, te = question_split(data, frac, seed)
    train_keys = {qkey(data.questions[i]) for i in tr}
    held_keys = {qkey(data.questions[i]) for i in te}
    model = JudgeModel(data.kind).fit(data.subset(tr), {k: v for k, v in refs.items() if k in train_keys}, emb, seed, progress)
    if model.known_questions() & held_keys:  # defensive: the split must never leak a question
        raise AssertionError("held-out question leaked into the judge's bank")
    m = heldout_metrics(targets(model, te), model.predict([data.questions[i] for i in te], [data.answers[i] for i in te], emb),
                        data.labels[tr])
    out.update({f"heldout_question_{k}": v for k, v in m.items()})
    out.update({"heldout_frac": frac, "seed": seed, "n_questions": data.stats.get("n_questions")})
    return out


def validate_judge(kind: str, data_dir=None, limit_questions: int | None = None, seed: int = SEED,
                   heldout_frac: float = HELDOUT_FRAC, progress: bool = False, processes: int = 1) -> dict:
    """Validate the default judge design for `kind` (optionally on a seeded subset of questions, for quick checks).

    Returns heldout_answer_{acc,bacc,majority_acc,n} and heldout_question_{...}. `processes` > 1 embeds new texts
    in that many spawned processes; 1 (the default) starts none.
    """
    check_kind(kind)
    check_processes(processes)
    if not 0 < heldout_frac < 1:
        raise LocauditError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
    data, refs = sample_questions(load_labelled(kind, data_dir), load_references(data_dir), limit_questions, seed)
    emb = embed_texts(needed_texts([data], refs), progress, processes)
    return validate_split(data, refs, emb, seed, heldout_frac, progress)


# ---------------------------------------------------------------------------------- the deployed judges

def train_default(data_dir=None, progress: bool = True, processes: int = 1) -> tuple[dict[str, JudgeModel], dict[str, dict]]:
    """Validate, then fit the deployed truth and info judges on all labelled data. Returns (models, info).

    `processes` = 1 (the default) does everything in this process; > 1 embeds the labelled texts in that many
    spawned processes and fits the two judges in one spawned process each (the same models either way)."""
    check_processes(processes)
    t0 = time.time()
    refs = load_references(data_dir)
    data = {k: load_labelled(k, data_dir) for k in KINDS}
    emb = embed_texts(needed_texts(list(data.values()), refs), progress, processes)
    models, infos = {}, {}
    bar = tqdm(total=len(KINDS), desc="training judges", disable=not progress)
    if processes > 1:  # the two judges are independent single-threaded fits: one process each
        with ProcessPoolExecutor(min(processes, len(KINDS)), mp_context=mp.get_context("spawn")) as pool:
            futures = {kind: pool.submit(train_kind, data[kind], refs, emb) for kind in KINDS}
            for kind, f in futures.items():
                models[kind], infos[kind] = f.result()
                bar.update()
    else:
        for kind in KINDS:
            models[kind], infos[kind] = train_kind(data[kind], refs, emb, progress)
            bar.update()
    bar.close()
    for kind in KINDS:
        infos[kind]["train_seconds_total"] = round(time.time() - t0, 1)
    return models, infos


def train_kind(data: Labelled, refs: dict, emb: dict, progress: bool = False) -> tuple[JudgeModel, dict]:
    """Validate, then fit, one judge (truth or info); a function of its inputs alone, so it can run in a
    worker process."""
    t = time.time()
    val = validate_split(data, refs, emb, SEED, HELDOUT_FRAC, progress)
    model = JudgeModel(data.kind).fit(data, refs, emb, SEED, progress)
    return model, {**val, "name": data.kind, "backbone": BACKBONE, "design": DESIGN_VERSION, "n_train": len(data),
                   "dedup": data.stats, "n_references_relabelled": model.n_refs_relabelled,
                   "n_reference_copies_relabelled": model.n_copies_relabelled,
                   "fit_seconds": round(time.time() - t, 1)}


class MiniLMJudge:
    """The default judge: a fitted `JudgeModel` plus its stored validation figures. Scoring embeds the answers
    (and unseen questions) one by one in this process (`Encoder.encode_alone`) and scores them one by one
    (`JudgeModel.predict`), so an answer's score is a function of its question and text alone: the same in any
    call, process or order. It never starts a process."""

    def __init__(self, model: JudgeModel, meta: dict):
        self.name = model.kind
        self.model = model
        self._info = dict(meta)

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        qs, ans = clean_inputs(questions, answers)
        texts = list(dict.fromkeys(ans + [q for q in qs if qkey(q) not in self.model.qemb]))
        emb = dict(zip(texts, Encoder.get().encode_alone(texts))) if texts else {}
        return self.model.predict(qs, ans, emb)

    def info(self) -> dict:
        return dict(self._info)
