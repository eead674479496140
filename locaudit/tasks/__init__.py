"""Behaviours as tasks: data split by prompt, preference pairs, probe examples and per-item scores.

`load_task(spec)` resolves a task from its name: `truthfulqa`, `caa:<behaviour>` (sycophancy, refusal,
survival-instinct, corrigibility, myopic-reward, hallucination, coordinate-other-ais) or the path of a preference
JSONL file. Each kind is one entry of `TASKS`; a new behaviour is one new class there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from locaudit.errors import LocauditError
from locaudit.tasks.base import Item, ItemScores, PreferenceItemsTask, Task, TaskSplit, preference_scores, split_items
from locaudit.tasks.caa import BEHAVIOURS as CAA_BEHAVIOURS
from locaudit.tasks.caa import CAATask
from locaudit.tasks.preference import PreferenceFileTask, read_preference_file
from locaudit.tasks.truthfulqa import TruthfulQATask

# name -> factory(argument after "name:", or None); a path to a .jsonl file is the "jsonl" kind
TASKS: dict[str, Callable[[str | None], Task]] = {
    "truthfulqa": lambda arg: TruthfulQATask(data_dir=arg),
    "caa": lambda arg: CAATask(arg or ""),
    "jsonl": lambda arg: PreferenceFileTask(arg or ""),
}

_HELP = (f"use truthfulqa, caa:<behaviour> ({', '.join(CAA_BEHAVIOURS)}) or the path of a preference .jsonl file")


def load_task(spec: str | os.PathLike | Task) -> Task:
    """A task from its spec (module docstring) or the path of a preference file; a Task is returned as is."""
    if isinstance(spec, os.PathLike):
        return TASKS["jsonl"](os.fspath(spec))
    if not isinstance(spec, str):
        return spec
    text = spec.strip()
    name, _, arg = text.partition(":")
    arg = arg.strip()
    factory = TASKS.get(name.lower())
    if factory is None and (text.endswith(".jsonl") or Path(text).is_file()):
        return TASKS["jsonl"](text)
    if factory is None:
        raise LocauditError(f"unknown task '{spec}'; {_HELP}")
    if name.lower() == "caa" and not arg:
        raise LocauditError(f"'caa' needs a behaviour, as caa:<behaviour>; one of {', '.join(CAA_BEHAVIOURS)}")
    if name.lower() == "jsonl" and not arg:
        raise LocauditError("'jsonl' needs a path, as jsonl:<file>; or give the path of the .jsonl file itself")
    return factory(arg or None)


__all__ = ["CAATask", "CAA_BEHAVIOURS", "Item", "ItemScores", "PreferenceFileTask", "PreferenceItemsTask", "TASKS",
           "Task", "TaskSplit", "TruthfulQATask", "load_task", "preference_scores", "read_preference_file",
           "split_items"]
