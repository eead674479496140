"""Running the study's arms: each arm's trials (fit, validation trials, selection, test trial), in this process
or in parallel workers of an execution backend (`study.backends`: local processes, a Ray cluster).

Arms are independent of one another (each chooses its hyper-parameter on its own validation trials), so an arm
is the unit of parallel work. On a CPU, PyTorch's threads scale poorly on the small matrices of a ~100M-parameter
model (measured on 2 cores: one thread runs a fit at 0.72x the speed of two), so `workers` processes of one
thread each, each running whole arms, use the cores better (two on two cores finish a set of fits ~1.35x sooner
than one two-thread process). On CPU every trial runs on one thread whatever the number of workers, so results
do not depend on it. Every trial is still one atomic file: an interruption loses only the trials in progress,
and a rerun skips every finished one.

`run_arms` orders the arms and counts progress; where they run is its backend's business (`ArmBackend`). A worker,
wherever it runs, rebuilds the study's context from a `WorkerSetup` (`build_context`), so every backend writes
the same trial files.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from locaudit.data.examples import preference_pairs
from locaudit.errors import LocauditError
from locaudit.evaluation import judges as judges_mod
from locaudit.evaluation import metrics
from locaudit.evaluation.lm_metrics import text_metrics_for
from locaudit.interventions import load_intervention
from locaudit.methods import EditSource
from locaudit.models import DEFAULT_MODEL, LoadedModel
from locaudit.probes import ProbeResult
from locaudit.stages import load
from locaudit.storage import atomic_write_json, read_json
from locaudit.study.plan import Arm, Preset, StudySettings, edit_dir, select_value, trial_path
from locaudit.training import fit_summary

# the per-arm stages whose seconds are summed: each method's evaluation stage (`Method.stage`) and "ipo_train",
# the time of every fit
STAGES = ("iti", "ipo_train", "ipo_eval", "baseline")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(device: torch.device, spec: str | None = None) -> int:
    """One worker per core on a CPU (at most 8: each holds its own copy of the model); on a GPU one per visible
    GPU when the model's device `spec` (--device) names none in particular (auto, cuda), else (or unknown) one."""
    if device.type != "cpu":
        return max(1, torch.cuda.device_count()) if device.type == "cuda" and spec in ("auto", "cuda") else 1
    return max(1, min(available_cores(), 8))


def worker_device(spec: str, index: int) -> str:
    """Worker `index`'s device on this machine: cuda:(index mod n_gpus) when `spec` names no GPU in particular
    (auto, cuda) and CUDA is available, so workers spread over the GPUs; `spec` itself otherwise."""
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{index % torch.cuda.device_count()}"
    return spec


@dataclass
class StudyContext:
    """Everything an arm needs: built once in the main process, or rebuilt in each worker (`load`)."""

    preset: Preset
    out: Path
    lm: LoadedModel
    probes: ProbeResult
    judges: tuple | None  # None: judge "none" (answers stored, scored later by `judge_run`)
    text: object | None
    split: object

    @property
    def deferred(self) -> bool:
        return self.judges is None

    @property
    def val_q(self):
        n = self.preset.study.max_val_questions
        return self.split.val[:n] if n else self.split.val

    @property
    def test_q(self):
        n = self.preset.study.max_test_questions
        return self.split.test[:n] if n else self.split.test


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs to rebuild the study's context wherever it runs (`build_context`). `lm` is None when
    the model is reloaded from the preset's spec (cache), else the in-memory model itself (one built in memory,
    e.g. in tests); `judge_spec` None means the preset's judge, a string a judge spec, anything else the judge
    objects themselves; `split` is the data split, handed over so no worker needs the data directory; `token`
    names this run of the arms (the Ray backend's check that the run directory is shared uses it)."""

    preset: Preset
    out: Path
    lm: LoadedModel | None
    judge_spec: object
    deferred: bool
    split: object
    token: str

    @property
    def device_spec(self) -> str:
        """The device the model is asked for (`--device`): auto, cpu, cuda, cuda:1, ..."""
        return self.preset.model.device

    def runner(self, device: str) -> "ArmRunner":
        """A worker's runner with the study's context rebuilt on `device` (backends call this on each worker)."""
        return ArmRunner(build_context(self.on_device(device)))

    def local_runner(self, ctx: "StudyContext", progress: bool) -> "ArmRunner":
        """The runner in the calling process, over the context it already has."""
        return ArmRunner(ctx, progress=progress)

    def on_device(self, device: str) -> "WorkerSetup":
        """The same setup with the model loaded on `device` (an in-memory model stays where it is)."""
        if self.lm is not None or device == self.preset.model.device:
            return self
        return replace(self, preset=replace(self.preset, model=replace(self.preset.model, device=device)))


def build_context(setup: WorkerSetup) -> StudyContext:
    """A worker's study context: the model (loaded, or the one handed over), the judges, the text reference for
    CE/KL and the stored probes, as the main process built them. Trials run on one CPU thread (as in the main
    process), so results do not depend on where they run."""
    torch.set_num_threads(1)
    preset = setup.preset
    lm = setup.lm or load(preset.model)
    if setup.deferred:
        judges = None
    elif setup.judge_spec is not None and not isinstance(setup.judge_spec, str):
        judges = setup.judge_spec  # judge objects handed over by the caller
    else:
        judges = judges_mod.load_judges(setup.judge_spec or preset.eval.judge, data_dir=preset.data.data_dir,
                                        progress=False)
    ev = preset.eval
    text = text_metrics_for(lm, ev.text_source, n_docs=ev.text_docs, max_tokens=ev.text_tokens,
                            batch_size=ev.batch_size) if ev.text_docs > 0 else None
    out = Path(setup.out)
    return StudyContext(preset, out, lm, ProbeResult.load(out / "probes"), judges, text, setup.split)


ArmResult = tuple  # (arm name, selected value or None, {stage: seconds}, number of trials): `ArmRunner.run`'s


class ArmBackend(Protocol):
    """Where arms run (`study.backends`: "local", "ray"). `run` runs every arm, each with a runner built from
    `setup` (or, in this process, from `ctx` itself), and yields each arm's `ArmResult` as it finishes, in any
    order; it fills `record` with what run.json records of the placement (at least "backend" and "workers").
    Closing the iterator early (an error, Ctrl-C) stops the arms still running; finished trials stay on disk."""

    name: str

    def run(self, ctx: StudyContext, arms: list[Arm], setup: WorkerSetup, progress: bool,
            record: dict) -> Generator[ArmResult, None, None]: ...


class ArmRunner:
    """Runs arms in the current process: `run(arm)` -> (arm name, selected value, stage seconds, trials)."""

    def __init__(self, ctx: StudyContext, progress: bool = False):
        self.ctx = ctx
        self.progress = progress
        self.source = EditSource(ctx.lm, probes=ctx.probes, placement=ctx.preset.eval.iti_placement,
                                 train_pairs=preference_pairs(ctx.split.train), val_pairs=preference_pairs(ctx.split.val),
                                 fit=ctx.preset.fit, seed=ctx.preset.data.seed, progress=progress,
                                 packing=ctx.preset.study.packing, packing_store=Path(ctx.out) / "packing")

    def run(self, arm: Arm) -> tuple[str, float | None, dict[str, float], int]:
        seconds = dict.fromkeys(STAGES, 0.0)
        values = arm.grid(self.ctx.preset.study)
        n = 0
        if len(values) > 1:
            self._fit_grid(arm, values, seconds)
            val_rows = [self._trial(arm, v, "val", seconds) for v in values]
            n += len(values)
            if self.ctx.deferred:  # nothing to select on yet: keep every value's test trial
                for v in values:
                    self._trial(arm, v, "test", seconds)
                return arm.name, None, seconds, n + len(values)
            chosen = select_value(values, val_rows)
        else:
            chosen = values[0]
        self._trial(arm, chosen, "test", seconds)
        return arm.name, chosen, seconds, n + 1

    def _edit(self, arm: Arm, value, seconds):
        """The arm's edit at `value`: built by its method; a fitted edit is saved under `edits/` and reused."""
        ctx = self.ctx
        if not arm.method.needs_fit:
            return arm.method.build(self.source, arm.heads, value).edit
        d = edit_dir(ctx.out, arm, value)
        if (d / "edit.json").is_file():
            try:
                return load_intervention(d, ctx.lm.arch)
            except LocauditError:
                pass  # damaged edit files: refit below
        t = time.time()
        built = arm.method.build(self.source, arm.heads, value)
        summary = {"model": ctx.lm.name, "edit_label": arm.name, "split_hash": ctx.split.hash, **fit_summary(built.fit)}
        built.edit.save(d, extra=summary)
        seconds["ipo_train"] += time.time() - t
        return built.edit

    def _fit_grid(self, arm: Arm, values, seconds) -> None:
        """Fit the grid's edits not yet on disk together (`Method.build_grid`: one pack where the device's
        measurement says it pays) and save each where `_edit` finds it."""
        build_grid = getattr(arm.method, "build_grid", None)
        missing = [v for v in values if not (edit_dir(self.ctx.out, arm, v) / "edit.json").is_file()]
        if not arm.method.needs_fit or build_grid is None or len(missing) < 2:
            return
        t = time.time()
        for v, built in zip(missing, build_grid(self.source, arm.heads, missing)):
            summary = {"model": self.ctx.lm.name, "edit_label": arm.name, "split_hash": self.ctx.split.hash,
                       **fit_summary(built.fit)}
            built.edit.save(edit_dir(self.ctx.out, arm, v), extra=summary)
        seconds["ipo_train"] += time.time() - t

    def _trial(self, arm: Arm, value, split_name, seconds) -> dict:
        ctx = self.ctx
        path = trial_path(ctx.out, arm, value, split_name)
        if path.is_file():
            try:
                return read_json(path)
            except LocauditError:
                pass  # unreadable: redo the trial
        edit = self._edit(arm, value, seconds)
        t = time.time()
        ev = ctx.preset.eval
        # validation trials select the hyper-parameter (by True*Info); MC and CE/KL only on test trials unless the
        # preset asks for trade-off curves over the grid (eval.val_side_metrics)
        side = split_name == "test" or ev.val_side_metrics
        m = metrics.evaluate(ctx.lm, edit, ctx.val_q if split_name == "val" else ctx.test_q, ev.fmt,
                             judges=ctx.judges, mc=ev.mc and side, text_metrics=ctx.text if side else None,
                             batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens, edit_name=arm.name,
                             progress=False)
        fit_seconds = 0.0
        method = arm.method
        if method.needs_fit:
            meta = read_json(edit_dir(ctx.out, arm, value) / "edit.json")
            fit_seconds = meta.get("seconds", 0.0)
            m["fit"] = {k: meta.get(k) for k in ("best", "val_start", "n_train_pairs", "n_val_pairs", "seconds",
                                                 "status", "steps", "attempts", "val_curve")}
            m["fit"]["lr"] = (meta.get("config") or {}).get("lr")
        heads = "all" if method.scope == "all" else ("" if arm.heads is None else arm.heads.spec())
        m.update({"arm": arm.name, "group": arm.group, "method": method.name, "heads": heads,
                  "alpha": value if method.hyper == "alpha" else None,
                  "tau": value if method.hyper == "tau" else None,
                  "split": split_name, "eval_seconds": time.time() - t, "fit_seconds": fit_seconds})
        seconds[method.stage] += time.time() - t
        atomic_write_json(path, m)
        return m


def trial_count(arm: Arm, study: StudySettings, deferred: bool) -> int:
    n = len(arm.grid(study))
    return (n if n > 1 else 0) + (n if deferred else 1)


def run_arms(ctx: StudyContext, arms: list[Arm], backend: ArmBackend, progress: bool = True,
             judge_spec: object = None) -> tuple[dict, dict[str, float], dict]:
    """Run every arm on `backend` (skipping finished trials); returns ({arm: selected value}, summed stage
    seconds, the backend's placement record). Workers rebuild the context from the run directory, the cached
    model and judges, or the in-memory model and judges (`judge_spec`) they are given."""
    seconds = dict.fromkeys(STAGES, 0.0)
    selections: dict = {}
    record: dict = {}
    # costliest arms first (`Method.cost`: full alignment's fits, then the localized fits, ITI's validation and
    # test trials, the baseline last), so that parallel workers finish together instead of one running the last
    # long arm alone
    arms = sorted(arms, key=lambda a: -a.method.cost)
    setup = WorkerSetup(ctx.preset, Path(ctx.out).resolve(), portable_model(ctx.lm), judge_spec, ctx.deferred, ctx.split,
                        uuid.uuid4().hex)
    bar = tqdm(total=sum(trial_count(a, ctx.preset.study, ctx.deferred) for a in arms), desc="study trials",
               disable=not progress)
    results = backend.run(ctx, arms, setup, progress, record)
    try:
        for name, chosen, secs, n in results:
            selections[name] = chosen
            for k, v in secs.items():
                seconds[k] += v
            bar.update(n)
    finally:
        results.close()  # an error here or Ctrl-C: the backend stops the arms still running
        bar.close()
    return selections, seconds, record


class cpu_threads:
    """On a CPU model, run the block with `n` PyTorch threads (trials always run single-threaded)."""

    def __init__(self, lm: LoadedModel, n: int):
        self.active = lm.device.type == "cpu"
        self.n = n

    def __enter__(self):
        if self.active:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.old)
        return False


def portable_model(lm: LoadedModel):
    """What a worker needs to get the model: its spec (reloaded from the local cache), or the in-memory model
    itself when it has no spec to load from (a model built in memory, e.g. in tests)."""
    name = str(lm.name)
    if name == DEFAULT_MODEL or os.path.exists(name) or "/" in name:
        return None
    return lm


_WORKER: dict = {}


def pool_init(setup: WorkerSetup, counter) -> None:
    """A local worker process's start: take the next worker index from the shared `counter` (its GPU, where
    there are several) and build the context once for all the arms it will run."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _WORKER["runner"] = setup.runner(worker_device(setup.device_spec, index))


def pool_run(arm) -> ArmResult:
    return _WORKER["runner"].run(arm)
