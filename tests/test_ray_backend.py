"""Execution backends: the tiny smoke study of tests/test_study.py run on a local Ray instance (2 CPUs, two
workers) writes the same results as the local backend, and so does an audit (on Ray and on local worker
processes, against the same audit run in this process); a Ray worker that cannot see the run directory, a
missing Ray and options of the wrong backend each fail in one line."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import pytest
import torch

from locaudit.errors import LocauditError
from locaudit.study import LocalBackend, RayBackend, make_backend, run_study
from locaudit.study.backends import _slots, check_shared_dir
from locaudit.storage import read_json
from tests.conftest import make_tiny
from tests.study_child import HashJudge
from tests.test_study import tiny_preset

ROOT = Path(__file__).resolve().parents[1]


def run_on(out: Path, backend):
    """The smoke study of tests/test_study.py (tiny Llama, hash judges) on `backend`."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_study(tiny_preset(), out, progress=False, lm=make_tiny("llama"),
                         judges=(HashJudge("truth"), HashJudge("info")), backend=backend)
    finally:
        torch.set_num_threads(old)


def audit_on(out: Path, backend, tmp: Path):
    """An audit of two heads with steering arms on the tiny Llama, on `backend`, checked against the same audit
    run in this process (both on one thread): every arm's trials and the statistics equal."""
    from locaudit.audit import AuditConfig, audit
    from tests.test_audit import FAST, write_pairs

    data = write_pairs(tmp / "pairs.jsonl")
    # packing pinned: "auto" times both ways in each audit directory and may choose differently (results equal
    # only to rounding then)
    cfg = AuditConfig(n_random=2, fit=FAST, taus=(0.1, 0.3), alphas=(5.0, 15.0), meandiff_alphas=(1.0, 4.0),
                      packing="on")
    lm = make_tiny("llama")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = audit("L0H1,L2H3", data, tmp / "audit-here", cfg, lm=lm, progress=False)
        there = audit("L0H1,L2H3", data, out, cfg, lm=lm, progress=False, backend=backend)
    finally:
        torch.set_num_threads(old)
    assert there.config["placement"]["backend"] == backend.name and here.config["placement"]["backend"] == "this process"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]  # noqa: E731
    assert strip(there.rows) == strip(here.rows) and len(there.rows) == 8  # none, claim, 2 random, full, 3 steering
    assert repr((there.null, there.frac_full, there.verdict)) == repr((here.null, here.frac_full, here.verdict))
    for f in sorted((tmp / "audit-here" / "trials").glob("*/*.json")):
        a, b = read_json(f), read_json(out / f.relative_to(tmp / "audit-here"))
        for r in (a, b):
            r.pop("seconds")
            if "fit" in r:
                r["fit"].pop("seconds")
        assert a == b, f.name
    return there


def test_audit_on_local_worker_processes(tmp_path):
    """The local backend's worker processes (spawned, one thread each) give the in-process audit's trials."""
    res = audit_on(tmp_path / "audit-pool", LocalBackend(2), tmp_path)
    assert res.config["placement"] == {"backend": "local", "workers": 2}


def rows_without_seconds(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_ray_backend_gives_the_local_results(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install locaudit[ray])")
    run_on(tmp_path / "local", LocalBackend(1))

    # Ray's worker processes inherit the environment of the instance started here (this checkout first on the
    # path, so they import this locaudit and the tests' hash judge; the test's cache)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        run_on(tmp_path / "ray", RayBackend(cpus_per_arm=1))
        # an audit's arms on the same Ray instance: the same trials as one after another in this process
        audit_on(tmp_path / "audit-ray", RayBackend(cpus_per_arm=1), tmp_path)
        # a run directory the workers do not share: here the driver's marker file never reaches the disk
        write_text = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: None if self.name.startswith(".ray-")
                            else write_text(self, *a, **k))
        with pytest.raises(LocauditError, match=r"^run directory .*unshared is not shared with Ray node \S+ "
                                                r"\(it does not see the files the driver writes there\); put --out") as e:
            run_on(tmp_path / "unshared", RayBackend(cpus_per_arm=1, workers=1))
        assert "\n" not in str(e.value) and not list((tmp_path / "unshared" / "trials").glob("*/*.json"))
    finally:
        ray.shutdown()

    local, remote = rows_without_seconds(tmp_path / "local" / "results.csv"), rows_without_seconds(tmp_path / "ray" / "results.csv")
    assert len(remote) == len(local) > 12 and remote == local
    placement = read_json(tmp_path / "ray" / "run.json")["placement"]
    assert placement["backend"] == "ray" and placement["workers"] == 2 and placement["gpus_per_arm"] == 0.0
    assert read_json(tmp_path / "ray" / "run.json")["selections"] == read_json(tmp_path / "local" / "run.json")["selections"]
    assert not list((tmp_path / "ray").glob(".ray-*"))  # the shared-directory marker is removed


def test_worker_checks_the_run_directory(tmp_path):
    """A worker that does not see the driver's marker file (a directory not shared with its node) refuses the
    run in one line; with the marker it passes and leaves nothing behind."""
    with pytest.raises(LocauditError, match=r"not shared with Ray node .*filesystem every node mounts"):
        check_shared_dir(tmp_path, "abc")
    (tmp_path / ".ray-abc").write_text("abc")
    check_shared_dir(tmp_path, "abc")
    assert [p.name for p in tmp_path.iterdir()] == [".ray-abc"]
    (tmp_path / ".ray-abc").write_text("another run")
    with pytest.raises(LocauditError, match="not shared"):
        check_shared_dir(tmp_path, "abc")


def test_slots_per_node():
    assert _slots({"CPU": 16.0, "GPU": 4.0}, 1.0, 1.0) == 4
    assert _slots({"CPU": 16.0, "GPU": 4.0}, 1.0, 0.5) == 8
    assert _slots({"CPU": 3.0, "GPU": 4.0}, 1.0, 0.5) == 3  # CPUs run out first
    assert _slots({"CPU": 2.0}, 1.0, 1.0) == 0  # no GPU on this node
    assert _slots({"CPU": 2.0}, 0.5, 0.0) == 4
    assert _slots({"CPU": 1.0, "GPU": 1.0}, 1.0 / 3, 1.0 / 3) == 3  # thirds of a GPU: not 2 by rounding


def test_local_workers_spread_over_the_gpus(monkeypatch):
    """The local backend's placement on a machine with 3 GPUs (CUDA's answers stood in for): one worker per GPU
    by default, worker i on cuda:(i mod 3) unless --device names a GPU or the CPU."""
    from locaudit.study.runner import default_workers, worker_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert [worker_device("auto", i) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]
    assert worker_device("cuda", 4) == "cuda:1" and worker_device("cuda:2", 4) == "cuda:2"
    assert worker_device("cpu", 1) == "cpu"
    cuda = torch.device("cuda", 0)
    assert default_workers(cuda, "auto") == default_workers(cuda, "cuda") == 3
    assert default_workers(cuda, "cuda:1") == default_workers(cuda) == 1


def test_options_of_another_backend_and_missing_ray(monkeypatch, capsys):
    from locaudit.cli import main

    assert main(["run", "--preset", "smoke", "--address", "host:6379"]) == 2
    assert capsys.readouterr().err.strip() == ("locaudit: error: --address applies to --backend ray, not local; "
                                               "drop it or use --backend ray")
    with pytest.raises(LocauditError, match="unknown backend 'slurm'; use one of local, ray"):
        make_backend("slurm")
    assert make_backend("local", workers=3, address=None) == LocalBackend(3)

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # `import ray` fails as if it were not installed
    assert main(["run", "--preset", "smoke", "--backend", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install locaudit[ray]" in err and err.startswith("locaudit: error: ")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_placements_agree(tmp_path, monkeypatch):
    """On a GPU machine, with a model loaded from a directory (device auto, so every worker reloads it on its
    GPU): in this process, in two local worker processes (worker i on cuda:i mod n_gpus), on Ray with one GPU per
    worker and with half a GPU each, the results are the same, and not those of the CPU (float32)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install locaudit[ray])")
    from dataclasses import replace

    from locaudit.config import ModelConfig

    lm = make_tiny("llama")
    model_dir = tmp_path / "tiny-llama"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    n_gpus = torch.cuda.device_count()

    def run(name, backend, device="auto"):
        preset = replace(tiny_preset(), model=ModelConfig(str(model_dir), device, "auto"))
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_study(preset, tmp_path / name, progress=False, judges=(HashJudge("truth"), HashJudge("info")),
                      backend=backend)
        finally:
            torch.set_num_threads(old)
        return rows_without_seconds(tmp_path / name / "results.csv"), read_json(tmp_path / name / "run.json")["placement"]

    cpu, _ = run("cpu", LocalBackend(1), device="cpu")
    gpu, placement = run("gpu", LocalBackend(1))
    assert placement == {"backend": "local", "workers": 1} and gpu != cpu
    pool, placement = run("gpu-pool", LocalBackend(2))
    assert placement["workers"] == 2 and pool == gpu

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(address="local", num_cpus=4, num_gpus=n_gpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        whole, placement = run("ray", RayBackend())
        assert placement["gpus_per_arm"] == 1.0 and placement["workers"] == n_gpus and whole == gpu
        halves, placement = run("ray-half", RayBackend(gpus_per_arm=0.5))
        assert placement["gpus_per_arm"] == 0.5 and placement["workers"] == 2 * n_gpus and halves == gpu
    finally:
        ray.shutdown()
