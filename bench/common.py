"""Shared helpers for the benchmarks: machine record, timing, cold caches, results, the RATIO line.

Every benchmark module exposes `run(quick: bool) -> dict` and `main()`, loads the model itself (model load is
never timed), measures locaudit and its baseline side by side in one process on the same data, writes
`bench/results/<name>[-quick].json`, and ends by printing exactly one line `RATIO <name> <baseline/locaudit>`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
MODEL = os.environ.get("LOCAUDIT_BENCH_MODEL", "smollm2-135m")

# Bench-only dependencies (never part of locaudit's install). Versions checked against transformers 5.24 /
# torch 2.13.0+cpu: their requirements are satisfied by the installed torch, so pip keeps the CPU build;
# naming torch==2.13.0 in the same command makes pip refuse any plan that would replace it.
BENCH_DEPS = {"trl": "1.16.0", "peft": "0.21.2"}
PIP_COMMAND = (".venv/bin/python -m pip install " + " ".join(f"{k}=={v}" for k, v in BENCH_DEPS.items())
               + " torch==2.13.0")


def missing_bench_deps() -> list[str]:
    missing = []
    for name in BENCH_DEPS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    import torch

    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {k: _version(k) for k in ("torch", "transformers", "trl", "peft", "datasets", "accelerate",
                                              "numpy", "locaudit")},
        "loadavg_start": loadavg(),
    }


class Timer:
    """`with Timer() as t: ...` then `t.seconds` (wall clock, perf_counter)."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False


WARM_CACHES = ("models", "judges", "truthfulqa")


@contextlib.contextmanager
def cold_cache(cold: tuple[str, ...] = ("pi0", "activations")):
    """Point locaudit's cache (`$LOCAUDIT_CACHE`) at a temporary directory for the duration of the block.

    Every existing entry of the real cache is symlinked in (the dequantised model, judges, ...), except the
    names in `cold`, which start empty: so pi0 log-probs and activations are really computed, as in a first run,
    and the user's cache is never touched. Call after the model is loaded.
    """
    from locaudit.storage import cache_dir

    real = cache_dir()
    for shared in WARM_CACHES:  # one-time artefacts built inside the block are kept for later runs
        (real / shared).mkdir(parents=True, exist_ok=True)
    old = os.environ.get("LOCAUDIT_CACHE")
    tmp = Path(tempfile.mkdtemp(prefix="locaudit-bench-cache-"))
    try:
        for entry in real.iterdir():
            if entry.name not in cold:
                (tmp / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
        os.environ["LOCAUDIT_CACHE"] = str(tmp)
        yield tmp
    finally:
        if old is None:
            os.environ.pop("LOCAUDIT_CACHE", None)
        else:
            os.environ["LOCAUDIT_CACHE"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def load_lm():
    """The benchmark model (default: the embedded SmolLM2-135M), float32 on CPU, and its load time."""
    import torch

    from locaudit.models import load_model

    torch.manual_seed(SEED)
    with Timer() as t:
        lm = load_model(MODEL, device="cpu", dtype="float32")
    warm_up(lm)
    return lm, t.seconds


def warm_up(lm) -> None:
    """One small forward and backward (untimed), so first-call costs (kernel selection, allocator growth) are
    paid before any measurement, equally for locaudit and its baseline."""
    import torch

    ids = torch.randint(0, lm.tokenizer.vocab_size or 100, (2, 48))
    emb = lm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = lm.model(inputs_embeds=emb, use_cache=False)
    out.logits[:, -4:].float().logsumexp(-1).sum().backward()
    with torch.inference_mode():
        lm.model(input_ids=ids, use_cache=False)


def load_split(limit: int | None = None):
    from locaudit.config import DataConfig

    return DataConfig(seed=SEED, limit_questions=limit).load_split()


def result_path(name: str, quick: bool, ext: str = "json") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}{'-quick' if quick else ''}.{ext}"


def write_result(name: str, quick: bool, record: dict) -> Path:
    record = {"benchmark": name, "quick": quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": "python -m bench.run_all" + (" --quick" if quick else "") + f" (module bench.{name})",
              **record}
    record.setdefault("machine", machine_info())
    record["machine"]["loadavg_end"] = loadavg()
    path = result_path(name, quick)
    path.write_text(json.dumps(record, indent=2, default=_plain) + "\n")
    return path


def _plain(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def print_ratio(name: str, value: float) -> None:
    print(f"RATIO {name} {value:.2f}", flush=True)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cli(name: str, run) -> None:
    """Standard `python -m bench.<name> [--quick]` entry point: run, write JSON, print the RATIO line last."""
    ap = argparse.ArgumentParser(prog=f"python -m bench.{name}")
    ap.add_argument("--quick", action="store_true", help="reduced sizes (bench-quick)")
    args = ap.parse_args()
    _quiet()
    info = machine_info()
    record = run(args.quick)
    record.setdefault("machine", info)
    path = write_result(name, args.quick, record)
    log(f"wrote {path}")
    print_ratio(name, record["ratio"])


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:
        pass
