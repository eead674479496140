"""ipo_train: locaudit's `training.fit` (IPO) vs TRL `DPOTrainer(loss_type="ipo")` with a PEFT rank-1 LoRA.

Both train a rank-1 edit of the attention output projection o_proj of the same layers (the layers of a seeded
random set of 16 heads; locaudit trains its head-restricted `LocalizedRank1`, TRL a PEFT LoRA `r=1` on those
layers' `o_proj`) on the same TruthfulQA preference pairs (`data.examples.preference_pairs` of the seeded
train split, a seeded subset), with the same batch size (4 pairs = 8 sequences), number of optimizer steps,
tau = beta = 0.1, learning rate (locaudit's default for 16 heads), AdamW without weight decay, cosine schedule
without warm-up, and the same prompt text: TRL gets `prompt = PromptFormat("qa").prompt(q)` and completions
`" " + answer` (locaudit's `qa` format; TRL itself appends EOS to each completion, so it scores one more token
per sequence).

Timed, model load excluded, each on its own freshly loaded model:
- locaudit: the whole `fit(...)` call with a cold pi0 cache: tokenisation, pi0 log-probs of train and
  validation pairs, the validation evaluations at step 0 and at the end (which TRL does not do), training.
- TRL: `trainer.train()` (the ratio uses this); `DPOTrainer(...)` construction (dataset tokenisation, PEFT
  wrapping) is timed separately and reported. TRL's default `precompute_ref_log_probs=False` is kept (what
  researchers run): with PEFT and no `ref_model`, every step runs an extra no-grad forward of the
  adapter-disabled model on the 8 sequences as the reference.
Both loss trajectories go to the JSON and to `bench/results/ipo_curves[-quick].png`.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
import warnings
from dataclasses import asdict

import numpy as np

from bench.common import SEED, Timer, cli, cold_cache, load_lm, load_split, log, missing_bench_deps, result_path, PIP_COMMAND

SIZES = {True: {"n_train": 8, "n_val": 4}, False: {"n_train": 64, "n_val": 16}}
BATCH = 4
TAU = 0.1
K_HEADS = 16


def pick(pairs, n, seed):
    idx = np.random.default_rng(seed).choice(len(pairs), size=min(n, len(pairs)), replace=False)
    return [pairs[i] for i in sorted(idx)]


@contextlib.contextmanager
def _fit_breakdown(record: dict):
    """Time the pieces of `fit` by wrapping module attributes it looks up at call time (no locaudit edit)."""
    from locaudit import training

    names = ("reference_logprobs", "evaluate_pairs", "encode_pairs")
    originals = {n: getattr(training, n) for n in names}
    for n in names:
        record[n] = 0.0

        def wrapped(*a, _n=n, **k):
            t0 = time.perf_counter()
            try:
                return originals[_n](*a, **k)
            finally:
                record[_n] += time.perf_counter() - t0
        setattr(training, n, wrapped)
    try:
        yield record
    finally:
        for n, f in originals.items():
            setattr(training, n, f)


def run_locaudit(train_pairs, val_pairs, heads_seed: int) -> dict:
    from locaudit.heads import random_heads
    from locaudit.interventions import LocalizedRank1
    from locaudit.training import FitConfig, fit

    lm, load_s = load_lm()
    heads = random_heads(K_HEADS, heads_seed, lm.arch.n_layers, lm.arch.n_heads)
    cfg = FitConfig(objective="ipo", tau=TAU, epochs=1, batch_size=BATCH, fmt="qa", seed=SEED)
    edit = LocalizedRank1(heads, lm.arch, seed=SEED)
    parts: dict = {}
    with cold_cache(), _fit_breakdown(parts), Timer() as t:
        result = fit(lm, edit, train_pairs, val_pairs, cfg, n_heads=len(heads), progress=False)
    steps = [h for h in result.history if "train_loss" in h]
    other = parts["reference_logprobs"] + parts["evaluate_pairs"] + parts["encode_pairs"]
    return {
        "seconds": t.seconds, "model_load_seconds": load_s, "steps": len(steps),
        "breakdown_seconds": {"encode_pairs": parts["encode_pairs"], "pi0_reference_logprobs": parts["reference_logprobs"],
                              "validation_evals": parts["evaluate_pairs"], "training_loop": t.seconds - other},
        "train_loss": [h["train_loss"] for h in steps],
        "val": [{"step": h["step"], "val_loss": h["val_loss"], "val_pref_acc": h["val_pref_acc"]}
                for h in result.history if "val_loss" in h],
        "lr": result.config.lr, "config": asdict(result.config), "heads": heads.names,
        "layers": sorted({h.layer for h in heads}),
    }, lm


def run_trl(train_pairs, layers: list[int], lr: float, n_steps: int) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from locaudit.data.formats import PromptFormat

    lm, load_s = load_lm()
    fmt = PromptFormat("qa")
    ds = Dataset.from_dict({
        "prompt": [fmt.prompt(p.question) for p in train_pairs],
        "chosen": [fmt.answer(p.chosen) for p in train_pairs],
        "rejected": [fmt.answer(p.rejected) for p in train_pairs],
    })
    peft_cfg = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=["o_proj"], layers_to_transform=layers,
                          layers_pattern="layers", bias="none", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory(prefix="locaudit-bench-trl-") as out:
        args = DPOConfig(
            output_dir=out, loss_type="ipo", beta=TAU, per_device_train_batch_size=BATCH, max_steps=n_steps,
            num_train_epochs=1, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
            optim="adamw_torch", gradient_accumulation_steps=1, logging_steps=1, save_strategy="no",
            eval_strategy="no", report_to=[], use_cpu=True, seed=SEED, data_seed=SEED, disable_tqdm=True,
            dataloader_num_workers=0, bf16=False, fp16=False,
        )
        with Timer() as tc:
            trainer = DPOTrainer(model=lm.model, args=args, train_dataset=ds, processing_class=lm.tokenizer,
                                 peft_config=peft_cfg)
        trainer.remove_callback(PrinterCallback)  # its per-step dict print is not part of the work
        n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        with Timer() as tt:
            trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    return {
        "seconds_train": tt.seconds, "seconds_construct": tc.seconds, "seconds_total": tt.seconds + tc.seconds,
        "model_load_seconds": load_s, "steps": trainer.state.global_step,
        "train_loss": [float(h["loss"]) for h in logs],
        "precompute_ref_log_probs": bool(args.precompute_ref_log_probs),
        "max_grad_norm": args.max_grad_norm, "trainable_params": n_trainable,
        "lora": {"r": 1, "lora_alpha": 1, "target_modules": ["o_proj"], "layers_to_transform": layers},
    }


def plot(loc: dict, trl: dict | None, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(range(1, len(loc["train_loss"]) + 1), loc["train_loss"], "o-", ms=3,
            label=f"locaudit fit (LocalizedRank1, {K_HEADS} heads)")
    if trl is not None:
        ax.plot(range(1, len(trl["train_loss"]) + 1), trl["train_loss"], "s-", ms=3,
                label="TRL DPOTrainer ipo + PEFT LoRA r=1 (o_proj)")
    ax.axhline((1 / (2 * TAU)) ** 2, color="grey", lw=0.8, ls=":", label="loss at h = 0")
    ax.set_xlabel("optimizer step (4 pairs each)")
    ax.set_ylabel(f"IPO training loss (tau={TAU})")
    ax.set_title("IPO training loss, same pairs, batch, steps, lr")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool) -> dict:
    from locaudit.data.examples import preference_pairs

    missing = missing_bench_deps()
    if missing:
        raise SystemExit(f"ipo_train needs the bench-only packages {', '.join(missing)}; install them with\n"
                         f"  {PIP_COMMAND}")
    size = SIZES[quick]
    split = load_split()
    train_pairs = pick(preference_pairs(split.train), size["n_train"], SEED)
    val_pairs = pick(preference_pairs(split.val), size["n_val"], SEED + 1)
    n_steps = math.ceil(len(train_pairs) / BATCH)
    log(f"ipo_train: {len(train_pairs)} train pairs, {len(val_pairs)} val pairs, {n_steps} steps of {BATCH} pairs")
    loc, lm = run_locaudit(train_pairs, val_pairs, heads_seed=SEED)
    log(f"ipo_train: locaudit fit {loc['seconds']:.2f}s {loc['breakdown_seconds']}")
    del lm
    trl = run_trl(train_pairs, loc["layers"], loc["lr"], n_steps)
    log(f"ipo_train: TRL construct {trl['seconds_construct']:.2f}s train {trl['seconds_train']:.2f}s")
    fig = result_path("ipo_curves", quick, "png")
    plot(loc, trl, fig)
    n = len(train_pairs)
    return {
        "what": "IPO training of a rank-1 o_proj edit on TruthfulQA preference pairs",
        "n_train_pairs": n, "n_val_pairs": len(val_pairs), "batch_pairs": BATCH, "steps": n_steps, "tau": TAU,
        "heads": loc["heads"], "layers": loc["layers"], "lr": loc["lr"],
        "locaudit": {**loc, "pairs_per_s": n / loc["seconds"],
                     "train_loop_pairs_per_s": n / loc["breakdown_seconds"]["training_loop"]},
        "trl": {**trl, "pairs_per_s": n / trl["seconds_train"], "pairs_per_s_incl_construct": n / trl["seconds_total"]},
        "ratio": trl["seconds_train"] / loc["seconds"],
        "ratio_incl_trl_construct": trl["seconds_total"] / loc["seconds"],
        "ratio_training_loops": trl["seconds_train"] / loc["breakdown_seconds"]["training_loop"],
        "figure": str(fig), "target": 3.0,
    }


def main():
    cli("ipo_train", run)


if __name__ == "__main__":
    main()
