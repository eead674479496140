"""An audit's arms on an execution backend (`study.backends`: `local` worker processes, or a Ray cluster).

Each fitted or steered arm is one job (`AuditJob`: the arm and its taus), sent to a worker that rebuilds the
audit's run (`AuditSetup.runner`: the model loaded on its device, or the in-memory model handed over; the task,
the split, the claim and its heuristic's probes or vectors as the driver resolved them), fits the arm's tau
grid (packed where the device's measurement says it pays) and writes each trial atomically into the audit
directory, exactly as `AuditRun.run_trial` does in the calling process. So resume, statistics and reports read
the same files whatever ran them, and the driver only collects the records. Workers run on one CPU thread, like
the study's: an audit run on a backend gives the same trials as one run in a single-thread process.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from locaudit.audit.claims import Claim
from locaudit.audit.config import AuditConfig
from locaudit.models import LoadedModel, load_model
from locaudit.study.runner import ArmBackend, portable_model
from locaudit.tasks import Task, TaskSplit
from locaudit.units import UnitSet


@dataclass(frozen=True)
class AuditJob:
    """One arm's trials: every tau of its grid (fitted arms), or its single trial (none, steering)."""

    arm: object  # audit.run.Arm
    taus: tuple

    @property
    def name(self) -> str:
        return self.arm.name


class JobRunner:
    """Runs jobs over one `audit.run.AuditRun`: the arm's grid fitted together, then each trial (stored ones are
    read)."""

    def __init__(self, run):
        self.audit_run = run

    def run(self, job: AuditJob) -> tuple[str, list[dict]]:
        self.audit_run.fit_grid(job.arm)
        return job.name, [self.audit_run.run_trial(job.arm, tau) for tau in job.taus]


@dataclass(frozen=True)
class AuditSetup:
    """What a worker needs to rebuild the audit's run anywhere (the backends' `WorkerSetup` protocol: `out`,
    `token`, `device_spec`, `runner`, `local_runner`). `lm` is None when the model is reloaded by `model`
    (its spec: the embedded name, a HF id or a path) in `dtype`, else the in-memory model itself; `run_cls` is
    `audit.run.AuditRun` (handed over, so that this module does not import the one that calls it)."""

    run_cls: type

    model: str
    dtype: str
    device_spec: str
    lm: LoadedModel | None
    task: Task
    claim: UnitSet
    cfg: AuditConfig
    out: Path
    split: TaskSplit
    resolved: Claim | None
    token: str

    def runner(self, device: str) -> JobRunner:
        torch.set_num_threads(1)
        lm = self.lm or load_model(self.model, device=device, dtype=self.dtype)
        return JobRunner(self.run_cls(lm, self.task, self.claim, self.cfg, Path(self.out), self.split, progress=False,
                                  resolved=self.resolved))

    def local_runner(self, run, progress: bool) -> JobRunner:
        return JobRunner(run)


def jobs(arms: list, cfg: AuditConfig) -> list[AuditJob]:
    """The arms as jobs, costliest first (full alignment, the claim and random fits, steering, the baseline), so
    that parallel workers finish together."""
    cost = {"full": 0, "claim": 1, "random": 1, "claim-steer": 2, "random-steer": 2, "none": 3}
    out = [AuditJob(a, (None,) if a.kind == "none" or a.steers else tuple(cfg.taus)) for a in arms]
    return sorted(out, key=lambda j: cost[j.arm.kind])


def run_on_backend(run, arms: list, backend: ArmBackend, progress: bool) -> dict[str, list[dict]]:
    """Every arm's trials, run by `backend`'s workers (stored trials are read, not recomputed); the backend's
    placement (which backend, how many workers, ...) is kept in `run.placement`."""
    lm = run.lm
    setup = AuditSetup(run_cls=type(run), model=str(lm.name), dtype=str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                       device_spec=lm.device.type, lm=portable_model(lm), task=run.task, claim=run.claim,
                       cfg=run.cfg, out=Path(run.out).resolve(), split=run.split, resolved=run.resolved,
                       token=uuid.uuid4().hex)
    record: dict = {}
    trials: dict[str, list[dict]] = {}
    results = backend.run(run, jobs(arms, run.cfg), setup, progress, record)
    try:
        for name, records in results:
            trials[name] = records
    finally:
        results.close()  # an error or Ctrl-C: the backend stops the jobs still running
    run.placement = record
    return trials
