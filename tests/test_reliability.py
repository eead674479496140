"""Bad input, the way users will type it: every mistake gives exit code 2 and exactly one line,
`locaudit: error: <problem>; <fix>`, and leaves nothing half-written. Property-based tests check that the
head-name parser and the data loaders either parse or raise LocauditError, never anything else. Caches
(activations, pi0 log-probs, the dequantised model) are validated on read and recomputed when corrupt."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locaudit.cli import main
from locaudit.errors import LocauditError
from tests.conftest import SHARED, byte_tokenizer, make_tiny

# LOCAUDIT_PROPERTY_EXAMPLES=5000 for a longer hunt; no example database (nothing written into the repository)
PROPERTY = settings(max_examples=int(os.environ.get("LOCAUDIT_PROPERTY_EXAMPLES", "150")), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def user_error(capsys, *argv, expect: tuple[str, ...] = ()) -> str:
    """Run the CLI, assert exit code 2 and one stderr line `locaudit: error: ...` containing `expect`."""
    rc, err = run_cli(capsys, *argv)
    lines = [line for line in err.rstrip("\n").split("\n") if "\r" not in line]  # (progress bars: model loading)
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("locaudit: error: "), err
    for fragment in expect:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def one_line(e: LocauditError) -> bool:
    return len(str(e).splitlines()) == 1 and str(e).strip() == str(e)


# ---------------------------------------------------------------------------------------------- fixtures

HEADER = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]


def write_csv(directory: Path, rows: list[list[str]], header=HEADER) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "TruthfulQA.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return directory


def real_rows(n: int = 12) -> list[list[str]]:
    with open(SHARED / "TruthfulQA.csv", encoding="utf-8-sig", newline="") as f:
        return [[r[c] for c in HEADER] for _, r in zip(range(n), csv.DictReader(f))]


@pytest.fixture
def small_data(tmp_path):
    """A 12-question TruthfulQA directory (no SHA256SUMS, no mc_task.json): loads in milliseconds."""
    return write_csv(tmp_path / "data", real_rows())


@pytest.fixture
def data_copy(tmp_path):
    """A full copy of the shared TruthfulQA directory, with its SHA256SUMS."""
    d = tmp_path / "tqa"
    d.mkdir()
    for name in ("TruthfulQA.csv", "mc_task.json", "SHA256SUMS", "finetune_truth.jsonl", "finetune_info.jsonl"):
        shutil.copy(SHARED / name, d / name)
        (d / name).chmod(0o644)
    return d


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny Llama saved as a model directory (a supported `--model`) and a tiny OPT (unsupported)."""
    from transformers import AutoModelForCausalLM, OPTConfig

    root = tmp_path_factory.mktemp("models")
    lm = make_tiny("llama")
    lm.model.save_pretrained(root / "llama")
    lm.tokenizer.save_pretrained(root / "llama")
    tok = byte_tokenizer()
    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                                     num_attention_heads=2, max_position_embeddings=64,
                                                     word_embed_proj_dim=16))
    opt.save_pretrained(root / "opt")
    tok.save_pretrained(root / "opt")
    return root


# ---------------------------------------------------------------------------------------------- head specs

@pytest.mark.parametrize("spec, expect", [
    ("L3-H1", "malformed head name 'L3-H1'"),
    ("LxH2", "malformed head name 'LxH2'"),
    ("", "empty head list"),
    (" , ", "empty head list"),
    ("L3H1,", "empty head name in 'L3H1,' (a stray comma?)"),
    ("L1H1,L2H0,L1H1", "head L1H1 is listed twice"),
    ("L1H1,L01H1", "head L1H1 is listed twice"),
    ("l3h1", "malformed head name 'l3h1'"),
    ("L3H1\nL4H2", "malformed head name 'L3H1\\nL4H2'"),
])
def test_bad_head_spec(capsys, tmp_path, spec, expect):
    msg = user_error(capsys, "fit", "--heads", spec, "--out", tmp_path / "fit", expect=(expect,))
    assert "argument --heads" in msg and "(see `locaudit fit --help`)" in msg
    assert "give each head once" in msg or "e.g. L3H1,L7H4" in msg  # the fix
    assert not (tmp_path / "fit").exists()
    user_error(capsys, "eval", "--iti", "--heads", spec, "--out", tmp_path / "ev", expect=(expect,))


def test_head_out_of_range(capsys, tmp_path, model_dirs, small_data):
    model = model_dirs / "llama"  # 3 layers of 4 heads
    user_error(capsys, "steer", "--model", model, "--data-dir", small_data, "--heads", "L99H3",
               expect=("head L99H3 is out of range: this model has layers 0..2 and heads 0..3",))
    out = tmp_path / "new" / "fit"
    user_error(capsys, "fit", "--model", model, "--data-dir", small_data, "--heads", "L1H4", "--out", out,
               expect=("head L1H4 is out of range",))
    assert not (tmp_path / "new").exists()  # the failed command removed the directories it created


def test_head_parser_api():
    from locaudit.heads import Head, HeadSet, parse_heads, random_heads, top_k_heads

    assert parse_heads([" L3H1", "L0H2 "]).names == ["L0H2", "L3H1"]
    for bad in (None, 5, ["L1H1", 3], "L\u0663H1", "L" + "9" * 5000 + "H0"):
        with pytest.raises(LocauditError) as e:
            parse_heads(bad)
        assert one_line(e.value)
    with pytest.raises(LocauditError, match="twice"):
        HeadSet((Head(1, 1), Head(1, 1)), "x")
    for k, seed in ((0, 0), (True, 0), (3, -1), (13, 0)):
        with pytest.raises(LocauditError):
            random_heads(k, seed, 3, 4)
    with pytest.raises(LocauditError, match="exceeds"):
        top_k_heads([Head(0, 0)], 2)


HEAD_TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.builds(lambda l, h: f"L{l}H{h}", st.integers(0, 12), st.integers(0, 12)),
                       st.sampled_from(["", " ", "L", "H1", "L1H", "LH", "L-1H2", "l1h1", "L1H1\n", "L01H1", "L1 H1"]),
                       st.text(alphabet="LH0123456789,; \t-x\u0663", max_size=8)),
             max_size=6).map(",".join),
)


@PROPERTY
@given(spec=HEAD_TEXT)
def test_head_parser_property(spec):
    from locaudit.heads import parse_heads

    try:
        hs = parse_heads(spec, n_layers=6, n_heads=6)
    except LocauditError as e:
        assert one_line(e)
        return
    names = [n.strip() for n in spec.split(",")]
    assert len(hs) == len(names) == len(set(hs.heads)) > 0
    assert all(0 <= h.layer < 6 and 0 <= h.head < 6 for h in hs)
    assert parse_heads(hs.spec()) == hs  # round trip


# ---------------------------------------------------------------------------------------------- data

def test_missing_data(capsys, tmp_path, monkeypatch):
    user_error(capsys, "probe", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "o",
               expect=("--data-dir", "is not a directory", "TruthfulQA"))
    (tmp_path / "empty").mkdir()
    user_error(capsys, "probe", "--data-dir", tmp_path / "empty", "--out", tmp_path / "o", expect=("has no TruthfulQA.csv",))
    monkeypatch.setenv("LOCAUDIT_DATA", str(tmp_path / "empty"))
    user_error(capsys, "fit", "--all-heads", "--out", tmp_path / "o", expect=("$LOCAUDIT_DATA", "has no TruthfulQA.csv"))
    assert not (tmp_path / "o").exists()


def test_checksums(capsys, tmp_path, data_copy):
    with open(data_copy / "mc_task.json", "a") as f:
        f.write(" ")
    user_error(capsys, "probe", "--data-dir", data_copy, "--out", tmp_path / "o",
               expect=("checksum mismatch for", "mc_task.json", "restore it"))
    (data_copy / "mc_task.json").unlink()
    user_error(capsys, "probe", "--data-dir", data_copy, "--out", tmp_path / "o",
               expect=("mc_task.json is listed in SHA256SUMS but missing",))
    (data_copy / "SHA256SUMS").write_text("not a checksum line\n")
    user_error(capsys, "probe", "--data-dir", data_copy, "--out", tmp_path / "o", expect=("SHA256SUMS line 1",))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case, expect", [
    ("missing column", "lacks column(s) Incorrect Answers"),
    ("empty correct", "line 3: question 'Why is the sky blue?' has no correct answer"),
    ("empty best", "line 3: question 'Why is the sky blue?' has an empty Best Answer"),
    ("no untruthful", "line 3: question 'Why is the sky blue?' has no untruthful (incorrect) answer"),
    ("empty question", "line 3: empty Question"),
    ("no rows", "has no questions"),
    ("not utf-8", "is not a readable CSV"),
    ("huge cell", "is not a readable CSV (field larger than field limit"),
])
def test_bad_csv(capsys, tmp_path, case, expect):
    good = ["Adversarial", "Science", "What color is the sky?", "Blue", "Blue; Azure", "Green; Red", ""]
    row = ["Adversarial", "Science", "Why is the sky blue?", "Scattering", "Rayleigh scattering", "It reflects the sea", ""]
    d = tmp_path / "d"
    if case == "missing column":
        write_csv(d, [good[:5]], header=HEADER[:5])
    elif case == "no rows":
        write_csv(d, [])
    else:
        i = {"empty correct": 4, "empty best": 3, "no untruthful": 5, "empty question": 2}.get(case)
        if i is not None:
            row[i] = " ; " if "Answers" in HEADER[i] else ""
        write_csv(d, [good, row])
        if case == "not utf-8":
            (d / "TruthfulQA.csv").write_bytes((d / "TruthfulQA.csv").read_bytes() + b"\xff\xfe,\x81\n")
        if case == "huge cell":
            (d / "TruthfulQA.csv").write_bytes((d / "TruthfulQA.csv").read_bytes() + b"a,b," + b"c" * 200_000 + b"\n")
    user_error(capsys, "probe", "--data-dir", d, "--out", tmp_path / "o", expect=(expect,))
    assert not (tmp_path / "o").exists()


def test_bad_mc_task(capsys, tmp_path, small_data):
    for text, expect in (("{not json", "not valid JSON (line 1)"), ('{"a": 1}', "not a JSON list"),
                         ('[{"question": "q", "mc1_targets": {"a": 1, "b": 1}}]', "exactly one true answer"),
                         ('[{"question": "q", "mc2_targets": ["a"]}]', "mc2_targets must map answer text to 0 or 1"),
                         ('[3]', "item 0")):
        (small_data / "mc_task.json").write_text(text)
        user_error(capsys, "probe", "--data-dir", small_data, "--out", tmp_path / "o", expect=(expect, "mc_task.json"))


def test_empty_split(capsys, tmp_path, small_data):
    for n, part in ((1, "validation"), (3, "test")):
        user_error(capsys, "probe", "--data-dir", small_data, "--limit-questions", n, "--out", tmp_path / "o",
                   expect=(f"--limit-questions {n} leaves the {part} split empty; use --limit-questions 5 or more",))
    write_csv(tmp_path / "three", real_rows(3))
    user_error(capsys, "probe", "--data-dir", tmp_path / "three", "--out", tmp_path / "o",
               expect=("the data has only 3 questions", "at least 5 questions"))
    assert not (tmp_path / "o").exists()


CELL = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@PROPERTY
@given(header=st.lists(st.sampled_from(HEADER + ["Question ", "junk", ""]), max_size=8),
       rows=st.lists(st.lists(st.one_of(CELL, st.sampled_from(["a; b", ";", " ", "x;;y"])), max_size=8), max_size=5),
       raw=st.one_of(st.none(), st.binary(max_size=60), st.text(max_size=60)))
def test_csv_loader_property(header, rows, raw):
    from locaudit.data.truthfulqa import load_truthfulqa

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "TruthfulQA.csv"
        if raw is None:
            buf = io.StringIO()
            csv.writer(buf).writerows([header] + rows)
            path.write_text(buf.getvalue(), encoding="utf-8")
        else:
            path.write_bytes(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
        try:
            qs = load_truthfulqa(d)
        except LocauditError as e:
            assert one_line(e)
            return
    assert qs and [q.id for q in qs] == list(range(len(qs)))
    for q in qs:
        assert q.question and q.best_answer and q.correct and q.incorrect
        assert all(a and a == a.strip() for a in q.correct + q.incorrect)


JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | CELL,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(CELL, inner, max_size=3), max_leaves=6)


@PROPERTY
@given(value=st.one_of(JSON_VALUE, st.lists(st.fixed_dictionaries(
    {"question": CELL}, optional={"mc1_targets": st.dictionaries(CELL, st.integers(-1, 2), max_size=3),
                                  "mc2_targets": st.one_of(JSON_VALUE, st.dictionaries(CELL, st.integers(0, 1), max_size=3))}),
    max_size=3)))
def test_mc_task_loader_property(value):
    from locaudit.data.truthfulqa import _load_mc

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mc_task.json"
        path.write_text(json.dumps(value))
        try:
            mc = _load_mc(path)
        except LocauditError as e:
            assert one_line(e)
            return
    for targets in mc.values():
        assert sum(targets["mc1_targets"].values()) in ((1,) if targets["mc1_targets"] else (0,))


# ---------------------------------------------------------------------------------------------- preference JSONL

def test_preference_jsonl(tmp_path):
    from locaudit.data.examples import PreferencePair, load_preference_jsonl

    good = tmp_path / "pairs.jsonl"
    good.write_text('\ufeff{"question": "Q1?", "chosen": "yes", "rejected": "no"}\n\n'
                    '{"question": "Q2?", "chosen": " a ", "rejected": "b", "extra": 1}\r\n'
                    '{"question": "Q1?", "chosen": "yes", "rejected": "maybe"}\n')
    assert load_preference_jsonl(good) == [PreferencePair(0, "Q1?", "yes", "no"), PreferencePair(1, "Q2?", "a", "b"),
                                           PreferencePair(0, "Q1?", "yes", "maybe")]
    (tmp_path / "ids.jsonl").write_text('{"qid": 7, "question": "Q", "chosen": "a", "rejected": "b"}\n')
    assert load_preference_jsonl(tmp_path / "ids.jsonl")[0].qid == 7
    ok = '{"question": "Q", "chosen": "a", "rejected": "b"}'
    cases = [
        (ok + "\n{not json}\n", "line 2: not valid JSON"),
        (ok + "\n" + ok + "\n\n[1, 2]\n", "line 4: expected a JSON object, got list"),
        ('{"question": "Q", "chosen": "a"}\n', "line 1: missing field(s) rejected"),
        ('{"question": "Q", "chosen": "", "rejected": "b"}', "line 1: field 'chosen' must be non-empty text"),
        ('{"question": 3, "chosen": "a", "rejected": "b"}', "line 1: field 'question' must be non-empty text"),
        ('{"question": "Q", "chosen": "a", "rejected": " a"}', "line 1: chosen and rejected answers are identical"),
        ('{"qid": 1, "question": "Q", "chosen": "a", "rejected": "b"}\n' + ok, "line 2: 'qid' is given on some lines"),
        ('{"qid": -1, "question": "Q", "chosen": "a", "rejected": "b"}', "line 1: 'qid' must be an integer >= 0"),
        ('{"qid": true, "question": "Q", "chosen": "a", "rejected": "b"}', "'qid' must be an integer"),
        ('{"qid": 1, "question": "Q", "chosen": "a", "rejected": "b"}\n{"qid": 1, "question": "R", "chosen": "a", "rejected": "b"}',
         "line 2: qid 1 is already used for a different question on line 1"),
        ("\n \n", "has no preference pairs"),
    ]
    for text, expect in cases:
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(LocauditError) as e:
            load_preference_jsonl(tmp_path / "bad.jsonl")
        assert expect in str(e.value) and one_line(e.value), (expect, str(e.value))
    (tmp_path / "bad.jsonl").write_bytes(ok.encode() + b"\n\xff\xfe\n")
    with pytest.raises(LocauditError, match="line 2: not UTF-8"):
        load_preference_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(LocauditError, match="not found"):
        load_preference_jsonl(tmp_path / "missing.jsonl")


PAIR_LINE = st.one_of(
    st.fixed_dictionaries({"question": CELL, "chosen": CELL, "rejected": CELL},
                          optional={"qid": st.one_of(st.integers(-2, 3), st.booleans(), CELL)}).map(json.dumps),
    JSON_VALUE.map(json.dumps),
    st.text(max_size=30).map(lambda t: t.replace("\n", " ")),
)


@PROPERTY
@given(lines=st.lists(PAIR_LINE, max_size=6), junk=st.binary(max_size=8))
def test_preference_jsonl_property(lines, junk):
    from locaudit.data.examples import load_preference_jsonl

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "pairs.jsonl"
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + (b"\n" + junk if junk else b""))
        try:
            pairs = load_preference_jsonl(path)
        except LocauditError as e:
            assert one_line(e)
            return
    assert pairs
    for p in pairs:
        assert p.question and p.chosen and p.rejected and p.chosen != p.rejected
        assert isinstance(p.qid, int) and not isinstance(p.qid, bool) and p.qid >= 0


# ---------------------------------------------------------------------------------------------- models

def test_unknown_model_offline(capsys, tmp_path, monkeypatch, small_data):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    user_error(capsys, "steer", "--model", "no-such-org/no-such-model", "--data-dir", small_data, "--heads", "L0H0",
               expect=("cannot load model id 'no-such-org/no-such-model'", "already in the local cache"))


def test_unsupported_and_broken_models(capsys, tmp_path, model_dirs, small_data):
    common = ("--data-dir", small_data, "--heads", "L0H0")
    user_error(capsys, "steer", "--model", model_dirs / "opt", *common,
               expect=("unsupported architecture 'opt'; supported model types:", "llama"))
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs / "llama", broken)
    (broken / "config.json").write_text("{")
    user_error(capsys, "steer", "--model", broken, *common, expect=("cannot load local directory",))
    (tmp_path / "text.gguf").write_text("not a model\n")
    user_error(capsys, "steer", "--model", tmp_path / "text.gguf", *common,
               expect=("is not a GGUF file (bad magic bytes); give a valid .gguf or a model directory",))
    user_error(capsys, "steer", "--model", tmp_path / "missing.gguf", *common, expect=("does not exist",))
    (tmp_path / "trunc.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    user_error(capsys, "steer", "--model", tmp_path / "trunc.gguf", *common, expect=("cannot read", "as a GGUF model"))
    assert not list((Path(os.environ["LOCAUDIT_CACHE"]) / "models").glob("*"))  # no half-built cache left
    user_error(capsys, "steer", "--device", "gpu", *common, expect=("unknown device 'gpu'",))
    user_error(capsys, "steer", "--dtype", "float8", "--model", model_dirs / "llama", *common, expect=("unknown dtype 'float8'",))


def test_model_cache_marker(tmp_path):
    from locaudit.models import _MARKER, _cache_complete

    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 10)
    good = {"sha256": "abc", "format": 1, "files": {"model.safetensors": 10}}
    assert not _cache_complete(d, "abc")  # no marker: an unfinished build
    for marker, ok in ((good, True), ({**good, "sha256": "abd"}, False), ({**good, "format": 0}, False),
                       ({**good, "files": {"model.safetensors": 9}}, False), ({**good, "files": {"gone": 1}}, False),
                       ({**good, "files": []}, False), ([1], False), ("{", False)):
        (d / _MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
        assert _cache_complete(d, "abc") is ok, marker


@pytest.mark.integration
def test_embedded_model_builds_from_an_empty_cache(smol, tmp_path, monkeypatch):
    """A new user's first load: the GGUF is dequantised into an empty cache, the marker written last, and the
    model equals the one the shared cache holds (a warm cache on a developer's machine never runs this path)."""
    from locaudit.models import _MARKER, load_model
    from locaudit.storage import cache_dir

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cold"))
    assert not (cache_dir() / "models").exists()
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    (built,) = (cache_dir() / "models").iterdir()
    marker = json.loads((built / _MARKER).read_text())
    assert marker["files"]["model.safetensors"] == (built / "model.safetensors").stat().st_size > 10**8
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, smol.model(ids).logits)
    assert not list(built.parent.glob("*.tmp*"))


@pytest.mark.integration
def test_corrupt_model_cache_is_rebuilt(smol, tmp_path, monkeypatch):
    """Truncate the dequantised weights of the embedded model in a private cache: detected and rebuilt."""
    from locaudit.models import _MARKER, embedded_gguf, load_model
    from locaudit.storage import cache_dir

    user_models = cache_dir() / "models"  # the shared cache `smol` filled
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    src = next(p for p in user_models.iterdir() if (p / _MARKER).is_file() and p.name.startswith("SmolLM2"))
    dst = tmp_path / "cache" / "models" / src.name
    shutil.copytree(src, dst)
    with open(dst / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    assert (dst / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size
    assert json.loads((dst / _MARKER).read_text())["files"]["model.safetensors"] > 1000
    assert embedded_gguf("smollm2-135m").is_file()
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, smol.model(ids).logits)
    assert not list(dst.parent.glob("*.tmp*"))


# ---------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("argv, expect", [
    (["probe", "--top-k", "two"], "argument --top-k: expected a positive integer, got 'two'"),
    (["fit", "--all-heads", "--epochs", "two"], "argument --epochs: expected an integer, got 'two'"),
    (["fit", "--all-heads", "--tau", "nan"], "argument --tau: expected a finite number, got 'nan'"),
    (["steer", "--alpha", "abc"], "argument --alpha: expected a number, got 'abc'"),
    (["steer", "--alpha", "inf"], "argument --alpha: expected a finite number, got 'inf'"),
    (["eval", "--none", "--text-docs", "-1"], "argument --text-docs: expected an integer >= 0, got -1"),
    (["eval", "--none", "--max-new-tokens", "0"], "argument --max-new-tokens: expected a positive integer, got 0"),
    (["fit", "--heads", "L1H1", "--random", "3"], "argument --random: not allowed with argument --heads"),
    (["fit", "--objective", "ppo", "--all-heads"], "argument --objective: invalid choice: 'ppo'"),
    (["fit", "--all-heads", "--bogus"], "unrecognized arguments: --bogus"),
    (["fit"], "one of the arguments --heads --top-k --random --all-heads --full is required"),
    (["run", "--preset"], "argument --preset: expected one argument"),
    (["judge"], "the following arguments are required: action"),
    ([], "the following arguments are required: command"),
])
def test_bad_options(capsys, tmp_path, argv, expect):
    if argv and argv[0] in ("probe", "fit", "eval"):
        argv = argv + ["--out", str(tmp_path / "o")]
    msg = user_error(capsys, *argv, expect=(expect,))
    assert "--help`)" in msg
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, expect", [
    (["fit", "--all-heads", "--epochs", "0"], "epochs must be positive, got 0"),
    (["fit", "--all-heads", "--batch-size", "-4"], "batch_size must be positive, got -4"),
    (["fit", "--all-heads", "--max-train-pairs", "0"], "max_train_pairs must be positive, got 0"),
    (["fit", "--all-heads", "--tau", "0"], "tau must be > 0, got 0.0"),
    (["fit", "--all-heads", "--tau", "-0.5"], "tau must be > 0, got -0.5"),
    (["fit", "--all-heads", "--lr", "0"], "learning rate must be > 0, got 0.0"),
    (["fit", "--all-heads", "--patience", "3"], "early stopping (patience) needs eval_every"),
    (["probe", "--limit-questions", "0"], "limit_questions (--limit-questions) must be positive, got 0"),
    (["probe", "--seed", "-1"], "seed (--seed) must be >= 0, got -1"),
    (["run", "--preset", "smoke", "--seed", "-1"], "seed (--seed) must be >= 0, got -1"),
    (["run", "--preset", "smoke", "--limit-questions", "0"], "limit_questions (--limit-questions) must be positive"),
])
def test_bad_option_values(capsys, tmp_path, argv, expect):
    """Values the config dataclasses (`FitConfig`, `DataConfig`) refuse: their own checks, not a second copy in the
    CLI, still before a model is loaded or anything is written."""
    msg = user_error(capsys, *argv, "--out", str(tmp_path / "o"), expect=(expect,))
    assert "--help`)" not in msg
    assert not (tmp_path / "o").exists()


def test_missing_input_paths(capsys, tmp_path):
    out = tmp_path / "o"
    user_error(capsys, "eval", "--edit", tmp_path / "nothing", "--out", out, expect=("is not an edit directory",))
    user_error(capsys, "eval", "--iti", "--probes", tmp_path, "--out", out, expect=("has no probes.npz",))
    user_error(capsys, "fit", "--top-k", "3", "--out", out, expect=("--top-k needs --probes DIR",))
    user_error(capsys, "eval", "--none", "--text", tmp_path / "none.txt", "--out", out,
               expect=("is neither a built-in corpus (wiki, lee) nor a file",))
    assert not out.exists()


def test_out_is_a_file(capsys, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    for cmd in (["probe"], ["fit", "--all-heads"], ["eval", "--none"], ["run"]):
        user_error(capsys, *cmd, "--out", f, expect=(f"--out {f} is an existing file; give a directory path",))
        user_error(capsys, *cmd, "--out", f / "sub", expect=(f"cannot be created: {f} is a file",))
    assert f.read_text() == "keep me"


def test_environment_errors(capsys, tmp_path, monkeypatch):
    import errno

    from locaudit import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.json"))
    monkeypatch.setattr(cli, "_check_data", full)
    user_error(capsys, "probe", "--out", tmp_path / "o",
               expect=(f"No space left on device ({tmp_path / 'x.json'}); free disk space or fix permissions",))
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "o" / "file"))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "file").write_text("")
    from locaudit.storage import cache_dir

    with pytest.raises(LocauditError, match="set LOCAUDIT_CACHE to a writable directory"):
        cache_dir()


BAD_PRESETS = [
    ('[study]\nalphas = ["a", 5.0]\n', "[study] alphas = ('a', 5.0): expected a list of numbers"),
    ("[study]\nalphas = [5.0, nan]\n", "expected a list of numbers"),
    ("[study]\ntaus = [0.0]\n", "[study]: every tau must be > 0, got 0.0"),
    ('[eval]\nmax_new_tokens = "50"\n', "[eval] max_new_tokens = '50': expected an integer"),
    ('[study]\ntop_k = "3"\n', "[study] top_k = '3': expected an integer"),
    ("[eval]\ntext_docs = -3\n", "[eval]: text_docs must be >= 0 (0 skips CE/KL), got -3"),
    ("[eval]\nbatch_size = 0\n", "[eval]: batch_size must be positive, got 0"),
    ('[eval]\niti_placement = "everywhere"\n', "[eval]: iti_placement must be one of iti, all, got 'everywhere'"),
    ("[study]\nmax_test_questions = 0\n", "[study]: max_test_questions must be positive"),
    ("[eval]\nfmt = \"xml\"\n", "[eval]: fmt = 'xml' is not a prompt format; use one of qa, plain, chat"),
    ("[fit]\nfmt = \"xml\"\n", "[fit]: fmt = 'xml' is not a prompt format; use one of qa, plain, chat"),
    ("[fit]\nwarmup_ratio = 1.0\n", "[fit]: weight_decay must be >= 0 and warmup_ratio in [0, 1)"),
    ('[study]\nprobe_format = "last"\n', "[study]: probe_format = 'last' is not a probe format; use one of iti_end_q, iti"),
    ("[study]\ntop_k = 0\n", "[study]: top_k must be positive, got 0"),
    ("[data]\nseed = -1\n", "[data]: seed (--seed) must be >= 0, got -1"),
    ("[studdy]\ntop_k = 3\n", "unknown table(s) studdy"),
    ("[study]\ntopk = 3\n", "unknown setting(s) topk"),
    ("[study\n", "is not valid TOML"),
    ("[data]\nlimit_questions = 2\n", "--limit-questions 2 leaves the validation split empty"),
]


@pytest.mark.parametrize("text, expect", BAD_PRESETS)
def test_bad_preset(capsys, tmp_path, text, expect):
    preset = tmp_path / "bad.toml"
    preset.write_text(text)
    user_error(capsys, "run", "--preset", preset, "--out", tmp_path / "run", expect=(expect,))
    assert not (tmp_path / "run").exists()


def test_unknown_preset(capsys, tmp_path):
    user_error(capsys, "run", "--preset", "huge", "--out", tmp_path / "run",
               expect=("unknown preset 'huge'; use one of", "quick"))
    user_error(capsys, "report", tmp_path, expect=("is not a locaudit run directory",))


# ---------------------------------------------------------------------------------------------- caches, atomic writes

def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    from locaudit.storage import atomic_write, atomic_write_text, read_json

    target = tmp_path / "t.json"
    atomic_write_text(target, '{"v": 1}')
    for exc in (RuntimeError("disk on fire"), KeyboardInterrupt()):
        def write(tmp, exc=exc):
            tmp.write_text('{"v": 2, "half')
            raise exc
        with pytest.raises(type(exc)):
            atomic_write(target, write)
        assert read_json(target) == {"v": 1}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
    (tmp_path / "bad.json").write_bytes(b'{"v": \xff')
    with pytest.raises(LocauditError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


CORRUPTIONS = {
    "truncated": lambda b: b[: len(b) // 2],
    "garbage": lambda b: bytes(range(256)) * 4,
    "zeroed": lambda b: b"\0" * len(b),
    "empty": lambda b: b"",
}


@pytest.mark.parametrize("how", ["truncated", "garbage", "zeroed", "empty"])
def test_activation_cache_corrupt_is_recomputed(tiny_llama, monkeypatch, how):
    from locaudit import activations
    from locaudit.storage import cache_dir

    texts = ["Q: one A: two", "Q: three A: four"]
    first = activations.cached_activations(tiny_llama, texts, progress=False)
    (path,) = (cache_dir() / "activations").glob("*.npy")
    path.write_bytes(CORRUPTIONS[how](path.read_bytes()))
    calls = []
    real = activations.capture_last_token
    monkeypatch.setattr(activations, "capture_last_token", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = activations.cached_activations(tiny_llama, texts, progress=False)
    assert calls == [1] and np.array_equal(first, again)
    assert np.array_equal(np.load(path), first)  # the cache entry was rewritten whole
    assert not list(path.parent.glob(".*tmp"))


def test_activation_cache_wrong_shape_is_recomputed(tiny_llama, monkeypatch):
    from locaudit import activations
    from locaudit.storage import cache_dir

    texts = ["Q: one A: two", "Q: three A: four"]
    first = activations.cached_activations(tiny_llama, texts, progress=False)
    (path,) = (cache_dir() / "activations").glob("*.npy")
    np.save(path, first[:1])
    calls = []
    real = activations.capture_last_token
    monkeypatch.setattr(activations, "capture_last_token", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert np.array_equal(activations.cached_activations(tiny_llama, texts, progress=False), first) and calls == [1]


@pytest.mark.parametrize("how", list(CORRUPTIONS) + ["wrong keys", "wrong shape"])
def test_pi0_cache_corrupt_is_recomputed(tiny_llama, monkeypatch, how):
    from locaudit import training
    from locaudit.data.examples import PreferencePair
    from locaudit.data.formats import PromptFormat
    from locaudit.storage import cache_dir

    pairs = [PreferencePair(0, "Is water wet?", "Yes.", "No."), PreferencePair(1, "Sky?", "Blue.", "Green.")]
    enc = training.encode_pairs(tiny_llama, pairs, PromptFormat("plain"))
    first = training.reference_logprobs(tiny_llama, enc, progress=False)
    (path,) = (cache_dir() / "pi0").glob("*.pt")
    if how == "wrong keys":
        torch.save({"lp_c": first["lp_c"]}, path)
    elif how == "wrong shape":
        torch.save({k: v[:1] for k, v in first.items()}, path)
    else:
        path.write_bytes(CORRUPTIONS[how](path.read_bytes()))
    calls = []
    real = training.answer_logprobs
    monkeypatch.setattr(training, "answer_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = training.reference_logprobs(tiny_llama, enc, progress=False)
    assert calls == [1]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(torch.equal(first[k], v) for k, v in torch.load(path, weights_only=True).items())


def test_corrupt_edit_is_a_user_error(tmp_path, tiny_llama):
    from locaudit.heads import parse_heads
    from locaudit.interventions import LocalizedRank1, load_intervention

    edit = LocalizedRank1(parse_heads("L0H1,L2H3"), tiny_llama.arch)
    edit.save(tmp_path / "e")
    assert load_intervention(tmp_path / "e", tiny_llama.arch).config() == edit.config()
    t, meta = tmp_path / "e" / "edit.safetensors", tmp_path / "e" / "edit.json"
    good, good_meta = t.read_bytes(), meta.read_text()
    t.write_bytes(good[:-10])
    with pytest.raises(LocauditError, match="unreadable.*refit the edit") as e:
        load_intervention(tmp_path / "e", tiny_llama.arch)
    assert one_line(e.value)
    t.write_bytes(good)
    for text, expect in (("[1, 2]", "not an edit description"), ('{"kind": "localized"}', "lacks 'heads'"),
                         ('{"kind": "lora"}', "unknown edit kind 'lora'"), ("{", "not valid JSON")):
        meta.write_text(text)
        with pytest.raises(LocauditError, match=expect):
            load_intervention(tmp_path / "e", tiny_llama.arch)
    meta.write_text(good_meta)
    with pytest.raises(LocauditError, match="head L2H3 is out of range"):  # fitted on a deeper model
        load_intervention(tmp_path / "e", tiny_shape(n_layers=2, hidden=32).arch)
    with pytest.raises(LocauditError, match="does not fit this model"):  # another head size
        load_intervention(tmp_path / "e", tiny_shape(n_layers=3, hidden=48).arch)


def tiny_shape(n_layers: int, hidden: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from locaudit.models import wrap_model

    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return wrap_model(AutoModelForCausalLM.from_config(cfg), tok, "tiny-shape")
