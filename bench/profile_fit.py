"""Profile one locaudit IPO training step (not part of run_all): `python -m bench.profile_fit [--steps N]`.

Breaks a step of `training.fit` into its parts (prefix KV under the edit with grad, the batched rows forward,
answer-only LM head + loss, backward, optimizer), then prints torch.profiler's top operators (self CPU time)
and cProfile's top functions (cumulative) for the same steps. Writes bench/results/profile_fit.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import numpy as np
import torch

from bench.common import RESULTS, SEED, cold_cache, load_lm, load_split, machine_info


def main():
    ap = argparse.ArgumentParser(prog="python -m bench.profile_fit")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()

    from locaudit.data.examples import preference_pairs
    from locaudit.data.formats import PromptFormat
    from locaudit.heads import random_heads
    from locaudit.interventions import LocalizedRank1
    from locaudit.scoring import batch_answer_logprobs, batch_tokens, collate, prefix_kv
    from locaudit.training import FitConfig, encode_pairs, margin, preference_loss, reference_logprobs

    info = machine_info()
    lm, _ = load_lm()
    split = load_split()
    pairs = preference_pairs(split.train)
    idx = np.random.default_rng(SEED).choice(len(pairs), size=4 * args.steps, replace=False)
    pairs = [pairs[i] for i in sorted(idx)]
    enc = encode_pairs(lm, pairs, PromptFormat("qa"))
    with cold_cache():
        t0 = time.perf_counter()
        ref = reference_logprobs(lm, enc, progress=False)
        t_ref = time.perf_counter() - t0
    cfg = FitConfig(tau=0.1, batch_size=4)
    heads = random_heads(16, SEED, lm.arch.n_layers, lm.arch.n_heads)
    edit = LocalizedRank1(heads, lm.arch, seed=SEED)
    opt = torch.optim.AdamW([p for p in edit.parameters() if p.requires_grad], lr=3e-2)
    pad = lm.tokenizer.pad_token_id

    def step(i, parts):
        ids = list(range(4 * i, 4 * i + 4))
        with edit.attach(lm):
            t = time.perf_counter()
            kv = prefix_kv(lm, enc.prefix)
            parts["prefix_kv"] += time.perf_counter() - t
            t = time.perf_counter()
            batch = collate([enc.chosen[j] for j in ids] + [enc.rejected[j] for j in ids], pad, lm.device)
            parts["collate"] += time.perf_counter() - t
            t = time.perf_counter()
            lp, n = batch_answer_logprobs(lm, batch, kv)
            tt = torch.as_tensor(ids)
            h = margin(lp[:4], n[:4], lp[4:], n[4:], ref["lp_c"][tt].float(), ref["lp_r"][tt].float(), True)
            loss = preference_loss(h, "ipo", cfg.tau).mean()
            parts["rows_forward_and_loss"] += time.perf_counter() - t
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            parts["backward"] += time.perf_counter() - t
        t = time.perf_counter()
        opt.step()
        parts["optimizer"] += time.perf_counter() - t
        counted = batch_tokens(batch)
        parts["tokens_rows_padded"] += counted["padded"]
        parts["tokens_rows_real"] += counted["real"]
        parts["tokens_prefix"] += len(enc.prefix)

    def new_parts():
        return {k: 0 for k in ("prefix_kv", "collate", "rows_forward_and_loss", "backward", "optimizer",
                               "tokens_rows_padded", "tokens_rows_real", "tokens_prefix")}

    step(0, new_parts())  # warm-up with grad through hooks
    parts = new_parts()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i, parts)
    wall = time.perf_counter() - t0
    print(f"pi0 for {len(enc)} pairs: {t_ref:.2f}s")
    print(f"{args.steps} steps, {wall:.2f}s ({wall / args.steps:.2f}s/step); parts (s, summed over steps):")
    for k, v in parts.items():
        print(f"  {k:24s} {v:.3f}" if isinstance(v, float) else f"  {k:24s} {v}")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(args.steps):
            step(i, new_parts())
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    print(table)
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=10)
    print(shapes)

    pr = cProfile.Profile()
    pr.enable()
    for i in range(args.steps):
        step(i, new_parts())
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(args.top)
    print(s.getvalue())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile_fit.json").write_text(json.dumps({
        "machine": info, "steps": args.steps, "seconds": wall, "pi0_seconds": t_ref, "parts": parts,
        "torch_profiler_top": table, "torch_profiler_by_shape": shapes, "cprofile_top": s.getvalue(),
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
