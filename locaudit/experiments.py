"""Stage entry points a notebook or the CLI calls: probe, steer, fit, eval, and (later) the whole study.

Each function takes configuration dataclasses, does one stage end to end, writes its outputs atomically
under `out`, and returns what it computed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from locaudit.config import DataConfig, ModelConfig
from locaudit.errors import LocauditError
from locaudit.heads import HeadSet, all_heads, parse_heads, random_heads, single_head
from locaudit.models import LoadedModel, load_model
from locaudit.probes import ProbeResult, probe_heads
from locaudit.storage import atomic_write_json, prepare_out_dir


def load(mcfg: ModelConfig) -> LoadedModel:
    return load_model(mcfg.model, device=mcfg.device, dtype=mcfg.dtype)


def run_probe(mcfg: ModelConfig, dcfg: DataConfig, out: Path, probe_format: str = "iti_end_q",
              batch_size: int = 16, top_k: int = 16, lm: LoadedModel | None = None, progress: bool = True) -> ProbeResult:
    """Probe every head; write probes.csv, top_heads.txt, probes.npz, probe_heatmap.png and probe.json."""
    from locaudit.figures import probe_heatmap

    out = prepare_out_dir(out)
    t0 = time.time()
    lm = lm or load(mcfg)
    t_model = time.time() - t0
    split = dcfg.load_split()
    result = probe_heads(lm, split, probe_format, seed=dcfg.seed, batch_size=batch_size, progress=progress)
    result.save(out)
    top = result.top(min(top_k, lm.arch.n_total_heads))
    probe_heatmap(result.val_acc, out / "probe_heatmap.png", [(h.layer, h.head) for h in top],
                  title=f"Probe accuracy, {lm.name} (boxes: top {len(top)})")
    atomic_write_json(out / "probe.json", {
        "model": lm.name, "data": asdict(dcfg), "split_hash": split.hash, "probe_format": probe_format,
        "n_train_examples": result.n_train, "n_val_examples": result.n_val,
        "top_heads": top.names, "top_val_acc": [float(result.val_acc[h.layer, h.head]) for h in top],
        "seconds_model_load": t_model, "seconds_total": time.time() - t0,
    })
    return result


def resolve_heads(lm: LoadedModel, heads: str | None = None, top_k: int | None = None, probes: Path | None = None,
                  random_k: int | None = None, seed: int = 0, all_: bool = False,
                  probe_result: ProbeResult | None = None) -> HeadSet:
    """One HeadSet from exactly one of: explicit names, top-k of saved probes, random (k, seed), all heads."""
    a = lm.arch
    chosen = [x for x in (heads is not None, top_k is not None, random_k is not None, all_) if x]
    if len(chosen) != 1:
        raise LocauditError("choose exactly one of --heads, --top-k, --random, --all-heads")
    if heads is not None:
        return parse_heads(heads, a.n_layers, a.n_heads)
    if random_k is not None:
        return random_heads(random_k, seed, a.n_layers, a.n_heads)
    if all_:
        return all_heads(a.n_layers, a.n_heads)
    result = probe_result or (ProbeResult.load(probes) if probes is not None else None)
    if result is None:
        raise LocauditError("--top-k needs --probes DIR (the output of `locaudit probe`)")
    if result.val_acc.shape != (a.n_layers, a.n_heads):
        raise LocauditError(f"probes in {probes} are for a model with shape {result.val_acc.shape}, not this one")
    return result.top(top_k)


def run_steer(mcfg: ModelConfig, dcfg: DataConfig, heads: HeadSet | None, alpha: float, questions: list[str] | None = None,
              probes: ProbeResult | None = None, top_k: int | None = None, fmt: str = "qa", max_new_tokens: int = 50,
              lm: LoadedModel | None = None, progress: bool = True) -> list[dict]:
    """Answers with and without ITI at `heads` (or the top-k probe heads) for the given questions
    (default: the first test questions)."""
    from locaudit.evaluation.generation import generate_answers
    from locaudit.interventions import ITI, NoEdit

    lm = lm or load(mcfg)
    split = dcfg.load_split()
    if probes is None:
        probes = probe_heads(lm, split, seed=dcfg.seed, progress=progress)
    if heads is None:
        heads = probes.top(top_k or 16)
    heads.validate(lm.arch.n_layers, lm.arch.n_heads)
    qs = questions or [q.question for q in split.test[:3]]
    iti = ITI.from_probes(heads, probes, alpha)
    base = generate_answers(lm, NoEdit(), qs, fmt=fmt, max_new_tokens=max_new_tokens, progress=progress)
    steered = generate_answers(lm, iti, qs, fmt=fmt, max_new_tokens=max_new_tokens, progress=progress)
    return [{"question": q, "unsteered": b, "steered": s, "heads": heads.names, "alpha": alpha}
            for q, b, s in zip(qs, base, steered)]


def make_edit(lm: LoadedModel, heads: HeadSet | None, seed: int = 0):
    """LocalizedRank1 at `heads`, or FullRank1 (ordinary rank-1 LoRA on every W^l) when heads is None."""
    from locaudit.interventions import FullRank1, LocalizedRank1

    return FullRank1(lm.arch, seed=seed) if heads is None else LocalizedRank1(heads, lm.arch, seed=seed)


def run_fit(mcfg: ModelConfig, dcfg: DataConfig, out: Path, heads: str | None = None, top_k: int | None = None,
            probes: Path | None = None, random_k: int | None = None, all_heads: bool = False, full: bool = False,
            objective: str = "ipo", tau: float = 0.1, epochs: int = 2, lr: float | None = None, batch_size: int = 4,
            fmt: str = "qa", max_train_pairs: int | None = None, sum_logprobs: bool = False,
            lm: LoadedModel | None = None, progress: bool = True) -> dict:
    """Fit the optimal edit at a head set (or full rank-1 LoRA); write edit.safetensors, edit.json and
    training_curve.png under `out`; return the edit.json record."""
    from locaudit.data.examples import preference_pairs
    from locaudit.figures import training_curve
    from locaudit.training import FitConfig, fit, fit_summary

    cfg = FitConfig(objective=objective, tau=tau, epochs=epochs, lr=lr, batch_size=batch_size, fmt=fmt,
                    max_train_pairs=max_train_pairs, average_logprobs=not sum_logprobs, seed=dcfg.seed)
    out = prepare_out_dir(out)
    lm = lm or load(mcfg)
    hs = None if full else resolve_heads(lm, heads=heads, top_k=top_k, probes=probes, random_k=random_k,
                                         seed=dcfg.seed, all_=all_heads)
    split = dcfg.load_split()
    edit = make_edit(lm, hs, seed=dcfg.seed)
    n_heads = None if (hs is None or len(hs) == lm.arch.n_total_heads) else len(hs)
    result = fit(lm, edit, preference_pairs(split.train), preference_pairs(split.val), cfg, n_heads=n_heads,
                 progress=progress)
    label = "full" if hs is None else hs.label
    summary = {"model": lm.name, "edit_label": label, "heads": "all (full rank-1 LoRA)" if hs is None else hs.names,
               "split_hash": split.hash, "data": asdict(dcfg), **fit_summary(result),
               "objective": cfg.objective, "tau": cfg.tau, "lr": result.config.lr, "epochs": cfg.epochs, "seed": cfg.seed}
    result.edit.save(out, extra=summary)
    training_curve(result.history, out / "training_curve.png", title=f"{label} {cfg.objective.upper()} tau={cfg.tau}")
    return summary
