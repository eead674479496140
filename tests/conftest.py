"""Shared fixtures: tiny randomly initialised models of each supported family, built in memory, with a
byte-level tokenizer (no downloads), and the real TruthfulQA questions from ../shared."""

from __future__ import annotations

import string
import sys
from pathlib import Path

import pytest
import torch

from locaudit.models import wrap_model

FAMILIES = ("llama", "qwen2", "gpt2", "gpt_neox", "gemma2")


def byte_tokenizer():
    """A real byte-level BPE tokenizer with no merges: 256 byte tokens + <bos>/<eos>/<pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    return fast


def random_llama(layers: int, width: int, heads: int, neurons: int, seed: int, vocab: int):
    """A random Llama (eager attention) for the byte tokenizer's `vocab`, every matrix N(0, 0.2^2) like the tiny
    models: the base the planted-localization tests edit."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=width, intermediate_size=neurons, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=512, vocab_size=vocab, bos_token_id=vocab - 3,
                      eos_token_id=vocab - 2, pad_token_id=vocab - 1)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return m


def tiny_config(family: str, vocab_size: int):
    from transformers import GPT2Config, GPTNeoXConfig, Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=vocab_size - 3, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1)
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=4096, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=4096, **common)
    if family == "gemma2":
        return Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, max_position_embeddings=4096, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=4096, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             max_position_embeddings=4096, **common)
    raise ValueError(family)


def make_tiny(family: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)), attn_implementation="eager")
    # random init leaves some weights near zero; make every projection clearly non-degenerate
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return wrap_model(model, tok, f"tiny-{family}-{seed}")


@pytest.fixture(params=FAMILIES)
def tiny(request):
    return make_tiny(request.param)


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (and stay fast on a busy machine); integration tests use all."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Unit tests get an empty cache; integration tests share the user's cache (dequantised model, judges)."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
        judges = sys.modules.get("locaudit.evaluation.judges")
        if judges is not None:  # the encoder's per-process memos are caches too: unit tests start without them
            for enc in judges.Encoder._shared.values():
                enc.forget()


SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "truthfulqa"


@pytest.fixture(scope="session")
def questions():
    from locaudit.data.truthfulqa import load_truthfulqa

    return load_truthfulqa(SHARED if SHARED.is_dir() else None)


@pytest.fixture(scope="session")
def smol():
    """The real embedded SmolLM2-135M (dequantised once into the user cache)."""
    from locaudit.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def trained_judges():
    """The default (truth, info) judges on all 817 questions, built once per test run (~4 minutes cold) in the
    run's LOCAUDIT_CACHE. Session-scoped, so it is set up before any test's private cache: request it only from
    @pytest.mark.integration tests. Skips without the TruthfulQA judge data."""
    from locaudit.evaluation import judges as J

    if not all((SHARED / name).is_file() for name in ("TruthfulQA.csv", *J.LABEL_FILES.values())):
        pytest.skip("TruthfulQA judge data not found in ../shared")
    return J.load_judges("default", SHARED, progress=False, processes=J.build_processes(4))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A 2-layer, 16-wide random BERT with a character-level WordPiece tokenizer, saved like a checkpoint: it stands
    in for the judges' MiniLM encoder."""
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
