"""Interrupting `locaudit run` and running the same command again.

A tiny study (tests/study_child.py: `python -m locaudit.cli run` on a tiny random Llama with a hash judge) is
started in a subprocess and killed while it is writing a trial file (Ctrl-C, and separately kill -9). Then the
same command is run again (in this process, through the same CLI entry point) and must
- reuse every trial finished before the kill byte for byte,
- never take a temporary (half-written) file for a finished trial, and tolerate the ones kill -9 leaves,
- end with the same results.csv (but the `seconds` column), trial records and edits as an uninterrupted run
  with the same seed (computed here in parallel with the children). That is also the determinism test:
  same command, same seed, other processes (other hash seeds) give identical results on CPU.
Ctrl-C must print one line and exit with 130.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from locaudit.cli import INTERRUPTED
from tests.study_child import run_cli, write_preset

CHILD = Path(__file__).with_name("study_child.py")
ROOT = CHILD.parents[1]
MIN_DONE = 4  # the child hangs while writing trial MIN_DONE + 1 (its temporary file on disk, not yet renamed)
TIMING_KEYS = {"seconds", "eval_seconds", "fit_seconds", "timings"}


class Interrupted:
    """A child study killed with `sig` in the middle of writing a trial."""

    def __init__(self, tmp: Path, name: str, sig: int, hash_seed: str):
        self.out, self.cache, self.sig = tmp / name, tmp / f"cache-{name}", sig
        self.argv = ["run", "--preset", str(tmp / "tiny.toml"), "--out", str(self.out)]
        env = {**os.environ, "LOCAUDIT_CACHE": str(self.cache), "PYTHONHASHSEED": hash_seed,
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, str(CHILD), "--hang-at-trial", str(MIN_DONE + 1), *self.argv],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.tmp_seen: list[Path] = []
        self.error: str | None = None
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self, timeout: float = 240.0) -> None:
        trials = self.out / "trials"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.error = f"the study finished (rc={self.proc.returncode}) before it could be interrupted"
                return
            done = list(trials.glob("*/*.json"))
            partial = list(trials.glob("*/.*.tmp")) if len(done) >= MIN_DONE else []  # then only the hanging write's
            if partial:
                self.proc.send_signal(self.sig)
                self.tmp_seen = partial
                return
            time.sleep(0.01)
        self.proc.kill()
        self.error = "timed out waiting for trials"

    def finish(self) -> tuple[int, str]:
        self.thread.join()
        _, err = self.proc.communicate(timeout=600)
        assert self.error is None, f"{self.error}\n{err}"
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start both interrupted children, compute the uninterrupted reference meanwhile, wait for the kills."""
    tmp = tmp_path_factory.mktemp("resume")
    write_preset(tmp / "tiny.toml")
    children = {"sigint": Interrupted(tmp, "sigint", signal.SIGINT, "1"),
                "sigkill": Interrupted(tmp, "sigkill", signal.SIGKILL, "2")}
    ref = tmp / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAUDIT_CACHE", str(tmp / "cache-reference"))
        assert run_cli(["run", "--preset", str(tmp / "tiny.toml"), "--out", str(ref)]) == 0
    results = {name: (child, *child.finish()) for name, child in children.items()}
    return ref, results


def rerun(child: Interrupted, monkeypatch) -> None:
    """The same command again, through the same CLI entry point, with the child's cache."""
    monkeypatch.setenv("LOCAUDIT_CACHE", str(child.cache))
    assert run_cli(child.argv) == 0


def finished(out: Path) -> dict[Path, bytes]:
    return {p.relative_to(out): p.read_bytes() for p in sorted((out / "trials").glob("*/*.json"))}


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def results_without_seconds(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def assert_same_results(out: Path, ref: Path) -> None:
    assert results_without_seconds(out) == results_without_seconds(ref)
    mine, theirs = finished(out), finished(ref)
    assert mine.keys() == theirs.keys()
    for rel in mine:
        assert strip_timing(json.loads(mine[rel])) == strip_timing(json.loads(theirs[rel])), rel
    edits = sorted(p.relative_to(ref) for p in (ref / "edits").rglob("edit.safetensors"))
    assert edits and edits == sorted(p.relative_to(out) for p in (out / "edits").rglob("edit.safetensors"))
    for rel in edits:  # training is deterministic too: the same weights, bit for bit
        assert (out / rel).read_bytes() == (ref / rel).read_bytes(), rel


def test_reference_run_is_complete(runs):
    ref, _ = runs
    rows = results_without_seconds(ref)
    assert len(rows) == len(finished(ref)) >= 15
    assert not list(ref.rglob("*.tmp"))


def test_ctrl_c_then_resume(runs, monkeypatch):
    ref, results = runs
    child, rc, err = results["sigint"]
    assert rc == 130, err
    assert err.rstrip("\n").split("\n")[-1] == INTERRUPTED and "Traceback" not in err, err
    assert child.tmp_seen, "the child was not interrupted mid-write"
    assert not list(child.out.rglob(".*.tmp")), "Ctrl-C left a temporary file behind"
    before = finished(child.out)
    assert len(before) == MIN_DONE < len(finished(ref))
    assert not (child.out / "results.csv").exists()

    rerun(child, monkeypatch)
    after = finished(child.out)
    assert {rel: after[rel] for rel in before} == before  # finished trials reused, unchanged
    assert_same_results(child.out, ref)


def test_kill_9_then_resume(runs, monkeypatch):
    ref, results = runs
    child, rc, err = results["sigkill"]
    assert rc == -signal.SIGKILL, err
    leftovers = list(child.out.rglob(".*.tmp"))
    assert leftovers, "kill -9 mid-write should leave the temporary file"
    before = finished(child.out)
    assert len(before) == MIN_DONE < len(finished(ref))

    # Make the leftovers as tempting as possible: a complete, plausible trial under a temporary name of a
    # trial that is not finished, and a half-written one. Neither may ever be read as a result.
    unfinished = min(set(finished(ref)) - set(before))
    fake = json.loads(finished(ref)[unfinished])
    fake.update(truth=1.0, info=1.0, truth_info=1.0)
    (child.out / unfinished).parent.mkdir(parents=True, exist_ok=True)
    (child.out / unfinished.parent / f".{unfinished.name}.planted.tmp").write_text(json.dumps(fake))
    (child.out / unfinished.parent / f".{unfinished.name}.half.tmp").write_text('{"arm": "')
    # and a finished trial damaged after the fact (not by locaudit, whose writes are atomic): redone, not trusted
    damaged = sorted(before)[1]
    (child.out / damaged).write_text((child.out / damaged).read_text()[:40])

    rerun(child, monkeypatch)
    after = finished(child.out)
    assert {rel: after[rel] for rel in before if rel != damaged} == {rel: b for rel, b in before.items() if rel != damaged}
    assert after[damaged] != before[damaged]
    assert_same_results(child.out, ref)
    assert json.loads((child.out / "results.json").read_text())["rows"].__len__() == len(finished(ref))
