"""The single stages, each end to end, for a notebook or the CLI: probe every head, steer with ITI, fit the
optimal edit at a head set, evaluate an edit (the whole study is `locaudit.study.run_study`).

Each function takes configuration dataclasses, does one stage, writes its outputs atomically under `out`,
and returns what it computed.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from locaudit.config import DataConfig, ModelConfig
from locaudit.data.examples import preference_pairs
from locaudit.errors import LocauditError
from locaudit.evaluation.generation import generate_answers
from locaudit.evaluation.judges import build_processes, load_judges
from locaudit.evaluation.lm_metrics import text_metrics_for
from locaudit.evaluation.metrics import evaluate
from locaudit.figures import probe_heatmap, training_curve
from locaudit.heads import HeadSet, all_heads, parse_heads, random_heads
from locaudit.interventions import ITI, NoEdit, load_intervention
from locaudit.methods import fit_optimal_edit
from locaudit.models import LoadedModel, load_model
from locaudit.probes import ProbeResult, probe_heads
from locaudit.storage import atomic_write_json, prepare_out_dir
from locaudit.training import FitConfig, fit_summary


def load(mcfg: ModelConfig) -> LoadedModel:
    return load_model(mcfg.model, device=mcfg.device, dtype=mcfg.dtype)


def run_probe(mcfg: ModelConfig, dcfg: DataConfig, out: Path, probe_format: str = "iti_end_q",
              batch_size: int = 16, top_k: int = 16, lm: LoadedModel | None = None, progress: bool = True) -> ProbeResult:
    """Probe every head; write probes.csv, top_heads.txt, probes.npz, probe_heatmap.png and probe.json."""
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
              placement: str = "iti", lm: LoadedModel | None = None, progress: bool = True) -> list[dict]:
    """Answers with and without ITI at `heads` (or the top-k probe heads) for the given questions
    (default: the first test questions)."""
    lm = lm or load(mcfg)
    split = dcfg.load_split()
    if probes is None:
        probes = probe_heads(lm, split, seed=dcfg.seed, progress=progress)
    if heads is None:
        heads = probes.top(top_k or 16)
    heads.validate(lm.arch.n_layers, lm.arch.n_heads)
    qs = questions or [q.question for q in split.test[:3]]
    iti = ITI.from_probes(heads, probes, alpha, placement=placement)
    answers = {}
    for name, edit in (("unsteered", NoEdit()), ("steered", iti)):
        with edit.attach(lm):
            answers[name] = generate_answers(lm, qs, fmt=fmt, max_new_tokens=max_new_tokens,
                                             progress=name if progress else None)
    base, steered = answers["unsteered"], answers["steered"]
    return [{"question": q, "unsteered": b, "steered": s, "heads": heads.names, "alpha": alpha}
            for q, b, s in zip(qs, base, steered)]


def run_fit(model: LoadedModel | ModelConfig, dcfg: DataConfig, heads: HeadSet | None, cfg: FitConfig, out: Path,
            progress: bool = True) -> dict:
    """Fit the optimal edit at `heads` (None: full rank-1 LoRA on every W^l, full alignment) with `cfg`, on the
    training and validation questions of `dcfg`'s split; write edit.safetensors, edit.json and
    training_curve.png under `out`; return the edit.json record. `model` is a loaded model or its config. The
    edit's initialisation seed is the data seed."""
    lm = model if isinstance(model, LoadedModel) else load(model)
    if heads is not None:
        heads.validate(lm.arch.n_layers, lm.arch.n_heads)
    out = prepare_out_dir(out)
    split = dcfg.load_split()
    result = fit_optimal_edit(lm, heads, preference_pairs(split.train), preference_pairs(split.val), cfg,
                              seed=dcfg.seed, progress=progress)
    label = "full" if heads is None else heads.label
    summary = {"model": lm.name, "edit_label": label, "heads": "all (full rank-1 LoRA)" if heads is None else heads.names,
               "split_hash": split.hash, "data": asdict(dcfg), **fit_summary(result),
               "objective": cfg.objective, "tau": cfg.tau, "lr": result.config.lr, "epochs": cfg.epochs, "seed": cfg.seed}
    result.edit.save(out, extra=summary)
    training_curve(result.history, out / "training_curve.png", title=f"{label} {cfg.objective.upper()} tau={cfg.tau}")
    return summary


def run_eval(mcfg: ModelConfig, dcfg: DataConfig, out: Path, edit_dir: Path | None = None, iti: bool = False,
             heads: str | None = None, top_k: int | None = None, probes: Path | None = None, alpha: float = 15.0,
             fmt: str = "qa", split: str = "test", judge: str = "default", text_docs: int = 100,
             text_source: str = "wiki", max_new_tokens: int = 50, placement: str = "iti",
             lm: LoadedModel | None = None, progress: bool = True) -> dict:
    """Evaluate no edit, ITI, or a saved edit on a split; write metrics.json and answers.jsonl under `out`."""
    out = prepare_out_dir(out)
    lm = lm or load(mcfg)
    sp = dcfg.load_split()
    if edit_dir is not None:
        edit = load_intervention(edit_dir, lm.arch)
    elif iti:
        probe_result = ProbeResult.load(probes) if probes is not None else probe_heads(lm, sp, seed=dcfg.seed, progress=progress)
        hs = resolve_heads(lm, heads=heads, top_k=None if heads else (top_k or 16), probe_result=probe_result)
        edit = ITI.from_probes(hs, probe_result, alpha, placement=placement)
    else:
        edit = NoEdit()
    judges = load_judges(judge, data_dir=dcfg.data_dir, progress=progress, processes=build_processes(4))
    text = text_metrics_for(lm, text_source, n_docs=text_docs) if text_docs > 0 else None
    m = evaluate(lm, edit, sp.part(split), fmt, judges=judges, text_metrics=text, out_dir=out,
                 max_new_tokens=max_new_tokens, progress=progress)
    record = {k: v for k, v in m.items() if k != "per_question"}
    record.update({"model": lm.name, "split": split, "split_hash": sp.hash, "edit_config": edit.config()})
    atomic_write_json(out / "metrics.json", record)
    return record
