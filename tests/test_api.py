"""The public API a notebook uses: the README's snippet runs as written, on the embedded model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import locaudit

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet() -> str:
    text = README.read_text()
    m = re.search(r"<!-- notebook-snippet[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README has no notebook snippet"
    return m.group(1)


def test_public_names_resolve():
    for name in locaudit.__all__:
        assert getattr(locaudit, name) is not None


@pytest.mark.integration
def test_readme_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    facts = [("What colour is the sky on a clear day?", "Blue.", "Green."), ("How many legs does a spider have?", "Eight.", "Six."),
             ("What is frozen water called?", "Ice.", "Steam."), ("Which planet do we live on?", "Earth.", "Mars."),
             ("What do bees make?", "Honey.", "Milk."), ("How many days are in a week?", "Seven.", "Ten.")]
    rows = []
    for i in range(30):
        q, good, bad = facts[i % len(facts)]
        rows.append({"prompt": f"Question {i}: {q}\nAnswer:", "chosen": " " + good, "rejected": " " + bad})
    rng.shuffle(rows)
    monkeypatch.chdir(tmp_path)
    Path("my_prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    scope: dict = {}
    exec(compile(snippet(), "README-snippet", "exec"), scope)
    fit, scores, task = scope["fit"], scope["scores"], scope["task"]
    assert fit.status in ("fixed_schedule", "converged", "step_cap") and fit.moved
    assert len(scores.ids) == len(task.split().test) == 6
    base = task.evaluate(scope["lm"], None, task.split().test)
    assert not np.allclose(scores.scores["h"], base.scores["h"])  # the fitted edit changed the model
    assert np.allclose(base.scores["h"], 0.0)
    out = capsys.readouterr().out.split()
    assert out[0] == fit.status and float(out[1]) == pytest.approx(scores.mean("pref_acc"))
