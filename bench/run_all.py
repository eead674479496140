"""Run every benchmark: `python -m bench.run_all [--quick] [--only NAME ...]` (`make bench`, `make bench-quick`).

Each benchmark runs in its own subprocess (`python -m bench.<name>`), so no library state (threads, seeds,
PEFT-wrapped modules) leaks from one into the next; each loads the model itself (untimed). Their output is
streamed through; the `RATIO` / `STAGE` lines are collected into `bench/results/summary[-quick].json`.

`packed` (K edits fitted in one pass vs one after another) runs on the CPU here; `python -m bench.packed
--device cuda` measures it on a GPU. `ipo_train` needs TRL and PEFT, which are not locaudit dependencies. When
they are missing it is skipped with the install command, the other benchmarks still run, and the exit status is
3. Any failed benchmark: status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import PIP_COMMAND, loadavg, machine_info, missing_bench_deps, result_path

BENCHMARKS = ("ipo_train", "capture", "generate", "quick", "packed")
RESULT_NAMES = {"packed": "packed-cpu"}  # benchmarks whose result file names the device
ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run_all")
    ap.add_argument("--quick", action="store_true", help="reduced sizes; each finishes within ~5 minutes")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    args = ap.parse_args(argv)

    names = list(args.only or BENCHMARKS)
    info = machine_info()
    print(f"# locaudit benchmarks{' (--quick)' if args.quick else ''}: {info['cpu_model']}, {info['cpu_count']} CPUs, "
          f"torch {info['versions']['torch']} ({info['torch_threads']} threads), "
          f"transformers {info['versions']['transformers']}; load average {info['loadavg_start']}", flush=True)
    if info["loadavg_start"] and info["loadavg_start"][0] > 0.5 * (info["cpu_count"] or 1):
        print(f"# WARNING: load average {info['loadavg_start'][0]} on {info['cpu_count']} CPUs: other jobs are "
              f"using the machine, timings (and ratios) will be distorted", flush=True)
    status = 0
    summary = {"quick": args.quick, "machine": info, "benchmarks": {}}
    missing = missing_bench_deps()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t_all = time.perf_counter()
    for name in names:
        if name == "ipo_train" and missing:
            print(f"SKIP ipo_train: the bench-only packages {', '.join(missing)} are not installed (they are not "
                  f"locaudit dependencies). Install them into the venv with:\n  {PIP_COMMAND}", flush=True)
            summary["benchmarks"][name] = {"skipped": f"missing {', '.join(missing)}"}
            status = status or 3
            continue
        cmd = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if args.quick else [])
        print(f"## {name}: {' '.join(cmd[1:])}  (load average {loadavg()})", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
        entry = {"returncode": rc, "seconds": time.perf_counter() - t0,
                 "stages": {l.split()[1]: float(l.split()[2]) for l in lines if l.startswith("STAGE ")}}
        ratios = [l for l in lines if l.startswith("RATIO ")]
        if rc == 0 and ratios:
            entry["ratio"] = float(ratios[-1].split()[2])
            path = result_path(RESULT_NAMES.get(name, name), args.quick)
            if path.is_file():
                entry["result_file"] = str(path.relative_to(ROOT))
        else:
            print(f"FAILED {name} (exit status {rc})", flush=True)
            status = 1 if status in (0, 3) else status
        summary["benchmarks"][name] = entry
    elapsed = time.perf_counter() - t_all
    summary["seconds"] = elapsed
    summary["loadavg_end"] = loadavg()
    path = result_path("summary", args.quick)
    if args.only and path.is_file():  # a partial run updates its benchmarks' entries and keeps the others
        try:
            old = json.loads(path.read_text())
            runs = old.get("runs", [])
            runs.append({k: summary[k] for k in ("machine", "seconds", "loadavg_end")} | {"only": names})
            summary = {**old, "benchmarks": {**old.get("benchmarks", {}), **summary["benchmarks"]}, "runs": runs}
        except (json.JSONDecodeError, OSError):
            pass
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"# done in {elapsed:.0f}s; load average {loadavg()}")
    for name, e in summary["benchmarks"].items():
        print(f"#   {name:10s} " + (f"ratio {e['ratio']:.2f}  ({e['seconds']:.0f}s)" if "ratio" in e
                                    else e.get("skipped", f"failed (exit {e.get('returncode')})")))
    return status


if __name__ == "__main__":
    sys.exit(main())
