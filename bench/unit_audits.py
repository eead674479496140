"""The README's unit-type experiment: one behaviour, three heuristics' claims of three unit kinds, each audited
against random sets of its own kind and size and against full alignment.

    python -m bench.unit_audits [--task caa:refusal] [--preset bench/presets/audit_caa_cpu.toml]
                                [--claims atp-neurons:16 sweep probe:16] [--out runs/unit-audits]

Each claim is one `locaudit.audit` run (`--no-steering`) under OUT/<claim>. The unedited model and full alignment
do not depend on the claim, so after the first audit their trials (and full alignment's edit) are copied into
the next audit's directory, which reads them as finished trials instead of fitting full alignment again; the
audits are checked to share model, task, split and settings. Finished audits are read back on a rerun (and
summarized again by the code of the rerun; the first run's wall times are kept). Writes
bench/results/unit-audits-<task>.json: every audit's arms, statistics, verdict, wall time and the seconds its
trials recorded (fit and evaluation of each arm, unchanged by resuming), and the machine.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

from bench.common import machine_info
from locaudit.audit import AuditConfig, audit
from locaudit.models import load_model
from locaudit.storage import atomic_write_json

RESULTS = Path(__file__).parent / "results"
SHARED_ARMS = ("none", "full")


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", spec).strip("-")


def _share(src: Path, dst: Path) -> list[str]:
    """Copy the claim-independent arms' trials and edits from a finished audit into `dst` (where absent)."""
    copied = []
    for arm in SHARED_ARMS:
        for path in [src / "trials" / arm, *sorted((src / "edits").glob(f"{arm}-*"))]:
            target = dst / path.relative_to(src)
            if path.is_dir() and not target.exists():
                shutil.copytree(path, target)
                copied.append(str(path.relative_to(src)))
    return copied


def _same_setting(a: Path, b: Path) -> bool:
    ra, rb = (json.loads((d / "audit.json").read_text()) for d in (a, b))
    keys = ("version", "model", "task", "config")
    return all(ra[k] == rb[k] for k in keys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="caa:refusal")
    ap.add_argument("--preset", default=str(Path(__file__).parent / "presets" / "audit_caa_cpu.toml"))
    ap.add_argument("--claims", nargs="+", default=["atp-neurons:16", "sweep", "probe:16"])
    ap.add_argument("--out", default="runs/unit-audits")
    args = ap.parse_args(argv)

    out = Path(args.out) / _slug(args.task)
    result_file = RESULTS / f"unit-audits-{_slug(args.task)}.json"
    # a rerun reads the stored trials (and re-summarizes them with this code): keep the first run's wall times
    prev = json.loads(result_file.read_text()) if result_file.is_file() else {}
    prev_walls = {a["dir"]: a.get("first_run_wall_seconds", a["wall_seconds_this_call"])
                  for a in prev.get("audits", []) if a.get("dir", "").startswith(str(out))}
    cfg = AuditConfig.from_preset(args.preset, steering=False)
    machine = machine_info()
    lm = load_model()
    rows, first = [], None
    t_all = time.time()
    for spec in args.claims:
        d = out / _slug(spec)
        d.mkdir(parents=True, exist_ok=True)
        shared = _share(first, d) if first is not None else []
        t0 = time.time()
        result = audit(spec, args.task, d, cfg, lm=lm)
        wall = time.time() - t0
        if first is not None and not _same_setting(first, d):
            raise SystemExit(f"{d} and {first} are audits with different settings; their shared arms do not apply")
        first = first or d
        res = json.loads((d / "results.json").read_text())
        # the arms' fit + evaluation seconds as their trial files recorded them (the same across resumed calls);
        # the shared arms count in the audit that computed them
        trial_seconds = sum(json.loads(p.read_text()).get("seconds", 0.0) for p in d.glob("trials/*/*.json")
                            if d == first or p.parent.name not in SHARED_ARMS)
        rows.append({"claim": spec, "dir": str(d), "shared_from_first": shared, "wall_seconds_this_call": wall,
                     "trial_seconds": trial_seconds,
                     "first_run_wall_seconds": prev_walls.get(str(d), wall), "claim_units": res["claim"],
                     **{k: res[k] for k in ("heuristic", "primary", "n_test_items", "null", "frac_full",
                                            "random_frac_full", "strength", "verdict", "wall_seconds", "arms")}})
        print(result.verdict, flush=True)
    record = {"benchmark": "unit_audits", "task": args.task, "preset": args.preset, "model": lm.name,
              "config": json.loads(json.dumps(cfg.__dict__, default=lambda o: getattr(o, "__dict__", str(o)))),
              "machine": machine, "wall_seconds_total": time.time() - t_all,
              "first_run_wall_seconds_total": prev.get("first_run_wall_seconds_total", prev.get("wall_seconds_total"))
              if prev_walls else time.time() - t_all, "audits": rows,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(result_file, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
