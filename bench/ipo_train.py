"""ipo_train: locaudit's `training.fit` (IPO) vs TRL `DPOTrainer(loss_type="ipo")` with a PEFT rank-1 LoRA,
training the same function from the same start on the same batches, so their loss curves must coincide.

- Edit: a rank-1 LoRA on the attention output projection o_proj of the layers of a seeded random set of 16
  heads: locaudit's `FullRank1(layers=...)`, PEFT's `LoraConfig(r=1, lora_alpha=1, layers_to_transform=...)`.
  Both start from the same A (drawn here, copied into both) and B = 0.
- Data: the same TruthfulQA preference pairs (a seeded subset of the train split), in the same order
  (locaudit `shuffle=False`, TRL `train_sampling_strategy="sequential"`), batch 4 pairs, one epoch.
  TRL appends EOS to each completion, so locaudit's answers carry the same EOS token.
- Optimisation: IPO with tau = beta = 0.1 on token-averaged log-probs (both), AdamW without weight decay, the
  same learning rate (locaudit's default for 16 heads), cosine without warm-up, no gradient clipping (TRL's
  default max_grad_norm=1.0 is switched off so the two optimisers see the same gradients).

Timed, model load excluded, each on its own freshly loaded model:
- locaudit: the whole `fit(...)` call with a cold pi0 cache: tokenisation, pi0 log-probs of the train and
  validation pairs, the validation evaluation at the end (which TRL does not do), training.
- TRL: `trainer.train()` (the ratio uses this); `DPOTrainer(...)` construction (dataset tokenisation, PEFT
  wrapping) is timed separately. TRL's default `precompute_ref_log_probs=False` is kept (what researchers
  run): every step runs an extra no-grad forward of the adapter-disabled model as the reference.
- For reference, locaudit's actual study workload, `LocalizedRank1` at the 16 heads (shuffled batches), is
  timed too. Both loss trajectories go to the JSON and to `bench/results/ipo_curves[-quick].png`.
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


def lora_a(layers: list[int], width: int) -> dict:
    """The shared LoRA input factors A^l, drawn like PEFT's default (Kaiming-uniform, bound 1/sqrt(fan_in))."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    bound = 1.0 / math.sqrt(width)
    return {l: (torch.rand(1, width, generator=g) * 2 - 1) * bound for l in layers}


def with_eos(pairs, eos: str):
    from locaudit.data.examples import PreferencePair

    return [PreferencePair(p.qid, p.question, p.chosen + eos, p.rejected + eos) for p in pairs]


def run_locaudit(train_pairs, val_pairs, heads_seed: int) -> dict:
    import torch

    from locaudit.heads import random_heads
    from locaudit.interventions import FullRank1, LocalizedRank1
    from locaudit.training import FitConfig, default_lr, fit

    lm, load_s = load_lm()
    heads = random_heads(K_HEADS, heads_seed, lm.arch.n_layers, lm.arch.n_heads)
    layers = sorted({h.layer for h in heads})
    base = FitConfig(objective="ipo", tau=TAU, epochs=1, batch_size=BATCH, fmt="qa", seed=SEED)
    lr = default_lr(len(heads), base)
    edit = FullRank1(lm.arch, layers=layers)
    with torch.no_grad():
        for l, a in lora_a(layers, lm.arch.n_heads * lm.arch.head_dim).items():
            edit.A[str(l)].copy_(a)
    eos = lm.tokenizer.eos_token
    cfg = FitConfig(objective="ipo", tau=TAU, epochs=1, batch_size=BATCH, fmt="qa", seed=SEED, lr=lr, shuffle=False)
    parts: dict = {}
    with cold_cache(), _fit_breakdown(parts), Timer() as t:
        result = fit(lm, edit, with_eos(train_pairs, eos), with_eos(val_pairs, eos), cfg, progress=False)
    steps = [h for h in result.history if "train_loss" in h]
    other = parts["reference_logprobs"] + parts["evaluate_pairs"] + parts["encode_pairs"]
    with cold_cache(), Timer() as t_loc:
        loc = fit(lm, LocalizedRank1(heads, lm.arch, seed=SEED), train_pairs, val_pairs, base, n_heads=len(heads),
                  progress=False)
    return {
        "seconds": t.seconds, "model_load_seconds": load_s, "steps": len(steps),
        "breakdown_seconds": {"encode_pairs": parts["encode_pairs"], "pi0_reference_logprobs": parts["reference_logprobs"],
                              "validation_evals": parts["evaluate_pairs"], "training_loop": t.seconds - other},
        "train_loss": [h["train_loss"] for h in steps],
        "val": [{"step": h["step"], "val_loss": h["val_loss"], "val_pref_acc": h["val_pref_acc"]}
                for h in result.history if "val_loss" in h],
        "lr": lr, "config": asdict(result.config), "heads": heads.names, "layers": layers,
        "localized_16_heads": {"seconds": t_loc.seconds, "train_loss": [h["train_loss"] for h in loc.history if "train_loss" in h],
                               "best": loc.best, "note": "the study's edit (LocalizedRank1, shuffled batches), timed for reference"},
    }, lm


def run_trl(train_pairs, layers: list[int], lr: float, n_steps: int) -> dict:
    import torch

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
            dataloader_num_workers=0, bf16=False, fp16=False, max_grad_norm=0.0,
            train_sampling_strategy="sequential",
        )
        with Timer() as tc:
            trainer = DPOTrainer(model=lm.model, args=args, train_dataset=ds, processing_class=lm.tokenizer,
                                 peft_config=peft_cfg)
        trainer.remove_callback(PrinterCallback)  # its per-step dict print is not part of the work
        shared = lora_a(layers, lm.arch.n_heads * lm.arch.head_dim)
        copied = 0
        with torch.no_grad():
            for name, module in trainer.model.named_modules():
                if name.endswith("self_attn.o_proj") and hasattr(module, "lora_A"):
                    layer = int(name.split(".layers.")[1].split(".")[0])
                    module.lora_A["default"].weight.copy_(shared[layer])
                    copied += 1
        if copied != len(layers):
            raise RuntimeError(f"found {copied} PEFT o_proj adapters, expected {len(layers)}")
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
    ax.plot(range(1, len(loc["train_loss"]) + 1), loc["train_loss"], "o-", ms=5, mfc="none",
            label="locaudit fit: rank-1 LoRA on o_proj of the layers")
    if trl is not None:
        ax.plot(range(1, len(trl["train_loss"]) + 1), trl["train_loss"], "x--", ms=5,
                label="TRL DPOTrainer ipo + PEFT LoRA r=1 (same layers)")
    ax.axhline((1 / (2 * TAU)) ** 2, color="grey", lw=0.8, ls=":", label="loss at h = 0")
    ax.set_xlabel("optimizer step (4 pairs each)")
    ax.set_ylabel(f"IPO training loss (tau={TAU})")
    ax.set_title("IPO training loss: same edit, start, batches and lr")
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
    diff = np.abs(np.array(loc["train_loss"]) - np.array(trl["train_loss"][: len(loc["train_loss"])]))
    return {
        "what": "IPO training of the same rank-1 o_proj LoRA from the same start on the same batches",
        "n_train_pairs": n, "n_val_pairs": len(val_pairs), "batch_pairs": BATCH, "steps": n_steps, "tau": TAU,
        "heads": loc["heads"], "layers": loc["layers"], "lr": loc["lr"],
        "locaudit": {**loc, "pairs_per_s": n / loc["seconds"],
                     "train_loop_pairs_per_s": n / loc["breakdown_seconds"]["training_loop"]},
        "trl": {**trl, "pairs_per_s": n / trl["seconds_train"], "pairs_per_s_incl_construct": n / trl["seconds_total"]},
        "loss_curves_max_abs_diff": float(diff.max()), "loss_curves_max_rel_diff": float((diff / np.abs(trl["train_loss"][: len(diff)])).max()),
        "ratio": trl["seconds_train"] / loc["seconds"],
        "ratio_incl_trl_construct": trl["seconds_total"] / loc["seconds"],
        "ratio_training_loops": trl["seconds_train"] / loc["breakdown_seconds"]["training_loop"],
        "figure": str(fig), "target": 3.0,
    }


def main():
    cli("ipo_train", run)


if __name__ == "__main__":
    main()
