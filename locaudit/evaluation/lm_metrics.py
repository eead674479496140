"""CE and KL on held-out general English text: how much an edit damages the model away from TruthfulQA.

ITI's definitions (Li et al. 2023), on the first `max_tokens` = 128 tokens of each of N = 100 documents
(tokenised with the tokenizer's special tokens, so BOS is included where the tokenizer adds one):

- CE = mean over documents of the mean next-token cross-entropy of the *edited* model,
  CE_doc = -1/(T-1) sum_{t<T} log q(x_{t+1} | x_<=t)   (ITI: the mean of the per-document HF `loss`).
- KL = mean over documents of the mean over the document's T positions of
  KL(P || Q) = sum_v p_v (log p_v - log q_v), P the unedited and Q the edited next-token distribution
  (ITI's "KL wrt Orig"; ITI sums over all T positions and divides by T). Computed from log-softmax in
  float32, without ITI's clamping of probabilities at 1e-10.

`TextMetrics` runs the unedited model once and keeps its final hidden states (T x d_model per document: 29 MB
for 100 x 128 tokens of SmolLM2, instead of 2.5 GB of float32 log-probs over its 49k vocabulary); each edit then
costs one forward pass of the body, and the base log-probs are recomputed exactly from the cached states
through the LM head, batch by batch. Both passes use the same batches, so for the unedited model P and Q are
bitwise equal and KL is exactly 0. An edit acts at every position of the text (`edit_positions(lm, None)`;
ITI's own CE/KL code shifts every token too), whatever ITI placement it has.

Corpus. The default corpus is English Wikipedia prose: the 2016 sample of the English Wikipedia dump
(`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`, 1.7 MB, ~100 articles) that ships as
test data inside the `gensim` wheel on PyPI (`pip install --no-deps gensim==4.4.0`; only the data file is
read, gensim is never imported). Wikipedia text is CC BY-SA 3.0. Wiki markup is stripped (templates, tables,
references, links, lists, headings); documents are runs of consecutive paragraphs of one article of at least
`MIN_DOC_CHARS` characters (so they hold 128 tokens), and N of them are drawn with a fixed seed. `lee` selects
the alternative Lee background corpus from the same wheel (299 Australian news articles, one per line; news
prose close to ITI's OpenWebText, but its licence is unclear). Any UTF-8 text file also works: it is split
into documents at blank lines.
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from locaudit.errors import LocauditError
from locaudit.models import LoadedModel, logits_from_hidden

N_DOCS = 100
MAX_TOKENS = 128
MIN_DOC_CHARS = 1000  # ~200+ tokens of English prose: every default document fills 128 tokens
CORPORA = ("wiki", "lee")
_GENSIM_DATA = {
    "wiki": "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "lee": "test/test_data/lee_background.cor",
}
_INSTALL = "pip install --no-deps gensim==4.4.0"


# ----------------------------------------------------------------------------------------------- corpora

def _gensim_file(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")  # locates the package without importing it (its deps are optional)
    if spec is None or not spec.submodule_search_locations:
        raise LocauditError(
            f"the '{name}' CE/KL corpus ships inside the PyPI package gensim, which is not installed; run "
            f"`{_INSTALL}` (make install does this) or pass --text FILE"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GENSIM_DATA[name]
    if not path.is_file():
        raise LocauditError(f"{path} is missing from the installed gensim; reinstall it with `{_INSTALL}`")
    return path


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) `open_ ... close` span."""
    out, depth, last = [], 0, 0
    for m in re.finditer(re.escape(open_) + "|" + re.escape(close), text):
        if m.group() == open_:
            if depth == 0:
                out.append(text[last:m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                last = m.end()
    if depth == 0:
        out.append(text[last:])
    return "".join(out)


def _strip_file_links(text: str) -> str:
    """Remove [[File:...]] / [[Image:...]] links, whose captions may contain nested [[...]] links."""
    out, pos = [], 0
    for m in re.finditer(r"\[\[(?:File|Image):", text, flags=re.I):
        if m.start() < pos:
            continue
        depth, i = 0, m.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    break
            else:
                i += 1
        out.append(text[pos:m.start()])
        pos = i
    out.append(text[pos:])
    return "".join(out)


_LINE_MARKUP = ("=", "*", "#", ":", ";", "|", "!", "{", "}")


def wiki_to_paragraphs(markup: str, min_chars: int = 200) -> list[str]:
    """Plain-prose paragraphs of one article's wikitext: templates, tables, references, comments, files,
    categories, lists and headings removed; links replaced by their text; bold/italics quotes dropped."""
    t = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    t = re.sub(r"<ref[^>/]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = re.sub(r"<(math|gallery|timeline|imagemap|score)[^>]*>.*?</\1>", "", t, flags=re.S)
    t = _strip_nested(t, "{{", "}}")
    t = _strip_nested(t, "{|", "|}")
    t = _strip_file_links(t)
    t = re.sub(r"\[\[(?:Category|[a-z\-]{2,12}):[^\]]*\]\]", "", t)  # categories, interlanguage links
    t = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[\[([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[(?:https?:)?//\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[(?:https?:)?//\S+\]", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = t.replace("&nbsp;", " ")
    paras = []
    for block in re.split(r"\n\s*\n", t):
        lines = [ln.strip() for ln in block.splitlines()]
        p = " ".join(ln for ln in lines if ln and not ln.startswith(_LINE_MARKUP))
        p = re.sub(r"\(\s*[,;]\s*", "(", html.unescape(p))  # "( ; x)" left by a removed template
        p = re.sub(r"\s+", " ", re.sub(r"\(\s*\)", "", p)).strip()
        if len(p) >= min_chars:
            paras.append(p)
    return paras


def _pack(paragraphs: Sequence[str], min_chars: int) -> list[str]:
    """Consecutive paragraphs joined (by newlines) into documents of at least `min_chars` characters."""
    docs, cur = [], []
    for p in paragraphs:
        cur.append(p)
        if sum(len(c) for c in cur) >= min_chars:
            docs.append("\n".join(cur))
            cur = []
    return docs


def wiki_documents(path: Path | None = None, min_chars: int = MIN_DOC_CHARS) -> list[str]:
    """All documents of the packaged Wikipedia sample (main-namespace, non-redirect articles), in dump order."""
    return list(_wiki_documents(Path(path or _gensim_file("wiki")), min_chars))


@functools.lru_cache(maxsize=2)
def _wiki_documents(path: Path, min_chars: int) -> tuple[str, ...]:
    docs = []
    try:
        with bz2.open(path) as f:
            for _, el in ET.iterparse(f, events=("end",)):
                if not el.tag.endswith("}page"):
                    continue
                ns = el.tag[: -len("page")]
                title = el.findtext(f"{ns}title") or ""
                text = el.findtext(f"{ns}revision/{ns}text") or ""
                if ":" not in title and not text.lstrip().upper().startswith("#REDIRECT"):
                    docs.extend(_pack(wiki_to_paragraphs(text), min_chars))
                el.clear()
    except (OSError, EOFError, ET.ParseError) as e:
        raise LocauditError(f"{path} is unreadable ({e}); reinstall gensim with `{_INSTALL}`") from None
    return tuple(docs)


def text_file_documents(path: Path) -> list[str]:
    """Documents of a UTF-8 text file: blocks separated by blank lines, inner whitespace kept."""
    path = Path(path)
    if not path.is_file():
        raise LocauditError(f"--text {path} does not exist; give a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LocauditError(f"--text {path} is not UTF-8 text") from None
    return [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]


def load_documents(source: str | Path = "wiki", n_docs: int = N_DOCS, seed: int = 0) -> list[str]:
    """N documents for CE/KL: `wiki` (default), `lee`, or a text file path.

    Packaged corpora: N documents drawn without replacement with `seed` (all of them if fewer). A text file:
    its first N documents, in file order.
    """
    if n_docs < 1:
        raise LocauditError(f"the number of CE/KL documents must be at least 1, got {n_docs}")
    if str(source) in CORPORA:
        name = str(source)
        docs = wiki_documents() if name == "wiki" else [
            ln.strip() for ln in _gensim_file("lee").read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        order = np.random.default_rng(seed).permutation(len(docs))[:n_docs]
        return [docs[i] for i in sorted(order)]
    docs = text_file_documents(Path(source))[:n_docs]
    if not docs:
        raise LocauditError(f"--text {source} has no text")
    return docs


# ----------------------------------------------------------------------------------------------- metrics

@dataclass(eq=False)
class TextMetrics:
    """CE and KL of any edit on fixed documents; the unedited model's pass is done once, at construction.

    Build it with no edit attached (`TextMetrics(lm, load_documents())`), then call `evaluate(edit)` for as
    many edits as needed. The cache is only valid while `lm`'s weights stay as they were at construction.
    """

    lm: LoadedModel
    documents: Sequence[str]
    max_tokens: int = MAX_TOKENS
    batch_size: int = 8
    progress: str | None = None
    seconds_base: float = field(init=False, default=0.0)

    def __post_init__(self):
        if self.max_tokens < 2:
            raise LocauditError(f"CE/KL need at least 2 tokens per document, got max_tokens={self.max_tokens}")
        if self.lm.arch.has_hooks():
            raise LocauditError("TextMetrics must be built from the unedited model: build it outside `with edit.attach(lm)`")
        tok = self.lm.tokenizer
        ids = [tok(d, add_special_tokens=True)["input_ids"][: self.max_tokens] for d in self.documents]
        self.ids = [i for i in ids if len(i) >= 2]
        if not self.ids:
            raise LocauditError("no CE/KL document has 2 or more tokens; give longer text")
        lengths = [len(i) for i in self.ids]
        order = sorted(range(len(self.ids)), key=lambda i: -lengths[i])
        self.batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        t0 = time.time()
        self.base_hidden = [self._hidden(b) for b in self._iter(self.batches, "CE/KL base")]
        self.seconds_base = time.time() - t0

    @property
    def n_docs(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        return sum(len(i) for i in self.ids)

    def _iter(self, batches, desc):
        from tqdm.auto import tqdm

        return tqdm(batches, desc=desc if self.progress else None, disable=not self.progress, leave=False)

    def _batch(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(self.ids[i]) for i in idx)
        pad = self.lm.tokenizer.pad_token_id
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[r, : len(self.ids[i])] = 1
        return ids.to(self.lm.device), mask.to(self.lm.device)

    @torch.inference_mode()
    def _hidden(self, idx: Sequence[int]) -> torch.Tensor:
        ids, mask = self._batch(idx)
        return self.lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state

    @torch.inference_mode()
    def evaluate(self, edit=None) -> dict:
        """{"ce", "kl": means over documents; "ce_per_doc", "kl_per_doc": arrays in document order;
        "n_docs", "n_tokens", "seconds"} for the model with `edit` attached (None: unedited)."""
        from locaudit.interventions import NoEdit, edit_positions

        if self.lm.arch.has_hooks():
            raise LocauditError("an edit is already attached; pass it to TextMetrics.evaluate instead of attaching it")
        edit = edit if edit is not None else NoEdit()
        t0 = time.time()
        ce = np.zeros(self.n_docs)
        kl = np.zeros(self.n_docs)
        with edit.attach(self.lm), edit_positions(self.lm, None):  # plain text: every position
            for b, idx in enumerate(self._iter(self.batches, "CE/KL")):
                h_edit = self._hidden(idx)
                for r, i in enumerate(idx):
                    n = len(self.ids[i])
                    logq = torch.log_softmax(logits_from_hidden(self.lm.model, h_edit[r, :n]).float(), dim=-1)
                    logp = torch.log_softmax(logits_from_hidden(self.lm.model, self.base_hidden[b][r, :n]).float(), dim=-1)
                    tgt = torch.tensor(self.ids[i][1:], device=logq.device)
                    ce[i] = -logq[:-1].gather(-1, tgt[:, None]).double().mean().item()
                    kl[i] = (logp.exp() * (logp - logq)).sum(-1).double().mean().item()
        return {"ce": float(ce.mean()), "kl": float(kl.mean()), "ce_per_doc": ce, "kl_per_doc": kl,
                "n_docs": self.n_docs, "n_tokens": self.n_tokens, "seconds": time.time() - t0}


_CACHED: dict[tuple, TextMetrics] = {}


def text_metrics_for(lm: LoadedModel, source: str | Path = "wiki", n_docs: int = N_DOCS, max_tokens: int = MAX_TOKENS,
                     seed: int = 0, batch_size: int = 8, progress: str | None = None) -> TextMetrics:
    """A TextMetrics for (model, corpus), built once per process and reused (one entry: the last one asked for)."""
    key = (id(lm.model), lm.name, str(source), n_docs, max_tokens, seed)
    if key not in _CACHED:
        _CACHED.clear()
        _CACHED[key] = TextMetrics(lm, load_documents(source, n_docs, seed), max_tokens, batch_size, progress)
    return _CACHED[key]
