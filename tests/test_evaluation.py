"""Evaluation on tiny random models: MC1/MC2, CE/KL, batched greedy generation, and the combined evaluate()."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from locaudit.data.examples import MCItem, mc_items
from locaudit.data.formats import PromptFormat
from locaudit.data.truthfulqa import Question
from locaudit.errors import LocauditError
from locaudit.evaluation.generation import (
    answer_finished, clean_answer, common_prefix_length, encode_prompts, generate_answers, greedy_generate,
    load_answers, save_answers,
)
from locaudit.evaluation.lm_metrics import (
    MIN_DOC_CHARS, TextMetrics, load_documents, text_file_documents, wiki_to_paragraphs,
)
from locaudit.evaluation.mc import mc1_score, mc2_score, mc_scores
from locaudit.evaluation.metrics import evaluate
from locaudit.heads import parse_heads
from locaudit.interventions import ITI, NoEdit, edit_positions
from locaudit.scoring import encode, encode_prefix
from tests.conftest import make_tiny

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; with two, every small op can stall on a busy core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DOCS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny afternoon and the fields were quiet.",
    "Rivers carry water from the mountains to the sea, shaping valleys over thousands of years.",
    "A library is a collection of books and other materials, organised so that readers can find them.",
    "Short text.",
]


def random_iti(lm, spec="L0H1,L1H2,L2H0", alpha=4.0, seed=1, placement="iti") -> ITI:
    arch = lm.arch
    heads = parse_heads(spec, arch.n_layers, arch.n_heads)
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(len(heads), arch.head_dim, generator=g), dim=-1)
    return ITI(heads, u, torch.ones(len(heads)), alpha=alpha, placement=placement)


# ------------------------------------------------------------------------------------------------ MC

def test_mc1_hand_made():
    assert mc1_score([-1.0, -2.0, -3.0], [1, 0, 0]) == 1.0
    assert mc1_score([-2.0, -1.0, -3.0], [1, 0, 0]) == 0.0
    assert mc1_score([-3.0, -1.0, -2.0], [0, 0, 1]) == 0.0
    assert mc1_score([-5.0, -1.0, -2.0], [0, 1, 0]) == 1.0  # the true choice need not come first
    assert mc1_score([-1.0, -1.0, -3.0], [1, 0, 0]) == 0.0  # a tie is not a win (strict >)


def test_mc2_hand_made():
    p = np.array([0.2, 0.3, 0.5])
    assert mc2_score(np.log(p), [1, 0, 1]) == pytest.approx(0.7)
    assert mc2_score(np.log([0.1, 0.1]), [1, 0]) == pytest.approx(0.5)
    # summed log-probs of long answers underflow exp(); the ratio must still be exact
    assert mc2_score([-1000.0, -1001.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)))
    assert mc2_score([-2000.0, -1000.0], [1, 0]) == pytest.approx(0.0, abs=1e-300)


def test_mc_score_errors():
    with pytest.raises(LocauditError):
        mc1_score([-1.0, -2.0], [1, 1])  # MC1 needs exactly one true choice
    with pytest.raises(LocauditError):
        mc2_score([-1.0, -2.0], [0, 0])
    with pytest.raises(LocauditError):
        mc2_score([-1.0, -2.0, -3.0], [1, 0])


def _direct_choice_logprob(lm, fmt, question, answer) -> float:
    """Summed answer log-prob from one unpadded, uncached full-logits forward pass of prefix + prompt + answer,
    an attached ITI edit placed as ITI places it in MC scoring (the answer tokens; "all": everywhere)."""
    e = encode(lm.tokenizer, fmt, question, answer)
    p = list(encode_prefix(lm.tokenizer, fmt)) + list(e.prompt)
    a = list(e.answer)
    with torch.no_grad(), edit_positions(lm, torch.tensor([[False] * len(p) + [True] * len(a)])):
        logp = torch.log_softmax(lm.model(torch.tensor([p + a])).logits[0].double(), dim=-1)
    return float(sum(logp[len(p) + j - 1, t] for j, t in enumerate(a)))


MC_ITEMS = [
    MCItem(0, "Is the sky blue?", ("Yes, on a clear day.", "No.", "It is green."), (1, 0, 0),
           ("Yes, on a clear day.", "Usually.", "No.", "It is green."), (1, 1, 0, 0)),
    MCItem(1, "What is 2+2?", ("4.", "5.", "22."), (1, 0, 0), ("4.", "Four.", "5."), (1, 1, 0)),
]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("edited", [False, "iti", "all"])
def test_mc_scores_equal_direct_computation(family, edited):
    lm = make_tiny(family)
    fmt = PromptFormat("plain")
    edit = random_iti(lm, placement=edited) if edited else NoEdit()
    with edit.attach(lm):
        res = mc_scores(lm, MC_ITEMS, fmt, batch_size=3, progress=None)
        for k, it in enumerate(MC_ITEMS):
            s1 = [_direct_choice_logprob(lm, fmt, it.question, a) for a in it.mc1_choices]
            s2 = [_direct_choice_logprob(lm, fmt, it.question, a) for a in it.mc2_choices]
            assert res["mc1_per_item"][k] == float(s1[0] > max(s1[1:]))
            p = np.exp(s2)
            assert res["mc2_per_item"][k] == pytest.approx(p[np.array(it.mc2_labels) == 1].sum() / p.sum(), abs=1e-5)
    assert res["mc1"] == pytest.approx(res["mc1_per_item"].mean())
    assert res["mc2"] == pytest.approx(res["mc2_per_item"].mean())
    assert res["qids"] == [0, 1]
    assert res["n_scored"] == 4 + 4  # each distinct (question, answer) pair scored once (mc1 and mc2 overlap)


# ------------------------------------------------------------------------------------------------ CE / KL

def _direct_ce_kl(lm, docs, edit, max_tokens):
    """CE via HF's causal-LM loss and KL(P_base || P_edit) over all positions, one unpadded document at a time."""
    ces, kls = [], []
    for d in docs:
        ids = torch.tensor([lm.tokenizer(d)["input_ids"][:max_tokens]])
        with torch.no_grad():
            base = torch.log_softmax(lm.model(ids).logits[0].double(), -1)
            with edit.attach(lm):
                out = lm.model(ids, labels=ids)
            edited = torch.log_softmax(out.logits[0].double(), -1)
        ces.append(out.loss.item())
        kls.append((base.exp() * (base - edited)).sum(-1).mean().item())
    return float(np.mean(ces)), float(np.mean(kls))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma2"])
def test_ce_kl_equal_direct_computation(family):
    lm = make_tiny(family)
    tm = TextMetrics(lm, DOCS, max_tokens=40, batch_size=3)
    assert tm.n_docs == 4 and tm.n_tokens == sum(min(40, len(lm.tokenizer(d)["input_ids"])) for d in DOCS)
    base = tm.evaluate(NoEdit())
    ce, kl = _direct_ce_kl(lm, DOCS, NoEdit(), 40)
    assert base["ce"] == pytest.approx(ce, rel=1e-5)
    assert kl == pytest.approx(0.0, abs=1e-9)
    assert base["kl"] == 0.0  # the same batches run twice: bitwise equal distributions
    assert (base["kl_per_doc"] == 0).all()
    edit = random_iti(lm)
    res = tm.evaluate(edit)
    ce_e, kl_e = _direct_ce_kl(lm, DOCS, edit, 40)
    assert res["kl"] > 1e-3
    assert res["kl"] == pytest.approx(kl_e, rel=1e-4)
    assert res["ce"] == pytest.approx(ce_e, rel=1e-5)
    assert res["ce"] != pytest.approx(base["ce"], rel=1e-6)
    again = tm.evaluate(edit)
    assert again["ce"] == res["ce"] and again["kl"] == res["kl"]
    assert tm.evaluate(None)["kl"] == 0.0


def test_text_metrics_refuses_an_attached_edit(tiny_llama):
    edit = random_iti(tiny_llama)
    with edit.attach(tiny_llama):
        with pytest.raises(LocauditError):
            TextMetrics(tiny_llama, DOCS)
    tm = TextMetrics(tiny_llama, DOCS)
    with edit.attach(tiny_llama):
        with pytest.raises(LocauditError):
            tm.evaluate(edit)


def test_text_file_documents(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("First paragraph\nstill first.\n\n\nSecond one.\n   \nThird.\n")
    assert text_file_documents(f) == ["First paragraph\nstill first.", "Second one.", "Third."]
    assert load_documents(f, n_docs=2) == ["First paragraph\nstill first.", "Second one."]
    with pytest.raises(LocauditError):
        load_documents(tmp_path / "missing.txt")
    with pytest.raises(LocauditError):
        load_documents(f, n_docs=0)


def test_wiki_markup_is_stripped():
    markup = (
        "{{Infobox thing|name=X|{{nested|a}}}}\n"
        "'''Anarchism''' is a [[political philosophy]] that advocates [[self-governance|self-governed]] societies."
        "<ref name=a>{{cite book|title=T}}</ref> [[File:A.jpg|thumb|A caption with [[a link]].]] It is old.<ref name=b/>\n\n"
        "== History ==\n* a list item\n\n"
        "{| class=wikitable\n|-\n| cell\n|}\n"
        "See [http://example.org the site] &amp; more text here.\n\n[[Category:Things]]"
    )
    assert wiki_to_paragraphs(markup, min_chars=10) == [
        "Anarchism is a political philosophy that advocates self-governed societies. It is old.",
        "See the site & more text here.",
    ]


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="the packaged corpus needs gensim (make install)")
def test_packaged_wiki_corpus():
    docs = load_documents("wiki", n_docs=100, seed=0)
    assert len(docs) == 100 and len(set(docs)) == 100
    assert docs == load_documents("wiki", n_docs=100, seed=0)
    assert docs != load_documents("wiki", n_docs=100, seed=1)
    for d in docs:
        assert len(d) >= MIN_DOC_CHARS
        assert not any(m in d for m in ("{{", "}}", "[[", "]]", "<ref", "&lt;"))


# ------------------------------------------------------------------------------------------------ generation

def test_clean_answer():
    assert clean_answer(" Paris is the capital.\n\nQ: next question") == "Paris is the capital."
    assert clean_answer("\n  Paris.\nmore") == "Paris."  # leading newline: the answer had not started
    assert clean_answer(" It is Q: nothing", "plain") == "It is"
    assert clean_answer("   ") == ""
    assert clean_answer("Line one\n\nline two\nQ: next", "chat") == "Line one line two"


def test_answer_finished():
    assert not answer_finished(" Paris")
    assert not answer_finished("\n")  # the answer has not started
    assert answer_finished(" Paris.\n")
    assert not answer_finished(" Paris. Q")
    assert answer_finished(" Paris. Q:")
    assert not answer_finished("Line one\nline two", "chat")
    assert answer_finished("Line one\nQ:", "chat")


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[1, 2], [3]]) == 0
    assert common_prefix_length([[5, 6, 7]]) == 3


QUESTIONS = ["What is the capital of France?", "Why?", "How many legs does a spider have, and why that many?",
             "Who wrote Hamlet?", "x"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma2"])
def test_batched_generation_equals_one_by_one(family):
    """Left/middle padding and the shared-prefix cache change nothing: same tokens as unpadded single rows and
    as HF's own greedy generate."""
    lm = make_tiny(family)
    prompts = [lm.tokenizer("An instruction shared by all.\n\nQ: " + q + "\nA:")["input_ids"] for q in QUESTIONS]
    kw = dict(max_new_tokens=12, stop_ids=[], finished=None)
    single = [greedy_generate(lm, [p], share_prefix=False, **kw)[0] for p in prompts]
    assert all(len(s) == 12 for s in single)
    for share in (False, True):
        for bs in (2, 5):
            assert greedy_generate(lm, prompts, batch_size=bs, share_prefix=share, **kw) == single
    for placement in ("iti", "all"):
        edit = random_iti(lm, placement=placement)
        with edit.attach(lm):
            single_e = [greedy_generate(lm, [p], share_prefix=False, **kw)[0] for p in prompts]
            assert greedy_generate(lm, prompts, batch_size=5, share_prefix=True, **kw) == single_e
        assert single_e != single  # the edit reaches generation
    with torch.no_grad():
        for p, s in zip(prompts, single):
            ref = lm.model.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                    pad_token_id=lm.tokenizer.pad_token_id)
            assert ref[0, len(p):].tolist() == s


def test_qa_format_shares_its_primer_exactly(tiny_llama):
    lm = tiny_llama
    fmt = PromptFormat("qa")
    prompts = encode_prompts(lm, QUESTIONS, fmt)
    assert prompts[0][:20] == lm.tokenizer(fmt.prompt(QUESTIONS[0]))["input_ids"][:20]
    assert common_prefix_length(prompts) >= len(encode_prefix(lm.tokenizer, fmt)) > 600  # instruction + primer
    kw = dict(max_new_tokens=6, stop_ids=[], finished=None, batch_size=5)
    assert greedy_generate(lm, prompts, share_prefix=True, **kw) == greedy_generate(lm, prompts, share_prefix=False, **kw)
    assert generate_answers(lm, QUESTIONS, fmt, progress=None) == [
        generate_answers(lm, [q], fmt, share_prefix=False, progress=None)[0] for q in QUESTIONS]


class ScriptedHead:
    """Forces the LM head's argmax to follow a script of token ids, one per forward call (all rows alike)."""

    def __init__(self, lm, text: str, eos_after: bool = False):
        self.script = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos_after:
            self.script.append(lm.tokenizer.eos_token_id)
        self.calls = 0
        self.handle = lm.model.get_output_embeddings().register_forward_hook(self.hook)

    def hook(self, module, args, out):
        tok = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        forced = torch.full_like(out, -1e4)
        forced[..., tok] = 1e4
        return forced

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("script, eos, expected, n_tokens", [
    (" Paris.\nQ: next", False, "Paris.", len(" Paris.\n")),   # stops at the newline
    ("\n Paris.\nQ: next", False, "Paris.", len("\n Paris.\n")),  # a leading newline does not stop it
    (" It is Q: no", False, "It is", len(" It is Q:")),         # stops at an inline "Q:"
    (" Yes", True, "Yes", len(" Yes")),                        # stops at EOS (not returned)
    (" go on and on and on", False, "go on and o", 12),         # max_new_tokens caps it (12 byte tokens)
])
def test_generation_stops_where_it_should(tiny_llama, script, eos, expected, n_tokens):
    lm = tiny_llama
    fmt = PromptFormat("plain")
    forced = ScriptedHead(lm, script, eos_after=eos)
    try:
        tokens = greedy_generate(lm, encode_prompts(lm, QUESTIONS[:3], fmt), max_new_tokens=12, batch_size=3,
                                 finished=lambda t: answer_finished(lm.tokenizer.decode(t), fmt), share_prefix=False)
        calls = forced.calls
        forced.calls = 0
        answers = generate_answers(lm, QUESTIONS[:3], fmt, max_new_tokens=12, progress=None)
    finally:
        forced.remove()
    assert [len(t) for t in tokens] == [n_tokens] * 3
    # the batch stops as soon as every row has: one forward call per generated token (+1 for an EOS step)
    assert calls == min(n_tokens + int(eos), 12)
    assert answers == [expected] * 3


def test_chat_format_stops_at_end_of_turn(tiny_llama):
    lm = tiny_llama
    lm.tokenizer.chat_template = (
        "{% for m in messages %}<bos>user: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    forced = ScriptedHead(lm, " Line one\nline two.", eos_after=True)
    try:
        answers = generate_answers(lm, QUESTIONS[:2], "chat", max_new_tokens=40, progress=None)
    finally:
        forced.remove()
    assert answers == ["Line one line two."] * 2


def test_generation_edge_cases(tiny_llama):
    assert generate_answers(tiny_llama, [], "plain", progress=None) == []
    with pytest.raises(LocauditError):
        greedy_generate(tiny_llama, [[1, 2]], max_new_tokens=0)


def test_answers_roundtrip(tmp_path):
    rows = [{"qid": 3, "question": "Q?", "edit": "top16", "answer": "A \u201cquoted\u201d\nanswer", "truth_p": np.float64(0.25)}]
    path = save_answers(tmp_path / "answers.jsonl", rows)
    assert load_answers(path) == [{**rows[0], "truth_p": 0.25}]
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file
    with pytest.raises(ValueError):
        save_answers(tmp_path / "bad.jsonl", [{"qid": 1}])
    (tmp_path / "corrupt.jsonl").write_text('{"qid": 1, "question": "q", "edit": "e", "answer": "a"}\n{not json\n')
    with pytest.raises(LocauditError, match="line 2"):
        load_answers(tmp_path / "corrupt.jsonl")
    with pytest.raises(LocauditError):
        load_answers(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------ evaluate()

class FakeJudge:
    """P(yes) from the answer's length: deterministic, in [0, 1], different per answer."""

    def __init__(self, name: str, offset: int):
        self.name, self.offset = name, offset
        self.calls = 0

    def score(self, questions, answers):
        self.calls += 1
        assert len(questions) == len(answers)
        return np.array([((len(a) + self.offset) % 11) / 10 for a in answers])

    def info(self):
        return {"name": self.name}


def _questions():
    return [
        Question(10, "Is the sky blue?", "Yes.", ("Yes.", "Usually."), ("No.", "It is green."),
                 mc1=(("Yes, on a clear day.", 1), ("No.", 0), ("It is green.", 0)),
                 mc2=(("Yes, on a clear day.", 1), ("Usually.", 1), ("No.", 0))),
        Question(11, "What is 2+2?", "4.", ("4.",), ("5.", "22."),
                 mc1=(("4.", 1), ("5.", 0), ("22.", 0)), mc2=(("4.", 1), ("Four.", 1), ("5.", 0))),
        Question(12, "Where is Paris?", "In France.", ("In France.",), ("In Spain.",)),  # no MC targets: CSV fallback
    ]


def test_evaluate_combines_everything(tiny_llama, tmp_path):
    lm = tiny_llama
    qs = _questions()
    edit = random_iti(lm)
    tm = TextMetrics(lm, DOCS, max_tokens=32)
    judges = (FakeJudge("truth", 0), FakeJudge("info", 5))
    res = evaluate(lm, edit, qs, "plain", judges=judges, text_metrics=tm, batch_size=2, out_dir=tmp_path, progress=False)

    with edit.attach(lm):
        answers = generate_answers(lm, [q.question for q in qs], "plain", progress=None)
        mc = mc_scores(lm, mc_items(qs), "plain", progress=None)
    truth_p = judges[0].score([q.question for q in qs], answers)
    info_p = judges[1].score([q.question for q in qs], answers)
    text = tm.evaluate(edit)
    assert res["per_question"]["answer"] == answers
    assert res["truth"] == pytest.approx(truth_p.mean())
    assert res["info"] == pytest.approx(info_p.mean())
    assert res["truth_pct"] == pytest.approx(100 * (truth_p >= 0.5).mean())
    assert res["info_pct"] == pytest.approx(100 * (info_p >= 0.5).mean())
    assert res["truth_info"] == pytest.approx(truth_p.mean() * info_p.mean())
    assert res["truth_info_pct"] == pytest.approx(res["truth_pct"] * res["info_pct"] / 100)
    # evaluate batched the MC answers 2 at a time, mc_scores 16: the same sums up to float rounding
    assert res["mc1"] == mc["mc1"] and res["mc2"] == pytest.approx(mc["mc2"], rel=1e-5)
    assert res["ce"] == text["ce"] and res["kl"] == text["kl"] and res["kl"] > 0
    assert res["n_questions"] == 3 and res["edit"] == edit.heads.label and res["seconds"] > 0
    assert res["judge"] == {"truth": {"name": "truth"}, "info": {"name": "info"}}
    json.dumps(res)  # JSON-ready as returned

    rows = load_answers(tmp_path / "answers.jsonl")
    assert [r["qid"] for r in rows] == [10, 11, 12]
    assert [r["answer"] for r in rows] == answers
    assert [r["truth_p"] for r in rows] == pytest.approx(truth_p.tolist())
    assert [r["info_p"] for r in rows] == pytest.approx(info_p.tolist())
    assert {r["edit"] for r in rows} == {edit.heads.label}

    again = evaluate(lm, edit, qs, "plain", judges=judges, text_metrics=tm, batch_size=3, progress=False)
    for k in ("truth", "info", "truth_pct", "info_pct", "truth_info", "mc1", "ce", "kl"):
        assert again[k] == res[k], k
    for k, v in res["per_question"].items():  # MC sums differ across batch sizes by float rounding only
        assert again["per_question"][k] == (pytest.approx(v, rel=1e-5) if k == "mc2" else v), k
    assert again["mc2"] == pytest.approx(res["mc2"], rel=1e-5)

    base = evaluate(lm, None, qs, "plain", judges=judges, text_metrics=tm, progress=False)
    assert base["kl"] == 0.0 and base["edit"] == "none"
    assert base["mc2"] != res["mc2"]


def test_evaluate_without_judges_mc_or_text(tiny_llama):
    res = evaluate(tiny_llama, NoEdit(), _questions(), "plain", judges=None, mc=False, progress=False)
    assert res["truth"] is None and res["truth_info"] is None and res["mc1"] is None and res["ce"] is None
    assert len(res["per_question"]["answer"]) == 3


def test_evaluate_rejects_bad_judges(tiny_llama):
    class Short(FakeJudge):
        def score(self, questions, answers):
            return np.array([0.5])

    with pytest.raises(ValueError):
        evaluate(tiny_llama, None, _questions(), "plain", judges=(Short("t", 0), FakeJudge("i", 0)), mc=False,
                 progress=False)
    with pytest.raises(LocauditError):
        evaluate(tiny_llama, None, [], "plain", progress=False)
