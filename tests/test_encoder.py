"""The judge encoder's parallel split: every text embedded exactly once, whatever the text and process counts,
with the vectors a single process gives (a tiny random BERT saved to disk stands in for MiniLM)."""

from __future__ import annotations

import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locaudit.errors import LocauditError
from locaudit.evaluation import judges as J


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
    assert len(enc.memo) == len(texts) and np.array_equal(par, single)


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
    assert vecs.shape == (len(texts), 16) and len(enc.memo) == len(texts)
    assert np.array_equal(J.Encoder(tiny_encoder_dir).encode(texts, processes=1), vecs)
    with pytest.raises(RuntimeError, match="a process was started"):
        J.Encoder(tiny_encoder_dir).encode(texts, processes=2)
    with pytest.raises(LocauditError, match="processes must be"):
        enc.encode(texts, processes=0)
