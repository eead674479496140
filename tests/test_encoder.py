"""The judge encoder (a tiny random BERT saved to disk stands in for MiniLM): the parallel split embeds every text
exactly once, whatever the text and process counts, with the vectors a single process gives; a corpus's vectors
are a function of the corpus, whatever was embedded or cached before; `encode_alone` gives each text the same
bits whatever else is embedded with it, in which order, in which encoder, from the memo or fresh."""

from __future__ import annotations

import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locaudit.errors import LocauditError
from locaudit.evaluation import judges as J
from locaudit.storage import cache_dir


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase + " "))
    return sorted({"".join(rng.choice(letters, size=rng.integers(1, 40))) + f" {i}" for i in range(n)}, key=lambda t: (len(t), t))


@given(n=st.integers(0, 500), batch=st.integers(1, 70), parts=st.integers(1, 9))
def test_batch_cuts_cover_every_text_once_in_whole_batches(n, batch, parts):
    cut = J.batch_cuts(n, batch, parts)
    assert len(cut) == parts + 1 and cut[0] == 0 and cut[-1] == n
    assert all(a <= b for a, b in zip(cut, cut[1:]))
    assert all(c % batch == 0 for c in cut[:-1])  # every part starts on a batch boundary
    covered = [i for a, b in zip(cut, cut[1:]) for i in range(a, b)]
    assert covered == list(range(n))


def test_batch_cuts_the_reported_failure():
    # the old cut batch * round(n / batch * k / parts) ended at 64 * round(1.4) = 64 for 90 texts: 26 dropped
    assert J.batch_cuts(90, 64, 1) == [0, 90]
    assert J.batch_cuts(1000, 64, 2)[-1] == 1000 and J.batch_cuts(1000, 64, 3) == [0, 320, 640, 1000]
    with pytest.raises(ValueError):
        J.batch_cuts(10, 0, 2)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 120), batch=st.integers(1, 16), parts=st.integers(1, 6))
def test_split_embeddings_equal_single_process(tiny_encoder_dir, n, batch, parts):
    """Each part embedded by a fresh encoder (as a worker process would) gives the single-process vectors."""
    texts = _texts(n, seed=n)
    single = J.Encoder(tiny_encoder_dir).encode(texts, batch_size=batch)

    def fresh_workers(chunks, batch_size):
        return [J.Encoder(tiny_encoder_dir).encode(c, batch_size=batch_size) for c in chunks]

    split = J.encode_split(texts, batch, parts, fresh_workers)
    assert len(split) == len(texts)
    if texts:
        assert split.shape == (len(texts), 16) and np.array_equal(split, single)


def test_encode_split_refuses_lost_texts(tiny_encoder_dir):
    texts = _texts(20, seed=1)
    drop_last = lambda chunks, b: [J.Encoder(tiny_encoder_dir).encode(c[:-1] or c, batch_size=b) for c in chunks]
    with pytest.raises(AssertionError, match="vectors for 20 texts"):
        J.encode_split(texts, 4, 3, drop_last)


def test_spawned_processes_give_single_process_vectors(tiny_encoder_dir):
    """The real path: two spawned single-thread processes, a text count that is not a multiple of the batch."""
    texts = _texts(37, seed=2)
    single = J.Encoder(tiny_encoder_dir).encode(texts, batch_size=4)
    enc = J.Encoder(tiny_encoder_dir)
    par = enc.encode(list(reversed(texts)), batch_size=4, processes=2)[::-1]
    assert len(enc.corpora) == 1 and np.array_equal(par, single)


def test_one_process_starts_none(tiny_encoder_dir, monkeypatch):
    """The default (and processes=1) embeds even a set big enough for the pool in this process: with process
    creation made to fail, it still works, and only processes=2 reaches the pool."""
    import multiprocessing.process

    from locaudit.evaluation.judges import encoder

    def refuse(*a, **k):
        raise RuntimeError("a process was started")

    monkeypatch.setattr(encoder, "ProcessPoolExecutor", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    texts = _texts(600, seed=3)  # over 8 batches of 64: processes > 1 would split them
    enc = J.Encoder(tiny_encoder_dir)
    vecs = enc.encode(texts)
    assert vecs.shape == (len(texts), 16) and len(enc.corpora) == 1
    assert np.array_equal(J.Encoder(tiny_encoder_dir).encode(texts, processes=1), vecs)
    with pytest.raises(RuntimeError, match="a process was started"):
        J.Encoder(tiny_encoder_dir).encode(texts, processes=2)
    with pytest.raises(LocauditError, match="processes must be"):
        enc.encode(texts, processes=0)


def _mixed_lengths(n: int, seed: int) -> list[str]:
    """Texts of 1 to 80 characters (other token counts, so a padded batch of them pads most), in no order."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase + " .,?!'"))
    return list(dict.fromkeys("".join(rng.choice(letters, size=rng.integers(1, 80))) for _ in range(n)))


@pytest.fixture(scope="module")
def alone_vectors(tiny_encoder_dir):
    """Each text embedded by a fresh encoder of its own (nothing else embedded in it): the reference vectors."""
    texts = _mixed_lengths(40, seed=5)
    return texts, {t: J.Encoder(tiny_encoder_dir).encode_alone([t])[0] for t in texts}


def test_encode_alone_is_a_function_of_the_text(tiny_encoder_dir, alone_vectors):
    """A text's vector is bitwise the same alone, among texts of other lengths, in another order, from the memo,
    and in a fresh encoder (as another process has) on another thread count; padded batches are not."""
    import torch

    texts, ref = alone_vectors
    want = np.stack([ref[t] for t in texts])
    enc = J.Encoder(tiny_encoder_dir)
    assert np.array_equal(enc.encode_alone(texts), want)
    assert np.array_equal(enc.encode_alone(texts[::-1])[::-1], want)  # from the memo, reversed
    assert set(enc.alone) == set(texts) and not enc.corpora
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fresh = J.Encoder(tiny_encoder_dir)
        order = np.random.default_rng(0).permutation(len(texts))
        got = fresh.encode_alone([texts[i] for i in order] + texts[:3])
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(got[:len(texts)], want[order]) and np.array_equal(got[len(texts):], want[:3])
    assert got.dtype == np.float32 and got.shape == (len(texts) + 3, 16)
    assert np.allclose(np.linalg.norm(want, axis=1), 1, atol=1e-5)
    # why it is needed: in padded batches (`encode`, the build's path) a text's last bits follow its companions
    batched = J.Encoder(tiny_encoder_dir).encode(texts, batch_size=8)
    assert np.allclose(batched, want, atol=1e-5) and not all(np.array_equal(a, b) for a, b in zip(batched, want))
    assert J.Encoder(tiny_encoder_dir).encode_alone([]).shape == (0, 16)
    # a text of no tokens (this tokenizer adds no [CLS]/[SEP]) is the zero vector, alone as in a padded batch
    assert not J.Encoder(tiny_encoder_dir).encode_alone([""]).any() and not J.Encoder(tiny_encoder_dir).encode(["", "ab"])[0].any()


def test_minilm_alone_vectors_ignore_their_companions():
    """The real MiniLM: "1. China" (the answer that scored 0.9515 in one worker and 0.9694 in the other) and
    other answers get the same bits alone, among each other, reversed and in a fresh encoder; in padded batches
    they do not."""
    texts = ["1. China", "China.", "The most populous country is India, which passed China in 2023.", "",
             "I have no comment.", "Nothing happens if you eat watermelon seeds; they pass through you."]
    alone = np.stack([J.Encoder(J.backbone_dir()).encode_alone([t])[0] for t in texts])
    enc = J.Encoder(J.backbone_dir())
    assert np.array_equal(enc.encode_alone(texts), alone)
    assert np.array_equal(J.Encoder(J.backbone_dir()).encode_alone(texts[::-1])[::-1], alone)
    assert np.array_equal(enc.encode_alone(texts[:1] + ["something else entirely, and longer than the rest"])[0], alone[0])
    assert alone.shape == (6, 384) and np.allclose(np.linalg.norm(alone, axis=1), 1, atol=1e-5)
    padded = enc.encode(texts)
    assert np.allclose(padded, alone, atol=1e-5) and not all(np.array_equal(a, b) for a, b in zip(padded, alone))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_encode_alone_ignores_its_companions(tiny_encoder_dir, alone_vectors, data):
    """Any subset of the texts, in any order, with repeats, after any earlier calls on the same encoder."""
    texts, ref = alone_vectors
    enc = J.Encoder(tiny_encoder_dir)
    for _ in range(data.draw(st.integers(1, 3))):
        pick = data.draw(st.lists(st.sampled_from(texts), min_size=1, max_size=12))
        assert np.array_equal(enc.encode_alone(pick), np.stack([ref[t] for t in pick]))
    enc.forget()
    assert not enc.alone and not enc.corpora


def test_build_vectors_are_a_function_of_the_corpus(tiny_encoder_dir, monkeypatch):
    """A corpus embedded after other corpora that share texts with it (in memory or on disk) gets its cold
    vectors: its batches are never made of whatever happens to be new. Its vectors are cached on disk, and a
    corrupt file is dropped and embedded again."""
    from locaudit.evaluation.judges import encoder

    corpus = _mixed_lengths(150, seed=6)
    cold = J.Encoder(tiny_encoder_dir).encode(corpus)
    enc = J.Encoder(tiny_encoder_dir)
    monkeypatch.setitem(J.Encoder._shared, str(J.backbone_dir()), enc)
    batches = []
    forward = encoder.Encoder._forward
    monkeypatch.setattr(encoder.Encoder, "_forward", lambda self, batch: batches.append(batch) or forward(self, batch))
    part = J.embed_texts(corpus[40:100])  # on disk and in memory: a subset, in batches of its own
    assert not all(np.array_equal(part[t], v) for t, v in zip(corpus[40:100], cold[40:100]))
    assert np.array_equal(enc.encode(corpus[::-1])[::-1], cold)  # in memory: the subset's vectors are not reused
    enc.forget()
    full = J.embed_texts(corpus + corpus[:5])
    assert np.array_equal(np.stack([full[t] for t in corpus]), cold)  # on disk: likewise
    files = sorted((cache_dir() / "judges" / "embeddings").glob("*.npz"))
    assert len(files) == 2 and all(f.name.startswith(J.backbone_id() + "-") for f in files)
    enc.forget()
    batches.clear()
    again = J.embed_texts(list(reversed(corpus)))
    assert not batches and all(np.array_equal(again[t], full[t]) for t in corpus)  # from disk
    for f in files:
        f.write_bytes(b"corrupt")
    enc.forget()
    fresh = J.embed_texts(corpus)
    assert len(batches) == 3 and all(np.array_equal(fresh[t], full[t]) for t in corpus)  # 150 texts, batches of 64
