"""gpu: locaudit's stages on one CUDA device in bfloat16, at the model sizes the `paper` preset is meant for.

Weights cannot reach the GPU machines this project borrows (no network, a small transfer limit), so this
benchmark builds *randomly initialised* models of real shapes, SmolLM2-135M and Llama-2-7B, on the device in
bfloat16: their speed is that of the real models, their outputs are meaningless. Every stage runs the same
code as a study, on real TruthfulQA text (qa format, six-shot prefix):

- IPO training: seconds per optimizer step (batch 4 pairs = 8 answers) for an edit at 16 random heads, at one
  head and full rank-1 LoRA, measured as the difference of two `training.fit` calls (64 and 192 training
  pairs), so pi0, validation and set-up costs cancel;
- generation: new tokens per second of `generate_answers` (64 questions, batch 32, 50 tokens);
- MC scoring: answers per second of `mc_scores` (64 questions);
- head capture: probe texts per second of `capture_last_token`;
then projects the wall time of `--preset paper` (K=16, R=16, S=24, five taus, five alphas, two epochs over
all training pairs) from those rates.

    python -m bench.gpu --tokenizer DIR --data-dir DIR [--shapes smollm2-135m llama-7b] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, head_dim=128, tie_word_embeddings=False, rope_theta=10000.0),
    # only to try the script on a CPU (`--device cpu --shapes tiny`)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=10000.0),
}
PAPER = {"top_k": 16, "n_random": 16, "n_single": 24, "taus": 5, "alphas": 5, "epochs": 2, "batch": 4}


DEVICE = {"device": "cuda", "dtype": torch.bfloat16}


def sync() -> None:
    if DEVICE["device"] == "cuda":
        torch.cuda.synchronize()


def build(shape: str, tokenizer_dir: str):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from locaudit.models import wrap_model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(DEVICE["device"]):
        model = LlamaForCausalLM(cfg).to(DEVICE["dtype"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return wrap_model(model, tok, f"random-{shape}")


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def step_seconds(lm, split, make_edit, n_heads) -> float:
    """Seconds per optimizer step: (fit over 192 pairs - fit over 64 pairs) / 32 steps."""
    from locaudit.data.examples import preference_pairs
    from locaudit.training import FitConfig, fit

    train, val = preference_pairs(split.train), preference_pairs(split.val)
    times = {}
    for n in (64, 64, 192):  # the first call warms up kernels and allocator
        cfg = FitConfig(epochs=1, batch_size=4, max_train_pairs=n, max_val_pairs=16, lr=1e-3, seed=n)
        times[n], _ = timed(lambda: fit(lm, make_edit(), train, val, cfg, n_heads=n_heads, progress=False))
    return (times[192] - times[64]) / ((192 - 64) / 4)


def measure(shape: str, tokenizer_dir: str, data_dir: str) -> dict:
    from locaudit.activations import capture_last_token
    from locaudit.config import DataConfig
    from locaudit.data.examples import mc_items, probe_examples
    from locaudit.evaluation.generation import encode_prompts, greedy_generate
    from locaudit.evaluation.mc import mc_scores
    from locaudit.heads import Head, random_heads, single_head
    from locaudit.interventions import FullRank1, LocalizedRank1

    lm = build(shape, tokenizer_dir)
    a = lm.arch
    split = DataConfig(data_dir=data_dir, seed=0).load_split()
    n_params = sum(p.numel() for p in lm.model.parameters())
    res = {"shape": shape, "n_params": n_params, "layers": a.n_layers, "heads": a.n_heads}
    k16 = random_heads(16, 0, a.n_layers, a.n_heads)
    one = single_head(Head(a.n_layers // 2, 0))  # a middle layer: the typical single-head arm
    res["step_s"] = {
        "localized_16_heads": step_seconds(lm, split, lambda: LocalizedRank1(k16, a), 16),
        "localized_1_head": step_seconds(lm, split, lambda: LocalizedRank1(one, a), 1),
        "full_rank1": step_seconds(lm, split, lambda: FullRank1(a), None),
    }
    qs = [q.question for q in split.test[:64]]
    prompts = encode_prompts(lm, qs, "qa")
    greedy_generate(lm, prompts[:8], max_new_tokens=4, batch_size=8)  # warm-up
    s, new = timed(lambda: greedy_generate(lm, prompts, max_new_tokens=50, batch_size=32, stop_ids=[]))
    res["generate"] = {"questions": len(qs), "seconds": s, "new_tokens": sum(map(len, new)),
                       "tokens_per_s": sum(map(len, new)) / s, "questions_per_s": len(qs) / s}
    items = mc_items(split.test[:64])
    mc_scores(lm, items[:4], "qa", batch_size=32, progress=None)
    s, m = timed(lambda: mc_scores(lm, items, "qa", batch_size=32, progress=None))
    res["mc"] = {"questions": len(items), "answers": m["n_scored"], "seconds": s, "answers_per_s": m["n_scored"] / s}
    texts = [e.text for e in probe_examples(split.train[:40], "iti_end_q")]
    capture_last_token(lm, texts[:16], batch_size=32, progress=False)
    s, _ = timed(lambda: capture_last_token(lm, texts, batch_size=32, progress=False))
    res["capture"] = {"texts": len(texts), "seconds": s, "texts_per_s": len(texts) / s}
    res["paper_projection"] = project(res, split)
    return res


def project(res: dict, split) -> dict:
    """Hours `--preset paper` would take at these rates (training steps + generation + MC; probing excluded)."""
    from locaudit.data.examples import mc_items, preference_pairs

    p = PAPER
    steps = p["epochs"] * math.ceil(len(preference_pairs(split.train)) / p["batch"])
    st = res["step_s"]
    fits_k16 = (1 + p["n_random"]) * p["taus"]
    fits_one = (p["n_single"] + 1) * p["taus"]
    train_s = steps * (fits_k16 * st["localized_16_heads"] + fits_one * st["localized_1_head"] + p["taus"] * st["full_rank1"])
    n_val, n_test = len(split.val), len(split.test)
    iti_arms, ipo_arms = 1 + p["n_random"], 1 + p["n_random"] + 1 + p["n_single"] + 1
    gen_questions = iti_arms * (p["alphas"] * n_val + n_test) + ipo_arms * (p["taus"] * n_val + n_test) + n_test
    gen_s = gen_questions / res["generate"]["questions_per_s"]
    answers_per_q = res["mc"]["answers"] / res["mc"]["questions"]
    mc_s = (iti_arms + ipo_arms + 1) * n_test * answers_per_q / res["mc"]["answers_per_s"]
    return {"train_steps_per_fit": steps, "fits": fits_k16 + fits_one + p["taus"], "train_hours": train_s / 3600,
            "generation_hours": gen_s / 3600, "mc_hours": mc_s / 3600,
            "total_hours": (train_s + gen_s + mc_s) / 3600, "n_train_pairs": len(preference_pairs(split.train)),
            "n_val": n_val, "n_test": n_test, "mc_items": len(mc_items(split.test))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-7b"], choices=list(SHAPES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only to try the script on a small shape")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device")
    DEVICE.update(device=args.device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    info = {"device": name, "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "dtype": str(DEVICE["dtype"]).replace("torch.", ""), "results": []}
    print(f"# {info['device']}, torch {info['torch']}, transformers {info['transformers']}", flush=True)
    for shape in args.shapes:
        t = time.perf_counter()
        r = measure(shape, args.tokenizer, args.data_dir)
        r["bench_seconds"] = time.perf_counter() - t
        if DEVICE["device"] == "cuda":
            torch.cuda.empty_cache()
        info["results"].append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
