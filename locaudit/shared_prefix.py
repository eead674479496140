"""Attention to a prefix that every row of a batch shares, held once for the whole batch.

Scoring, training and generation prepend the same prefix to every row (the `qa` format's instruction and
six-shot primer, ~230 tokens). Broadcasting it into an ordinary per-row KV cache makes the cache copy the whole
prefix into every row, and copy it again at every decoding step as the cache grows (and once more per query
head under grouped-query attention). Inside `shared_prefix(lm, kv)` the rows' caches hold their own tokens
only; each attention call joins the batch-1 prefix keys/values to the rows' own (a transient concatenation)
and runs one fused attention kernel over [prefix; own tokens] with a mask that lets every row token see the
whole prefix (which precedes it) and, causally, its own unpadded tokens. Callers pass that mask over the own
tokens (`own_mask`); the model's mask construction passes 4D masks through unchanged. Models with attention
logit soft-capping (Gemma-2) use an explicit two-part softmax instead:

    attn(q) = (sum_p e^{s_p} v_p + sum_j e^{s_j} v_j) / (sum_p e^{s_p} + sum_j e^{s_j}),   s = softcap(scaling * q.k)

A sliding window shorter than the whole sequence is refused.

The prefix may also hold one row per block of rows (batch K, the B rows being K equal blocks): block k attends
to prefix row k. `packed` uses this for K edits trained together, whose prefixes differ from the first edited
layer on.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from locaudit.errors import LocauditError
from locaudit.models import LoadedModel

NAME = "locaudit_shared_prefix"
_ATTR = "_locaudit_prefix_kv"

PrefixKV = Sequence[tuple[torch.Tensor, torch.Tensor]]


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
               sliding_window=None, **kwargs):
    """HF attention-interface function: query (B, H, Tq, d), key/value (B, kvh, S, d) of the row's own tokens,
    attention_mask (B, 1, Tq, S) bool (True = attend) or None (causal); returns ((B, Tq, H, d), None). The
    prefix kp, vp (Kp, kvh, P, d) has one row (every row attends to it) or one per block of B / Kp rows."""
    kp, vp = getattr(module.config, _ATTR)[module.layer_idx]
    B, H, Tq, d = query.shape
    kvh, S, P, Kp = key.shape[1], key.shape[2], kp.shape[2], kp.shape[0]
    if B % Kp:
        raise LocauditError(f"a shared prefix of {Kp} rows cannot serve a batch of {B} rows (not a multiple)")
    if sliding_window is not None and P + S > sliding_window:
        raise LocauditError(f"sequence of {P + S} tokens is longer than the model's sliding attention window "
                            f"({sliding_window}); use a shorter prompt format (e.g. --format plain)")
    if attention_mask is None:  # causal over the own tokens, the queries being the last Tq of S
        attention_mask = torch.ones(Tq, S, dtype=torch.bool, device=query.device).tril(S - Tq)[None, None]
    if attention_mask.dtype != torch.bool:  # an additive float mask
        attention_mask = attention_mask == 0
    if softcap is None:
        return _fused(query, kp, vp, key, value, attention_mask, scaling, dropout), None
    g = H // kvh
    scale = scaling if scaling is not None else d ** -0.5
    # layout (kvh, B, g*Tq, .): query head k*g + i reads kv head k
    q = query.reshape(B, kvh, g * Tq, d).transpose(0, 1)
    if Kp == 1:
        s_p = torch.matmul(q.reshape(kvh, B * g * Tq, d), kp[0].transpose(-1, -2)).view(kvh, B, g * Tq, P)
    else:  # block k of the rows against prefix row k: (kvh, Kp, rows of a block, .)
        s_p = torch.matmul(q.reshape(kvh, Kp, -1, d), kp.transpose(0, 1).transpose(-1, -2)).view(kvh, B, g * Tq, P)
    s_o = torch.matmul(q, key.transpose(0, 1).transpose(-1, -2))
    s_p, s_o = s_p.float() * scale, s_o.float() * scale
    s_p, s_o = torch.tanh(s_p / softcap) * softcap, torch.tanh(s_o / softcap) * softcap
    keep = attention_mask.expand(B, 1, Tq, S).unsqueeze(2).expand(B, 1, g, Tq, S).reshape(B, 1, g * Tq, S)
    s_o = s_o.masked_fill(~keep.transpose(0, 1), float("-inf"))
    m = torch.maximum(s_p.amax(-1, keepdim=True), s_o.amax(-1, keepdim=True))
    e_p, e_o = torch.exp(s_p - m), torch.exp(s_o - m)
    z = e_p.sum(-1, keepdim=True) + e_o.sum(-1, keepdim=True)
    p_p, p_o = (e_p / z).to(value.dtype), (e_o / z).to(value.dtype)
    if dropout:
        p_p = torch.nn.functional.dropout(p_p, dropout, training=True)
        p_o = torch.nn.functional.dropout(p_o, dropout, training=True)
    if Kp == 1:
        out = torch.matmul(p_p.reshape(kvh, B * g * Tq, P), vp[0]).view(kvh, B, g * Tq, d)
    else:
        out = torch.matmul(p_p.reshape(kvh, Kp, -1, P), vp.transpose(0, 1)).view(kvh, B, g * Tq, d)
    out = out + torch.matmul(p_o, value.transpose(0, 1))
    # (kvh, B, g, Tq, d) -> (B, Tq, kvh * g, d)
    return out.view(kvh, B, g, Tq, d).permute(1, 3, 0, 2, 4).reshape(B, Tq, H, d), None


_GQA_KWARG = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _fused(query, kp, vp, key, value, mask, scaling, dropout) -> torch.Tensor:
    """Fused attention over [prefix; own tokens]: (B, Tq, H, d)."""
    B, H, Tq, _ = query.shape
    P, S = kp.shape[2], key.shape[2]
    k, v = _join(kp, key, B), _join(vp, value, B)
    m = torch.cat([mask.new_ones(mask.shape[0], 1, Tq, P), mask.expand(-1, 1, Tq, S)], dim=-1)
    kw = {}
    if k.shape[1] != H:
        if _GQA_KWARG:
            kw["enable_gqa"] = True
        else:  # older PyTorch: repeat each key/value head for its query heads
            k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=m, dropout_p=dropout,
                                                           scale=scaling, **kw)
    return out.transpose(1, 2)


def _join(prefix: torch.Tensor, own: torch.Tensor, B: int) -> torch.Tensor:
    """[prefix; own tokens] keys or values of each of the B rows, (B, kvh, P + S, d): row r reads prefix row
    r // (B / Kp) of the (Kp, kvh, P, d) prefix, written straight into the joined tensor (one copy)."""
    Kp, kvh, P, d = prefix.shape
    if Kp == 1:
        return torch.cat([prefix.expand(B, -1, -1, -1), own], dim=2)
    out = own.new_empty(B, kvh, P + own.shape[2], d)
    out.view(Kp, B // Kp, kvh, P + own.shape[2], d)[:, :, :, :P] = prefix.unsqueeze(1)
    out[:, :, P:] = own
    return out


def _register() -> None:
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, _attention)


def _attention_configs(lm: LoadedModel) -> list:
    """The distinct config objects the attention modules read (a multimodal model has a text sub-config)."""
    configs = {}
    for m in lm.model.modules():
        if hasattr(m, "layer_idx") and hasattr(m, "config"):
            configs[id(m.config)] = m.config
    return list(configs.values())


@contextlib.contextmanager
def shared_prefix(lm: LoadedModel, kv: PrefixKV) -> Iterator[None]:
    """Run the model's attention against the batch-1 prefix `kv` (per layer (keys, values), as `scoring.prefix_kv`
    returns them) for every row, for the duration of the block (a layer's prefix of batch K: per block of rows). Forwards inside must pass per-row caches that
    hold only the rows' own tokens, and 4D masks from `own_mask`."""
    if not kv:
        raise ValueError("shared_prefix needs a non-empty prefix")
    _register()
    configs = _attention_configs(lm)
    saved = [(c, c._attn_implementation, getattr(c, _ATTR, None)) for c in configs]
    try:
        for c in configs:
            object.__setattr__(c, _ATTR, list(kv))
            c._attn_implementation = NAME
        yield
    finally:
        for c, impl, old in saved:
            c._attn_implementation = impl
            if old is None:
                if hasattr(c, _ATTR):
                    object.__delattr__(c, _ATTR)
            else:
                object.__setattr__(c, _ATTR, old)


def own_mask(mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """4D boolean mask (B, 1, q_len, S) for the last `q_len` of a row's own S tokens: causal, and never
    attending to positions where the 2D `mask` (B, S) is 0 (padding)."""
    B, S = mask.shape
    causal = torch.ones(q_len, S, dtype=torch.bool, device=mask.device).tril(S - q_len)
    return causal[None, None] & mask.bool()[:, None, None, :]
