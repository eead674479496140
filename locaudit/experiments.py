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
from locaudit.heads import HeadSet, all_heads, parse_heads, random_heads
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
              placement: str = "iti", lm: LoadedModel | None = None, progress: bool = True) -> list[dict]:
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
    iti = ITI.from_probes(heads, probes, alpha, placement=placement)
    answers = {}
    for name, edit in (("unsteered", NoEdit()), ("steered", iti)):
        with edit.attach(lm):
            answers[name] = generate_answers(lm, qs, fmt=fmt, max_new_tokens=max_new_tokens,
                                             progress=name if progress else None)
    base, steered = answers["unsteered"], answers["steered"]
    return [{"question": q, "unsteered": b, "steered": s, "heads": heads.names, "alpha": alpha}
            for q, b, s in zip(qs, base, steered)]


def make_edit(lm: LoadedModel, heads: HeadSet | None, seed: int = 0, scale: float = 1.0):
    """LocalizedRank1 at `heads`, or FullRank1 (ordinary rank-1 LoRA on every W^l) when heads is None; `scale`
    is the LoRA scale (PEFT's lora_alpha / r, `FitConfig.lora_scale`)."""
    from locaudit.interventions import FullRank1
    from locaudit.units import as_units

    if heads is None:
        return FullRank1(lm.arch, seed=seed, scale=scale)
    return as_units(heads).make_edit(lm.arch, seed=seed, scale=scale)


def fit_optimal_edit(lm: LoadedModel, heads: HeadSet | None, train_pairs, val_pairs, cfg, seed: int = 0,
                     progress: bool = True):
    """The optimal edit at `heads` (None: full alignment), trained to its optimum from fresh edits
    (`training.fit_to_optimum`); a set of every head takes the all-heads learning rate, like full alignment."""
    from locaudit.training import fit_to_optimum

    from locaudit.units import as_units

    n_heads = None if heads is None else as_units(heads).lr_size(lm.arch)
    return fit_to_optimum(lm, lambda: make_edit(lm, heads, seed=seed, scale=cfg.lora_scale), train_pairs, val_pairs,
                          cfg, n_heads=n_heads, progress=progress)


def run_fit(mcfg: ModelConfig, dcfg: DataConfig, out: Path, heads: str | None = None, top_k: int | None = None,
            probes: Path | None = None, random_k: int | None = None, all_heads: bool = False, full: bool = False,
            objective: str = "ipo", tau: float = 0.1, epochs: int = 2, lr: float | None = None, batch_size: int = 4,
            fmt: str = "qa", max_train_pairs: int | None = None, max_val_pairs: int | None = None,
            sum_logprobs: bool = False, max_steps: int | None = None, eval_every: int | None = None,
            patience: int | None = None, lm: LoadedModel | None = None, progress: bool = True) -> dict:
    """Fit the optimal edit at a head set (or full rank-1 LoRA); write edit.safetensors, edit.json and
    training_curve.png under `out`; return the edit.json record."""
    from locaudit.data.examples import preference_pairs
    from locaudit.figures import training_curve
    from locaudit.training import FitConfig, fit_summary

    cfg = FitConfig(objective=objective, tau=tau, epochs=epochs, lr=lr, batch_size=batch_size, fmt=fmt,
                    max_train_pairs=max_train_pairs, max_val_pairs=max_val_pairs,
                    average_logprobs=not sum_logprobs, seed=dcfg.seed, max_steps=max_steps, eval_every=eval_every,
                    patience=patience)
    out = prepare_out_dir(out)
    lm = lm or load(mcfg)
    hs = None if full else resolve_heads(lm, heads=heads, top_k=top_k, probes=probes, random_k=random_k,
                                         seed=dcfg.seed, all_=all_heads)
    split = dcfg.load_split()
    result = fit_optimal_edit(lm, hs, preference_pairs(split.train), preference_pairs(split.val), cfg, seed=dcfg.seed,
                              progress=progress)
    label = "full" if hs is None else hs.label
    summary = {"model": lm.name, "edit_label": label, "heads": "all (full rank-1 LoRA)" if hs is None else hs.names,
               "split_hash": split.hash, "data": asdict(dcfg), **fit_summary(result),
               "objective": cfg.objective, "tau": cfg.tau, "lr": result.config.lr, "epochs": cfg.epochs, "seed": cfg.seed}
    result.edit.save(out, extra=summary)
    training_curve(result.history, out / "training_curve.png", title=f"{label} {cfg.objective.upper()} tau={cfg.tau}")
    return summary


# ---------------------------------------------------------------------------------------------------------
# The whole study


def _software() -> dict:
    import platform

    import numpy
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "platform": platform.platform(), "cpu_count": __import__("os").cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_study(preset, out: Path, progress: bool = True, lm: LoadedModel | None = None, judges=None,
              workers: int | None = None) -> dict:
    """The paper's protocol as one resumable job (see `study.plan_arms`): probe, ITI and optimal edits at
    the probe heads and at random heads, full alignment, single heads, the unedited baseline; each arm's
    hyper-parameter chosen on validation questions and reported on test questions; then statistics and the
    report. Every finished trial is a file under `out/trials`; rerunning skips it. `lm` and `judges` may be
    passed in (already loaded) instead of being loaded from the preset. Arms run in `workers` processes
    (default: one per CPU core, one on a GPU; see `runner`)."""
    from tqdm.auto import tqdm

    from locaudit.data.truthfulqa import composition, describe_composition
    from locaudit.evaluation.lm_metrics import text_metrics_for
    from locaudit.report import write_report
    from locaudit.runner import StudyContext, default_workers, run_arms
    from locaudit.storage import read_json
    from locaudit.study import plan_arms

    out = prepare_out_dir(out)
    t_start = time.time()
    stage_seconds: dict[str, float] = {}
    config_record = {"preset": preset.as_dict(), "software": _software()}
    prev = out / "config.json"
    if prev.is_file():
        old = read_json(prev)
        if old.get("preset") != json.loads(json.dumps(preset.as_dict())):
            raise LocauditError(f"{out} holds a run with different settings; use a new --out or the same options")
    atomic_write_json(prev, config_record)

    t0 = time.time()
    given_judges = judges
    lm = lm or load(preset.model)
    split = preset.data.load_split()
    stage_seconds["load"] = time.time() - t0

    t0 = time.time()
    probe_dir = out / "probes"
    probes = None
    if (probe_dir / "probes.npz").is_file():
        try:
            probes = ProbeResult.load(probe_dir)
        except LocauditError:
            probes = None  # unreadable (e.g. killed mid-write by an older version): recompute
    if probes is None:
        probes = run_probe(preset.model, preset.data, probe_dir, probe_format=preset.study.probe_format,
                           batch_size=preset.eval.batch_size, top_k=preset.study.top_k, lm=lm, progress=progress)
    stage_seconds["probe"] = time.time() - t0

    t0 = time.time()
    # judge "none": store answers only (e.g. on a GPU machine without the judges); `judge_run` scores them later
    deferred = judges is None and preset.eval.judge == "none"
    if judges is None and not deferred:
        from locaudit.evaluation.judges import build_processes, load_judges

        judges = load_judges(preset.eval.judge, data_dir=preset.data.data_dir, progress=progress, processes=build_processes(4))
    stage_seconds["judges"] = time.time() - t0
    t0 = time.time()
    text = text_metrics_for(lm, preset.eval.text_source, n_docs=preset.eval.text_docs,
                            max_tokens=preset.eval.text_tokens, batch_size=preset.eval.batch_size) \
        if preset.eval.text_docs > 0 else None
    stage_seconds["text_reference"] = time.time() - t0

    arms = plan_arms(preset.study, probes.ranking, lm.arch.n_layers, lm.arch.n_heads, preset.data.seed)
    t0 = time.time()
    if any(a.method in ("ipo", "full") for a in arms):
        _reference_once(lm, split, preset.fit, progress)  # every fit shares pi0: compute (or load) it once, here
    stage_seconds["pi0"] = time.time() - t0
    ctx = StudyContext(preset, out, lm, probes, None if deferred else judges, text, split)
    samples = {"val": composition(ctx.val_q), "test": composition(ctx.test_q)}
    if progress:
        tqdm.write(f"validation questions {describe_composition(ctx.val_q)}\ntest questions {describe_composition(ctx.test_q)}")
    workers = default_workers(lm.device) if workers is None else max(1, int(workers))
    t0 = time.time()
    selections, arm_seconds = run_arms(ctx, arms, workers, progress=progress, judge_spec=given_judges)
    stage_seconds.update(arm_seconds)  # per stage, summed over workers
    stage_seconds["arms_wall"] = time.time() - t0
    stage_seconds["total"] = time.time() - t_start
    selections = {a.name: selections.get(a.name) for a in arms}  # plan order
    atomic_write_json(out / "run.json", {"selections": selections, "judged": not deferred,
                                         "stage_seconds": stage_seconds, "workers": workers,
                                         "split_hash": split.hash, "n_val_questions": len(ctx.val_q),
                                         "n_test_questions": len(ctx.test_q), "samples": samples, "model": lm.name,
                                         "arch": {"n_layers": lm.arch.n_layers, "n_heads": lm.arch.n_heads,
                                                  "head_dim": lm.arch.head_dim, "family": lm.arch.family.name}})
    if deferred:
        return {"deferred": True, "run_dir": str(out), "n_trials": len(list((out / "trials").glob("*/*.json")))}
    return write_report(out)


def _reference_once(lm: LoadedModel, split, cfg, progress: bool) -> None:
    """pi0's log-probs of the pairs every fit of the study uses (cached on disk, so each fit only loads them)."""
    from locaudit.data.examples import preference_pairs
    from locaudit.training import prepare_pairs

    prepare_pairs(lm, preference_pairs(split.train), preference_pairs(split.val), cfg, progress=progress)


def judge_run(out: Path, judge: str = "default", progress: bool = True) -> dict:
    """Finish a run made with judge "none" (answers generated where no judge was available): score every stored
    answer with `judge`, choose each arm's hyper-parameter on the validation questions, and write the report
    (of the finished arms only, marked partial, if the run itself did not finish).
    Each trial is rewritten atomically when scored, so an interrupted call resumes; a trial scored by another
    judge version is scored again, so one report never mixes judges."""
    from tqdm.auto import tqdm

    from locaudit.evaluation.judges import build_processes, load_judges
    from locaudit.evaluation.metrics import judge_answers, judged_fields
    from locaudit.report import load_trials, write_report
    from locaudit.storage import read_json
    from locaudit.study import select_value

    out = Path(out)
    if not (out / "config.json").is_file():
        raise LocauditError(f"{out} is not a locaudit run directory (no config.json); give the --out of `locaudit run`")
    config = read_json(out / "config.json")
    # an unfinished run (stopped by a time limit, say) is judged and reported as far as it got, marked partial;
    # rerunning the same `locaudit run` later finishes it
    run = read_json(out / "run.json") if (out / "run.json").is_file() else {"partial": True}
    judges = load_judges(judge, data_dir=config["preset"]["data"].get("data_dir"), progress=progress, processes=build_processes(4))
    infos = {"truth": judges[0].info(), "info": judges[1].info()}
    versions = (infos["truth"].get("version"), infos["info"].get("version"))
    paths = sorted((out / "trials").glob("*/*.json"))
    for path in tqdm(paths, desc="judging answers", disable=not progress, leave=False):
        r = read_json(path)
        done = r.get("judge") or {}
        if r.get("truth") is not None and (done.get("truth", {}).get("version"), done.get("info", {}).get("version")) == versions:
            continue
        pq = r["per_question"]
        t, i = judge_answers(judges, pq["question"], pq["answer"])
        r.update(judged_fields(t, i))
        pq["truth_p"], pq["info_p"] = t.tolist(), i.tolist()
        r["judge"] = infos
        atomic_write_json(path, r)
    study = config["preset"]["study"]
    order = {"iti": [float(a) for a in study["alphas"]], "ipo": [float(t) for t in study["taus"]],
             "full": [float(t) for t in study["taus"]]}
    by_arm: dict[str, list[dict]] = {}
    for r in load_trials(out):
        by_arm.setdefault(r["arm"], []).append(r)
    selections = {}
    for name, rows in by_arm.items():
        method = rows[0]["method"]
        key = "alpha" if method == "iti" else "tau"
        val = sorted((r for r in rows if r["split"] == "val"), key=lambda r: order[method].index(float(r[key])))
        if val:
            selections[name] = select_value(tuple(r[key] for r in val), val)
        else:
            selections[name] = next((r.get(key) for r in rows if r["split"] == "test"), None) if method != "none" else None
    run.update(selections=selections, judged=True)
    for split_name in ("test", "val"):  # a partial run has no run.json to say these: read them off the trials
        n = next((r["n_questions"] for rows in by_arm.values() for r in rows if r["split"] == split_name), None)
        run.setdefault(f"n_{split_name}_questions", n)
    run.setdefault("model", config["preset"]["model"]["model"])
    atomic_write_json(out / "run.json", run)
    return write_report(out)


def run_eval(mcfg: ModelConfig, dcfg: DataConfig, out: Path, edit_dir: Path | None = None, iti: bool = False,
             heads: str | None = None, top_k: int | None = None, probes: Path | None = None, alpha: float = 15.0,
             fmt: str = "qa", split: str = "test", judge: str = "default", text_docs: int = 100,
             text_source: str = "wiki", max_new_tokens: int = 50, placement: str = "iti",
             lm: LoadedModel | None = None, progress: bool = True) -> dict:
    """Evaluate no edit, ITI, or a saved edit on a split; write metrics.json and answers.jsonl under `out`."""
    from locaudit.evaluation.judges import build_processes, load_judges
    from locaudit.evaluation.lm_metrics import text_metrics_for
    from locaudit.evaluation.metrics import evaluate
    from locaudit.interventions import ITI, NoEdit, load_intervention

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
