"""Head activations o_h^l at the last token, for every layer, captured in one forward pass per batch.

o^l is the input of W^l (the attention output projection), i.e. the concatenation of the H head outputs;
it is reshaped to (H, d) per layer. Results are cached under the user cache, keyed by model, texts and
dtype, and written atomically, so a rerun (or a crash and rerun) reuses finished work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from locaudit.models import LoadedModel
from locaudit.scoring import length_batches
from locaudit.storage import atomic_write, cache_dir, stable_hash


def capture_last_token(lm: LoadedModel, texts: Sequence[str], batch_size: int = 16,
                       progress: bool = True) -> np.ndarray:
    """Array (N, L, H, d) float32 of every head's output at each text's last token."""
    arch, tok = lm.arch, lm.tokenizer
    encoded = [tok(t)["input_ids"] for t in texts]
    out = np.zeros((len(texts), arch.n_layers, arch.n_heads, arch.head_dim), dtype=np.float32)
    current: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module, args):
            o = args[0]
            current[layer] = o[current["rows"], current["last"]].detach().float().cpu()
        return hook

    handles = [arch.out_proj(l).register_forward_pre_hook(make_hook(l)) for l in range(arch.n_layers)]
    try:
        with torch.inference_mode():
            for idx in tqdm(length_batches([len(e) for e in encoded], batch_size), desc="capturing heads",
                            disable=not progress, leave=False):
                T = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), T), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(idx):
                    ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[r, : len(encoded[i])] = 1
                current["rows"] = torch.arange(len(idx), device=lm.device)
                current["last"] = (mask.sum(1) - 1).to(lm.device)
                lm.model.base_model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
                for l in range(arch.n_layers):
                    out[idx, l] = current[l].view(len(idx), arch.n_heads, arch.head_dim).numpy()
    finally:
        for h in handles:
            h.remove()
    return out


def cached_activations(lm: LoadedModel, texts: Sequence[str], batch_size: int = 16, progress: bool = True,
                       cache: Path | None = None) -> np.ndarray:
    """`capture_last_token` with a disk cache keyed by (model, dtype, texts); a corrupt entry is recomputed."""
    dtype = str(next(lm.model.parameters()).dtype)
    key = stable_hash({"model": lm.name, "dtype": dtype, "texts": list(texts), "v": 1})
    path = (cache or cache_dir() / "activations") / f"{key}.npy"
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if (arr.shape == (len(texts), lm.arch.n_layers, lm.arch.n_heads, lm.arch.head_dim)
                    and arr.dtype == np.float32 and np.isfinite(arr).all()):
                return arr
        except Exception:  # corrupt, truncated or empty (np.load raises several types): recompute below
            pass
    arr = capture_last_token(lm, texts, batch_size, progress)
    atomic_write(path, lambda tmp: save_npy(tmp, arr))
    return arr


def save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
