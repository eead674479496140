"""Batched greedy generation of answers to questions, under whatever edit is attached to the model.

Greedy decoding (argmax at every step, as ITI's `top_k=1`) with a KV cache, at most `max_new_tokens` (50, as
ITI) new tokens, and per-row stopping: a row stops at an EOS / end-of-turn token or once its text holds the end
of the answer (`qa`/`plain`: a newline or "Q:" after the answer started; `chat`: "\\nQ:"); a batch stops when
every row has. Rows are batched by prompt length and answers come back in input order. Prompts are tokenised
exactly as MC scoring tokenises them (`scoring.encode_prefix` + `scoring.encode`), so generation and MC see the
same prompt tokens.

Batch layout. Each row is `[shared prefix | padding | rest of its prompt | generated tokens]`. The shared
prefix is the longest token prefix common to every prompt of the call: for the `qa` format the instruction and
6-shot primer (~230 tokens), for `chat` a template's system preamble, for `plain` just `<bos>Q:`. It is run
once (batch 1) and every row attends to its keys/values in place (`shared_prefix`), so each batch only runs,
and caches, the per-question remainder. A row that has finished leaves the batch.
Padding sits between the prefix and the remainder (plain left padding when nothing is shared) and is masked
out; position ids count real tokens only. Every row therefore attends to exactly the tokens, at exactly the
positions, it would see if generated alone: the shared-prefix path computes the same function as naive left
padding, not an approximation (the tests compare both paths with one-by-one generation token for token).
The prefix cache is recomputed at every call, inside the caller's `with edit.attach(lm):`, so it always
reflects the attached edit.

Edit positions (`interventions.edit_positions`), as ITI's generation edits them (honest_llama's `'lt'` edit
location with a KV cache): the shared prefix declares no position, a prefill declares its last column (every
row's last prompt token, rows being left-padded), and each decoding step declares every row's new token. So an
ITI edit with `placement="iti"` shifts the last prompt token and every generated token and nothing else; a
weight edit acts everywhere regardless.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from locaudit.data.formats import PromptFormat
from locaudit.errors import LocauditError
from locaudit.interventions import edit_positions
from locaudit.models import LoadedModel, cache_kwarg
from locaudit.scoring import encode, encode_prefix, length_batches, prefix_kv
from locaudit.shared_prefix import own_mask, shared_prefix
from locaudit.storage import atomic_write_text

MAX_NEW_TOKENS = 50  # ITI: max_length = len(prompt) + 50
# End-of-turn markers of common chat templates; whichever exist in a tokenizer's vocabulary stop generation.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end|>", "<|end_of_text|>")
ANSWER_FIELDS = ("qid", "question", "edit", "answer")


def _format(fmt: PromptFormat | str) -> PromptFormat:
    return fmt if isinstance(fmt, PromptFormat) else PromptFormat(fmt)


def stop_token_ids(lm: LoadedModel) -> set[int]:
    """Token ids that end a row: the tokenizer's and generation config's EOS, and known end-of-turn tokens."""
    tok = lm.tokenizer
    ids: set[int] = set()
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in ([eos] if isinstance(eos, int) else eos))
    vocab = tok.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return ids


def answer_finished(text: str, fmt: PromptFormat | str = "qa") -> bool:
    """Whether generated text already contains the end of the answer, so its row can stop.

    `qa`/`plain`: a newline or "Q:" after leading whitespace (a leading newline does not end an answer that
    has not started). `chat`: "\\nQ:" (a chat answer may span lines; it normally ends with an end-of-turn token).
    """
    if _format(fmt).name not in ("qa", "plain"):  # chat, raw, messages
        return "\nQ:" in text
    t = text.lstrip()
    return "\n" in t or "Q:" in t


def clean_answer(text: str, fmt: PromptFormat | str = "qa") -> str:
    """Post-process generated text into one answer line (ITI: cut at "Q:", strip).

    `qa`/`plain`: drop leading whitespace, cut at the first newline and at the first "Q:", strip.
    `chat`: cut at the first "\\nQ:" and collapse all whitespace to single spaces, so the answer stays one line
    (judges read `Q: ...\\nA: ...`).
    """
    if _format(fmt).name not in ("qa", "plain"):  # chat, raw, messages
        return " ".join(text.split("\nQ:", 1)[0].split())
    t = text.lstrip()
    t = t.split("\n", 1)[0]
    return t.split("Q:", 1)[0].strip()


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all sequences."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


def _forward(lm: LoadedModel, ids, attn, pos, cache):
    """One cached forward pass; returns (last-position logits, updated cache)."""
    out = lm.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                   **{cache_kwarg(lm.model): cache})
    return out.logits[:, -1], (out["cache"] if "cache" in out.keys() else out.past_key_values)


def _select_rows(lm: LoadedModel, cache, rows: torch.Tensor):
    """A cache holding only the given batch rows of `cache`."""
    from transformers import DynamicCache

    out = DynamicCache(config=lm.model.config)
    for l, layer in enumerate(cache.layers):
        out.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), l)
    return out


def _prefill(lm: LoadedModel, rests: Sequence[Sequence[int]], n_prefix: int):
    """Run left-padded `[padding | rest]` rows after the prefix; returns (last logits, cache, own 2D mask,
    next positions)."""
    from transformers import DynamicCache

    device = lm.device
    B, S = len(rests), max(len(r) for r in rests)
    ids = torch.full((B, S), lm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    for i, r in enumerate(rests):
        ids[i, S - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, S - len(r):] = 1
    # real tokens get positions n_prefix, n_prefix+1, ...; padding gets a harmless in-range position (it is masked)
    pos = (n_prefix + mask.cumsum(-1) - 1).clamp(min=0).to(device)
    own = mask.to(device)
    attn = own_mask(own, S) if n_prefix else own
    last = torch.zeros((B, S), dtype=torch.bool, device=device)
    last[:, -1] = True  # every row's last prompt token (left padding)
    with edit_positions(lm, last):
        logits, cache = _forward(lm, ids.to(device), attn, pos, DynamicCache(config=lm.model.config))
    return logits, cache, own, pos[:, -1:] + 1


def _merge(lm: LoadedModel, parts: list) -> tuple:
    """One decoding batch from several prefilled chunks: caches and masks left-padded to a common length."""
    from transformers import DynamicCache

    if len(parts) == 1:
        return parts[0]
    S = max(p[2].shape[1] for p in parts)

    def left(x, dim):  # zero-pad x on the left of dimension `dim` up to S
        pad = [0, 0] * (x.dim() - 1 - dim) + [S - x.shape[dim], 0]
        return torch.nn.functional.pad(x, pad)

    cache = DynamicCache(config=lm.model.config)
    for l in range(len(parts[0][1].layers)):
        cache.update(torch.cat([left(p[1].layers[l].keys, 2) for p in parts]),
                     torch.cat([left(p[1].layers[l].values, 2) for p in parts]), l)
    return (torch.cat([p[0] for p in parts]), cache, torch.cat([left(p[2], 1) for p in parts]),
            torch.cat([p[3] for p in parts]))


def _generate_batch(lm: LoadedModel, chunks: Sequence[Sequence[Sequence[int]]], n_prefix: int,
                    max_new_tokens: int, stop_ids: set[int], finished: Callable[[list[int]], bool] | None) -> list[list[int]]:
    """Greedy continuation of `[prefix | padding | rest]` rows; returns each row's new tokens (stop token excluded).

    Each chunk (prompts of similar length) is prefilled on its own, so little padding is computed; then all
    chunks decode together, one step for every row at once (a decoding step reads all the weights whatever the
    number of rows). Rows attend to the batch-1 prefix in place (`shared_prefix`); their caches hold their own
    tokens only. A row that has finished leaves the batch, so later steps compute only the rows still
    generating."""
    device = lm.device
    logits, cache, own, next_pos = _merge(lm, [_prefill(lm, c, n_prefix) for c in chunks])
    B = own.shape[0]
    generated: list[list[int]] = [[] for _ in range(B)]
    live = list(range(B))  # original row index of each batch row still generating
    for t in range(max_new_tokens):
        nxt = logits.argmax(-1).tolist()
        keep = []
        for r, i in enumerate(live):
            if nxt[r] in stop_ids:
                continue
            generated[i].append(nxt[r])
            if finished is None or not finished(generated[i]):
                keep.append(r)
        if not keep or t == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            rows = torch.tensor(keep, device=device)
            cache, own, next_pos = _select_rows(lm, cache, rows), own.index_select(0, rows), next_pos.index_select(0, rows)
            live = [live[r] for r in keep]
            nxt = [nxt[r] for r in keep]
        own = torch.cat([own, own.new_ones(len(live), 1)], dim=1)
        with edit_positions(lm, None):  # every row's newly generated token
            logits, cache = _forward(lm, torch.tensor(nxt, dtype=torch.long, device=device)[:, None],
                                     own_mask(own, 1) if n_prefix else own, next_pos, cache)
        next_pos = next_pos + 1
    return generated


@torch.inference_mode()
def greedy_generate(lm: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int = MAX_NEW_TOKENS,
                    batch_size: int = 16, finished: Callable[[list[int]], bool] | None = None,
                    stop_ids: Iterable[int] | None = None, share_prefix: bool = True,
                    progress: str | None = None, decode_rows: int = 64) -> list[list[int]]:
    """Greedy new tokens for each tokenised prompt, in input order (see the module docstring for the layout).

    Prompts are prefilled `batch_size` at a time (sorted by length) and decoded up to `decode_rows` at a time.
    `finished(tokens) -> bool` is asked after every new token of a row; `stop_ids` (default: EOS and end-of-turn
    tokens) end a row without being returned. `share_prefix=False` runs every prompt in full (plain left padding).
    """
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise LocauditError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise LocauditError(f"batch size must be at least 1, got {batch_size}")
    prompts = [tuple(p) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise LocauditError("cannot generate from an empty prompt")
    if not prompts:
        return []
    stops = set(stop_token_ids(lm) if stop_ids is None else stop_ids)
    # every row keeps at least one token of its own, so its last prompt position is computed in the batch pass
    n_prefix = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1) if share_prefix else 0
    kv = prefix_kv(lm, prompts[0][:n_prefix]) if n_prefix else None
    results: list[list[int] | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=progress, disable=progress is None, leave=False) as bar, \
            (shared_prefix(lm, kv) if kv else contextlib.nullcontext()):
        chunks = length_batches([len(p) for p in prompts], batch_size)
        per_decode = max(1, decode_rows // batch_size)
        for g0 in range(0, len(chunks), per_decode):
            group = chunks[g0:g0 + per_decode]
            idx = [i for c in group for i in c]
            new = _generate_batch(lm, [[prompts[i][n_prefix:] for i in c] for c in group], n_prefix,
                                  max_new_tokens, stops, finished)
            for i, g in zip(idx, new):
                results[i] = g
            bar.update(len(idx))
    return results  # type: ignore[return-value]


def encode_prompts(lm: LoadedModel, questions: Sequence[str], fmt: PromptFormat | str = "qa") -> list[list[int]]:
    """Token ids of each question's prompt, exactly as MC scoring feeds them: `scoring.encode_prefix` followed
    by `scoring.encode`'s prompt ids (the format's shared prefix is tokenised on its own)."""
    fmt = _format(fmt)
    prefix = list(encode_prefix(lm.tokenizer, fmt))
    return [prefix + list(encode(lm.tokenizer, fmt, q, "").prompt) for q in questions]


def generate_answers(lm: LoadedModel, questions: Sequence[str], fmt: PromptFormat | str = "qa",
                     max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16, share_prefix: bool = True,
                     progress: str | None = "generate") -> list[str]:
    """Greedy answer to each question under the attached edit (if any), post-processed by `clean_answer`,
    in input order. Use inside `with edit.attach(lm):` to generate from an edited model."""
    fmt = _format(fmt)
    tok = lm.tokenizer

    def finished(tokens: list[int]) -> bool:
        return answer_finished(tok.decode(tokens, skip_special_tokens=True), fmt)

    new = greedy_generate(lm, encode_prompts(lm, questions, fmt), max_new_tokens=max_new_tokens,
                          batch_size=batch_size, finished=finished, share_prefix=share_prefix, progress=progress)
    return [clean_answer(tok.decode(g, skip_special_tokens=True), fmt) for g in new]


def save_answers(path: Path, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line (at least qid, question, edit, answer; extra fields kept), atomically."""
    lines = []
    for n, row in enumerate(rows):
        missing = [f for f in ANSWER_FIELDS if f not in row]
        if missing:
            raise ValueError(f"answer row {n} lacks field(s) {', '.join(missing)}")
        lines.append(json.dumps(row, ensure_ascii=False, default=_plain))
    return atomic_write_text(Path(path), "".join(line + "\n" for line in lines))


def _plain(o):
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_answers(path: Path) -> list[dict]:
    """Read an answers.jsonl written by `save_answers`; a missing or corrupt file raises LocauditError."""
    path = Path(path)
    if not path.is_file():
        raise LocauditError(f"{path} does not exist; run the evaluation that writes it first")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LocauditError(f"{path} line {n} is not valid JSON ({e.msg}); delete the file and rerun") from None
        if not isinstance(row, dict) or any(f not in row for f in ANSWER_FIELDS):
            raise LocauditError(f"{path} line {n} lacks the fields {', '.join(ANSWER_FIELDS)}; delete the file and rerun")
        rows.append(row)
    return rows
