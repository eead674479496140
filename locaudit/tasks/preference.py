"""A researcher's own behaviour as preference pairs in a JSONL file, in TRL's preference format.

One JSON object per line:
- standard: {"prompt": "text", "chosen": "text", "rejected": "text"}: prompt and answer are concatenated as
  written (TRL does the same; put any chat markup in the prompt yourself);
- conversational: {"prompt": [{"role": "user", "content": ...}, ...], "chosen": [{"role": "assistant",
  "content": ...}], "rejected": [...]}: the prompt is rendered with the model's chat template and a generation
  prompt, the answer is the assistant's content;
- locaudit's older form {"question", "chosen", "rejected"} (optional integer "qid") is read as the standard
  form in locaudit's `plain` format (`Q: {question}\\nA: {answer}`).
An optional text field "group" stratifies the split. Lines with the same prompt form one item (one prompt, several
pairs), so the split never puts one prompt on both sides. Scored by held-out preference accuracy (primary),
log-prob margin and IPO loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from locaudit.data.examples import jsonl_objects
from locaudit.data.formats import PromptFormat
from locaudit.errors import LocauditError
from locaudit.heads import show
from locaudit.models import LoadedModel
from locaudit.tasks.base import Item, PreferenceItemsTask

_HELP = ('write one JSON object per line: {"prompt": ..., "chosen": ..., "rejected": ...} with text values, '
         'or lists of {"role", "content"} messages for conversational data')
_FORMAT_OF = {"standard": "raw", "conversational": "messages", "question": "plain"}


def _text(value, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise LocauditError(f"{where}: field '{key}' must be non-empty text, got {show(json.dumps(value))}; {_HELP}")
    return value


def _messages(value, key: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise LocauditError(f"{where}: field '{key}' must be a non-empty list of messages, got {show(json.dumps(value))}")
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LocauditError(f"{where}: every message in '{key}' needs text 'role' and 'content', got {show(json.dumps(m))}")
    return value


def _answer(value, key: str, where: str) -> str:
    msgs = _messages(value, key, where)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant" or not msgs[0]["content"].strip():
        raise LocauditError(f"{where}: '{key}' must be one non-empty assistant message, got {show(json.dumps(value))}")
    return msgs[0]["content"]


def _form(obj: dict) -> str:
    if "prompt" in obj:
        return "conversational" if isinstance(obj["prompt"], list) else "standard"
    if "question" in obj:
        return "question"
    raise LocauditError("missing field 'prompt'")


def read_preference_file(path: str | os.PathLike) -> tuple[list[Item], str]:
    """Items (pairs grouped by prompt, in order of first appearance) and the file's form (standard,
    conversational or question); every malformed line raises one LocauditError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise LocauditError(f"preference file {show(str(path), 80)} not found; give a JSONL file ({_HELP})")
    form = None
    prompts: dict[str, int] = {}
    pairs: list[list[tuple[str, str]]] = []
    groups: list[str] = []
    for n, where, obj in jsonl_objects(path, _HELP):
        try:
            this = _form(obj)
        except LocauditError as e:
            raise LocauditError(f"{where}: {e}; {_HELP}") from None
        missing = [k for k in ("chosen", "rejected") if k not in obj]
        if missing:
            raise LocauditError(f"{where}: missing field(s) {', '.join(missing)}; {_HELP}")
        if form is None:
            form = this
        elif this != form:
            raise LocauditError(f"{where}: a {this} line in a file of {form} lines; use one form for the whole file")
        if this == "conversational":
            prompt = json.dumps(_messages(obj["prompt"], "prompt", where), ensure_ascii=False)
            chosen, rejected = _answer(obj["chosen"], "chosen", where), _answer(obj["rejected"], "rejected", where)
        else:
            key = "prompt" if this == "standard" else "question"
            prompt = _text(obj[key], key, where)
            chosen, rejected = _text(obj["chosen"], "chosen", where), _text(obj["rejected"], "rejected", where)
            if this == "question":
                prompt, chosen, rejected = prompt.strip(), chosen.strip(), rejected.strip()
        if chosen == rejected:
            raise LocauditError(f"{where}: chosen and rejected answers are identical; a pair needs two different answers")
        group = obj.get("group", "")
        if not isinstance(group, str):
            raise LocauditError(f"{where}: 'group' must be text, got {show(json.dumps(group))}")
        k = prompts.setdefault(prompt, len(prompts))
        if k == len(pairs):
            pairs.append([])
            groups.append(group)
        elif groups[k] != group:
            raise LocauditError(f"{where}: this prompt was given group {groups[k]!r} before and {group!r} here; "
                                f"give each prompt one group")
        pairs[k].append((chosen, rejected))
    if form is None:
        raise LocauditError(f"{path} has no preference pairs; {_HELP}")
    items = [Item(k, p, tuple(pairs[k]), groups[k]) for p, k in prompts.items()]
    return items, form


class PreferenceFileTask(PreferenceItemsTask):
    """Preference pairs from a JSONL file (module docstring); `name` is the file's stem."""

    what = "prompts"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._items, self.form = read_preference_file(self.path)
        self.name = f"jsonl:{self.path.name}"

    def items(self) -> list[Item]:
        return list(self._items)

    def prompt_format(self, lm: LoadedModel | None = None) -> PromptFormat:
        return PromptFormat(_FORMAT_OF[self.form])

    def spec(self) -> str:
        return str(self.path)
