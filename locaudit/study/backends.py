"""Execution backends: where the study's arms (and the audit's jobs, `audit.distributed`) run. Each is a frozen dataclass of its options that follows
`runner.ArmBackend`; `BACKENDS` names them and `make_backend` builds one from command-line options.

- `local` (the default, needs nothing): the arms in this process, or in `workers` spawned single-thread processes
  on this machine; on a machine with several GPUs, worker i loads the model on cuda:(i mod n_gpus).
- `ray` (`pip install locaudit[ray]`): the arms on a Ray cluster. As many workers as the cluster's nodes hold
  slots of `gpus_per_arm` GPUs and `cpus_per_arm` CPUs (at most `workers`, at most one per arm) each load the
  model and judges once, like a local worker, and run the arms sent to them, costliest first, each arm to the
  next free worker. The workers are Ray actors rather than one Ray task per arm: Ray does not reuse a GPU
  task's process (its CUDA context stays on the GPU of its first task), so a task per arm would reload the
  model for every arm, while an actor keeps its GPU and its model for the whole run.

Workers write every trial atomically straight into the run directory, so with Ray it must be on a filesystem
that every node mounts at the same path; each worker checks that it sees a file the driver wrote there and
can write there before it loads anything. Resume, reports and statistics read only the run directory, so they
do not depend on the backend.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
from collections.abc import Generator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from locaudit.errors import LocauditError
from locaudit.study.plan import Arm
from locaudit.study.runner import (
    ArmBackend,
    ArmResult,
    StudyContext,
    WorkerSetup,
    cpu_threads,
    default_workers,
    pool_init,
    pool_run,
)

RAY_MISSING = "--backend ray needs Ray, which is not installed; pip install locaudit[ray]"


@dataclass(frozen=True)
class LocalBackend:
    """The arms on this machine: in this process (one worker) or in `workers` spawned processes (default: one
    per CPU core up to 8 on a CPU; one per GPU on a GPU, unless the model's device names one GPU)."""

    workers: int | None = None
    name: ClassVar[str] = "local"

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise LocauditError(f"workers (--workers) must be at least 1, got {self.workers}")

    def run(self, ctx: StudyContext, arms: list[Arm], setup: WorkerSetup, progress: bool,
            record: dict) -> Generator[ArmResult, None, None]:
        n = min(self.workers or default_workers(ctx.lm.device, setup.device_spec), max(1, len(arms)))
        record.update(backend=self.name, workers=n)
        if n <= 1:
            runner = setup.local_runner(ctx, progress)
            with cpu_threads(ctx.lm, 1):
                for arm in arms:
                    yield runner.run(arm)
            return
        spawn = mp.get_context("spawn")
        counter = spawn.Value("i", 0)  # each worker takes the next index: its GPU where there are several
        with spawn.Pool(processes=n, initializer=pool_init, initargs=(setup, counter)) as pool:
            try:
                yield from pool.imap_unordered(pool_run, arms)
                pool.close()  # let the workers exit on their own, so no semaphore is left to the tracker
                pool.join()
            except BaseException:
                pool.terminate()  # Ctrl-C or a failed arm: stop the others; finished trials stay on disk
                raise


@dataclass(frozen=True)
class RayBackend:
    """The arms on a Ray cluster at `address` (None: $RAY_ADDRESS or the Ray instance this machine last started,
    else a new one here; "local": a new one here; "auto": an existing one only; or HOST:PORT of a head node). Each worker holds
    `gpus_per_arm` GPUs (default: 1 when the cluster has GPUs and the model is not on the CPU, else 0; a
    fraction shares a GPU) and `cpus_per_arm` CPUs; `workers` caps their number (default: as many as the
    cluster's nodes hold). The run directory must be on a filesystem shared by every node."""

    address: str | None = None
    gpus_per_arm: float | None = None
    cpus_per_arm: float = 1.0
    workers: int | None = None
    name: ClassVar[str] = "ray"

    def __post_init__(self):
        if self.gpus_per_arm is not None and not (
                self.gpus_per_arm >= 0 and (self.gpus_per_arm <= 1 or float(self.gpus_per_arm).is_integer())):
            raise LocauditError(f"gpus_per_arm (--gpus-per-arm) must be a fraction of one GPU or a whole number of "
                                f"GPUs, got {self.gpus_per_arm}")
        if not self.cpus_per_arm > 0:
            raise LocauditError(f"cpus_per_arm (--cpus-per-arm) must be positive, got {self.cpus_per_arm}")
        if self.workers is not None and self.workers < 1:
            raise LocauditError(f"workers (--workers) must be at least 1, got {self.workers}")
        import_ray()  # Ray missing fails now, before any model is loaded

    def run(self, ctx: StudyContext, arms: list[Arm], setup: WorkerSetup, progress: bool,
            record: dict) -> Generator[ArmResult, None, None]:
        ray = import_ray()
        own = not ray.is_initialized()  # a connection made here is closed here; a caller's is left open
        if own:
            self._connect(ray)
        marker = Path(setup.out) / f".ray-{setup.token}"
        workers = []
        try:
            gpus = self._gpus(ray, setup)
            nodes = [node for node in ray.nodes() if node.get("Alive")]
            slots = sum(_slots(node.get("Resources", {}), self.cpus_per_arm, gpus) for node in nodes)
            if slots == 0:
                raise LocauditError(f"no node of the Ray cluster has {self.cpus_per_arm:g} CPU(s) and {gpus:g} GPU(s) "
                                    f"free for an arm; lower --cpus-per-arm or --gpus-per-arm, or add nodes")
            n = min(slots, self.workers or slots, max(1, len(arms)))
            record.update(backend=self.name, workers=n, address=self.address, gpus_per_arm=gpus,
                          cpus_per_arm=self.cpus_per_arm, nodes=len(nodes))
            marker.write_text(setup.token)  # each worker checks it sees this file: the directory is shared
            # no restarts: a lost worker stops the run (its finished trials are on disk; a rerun resumes)
            worker_cls = ray.remote(RayArmWorker).options(num_cpus=self.cpus_per_arm, num_gpus=gpus)
            setup_ref = ray.put(setup)
            workers = [worker_cls.remote(setup_ref) for _ in range(n)]
            yield from _dispatch(ray, workers, arms)
        finally:
            for w in workers:
                ray.kill(w, no_restart=True)  # stops arms still running (an error, Ctrl-C); frees their GPUs
            marker.unlink(missing_ok=True)
            if own:
                ray.shutdown()

    def _connect(self, ray) -> None:
        where = self.address or os.environ.get("RAY_ADDRESS") or "this machine"
        try:
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise LocauditError(f"cannot connect to a Ray cluster at {where} ({' '.join(str(e).split())[:200]}); "
                                f"start one with `ray start --head` and give its address with --address") from None

    def _gpus(self, ray, setup: WorkerSetup) -> float:
        device = setup.device_spec
        gpus = self.gpus_per_arm
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and device != "cpu" else 0.0
        if gpus == 0 and device.startswith("cuda"):
            raise LocauditError(f"--device {device} needs a GPU for each arm, but the Ray cluster has no GPU or "
                                f"--gpus-per-arm is 0; give --gpus-per-arm, or --device auto or cpu")
        return float(gpus)


def _slots(resources: dict, cpus: float, gpus: float) -> int:
    """How many workers of `cpus` CPUs and `gpus` GPUs fit in a node's `resources`."""
    fits = [resources.get("CPU", 0) / cpus] + ([resources.get("GPU", 0) / gpus] if gpus > 0 else [])
    return int(min(fits) + 1e-9)


def _dispatch(ray, workers: list, arms: list[Arm]) -> Generator[ArmResult, None, None]:
    """Send the arms (in order) to the workers, one at a time each; yield each arm's result as it finishes."""
    queue = list(arms)
    running = {}
    for w in workers:
        if queue:
            arm = queue.pop(0)
            running[w.run.remote(arm)] = (w, arm)
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        w, arm = running.pop(ref)
        result = _result(ray, ref, arm)
        if queue:  # keep the worker busy while the caller records the result
            arm = queue.pop(0)
            running[w.run.remote(arm)] = (w, arm)
        yield result


def _result(ray, ref, arm: Arm) -> ArmResult:
    """An arm's result; a LocauditError or OSError raised on a worker is raised here as itself (one line), a
    worker lost with its node or process as one LocauditError line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (LocauditError, OSError)):
            raise e.cause from None
        raise
    except ray.exceptions.RayActorError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LocauditError(f"the Ray worker running arm {arm.name} was lost ({first}); finished trials are saved, "
                            f"rerun the same command to resume") from None


class RayArmWorker:
    """A Ray actor running arms (of a study, or an audit's jobs): on its first one it checks the run directory is
    shared and writable, then builds its runner (`setup.runner`: the model on the GPU Ray gave it, or the CPU)
    and keeps it for the ones after."""

    def __init__(self, setup: WorkerSetup):
        self.setup = setup
        self.runner = None

    def run(self, arm: Arm) -> ArmResult:
        if self.runner is None:
            setup = self.setup
            check_shared_dir(Path(setup.out), setup.token)
            gpu = bool(import_ray().get_gpu_ids())  # Ray shows the actor only its own GPUs: cuda is the first
            device = "cuda" if gpu and setup.device_spec != "cpu" else "cpu"
            self.runner = setup.runner(device)
        return self.runner.run(arm)


def check_shared_dir(out: Path, token: str) -> None:
    """On a worker: the run directory holds the driver's marker file (.ray-TOKEN), and a file can be written
    there; otherwise one LocauditError line saying which node cannot reach it."""
    host = socket.gethostname()
    try:
        seen = (out / f".ray-{token}").read_text() == token
    except OSError:
        seen = False
    if not seen:
        raise LocauditError(f"run directory {out} is not shared with Ray node {host} (it does not see the files the "
                            f"driver writes there); put --out on a filesystem every node mounts at the same path")
    probe = out / f".ray-{token}-{host}-{os.getpid()}"
    try:
        probe.write_text(token)
        probe.unlink()
    except OSError as e:
        raise LocauditError(f"run directory {out} is not writable from Ray node {host} ({e.strerror or e}); "
                            f"give an --out every node can write to") from None


def import_ray():
    """Ray, imported only when the ray backend is used (an optional extra: locaudit[ray])."""
    try:
        import ray
    except ImportError:
        raise LocauditError(RAY_MISSING) from None
    return ray


BACKENDS: dict[str, type] = {"local": LocalBackend, "ray": RayBackend}


def make_backend(name: str, **options) -> ArmBackend:
    """The backend `name` with the options given (None: the backend's default); an option that belongs to
    another backend is an error naming its flag."""
    cls = BACKENDS.get(name)
    if cls is None:
        raise LocauditError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    given = {k: v for k, v in options.items() if v is not None}
    takes = {f.name for f in fields(cls)}
    for key in given:
        if key not in takes:
            owners = [n for n, c in BACKENDS.items() if key in {f.name for f in fields(c)}]
            raise LocauditError(f"--{key.replace('_', '-')} applies to --backend {' or '.join(owners)}, not {name}; "
                                f"drop it or use --backend {owners[0]}")
    return cls(**given)
