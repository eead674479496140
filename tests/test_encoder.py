"""The judge encoder's parallel split: every text embedded exactly once, whatever the text and process counts,
with the vectors a single process gives (a tiny random BERT saved to disk stands in for MiniLM)."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locaudit.evaluation import judges as J


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    """A 2-layer, 16-wide random BERT with a character-level WordPiece tokenizer, saved like a checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_lowercase + string.digits + " .,?!'"))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=300))
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


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
