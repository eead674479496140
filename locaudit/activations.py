"""Head activations o_h^l at the last token, for every layer, captured in one forward pass per batch (texts
that begin alike share their common prefix's pass).

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
from locaudit.scoring import forward_rows, new_cache, right_padded, stack_kv
from locaudit.storage import atomic_write, cache_dir, stable_hash


def capture_last_token(lm: LoadedModel, texts: Sequence[str], batch_size: int = 16, progress: bool = True,
                       chunk_groups: int = 256) -> np.ndarray:
    """Array (N, L, H, d) float32 of every head's output at each text's last token.

    Texts that begin alike (the answers to one question, `Q: {q} A: {a} ...`) share work: their common token
    prefix runs once per group and each text's remainder then runs on its group's keys/values, in
    length-sorted batches, so no shared token is computed twice (groups in chunks of `chunk_groups`, whose
    keys/values are kept meanwhile). Masks and positions make every token see exactly what it sees in a
    full pass of its own text."""
    arch, tok = lm.arch, lm.tokenizer
    dev, pad = lm.device, tok.pad_token_id
    encoded = [tok(t)["input_ids"] for t in texts]
    out = np.zeros((len(texts), arch.n_layers, arch.n_heads, arch.head_dim), dtype=np.float32)
    current: dict = {}

    def make_hook(layer: int):
        def hook(module, args):
            if "rows" in current:
                current[layer] = args[0][current["rows"], current["last"]].detach().float().cpu()
        return hook

    groups = shared_prefix_groups(encoded)
    handles = [arch.out_proj(l).register_forward_pre_hook(make_hook(l)) for l in range(arch.n_layers)]
    bar = tqdm(total=len(texts), desc="capturing heads", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for c in range(0, len(groups), chunk_groups):
                chunk = groups[c:c + chunk_groups]
                own = _group_kv(lm, [encoded[g[0]][:n] for n, g in chunk], batch_size)
                rows = [(i, j) for j, (n, g) in enumerate(chunk) for i in g]  # (text, group in chunk)
                rows.sort(key=lambda r: -(len(encoded[r[0]]) - chunk[r[1]][0]))
                for b in range(0, len(rows), batch_size):
                    batch = rows[b:b + batch_size]
                    shared = [chunk[j][0] for _, j in batch]
                    Tp = max(shared)
                    ids, mask = right_padded([encoded[i][n:] for (i, _), n in zip(batch, shared)], pad)
                    Ta = ids.shape[1]
                    kv = None
                    if Tp:
                        kv = [tuple(stack_kv([own[j][l][t] if own[j] else None for _, j in batch], Tp) for t in (0, 1))
                              for l in range(arch.n_layers)]
                    p_mask = torch.tensor([[1] * n + [0] * (Tp - n) for n in shared], dtype=torch.long)
                    pos = torch.tensor(shared)[:, None] + torch.arange(Ta)
                    current["rows"] = torch.arange(len(batch), device=dev)
                    current["last"] = (mask.sum(1) - 1).to(dev)
                    forward_rows(lm, ids.to(dev), torch.cat([p_mask, mask], 1).to(dev), pos.to(dev), new_cache(lm, kv))
                    current.pop("rows")
                    for l in range(arch.n_layers):
                        out[[i for i, _ in batch], l] = current[l].view(len(batch), arch.n_heads, arch.head_dim).numpy()
                    bar.update(len(batch))
    finally:
        bar.close()
        for h in handles:
            h.remove()
    return out


def _group_kv(lm: LoadedModel, prefixes: list[Sequence[int]], batch_size: int) -> list:
    """Per group, per layer (keys, values) of its shared prefix (batch 1, real length); [] for no prefix."""
    dev = lm.device
    out: list = [[] for _ in prefixes]
    order = sorted((j for j, p in enumerate(prefixes) if p), key=lambda j: -len(prefixes[j]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, mask = right_padded([prefixes[j] for j in idx], lm.tokenizer.pad_token_id)
        T = ids.shape[1]
        _, kv = forward_rows(lm, ids.to(dev), mask.to(dev), torch.arange(T, device=dev).expand(len(idx), T), new_cache(lm))
        for r, j in enumerate(idx):
            n = len(prefixes[j])
            out[j] = [(k[r:r + 1, :, :n], v[r:r + 1, :, :n]) for k, v in kv]
    return out


def shared_prefix_groups(encoded: Sequence[Sequence[int]], min_shared: int = 8) -> list[tuple[int, list[int]]]:
    """Texts that start alike, as (shared length, indices) groups: lexicographic neighbours whose common token
    prefix is at least `min_shared` long share a group; its shared length is the group's common prefix, cut so
    that every member keeps at least one token of its own (the one whose activation is read)."""
    order = sorted(range(len(encoded)), key=lambda i: list(encoded[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and _common(encoded[groups[-1][-1]], encoded[i]) >= min_shared:
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for g in groups:
        shared = min(len(encoded[i]) for i in g) - 1
        for i in g[1:]:
            shared = min(shared, _common(encoded[g[0]], encoded[i]))
        out.append((shared if len(g) > 1 else 0, g))
    return out


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def cached_activations(lm: LoadedModel, texts: Sequence[str], batch_size: int = 16, progress: bool = True,
                       cache: Path | None = None) -> np.ndarray:
    """`capture_last_token` with a disk cache keyed by (model, dtype, texts); a corrupt entry is recomputed."""
    dtype = str(next(lm.model.parameters()).dtype)
    key = stable_hash({"model": lm.name, "weights": lm.fingerprint, "dtype": dtype, "texts": list(texts), "v": 2})
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
