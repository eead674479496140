"""generate: locaudit's batched shared-prefix greedy generation vs one HF `model.generate` call per question.

Baseline (ITI's evaluation loop): for each question, the `qa` prompt (instruction + 6-shot primer +
`Q: ...\\nA:`), `model.generate(ids, do_sample=False, max_new_tokens=50)` (greedy; stops only at
EOS, as ITI's `top_k=1, max_length=len+50`), decoded and cut to one answer line (`clean_answer`). locaudit:
`generate_answers(lm, questions, "qa", max_new_tokens=50, batch_size=16)`: the ~216-token prefix runs once, rows
are length-batched, each row stops at the end of its answer line. Same questions (TruthfulQA test split).

Because part of locaudit's gain is stopping at the end of the answer line, the full run also times a stronger
baseline, `generate(..., stop_strings=["\\n", "Q:"])` (HF's own early stop, still one question per call), and
reports that ratio too (`ratio_vs_stop_strings`). Answers are compared after `clean_answer`.

Both decode from identical token ids: the baseline gets the prompt as locaudit tokenises it (the shared prefix on
its own, then the question), so that equal greedy answers check the batched generation. (Tokenising the whole
prompt string instead differs by one token at the prefix/question junction for SmolLM2: `\\n\\n` becomes two
tokens before `Q`, one when the prefix ends there; that alone changed 10 of 32 greedy answers.)
"""

from __future__ import annotations

import numpy as np
import torch

from bench.common import SEED, Timer, cli, load_lm, load_split, log

SIZES = {True: {"n_questions": 6, "stop_strings_baseline": False},
         False: {"n_questions": 32, "stop_strings_baseline": True}}
MAX_NEW = 50


def questions(n: int) -> list[str]:
    split = load_split()
    qs = list(split.test)
    idx = np.random.default_rng(SEED).choice(len(qs), size=min(n, len(qs)), replace=False)
    return [qs[i].question for i in sorted(idx)]


def baseline_generate(lm, qs, stop_strings=None) -> tuple[list[str], int]:
    from locaudit.data.formats import PromptFormat
    from locaudit.evaluation.generation import clean_answer, encode_prompts

    fmt, tok = PromptFormat("qa"), lm.tokenizer
    answers, new_tokens = [], 0
    extra = {"stop_strings": stop_strings, "tokenizer": tok} if stop_strings else {}
    with torch.no_grad():
        for prompt in encode_prompts(lm, qs, "qa"):  # one question at a time, the same token ids as locaudit's
            ids = torch.tensor([prompt], device=lm.device)
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=MAX_NEW, pad_token_id=tok.pad_token_id, **extra)
            gen = out[0, ids.shape[1]:]
            new_tokens += int(gen.numel())
            answers.append(clean_answer(tok.decode(gen, skip_special_tokens=True), fmt))
    return answers, new_tokens


def run(quick: bool) -> dict:
    from locaudit.evaluation.generation import encode_prompts, generate_answers

    size = SIZES[quick]
    lm, load_s = load_lm()
    # greedy decoding: make sure the model's generation config does not sample
    gc = lm.model.generation_config
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
    qs = questions(size["n_questions"])
    prompt_lens = [len(p) for p in encode_prompts(lm, qs, "qa")]
    log(f"generate: {len(qs)} questions, prompt tokens mean {np.mean(prompt_lens):.1f}")
    # warm-up, untimed
    generate_answers(lm, qs[:2], "qa", max_new_tokens=4, progress=None)
    baseline_generate(lm, qs[:1])
    with Timer() as tb:
        base_answers, base_new = baseline_generate(lm, qs)
    log(f"generate: baseline {tb.seconds:.2f}s ({base_new} new tokens)")
    with Timer() as tl:
        ours = generate_answers(lm, qs, "qa", max_new_tokens=MAX_NEW, batch_size=16, progress=None)
    log(f"generate: locaudit {tl.seconds:.2f}s")
    record = {
        "what": "greedy answers (max 50 new tokens) to TruthfulQA questions with the qa prompt",
        "model": lm.name, "model_load_seconds": load_s, "n_questions": len(qs),
        "prompt_tokens_mean": float(np.mean(prompt_lens)),
        "baseline": {"name": "HF model.generate per question, greedy, max_new_tokens=50 (ITI-style, EOS stop only)",
                     "seconds": tb.seconds, "questions_per_s": len(qs) / tb.seconds, "new_tokens": base_new},
        "locaudit": {"name": "evaluation.generation.generate_answers(batch_size=16, shared prefix)",
                     "seconds": tl.seconds, "questions_per_s": len(qs) / tl.seconds},
        "answers_identical_fraction": float(np.mean([a == b for a, b in zip(base_answers, ours)])),
        "examples": [{"question": q, "baseline": a, "locaudit": b} for q, a, b in list(zip(qs, base_answers, ours))[:5]],
        "differing_answers": [{"question": q, "baseline": a, "locaudit": b}
                              for q, a, b in zip(qs, base_answers, ours) if a != b],
        "ratio": tb.seconds / tl.seconds, "target": 5.0,
    }
    if size["stop_strings_baseline"]:
        with Timer() as ts:
            stop_answers, stop_new = baseline_generate(lm, qs, stop_strings=["\n", "Q:"])
        log(f"generate: baseline with stop_strings {ts.seconds:.2f}s")
        record["baseline_stop_strings"] = {
            "name": "HF model.generate per question, greedy, max_new_tokens=50, stop_strings=['\\n', 'Q:']",
            "seconds": ts.seconds, "questions_per_s": len(qs) / ts.seconds, "new_tokens": stop_new,
            "answers_identical_fraction": float(np.mean([a == b for a, b in zip(stop_answers, ours)])),
        }
        record["ratio_vs_stop_strings"] = ts.seconds / tl.seconds
    return record


def main():
    cli("generate", run)


if __name__ == "__main__":
    main()
