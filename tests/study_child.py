"""A tiny `locaudit run` for interruption tests: the real CLI (`python -m locaudit.cli run ...`, i.e. its argument
parsing, preset loading, error and Ctrl-C handling) and the real `locaudit.study.run_study`, on a tiny random Llama with a
deterministic hash judge instead of the embedded model and the trained judges.

    LOCAUDIT_CACHE=DIR python tests/study_child.py [--hang-at-trial N] run --preset tiny.toml --out RUN

`--hang-at-trial N` stops inside the atomic write of the N-th trial file, after its temporary file is written
and before it is renamed into place, so a test can kill the process at exactly that point (a half-finished
trial on disk, N-1 finished ones). Results do not depend on it. `run_cli(argv)` runs the same in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# smoke, made smaller: 12 arms, 18 trials (3 ITI arms x 2 alphas on validation), a few seconds on one CPU thread
PRESET_TOML = """\
[data]
limit_questions = 30
seed = 0

[study]
top_k = 3
n_random_sets = 2
n_single = 2
alphas = [5.0, 15.0]
taus = [0.1]
max_val_questions = 3
max_test_questions = 4

[fit]
epochs = 1
batch_size = 4
max_train_pairs = 4
max_val_pairs = 4
fmt = "plain"

[eval]
fmt = "plain"
max_new_tokens = 6
text_docs = 2
text_tokens = 24
batch_size = 8
"""


def write_preset(path: Path) -> Path:
    path = Path(path)
    path.write_text(PRESET_TOML)
    return path


class HashJudge:
    """Deterministic stand-in judge: P(yes) from a hash of (question, answer)."""

    def __init__(self, name: str):
        self.name = name

    def score(self, questions, answers):
        import numpy as np

        return np.array([int(hashlib.sha256(f"{self.name}|{q}|{a}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
                         for q, a in zip(questions, answers)])

    def info(self):
        return {"version": f"hash-{self.name}", "heldout_answer_acc": None, "heldout_question_acc": None}


@contextlib.contextmanager
def patched(hang_at_trial: int = 0):
    """`run_study` gets the tiny model and hash judges (and progress off); optionally hang in a trial write."""
    import torch

    from locaudit import storage
    from locaudit import study as ex
    from locaudit.study import LocalBackend
    from tests.conftest import make_tiny

    orig_run, orig_write, threads = ex.run_study, storage.atomic_write, torch.get_num_threads()

    def run_study(preset, out, progress=True, lm=None, judges=None, workers=None, backend=None):
        if backend is None:
            backend = LocalBackend(workers or 1)
        elif isinstance(backend, LocalBackend) and backend.workers is None:
            backend = LocalBackend(1)  # one process unless the command asks for more
        return orig_run(preset, out, progress=False, lm=lm or make_tiny("llama"),
                        judges=judges or (HashJudge("truth"), HashJudge("info")), backend=backend)

    n_trials = [0]

    def hanging_atomic_write(path, write):
        if "trials" not in Path(path).parts:
            return orig_write(path, write)
        n_trials[0] += 1

        def hang(tmp):
            write(tmp)
            if n_trials[0] == hang_at_trial:
                time.sleep(600)  # until the test kills us
        return orig_write(path, hang)

    torch.set_num_threads(1)
    ex.run_study = run_study
    if hang_at_trial:
        storage.atomic_write = hanging_atomic_write
    try:
        yield
    finally:
        ex.run_study, storage.atomic_write = orig_run, orig_write
        torch.set_num_threads(threads)


def run_cli(argv: list[str]) -> int:
    """`locaudit.cli.main(argv)` with the tiny model and hash judges, in this process."""
    from locaudit.cli import main

    with patched():
        return main(argv)


if __name__ == "__main__":
    # A shell that starts jobs in the background (CI runners, `cmd &`) makes them ignore SIGINT, and Python then
    # installs no KeyboardInterrupt handler. Restore it, as in a user's terminal where Ctrl-C reaches the study.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = sys.argv[1:]
    hang = 0
    if args[:1] == ["--hang-at-trial"]:
        hang, args = int(args[1]), args[2:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with patched(hang):
        sys.argv = ["locaudit", *args]
        runpy.run_module("locaudit.cli", run_name="__main__", alter_sys=True)
