"""capture: locaudit's batched last-token head capture vs honest_llama-style one-at-a-time hooked forwards.

Baseline (ITI's `get_llama_activations_bau`, minus its MLP hooks, which only makes it cheaper): for each text,
batch 1, the full causal LM forward with the LM head over every position and `output_hidden_states=True`,
forward pre-hooks on every layer's o_proj that copy its input (all positions) to CPU, then the last position
is kept. locaudit: `activations.capture_last_token` (length-sorted batches of 16, body only, hooks gather just
the last real token of each row, one pass for all layers). Same texts (TruthfulQA probe examples, `iti_end_q`),
same model; the two outputs are compared element-wise. The texts are all the probe examples of whole questions,
as the probe stage captures them (so answers to one question share their start). Rounds alternate baseline/locaudit; best time of each.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.common import SEED, Timer, cli, load_lm, load_split, log

SIZES = {True: {"n_texts": 32, "rounds": 1}, False: {"n_texts": 256, "rounds": 2}}


def probe_texts(n: int) -> list[str]:
    """The probe stage's workload in miniature: every probe example (one per labelled answer) of seeded random
    training questions, whole questions at a time, until there are `n` texts. Probing captures all answers
    of each question, which share the `Q: {question} A:` start (as honest_llama's loop over the dataset does)."""
    from locaudit.data.examples import probe_examples

    split = load_split()
    pool = list(split.train) + list(split.val) + list(split.test)
    examples = probe_examples(split.train, "iti_end_q", seed=SEED, pool=pool)
    by_q: dict[int, list[str]] = {}
    for e in examples:
        by_q.setdefault(e.qid, []).append(e.text)
    texts: list[str] = []
    for q in np.random.default_rng(SEED).permutation(sorted(by_q)):
        if len(texts) >= n:
            break
        texts += by_q[int(q)]
    return texts[:n]


def baseline_capture(lm, texts) -> np.ndarray:
    """One text at a time, full model with LM head and hidden states, hooks on o_proj inputs (honest_llama)."""
    arch, tok = lm.arch, lm.tokenizer
    store: dict[int, torch.Tensor] = {}

    def make_hook(layer):
        def hook(module, args):
            store[layer] = args[0].detach().squeeze(0).cpu()  # (T, H*d), every position, as TraceDict keeps it
        return hook

    handles = [arch.out_proj(l).register_forward_pre_hook(make_hook(l)) for l in range(arch.n_layers)]
    out = np.zeros((len(texts), arch.n_layers, arch.n_heads, arch.head_dim), dtype=np.float32)
    try:
        with torch.no_grad():
            for i, text in enumerate(texts):
                ids = tok(text, return_tensors="pt")["input_ids"].to(lm.device)
                output = lm.model(ids, output_hidden_states=True)
                hidden = torch.stack(output.hidden_states, dim=0).squeeze().detach().cpu().numpy()  # noqa: F841
                heads = torch.stack([store[l] for l in range(arch.n_layers)], dim=0).numpy()  # (L, T, H*d)
                out[i] = heads[:, -1, :].reshape(arch.n_layers, arch.n_heads, arch.head_dim)
    finally:
        for h in handles:
            h.remove()
    return out


def computed_tokens(tokenizer, texts) -> int:
    """Tokens locaudit's capture actually runs: each group's shared start once, then every text's remainder."""
    from locaudit.activations import shared_prefix_groups

    enc = [tokenizer(t)["input_ids"] for t in texts]
    groups = shared_prefix_groups(enc)
    return sum(n for n, _ in groups) + sum(len(enc[i]) - n for n, g in groups for i in g)


def run(quick: bool) -> dict:
    from locaudit.activations import capture_last_token

    size = SIZES[quick]
    lm, load_s = load_lm()
    texts = probe_texts(size["n_texts"])
    tok_counts = [len(lm.tokenizer(t)["input_ids"]) for t in texts]
    log(f"capture: {len(texts)} texts, {sum(tok_counts)} tokens (mean {np.mean(tok_counts):.1f})")
    # warm-up (allocator, first-call overheads) on a few texts, untimed
    capture_last_token(lm, texts[:4], batch_size=16, progress=False)
    baseline_capture(lm, texts[:2])
    base_times, loc_times = [], []
    for r in range(size["rounds"]):
        with Timer() as tb:
            base = baseline_capture(lm, texts)
        with Timer() as tl:
            ours = capture_last_token(lm, texts, batch_size=16, progress=False)
        base_times.append(tb.seconds)
        loc_times.append(tl.seconds)
        log(f"capture round {r}: baseline {tb.seconds:.2f}s, locaudit {tl.seconds:.2f}s")
    diff = float(np.abs(base - ours).max())
    scale = float(np.abs(base).max())
    b, l = min(base_times), min(loc_times)
    return {
        "what": "last-token o^l of every head, all layers, for probe texts",
        "model": lm.name, "model_load_seconds": load_s,
        "n_texts": len(texts), "n_tokens": int(sum(tok_counts)), "computed_tokens": computed_tokens(lm.tokenizer, texts),
        "baseline": {"name": "honest_llama-style: batch 1, full LM forward (LM head, output_hidden_states), "
                             "o_proj pre-hooks copying all positions to CPU",
                     "seconds": b, "seconds_all_rounds": base_times, "texts_per_s": len(texts) / b},
        "locaudit": {"name": "activations.capture_last_token(batch_size=16)",
                     "seconds": l, "seconds_all_rounds": loc_times, "texts_per_s": len(texts) / l},
        "max_abs_diff": diff, "max_abs_value": scale, "outputs_match": diff <= 1e-3 * max(scale, 1.0),
        "ratio": b / l, "target": 5.0,
    }


def main():
    cli("capture", run)


if __name__ == "__main__":
    main()
