"""The paper's protocol as one resumable job (`run_study`), and judging a run whose answers were stored
unjudged (`judge_run`)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy
import torch
import transformers
from tqdm.auto import tqdm

from locaudit.data.examples import preference_pairs
from locaudit.data.truthfulqa import composition, describe_composition
from locaudit.errors import LocauditError
from locaudit.evaluation import judges as judges_mod
from locaudit.evaluation.lm_metrics import text_metrics_for
from locaudit.evaluation.metrics import judge_answers, judged_fields
from locaudit.methods import method_of
from locaudit.models import LoadedModel
from locaudit.packing import PackingChoice, stored_choices
from locaudit.probes import ProbeResult
from locaudit.report import load_trials, write_report
from locaudit.stages import load, run_probe
from locaudit.storage import atomic_write_json, prepare_out_dir, read_json
from locaudit.study.plan import Preset, StudySettings, build_settings, plan_arms, select_value
from locaudit.study.backends import LocalBackend
from locaudit.study.runner import ArmBackend, StudyContext, run_arms
from locaudit.training import FitConfig, prepare_pairs


def _software() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# settings added to the preset since runs were written, with the value that reproduces what those runs did: a run
# written before a setting existed resumes under the same settings (section, key) -> value
ADDED_SETTINGS = {("study", "packing"): "auto", ("fit", "retry_flat"): False}


def upgrade_preset(record):
    """A run's recorded preset (config.json) with the settings added since it was written filled in."""
    if isinstance(record, dict):
        for (section, key), value in ADDED_SETTINGS.items():
            if isinstance(record.get(section), dict):
                record[section].setdefault(key, value)
    return record


def run_study(preset: Preset, out: Path, progress: bool = True, lm: LoadedModel | None = None, judges=None,
              workers: int | None = None, backend: ArmBackend | None = None) -> dict:
    """The paper's protocol as one resumable job (see `study.plan_arms`): probe, ITI and optimal edits at
    the probe heads and at random heads, full alignment, single heads, the unedited baseline; each arm's
    hyper-parameter chosen on validation questions and reported on test questions; then statistics and the
    report. Every finished trial is a file under `out/trials`; rerunning skips it. `lm` and `judges` may be
    passed in (already loaded) instead of being loaded from the preset. Arms run on `backend`
    (`study.backends`; default: the local one with `workers` processes: one per CPU core, or one per GPU)."""
    if backend is not None and workers is not None:
        raise LocauditError("give run_study the workers of its backend (e.g. LocalBackend(workers=N)), not both")
    backend = backend or LocalBackend(workers)
    out = prepare_out_dir(out)
    t_start = time.time()
    stage_seconds: dict[str, float] = {}
    config_record = {"preset": preset.as_dict(), "software": _software()}
    prev = out / "config.json"
    if prev.is_file():
        old = read_json(prev)
        if upgrade_preset(old.get("preset")) != json.loads(json.dumps(preset.as_dict())):
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
        judges = judges_mod.load_judges(preset.eval.judge, data_dir=preset.data.data_dir, progress=progress,
                                        processes=judges_mod.build_processes(4))
    stage_seconds["judges"] = time.time() - t0
    t0 = time.time()
    text = text_metrics_for(lm, preset.eval.text_source, n_docs=preset.eval.text_docs,
                            max_tokens=preset.eval.text_tokens, batch_size=preset.eval.batch_size) \
        if preset.eval.text_docs > 0 else None
    stage_seconds["text_reference"] = time.time() - t0

    arms = plan_arms(preset.study, probes.ranking, lm.arch.n_layers, lm.arch.n_heads, preset.data.seed)
    t0 = time.time()
    if any(a.method.needs_fit for a in arms):
        _reference_once(lm, split, preset.fit, progress)  # every fit shares pi0: compute (or load) it once, here
    stage_seconds["pi0"] = time.time() - t0
    ctx = StudyContext(preset, out, lm, probes, None if deferred else judges, text, split)
    samples = {"val": composition(ctx.val_q), "test": composition(ctx.test_q)}
    if progress:
        tqdm.write(f"validation questions {describe_composition(ctx.val_q)}\ntest questions {describe_composition(ctx.test_q)}")
    t0 = time.time()
    selections, arm_seconds, placement = run_arms(ctx, arms, backend, progress=progress, judge_spec=given_judges)
    stage_seconds.update(arm_seconds)  # per stage, summed over workers
    packing = stored_choices(out / "packing")  # each device's decision on packing the tau grids (`locaudit.packing`)
    if progress:
        for c in packing:
            tqdm.write(PackingChoice.from_dict(c).line())
    stage_seconds["arms_wall"] = time.time() - t0
    stage_seconds["total"] = time.time() - t_start
    selections = {a.name: selections.get(a.name) for a in arms}  # plan order
    atomic_write_json(out / "run.json", {"selections": selections, "judged": not deferred,
                                         "stage_seconds": stage_seconds, "workers": placement.get("workers"),
                                         "placement": placement,
                                         "packing": packing,
                                         "split_hash": split.hash, "n_val_questions": len(ctx.val_q),
                                         "n_test_questions": len(ctx.test_q), "samples": samples, "model": lm.name,
                                         "arch": {"n_layers": lm.arch.n_layers, "n_heads": lm.arch.n_heads,
                                                  "head_dim": lm.arch.head_dim, "family": lm.arch.family.name}})
    if deferred:
        return {"deferred": True, "run_dir": str(out), "n_trials": len(list((out / "trials").glob("*/*.json")))}
    return write_report(out)


def _reference_once(lm: LoadedModel, split, cfg: FitConfig, progress: bool) -> None:
    """pi0's log-probs of the pairs every fit of the study uses (cached on disk, so each fit only loads them)."""
    prepare_pairs(lm, preference_pairs(split.train), preference_pairs(split.val), cfg, progress=progress)


def judge_run(out: Path, judge: str = "default", progress: bool = True) -> dict:
    """Finish a run made with judge "none" (answers generated where no judge was available): score every stored
    answer with `judge`, choose each arm's hyper-parameter on the validation questions, and write the report
    (of the finished arms only, marked partial, if the run itself did not finish).
    Each trial is rewritten atomically when scored, so an interrupted call resumes; a trial scored by another
    judge version is scored again, so one report never mixes judges."""
    out = Path(out)
    if not (out / "config.json").is_file():
        raise LocauditError(f"{out} is not a locaudit run directory (no config.json); give the --out of `locaudit run`")
    config = read_json(out / "config.json")
    # an unfinished run (stopped by a time limit, say) is judged and reported as far as it got, marked partial;
    # rerunning the same `locaudit run` later finishes it
    run = read_json(out / "run.json") if (out / "run.json").is_file() else {"partial": True}
    judges = judges_mod.load_judges(judge, data_dir=config["preset"]["data"].get("data_dir"), progress=progress,
                                    processes=judges_mod.build_processes(4))
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
    study = build_settings(StudySettings, config["preset"]["study"], f"{out / 'config.json'} [study]")
    by_arm: dict[str, list[dict]] = {}
    for r in load_trials(out):
        by_arm.setdefault(r["arm"], []).append(r)
    selections = {}
    for name, rows in by_arm.items():
        method = method_of(rows[0])
        key = method.hyper
        if key is None:  # nothing to choose (the baseline)
            selections[name] = None
            continue
        order = [float(v) for v in method.grid(study)]
        val = sorted((r for r in rows if r["split"] == "val"), key=lambda r: order.index(float(r[key])))
        if val:
            selections[name] = select_value(tuple(r[key] for r in val), val)
        else:
            selections[name] = next((r.get(key) for r in rows if r["split"] == "test"), None)
    run.update(selections=selections, judged=True)
    for split_name in ("test", "val"):  # a partial run has no run.json to say these: read them off the trials
        n = next((r["n_questions"] for rows in by_arm.values() for r in rows if r["split"] == split_name), None)
        run.setdefault(f"n_{split_name}_questions", n)
    run.setdefault("model", config["preset"]["model"]["model"])
    atomic_write_json(out / "run.json", run)
    return write_report(out)
