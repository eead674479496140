"""Many edits, one pass: K independent fits trained together, each giving what its own `training.fit` gives.

A study fits dozens of edits on the same pairs (the claimed set, random sets, single heads, full alignment, a
tau grid of each). Each step of one fit runs the model on B pairs; a GPU step of one edit is latency-bound
(per-layer kernel launches), so K fits in one forward of K*B rows should cost little more than one. On a CPU the
arithmetic is the bound, and only the layers below the pack's lowest edited layer are saved (bench/README.md,
"Packed fits"). `fit_packed` does this:

- the B pairs' rows are replicated once per live edit, rows k*B..(k+1)*B-1 belonging to edit k (`pack`): the
  layers below the lowest edited layer l0 run once on the B rows, and a pre-hook on each block from l0 on repeats
  every batch-dim input (hidden states, masks, rotary position embeddings) K times; from l0 on the shared prefix
  has K rows too (block k attends to the prefix as edit k changes it, `shared_prefix`);
- at each edited W^l, edit k's rank-1 change acts on block k only: o <- o + s <a, o> b for a localized edit
  (b non-zero on S's slices only), out <- out + s <a, o> B for full rank-1 LoRA; the blocks of edits without a
  change at l pass through untouched;
- the loss is the sum over edits of each edit's own mean loss (its own objective, tau, averaging), never a mean
  across edits, so each edit's gradient is its solo gradient; each edit has its own AdamW and LambdaLR (its
  learning rate, warm-up and cosine schedule), best checkpoint, early stopping (`Plateau`) and status;
- an edit that stops (converged, or its step cap) leaves the pack: its rows are no longer computed;
- pi0's log-probs are computed once (`prepare_pairs`, cached on disk as for `fit`).

The edits of a pack see the same batches, so their configs must agree on the data and its order (`SHARED`);
everything else (kind, heads, learning rate, tau, objective, step cap, validation schedule, patience, LoRA
scale) may differ per edit. FitConfig has no gradient clipping, so there is none to pack. The results equal K
`fit` calls up to float rounding (batched matmuls sum in another order), which Adam can amplify over many steps.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from locaudit.data.examples import PreferencePair
from locaudit.errors import LocauditError
from locaudit.interventions import FullRank1, Intervention, LocalizedRank1
from locaudit.models import LoadedModel
from locaudit.scoring import _token_logprobs, collate, forward_rows, new_cache, prefix_kv
from locaudit.shared_prefix import own_mask, shared_prefix
from locaudit.training import (FitConfig, FitResult, Plateau, bucketed_batches, default_lr, identity_eval, keep_best,
                               margin, preference_accuracy, preference_loss, prepare_pairs, schedule)

# FitConfig fields every edit of a pack must share: they fix the pairs and the order of the batches.
SHARED = ("fmt", "seed", "batch_size", "shuffle", "max_train_pairs", "max_val_pairs")


@dataclass(frozen=True)
class Rank1:
    """One edit's rank-1 change at one W^l. side "input": o <- o + scale <a, o> v (v in o's H*d space, so the
    change is scale <a, o> W v); side "output": out <- out + scale <a, o> v (v in d_model)."""

    side: str
    a: torch.Tensor
    v: torch.Tensor
    scale: float


def _localized(edit: LocalizedRank1) -> dict[int, Rank1]:
    return {l: Rank1("input", edit.a[str(l)], edit.b(l), edit.scale) for l in edit.layers}


def _full(edit: FullRank1) -> dict[int, Rank1]:
    return {l: Rank1("output", edit.A[str(l)][0], edit.B[str(l)][:, 0], edit.scale) for l in edit.layers}


# edit kind -> its rank-1 changes by layer (built from its parameters, so gradients reach them)
PACKABLE: dict[str, Callable[[Intervention], dict[int, Rank1]]] = {
    LocalizedRank1.kind: _localized,
    FullRank1.kind: _full,
}


def _blocks(lm: LoadedModel) -> list[torch.nn.Module]:
    """The decoder block holding each layer's W^l (the module `Family.out_proj` is relative to)."""
    names = {id(m): n for n, m in lm.model.named_modules()}
    suffix = "." + lm.arch.family.out_proj
    out = []
    for l in range(lm.arch.n_layers):
        name = names[id(lm.arch.out_proj(l))]
        if not name.endswith(suffix):
            raise LocauditError(f"cannot find the decoder block of layer {l} ({name}); this model's layout is not "
                                f"supported for packed fits, use training.fit")
        out.append(lm.model.get_submodule(name[: -len(suffix)]))
    return out


def _tile(x, n: int, K: int, memo: dict):
    """x with every tensor of batch n (dim 0, at least 2-D) repeated K times along dim 0 (tuples, lists and dict
    values too): row k*n + i is row i. `memo` holds the tensors already tiled in this forward (the model passes
    the same masks and position embeddings to every layer), so each is repeated once."""
    if isinstance(x, torch.Tensor):
        if x.dim() < 2 or x.shape[0] != n:
            return x
        seen = memo.get(id(x))
        if seen is None or seen[0] is not x:
            seen = memo[id(x)] = (x, x.repeat(K, *([1] * (x.dim() - 1))))
        return seen[1]
    if isinstance(x, (tuple, list)):
        return type(x)(_tile(y, n, K, memo) for y in x)
    if isinstance(x, dict):
        return {k: _tile(v, n, K, memo) for k, v in x.items()}
    return x


@dataclass(frozen=True)
class _Side:
    """The rank-1 changes of one side at one layer, for the blocks `ks` of the edits that have one there."""

    ks: torch.Tensor  # (m,) block indices
    a: torch.Tensor  # (m, H*d)
    v: torch.Tensor  # (m, width)
    s: torch.Tensor  # (m,) scales
    K: int  # blocks in the pack

    @classmethod
    def of(cls, changes: list[Rank1 | None]) -> "_Side":
        ks = [k for k, c in enumerate(changes) if c is not None]
        a = changes[ks[0]].a
        return cls(torch.tensor(ks, device=a.device), torch.stack([changes[k].a for k in ks]),
                   torch.stack([changes[k].v for k in ks]),
                   torch.tensor([changes[k].scale for k in ks], device=a.device), len(changes))

    def add(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x + s_k <a_k, o> v_k on block k of the rows of x and o, for the blocks k in `ks` (others unchanged)."""
        K, m = self.K, self.ks.shape[0]
        o3, x3 = o.reshape(K, -1, o.shape[-1]), x.reshape(K, -1, x.shape[-1])
        if m < K:
            o3 = o3.index_select(0, self.ks)
        coef = torch.bmm(o3, self.a.to(o.dtype).unsqueeze(-1)).squeeze(-1)  # (m, rows*T): <a_k, o>
        delta = (self.s.to(o.dtype)[:, None] * coef).unsqueeze(-1) * self.v.to(o.dtype)[:, None, :]
        out = x3 + delta if m == K else x3.index_add(0, self.ks, delta)
        return out.reshape(x.shape)


@contextlib.contextmanager
def pack(lm: LoadedModel, edits: Sequence[Intervention]) -> Iterator[int]:
    """Attach K edits at once: every forward inside runs its B rows once per edit, as K*B rows (block k, rows
    k*B..(k+1)*B-1, under edits[k]); the layers below the lowest edited layer run once on the B rows. Yields K.
    Only weight edits with a rank-1 form can be packed (`PACKABLE`)."""
    K = len(edits)
    if K == 0:
        raise LocauditError("a pack needs at least one edit")
    for e in edits:
        if e.kind not in PACKABLE:
            raise LocauditError(f"edit kind '{e.kind}' cannot be packed (packable: {', '.join(PACKABLE)}); "
                                f"fit it with training.fit")
        e.to(lm.device)
    changes = [PACKABLE[e.kind](e) for e in edits]
    layers = sorted({l for c in changes for l in c})
    arch = lm.arch
    handles = []

    memo: dict = {}

    def repeat_hook(first: bool):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if first:  # a new forward
                memo.clear()
                n = hidden.shape[0]
            else:
                if hidden.shape[0] % K:
                    raise LocauditError(f"packed forward reached a layer with {hidden.shape[0]} rows, not a "
                                        f"multiple of its {K} edits")
                n = hidden.shape[0] // K
            return _tile(args, n, K, memo), _tile(kwargs, n, K, memo)
        return hook

    def input_hook(side: _Side):
        def hook(module, args):
            return (side.add(args[0], args[0]),) + tuple(args[1:])
        return hook

    def output_hook(side: _Side):
        def hook(module, args, output):
            return side.add(output, args[0])
        return hook

    try:
        if K > 1:
            blocks = _blocks(lm)
            for l in range(layers[0], arch.n_layers):
                handles.append(blocks[l].register_forward_pre_hook(repeat_hook(l == layers[0]), with_kwargs=True))
        for l in layers:
            proj = arch.out_proj(l)
            for side in ("input", "output"):
                at = [c[l] if l in c and c[l].side == side else None for c in changes]
                if any(x is not None for x in at):
                    handles.append(proj.register_forward_pre_hook(input_hook(_Side.of(at))) if side == "input"
                                   else proj.register_forward_hook(output_hook(_Side.of(at))))
        yield K
    finally:
        memo.clear()
        for h in handles:
            h.remove()


def packed_answer_logprobs(lm: LoadedModel, batch: dict[str, torch.Tensor], kv, K: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """`scoring.batch_answer_logprobs` inside `pack(lm, K edits)`: ((K, R) summed answer log-probs, one row per
    edit; (R,) answer lengths). `kv` is `prefix_kv` computed inside the same pack. The same two levels: the
    distinct prompts after the prefix, then the answers after their prompts."""
    P = kv[0][0].shape[-2] if kv else 0

    def mask_for(m2d, q_len):
        return own_mask(m2d, q_len) if P else m2d

    p_ids, p_mask, group = batch["prompt_ids"], batch["prompt_mask"], batch["group"]
    G, Tp = p_ids.shape
    dev = p_ids.device
    with shared_prefix(lm, kv) if kv else contextlib.nullcontext():
        hp, kv1 = forward_rows(lm, p_ids, mask_for(p_mask, Tp), torch.arange(P, P + Tp, device=dev).expand(G, Tp),
                               new_cache(lm))
        hp = hp.view(K, G, Tp, -1)
        h = hp[:, group, batch["first_pos"]]  # (K, R, D)
        a_ids, a_mask = batch["answer_ids"], batch["answer_mask"]
        if a_ids.shape[1] and batch["rest_rows"].numel():
            Ta, R = a_ids.shape[1], group.shape[0]
            tiled = (group[None] + G * torch.arange(K, device=dev)[:, None]).reshape(-1)
            rows = lambda n: group if n == G else tiled  # noqa: E731  (layers below the pack's first: G rows)
            cache = new_cache(lm, [(k.index_select(0, rows(k.shape[0])), v.index_select(0, rows(v.shape[0])))
                                   for k, v in kv1])
            mask2 = torch.cat([p_mask.index_select(0, group), a_mask], dim=1)
            pos2 = P + batch["prompt_len"].index_select(0, group)[:, None] + torch.arange(Ta, device=dev)
            ha, _ = forward_rows(lm, a_ids, mask_for(mask2, Ta), pos2, cache)
            h = torch.cat([h, ha.view(K, R, Ta, -1)[:, batch["rest_rows"], batch["rest_pos"]]], dim=1)
    M = h.shape[1]
    tgt = torch.cat([batch["first_tgt"], batch["rest_tgt"]])[:M]
    token_lp = _token_logprobs(lm, h.reshape(K * M, -1), tgt.repeat(K)).view(K, M)
    n = group.shape[0]
    rows = torch.cat([torch.arange(n, device=dev), batch["rest_rows"]])[:M]
    total = torch.zeros(K, n, device=token_lp.device, dtype=token_lp.dtype).index_add(1, rows, token_lp)
    count = torch.zeros(n, device=token_lp.device).index_add(0, rows, torch.ones(M, device=token_lp.device))
    return total, count


def _pair_losses(lm, enc, ref, idx, cfgs: Sequence[FitConfig], kv) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`training._pair_forward` for each edit of the pack: [(per-pair loss, h)] in pack order."""
    batch = collate([enc.chosen[i] for i in idx] + [enc.rejected[i] for i in idx], lm.tokenizer.pad_token_id, lm.device)
    lp, n = packed_answer_logprobs(lm, batch, kv, len(cfgs))
    k = len(idx)
    t = torch.as_tensor(list(idx))
    ref_c, ref_r = ref["lp_c"][t].to(lp.device, lp.dtype), ref["lp_r"][t].to(lp.device, lp.dtype)
    out = []
    for e, cfg in enumerate(cfgs):
        h = margin(lp[e, :k], n[:k], lp[e, k:], n[k:], ref_c, ref_r, cfg.average_logprobs)
        out.append((preference_loss(h, cfg.objective, cfg.tau), h))
    return out


@torch.inference_mode()
def evaluate_packed(lm: LoadedModel, edits: Sequence[Intervention], enc, ref, cfgs: Sequence[FitConfig],
                    batch_size: int = 16) -> list[dict[str, float]]:
    """`training.evaluate_pairs` for K edits in one pass: each edit's mean loss, preference accuracy, margin."""
    losses, hs = [], []
    with pack(lm, edits):
        kv = prefix_kv(lm, enc.prefix)
        for s in range(0, len(enc), batch_size):
            idx = list(range(s, min(s + batch_size, len(enc))))
            per_edit = _pair_losses(lm, enc, ref, idx, cfgs, kv)
            losses.append(torch.stack([loss for loss, _ in per_edit]).double().cpu())  # (K, pairs), one copy
            hs.append(torch.stack([h for _, h in per_edit]).double().cpu())
    loss, h = torch.cat(losses, dim=1), torch.cat(hs, dim=1)
    return [{"loss": float(loss[e].mean()), "pref_acc": preference_accuracy(h[e]), "margin": float(h[e].mean())}
            for e in range(len(edits))]


@dataclass
class _Run:
    """One edit's state in a pack: what `training.fit` keeps in its locals."""

    edit: Intervention
    cfg: FitConfig  # with its learning rate
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    total: int
    eval_points: set
    history: list = field(default_factory=list)
    best_row: dict | None = None
    best_state: dict | None = None
    plateau: Plateau | None = None
    status: str = "fixed_schedule"
    steps: int = 0
    live: bool = True


def _check_pack(edits: Sequence[Intervention], cfgs: Sequence[FitConfig]) -> None:
    if len({id(e) for e in edits}) != len(edits):
        raise LocauditError("the same edit object appears twice in a pack; give each fit its own edit")
    for name in SHARED:
        for k, cfg in enumerate(cfgs[1:], 1):
            if getattr(cfg, name) != getattr(cfgs[0], name):
                raise LocauditError(f"packed fits must share {', '.join(SHARED)} (they see the same batches): edit {k} "
                                    f"has {name}={getattr(cfg, name)!r}, edit 0 has {getattr(cfgs[0], name)!r}; "
                                    f"fit them in separate packs")
    for e in edits:
        if e.kind not in PACKABLE:
            raise LocauditError(f"edit kind '{e.kind}' cannot be packed (packable: {', '.join(PACKABLE)}); "
                                f"fit it with training.fit")
        if not any(p.requires_grad for p in e.parameters()):
            raise LocauditError(f"edit kind '{e.kind}' has no trainable parameters")


def _per_edit(value, K: int, name: str) -> list:
    if not isinstance(value, (list, tuple)):
        return [value] * K
    if len(value) != K:
        raise LocauditError(f"{name} has {len(value)} entries for {K} edits; give one per edit (or one for all)")
    return list(value)


def fit_packed(lm: LoadedModel, edits: Sequence[Intervention], train_pairs: Sequence[PreferencePair],
               val_pairs: Sequence[PreferencePair], cfgs: FitConfig | Sequence[FitConfig],
               n_heads: int | None | Sequence[int | None] = None, progress: bool = True) -> list[FitResult]:
    """Train K edits together (module docstring); result k is what `training.fit(lm, edits[k], ..., cfgs[k],
    n_heads[k])` returns, up to float rounding. `cfgs` and `n_heads`: one per edit, or one for all. Each
    result's `seconds` is its share of the pack's wall time, in proportion to its steps."""
    t0 = time.time()
    K = len(edits)
    if K == 0:
        raise LocauditError("fit_packed needs at least one edit")
    cfgs = _per_edit(cfgs, K, "cfgs")
    n_heads = _per_edit(n_heads, K, "n_heads")
    _check_pack(edits, cfgs)
    base = cfgs[0]
    torch.manual_seed(base.seed)
    enc_train, ref_train, enc_val, ref_val = prepare_pairs(lm, train_pairs, val_pairs, base, progress)
    steps_per_epoch = math.ceil(len(enc_train) / base.batch_size)

    runs = []
    for edit, cfg, nh in zip(edits, cfgs, n_heads):
        cfg = replace(cfg, lr=cfg.lr if cfg.lr is not None else default_lr(nh, cfg))
        edit.to(lm.device)
        opt = torch.optim.AdamW([p for p in edit.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
        total, lr_at, points = schedule(cfg, steps_per_epoch)
        runs.append(_Run(edit, cfg, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at), total, points,
                         status="step_cap" if cfg.early_stopping else "fixed_schedule"))

    # start rows: an identity edit's are known exactly (`identity_eval`); the others are validated in one pass
    moved = [r for r in runs if not r.edit.is_identity()]
    starts = dict(zip(map(id, moved), evaluate_packed(lm, [r.edit for r in moved], enc_val, ref_val,
                                                      [r.cfg for r in moved]))) if moved else {}
    for r in runs:
        v = starts[id(r)] if id(r) in starts else identity_eval(r.cfg)
        r.history.append({"step": 0, "epoch": 0.0, "val_loss": v["loss"], "val_pref_acc": v["pref_acc"]})
        r.best_row, r.best_state = r.history[-1], copy.deepcopy(r.edit.state_dict())
        r.plateau = Plateau(r.cfg.min_delta, r.cfg.patience or 0, reference=r.best_row["val_loss"])
        r.edit.train()

    rng = np.random.default_rng(base.seed)
    lengths = [max(len(c), len(r)) for c, r in zip(enc_train.chosen, enc_train.rejected)]
    bar = tqdm(total=max(r.total for r in runs), desc=f"fit {K} packed edits", disable=not progress, leave=False)
    step = 0
    while any(r.live for r in runs):
        order = (bucketed_batches(lengths, base.batch_size, rng) if base.shuffle else
                 [list(range(i, min(i + base.batch_size, len(lengths)))) for i in range(0, len(lengths), base.batch_size)])
        for idx in order:
            live = [r for r in runs if r.live]
            with pack(lm, [r.edit for r in live]):
                kv = prefix_kv(lm, enc_train.prefix)
                losses = [loss.mean() for loss, _ in _pair_losses(lm, enc_train, ref_train, idx, [r.cfg for r in live], kv)]
                for r in live:
                    r.opt.zero_grad(set_to_none=True)
                losses = torch.stack(losses)
                losses.sum().backward()  # each edit's gradient is that of its own mean loss
            step += 1
            for r, loss in zip(live, losses.detach().tolist()):
                r.opt.step()
                r.sched.step()
                r.steps = step
                r.history.append({"step": step, "epoch": step / steps_per_epoch, "train_loss": loss,
                                  "lr": r.sched.get_last_lr()[0]})
            bar.update(1)
            due = [r for r in live if step in r.eval_points]
            if due:
                for r in due:
                    r.edit.eval()
                for r, v in zip(due, evaluate_packed(lm, [r.edit for r in due], enc_val, ref_val, [r.cfg for r in due])):
                    r.edit.train()
                    r.history.append({"step": step, "epoch": step / steps_per_epoch, "val_loss": v["loss"],
                                      "val_pref_acc": v["pref_acc"]})
                    if v["loss"] < r.best_row["val_loss"]:
                        r.best_row, r.best_state = r.history[-1], copy.deepcopy(r.edit.state_dict())
                    if r.plateau.update(v["loss"]) and r.cfg.early_stopping:
                        r.status, r.live = "converged", False
            for r in live:
                if step >= r.total:
                    r.live = False
            if not any(r.live for r in runs):
                break
    bar.close()
    wall = time.time() - t0
    steps = sum(r.steps for r in runs) or 1
    results = []
    for r in runs:
        r.edit.load_state_dict(r.best_state)
        r.edit.eval()
        if r.best_row["step"] == 0:
            r.status = "stuck"
        results.append(FitResult(r.edit, r.history, r.best_row, r.cfg, wall * r.steps / steps, len(enc_train),
                                 len(enc_val), status=r.status, steps=r.steps, attempts=[]))
    return results


def fit_packed_to_optimum(lm: LoadedModel, new_edits: Sequence[Callable[[], Intervention]],
                          train_pairs: Sequence[PreferencePair], val_pairs: Sequence[PreferencePair],
                          cfgs: FitConfig | Sequence[FitConfig], n_heads: int | None | Sequence[int | None] = None,
                          progress: bool = True) -> list[FitResult]:
    """`training.fit_to_optimum` for K edits: all fitted in one pack from fresh edits (`new_edits[k]()`); the fits
    to retry (never left the identity, or with `retry_flat` stayed flat) are refitted, packed together, from fresh
    edits at lr * retry_factor, up to their `retries` times. Each edit keeps its best attempt (`keep_best`), which
    lists the others, and its seconds include theirs."""
    K = len(new_edits)
    cfgs = _per_edit(cfgs, K, "cfgs")
    n_heads = _per_edit(n_heads, K, "n_heads")
    lrs = [c.lr if c.lr is not None else default_lr(n, c) for c, n in zip(cfgs, n_heads)]
    tries: list[list[FitResult]] = [[] for _ in range(K)]
    pending = list(range(K))
    round_ = 0
    while pending:
        fits = fit_packed(lm, [new_edits[i]() for i in pending], train_pairs, val_pairs,
                          [replace(cfgs[i], lr=lrs[i]) for i in pending], [n_heads[i] for i in pending], progress)
        still = []
        for i, result in zip(pending, fits):
            tries[i].append(result)
            if result.retry and round_ < cfgs[i].retries:
                lrs[i] *= cfgs[i].retry_factor
                still.append(i)
        pending, round_ = still, round_ + 1
    return [keep_best(t) for t in tries]
