"""`locaudit` command line: argument parsing and error reporting only; every command calls a public
function of the library. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from locaudit.errors import LocauditError


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return v


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def _common(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), a HF id, a model directory or a .gguf file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)")
    p.add_argument("--data-dir", default=None, help="TruthfulQA directory (default: $LOCAUDIT_DATA or ../shared/data/truthfulqa)")
    p.add_argument("--limit-questions", type=_positive_int, default=None, help="use a seeded subset of N questions")
    p.add_argument("--seed", type=int, default=0)
    if out:
        p.add_argument("--out", type=Path, required=True)


def _configs(args):
    from locaudit.config import DataConfig, ModelConfig

    return (ModelConfig(args.model, args.device, args.dtype),
            DataConfig(data_dir=args.data_dir, limit_questions=args.limit_questions, seed=args.seed))


def cmd_probe(args) -> None:
    from locaudit.experiments import run_probe

    result = run_probe(*_configs(args), args.out, probe_format=args.probe_format, batch_size=args.batch_size, top_k=args.top_k)
    top = result.ranking[: args.top_k]
    print(f"top {len(top)} heads by probe validation accuracy:")
    for h in top:
        print(f"  {h.name}  {result.val_acc[h.layer, h.head]:.3f}")
    print(f"wrote {args.out}/probes.csv, top_heads.txt, probe_heatmap.png")


def cmd_steer(args) -> None:
    from locaudit.experiments import load, resolve_heads, run_steer
    from locaudit.probes import ProbeResult

    mcfg, dcfg = _configs(args)
    lm = load(mcfg)
    probes = ProbeResult.load(args.probes) if args.probes else None
    heads = None
    if args.heads:
        heads = resolve_heads(lm, heads=args.heads)
    rows = run_steer(mcfg, dcfg, heads, args.alpha, [args.question] if args.question else None, probes=probes,
                     top_k=args.top_k, fmt=args.format, lm=lm)
    print(f"ITI at {len(rows[0]['heads'])} heads ({','.join(rows[0]['heads'])}), alpha={args.alpha}")
    for r in rows:
        print(f"\nQ: {r['question']}\n  unsteered: {r['unsteered']}\n  steered:   {r['steered']}")


def cmd_fit(args) -> None:
    from locaudit.experiments import run_fit

    summary = run_fit(*_configs(args), args.out, heads=args.heads, top_k=args.top_k, probes=args.probes,
                      random_k=args.random, all_heads=args.all_heads, full=args.full, objective=args.objective,
                      tau=args.tau, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, fmt=args.format,
                      max_train_pairs=args.max_train_pairs, sum_logprobs=args.sum_logprobs)
    b, s = summary["best"], summary["val_start"]
    print(f"{summary['edit_label']}: val {summary['config']['objective'].upper()} loss {s['val_loss']:.3f} -> {b['val_loss']:.3f}, "
          f"preference accuracy {s['val_pref_acc']:.3f} -> {b['val_pref_acc']:.3f} "
          f"({summary['n_train_pairs']} train / {summary['n_val_pairs']} val pairs, {summary['seconds']:.0f}s)")
    print(f"wrote {args.out}/edit.safetensors, edit.json, training_curve.png")


def cmd_eval(args) -> None:
    from locaudit.experiments import run_eval

    m = run_eval(*_configs(args), args.out, edit_dir=args.edit, iti=args.iti, heads=args.heads, top_k=args.top_k,
                 probes=args.probes, alpha=args.alpha, fmt=args.format, split=args.split, judge=args.judge,
                 text_docs=args.text_docs, text_source=args.text, max_new_tokens=args.max_new_tokens)
    keys = ("truth", "info", "truth_info", "mc1", "mc2", "ce", "kl", "n_questions")
    print("  ".join(f"{k}={m[k]:.3f}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys))
    print(f"wrote {args.out}/metrics.json, answers.jsonl")


def cmd_judge(args) -> None:
    from locaudit.evaluation.judges import judge_report

    rep = judge_report(args.judge, data_dir=args.data_dir)
    print(json.dumps(rep, indent=2, default=str))


def cmd_run(args) -> None:
    from datetime import datetime

    from locaudit.experiments import run_study
    from locaudit.study import load_preset, with_overrides

    preset = with_overrides(load_preset(args.preset), model=args.model, device=args.device, dtype=args.dtype,
                            data_dir=args.data_dir, limit_questions=args.limit_questions, seed=args.seed)
    out = args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    results = run_study(preset, out)
    for key in ("iti", "ipo"):
        if key in results["stats"]:
            print(results["stats"][key]["verdict"])
    print(f"report: {out}/report.html")


def cmd_report(args) -> None:
    from locaudit.report import write_report

    write_report(args.run_dir)
    print(f"rebuilt {args.run_dir}/results.csv, results.json, figures/, report.html")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locaudit", description="Does editing provide evidence for localization? Audit a head-level localization claim.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("probe", help="probe every attention head for truthfulness (ITI) and rank heads")
    _common(p)
    p.add_argument("--probe-format", default="iti_end_q", choices=["iti_end_q", "iti"])
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--top-k", type=_positive_int, default=16)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("steer", help="answers with and without ITI steering at some heads")
    _common(p, out=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--heads", help="comma list like L3H1,L7H4")
    g.add_argument("--top-k", type=_positive_int, default=None, help="the top-K probe heads (default 16)")
    p.add_argument("--probes", type=Path, default=None, help="output dir of `locaudit probe` (default: probe now)")
    p.add_argument("--alpha", type=_float, default=15.0)
    p.add_argument("--question", default=None)
    p.add_argument("--format", default="qa", choices=["qa", "plain", "chat"])
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("fit", help="train the optimal localized edit (IPO) at a head set, or full rank-1 LoRA")
    _common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--heads", help="comma list like L3H1,L7H4")
    g.add_argument("--top-k", type=_positive_int, help="top-K probe heads (with --probes DIR)")
    g.add_argument("--random", type=_positive_int, metavar="K", help="K random heads, drawn with --seed")
    g.add_argument("--all-heads", action="store_true", help="localized edit with S = every head")
    g.add_argument("--full", action="store_true", help="ordinary rank-1 LoRA on every W^l (full alignment)")
    p.add_argument("--probes", type=Path, default=None)
    p.add_argument("--objective", default="ipo", choices=["ipo", "dpo"])
    p.add_argument("--tau", type=_positive_float, default=0.1)
    p.add_argument("--epochs", type=_positive_int, default=2)
    p.add_argument("--lr", type=_positive_float, default=None, help="default: by head-set size")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--max-train-pairs", type=_positive_int, default=None)
    p.add_argument("--format", default="qa", choices=["qa", "plain", "chat"])
    p.add_argument("--sum-logprobs", action="store_true", help="sum answer-token log-probs instead of averaging")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("eval", help="generate, judge, MC1/MC2, CE and KL for no edit, ITI, or a fitted edit")
    _common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--edit", type=Path, help="an edit directory written by `locaudit fit`")
    g.add_argument("--iti", action="store_true", help="ITI steering (with --heads or --top-k, and --alpha)")
    g.add_argument("--none", action="store_true", help="the unedited model")
    p.add_argument("--heads", default=None)
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--probes", type=Path, default=None)
    p.add_argument("--alpha", type=_float, default=15.0)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--format", default="qa", choices=["qa", "plain", "chat"])
    p.add_argument("--judge", default="default", help="default, hf:TRUTH_DIR,INFO_DIR or openai:BASE_URL#TRUTH_MODEL,INFO_MODEL")
    p.add_argument("--text", default="wiki", help="general text for CE/KL: the built-in corpus or a text file")
    p.add_argument("--text-docs", type=int, default=100)
    p.add_argument("--max-new-tokens", type=_positive_int, default=50)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("judge", help="train (once) and report the truth and info judges' held-out accuracy")
    p.add_argument("action", choices=["report"])
    p.add_argument("--judge", default="default")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("run", help="the whole study, resumable, with statistics and an HTML report")
    p.add_argument("--preset", default="quick", help="smoke, quick, paper, or a .toml file")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<timestamp>)")
    for flag in ("--model", "--device", "--dtype", "--data-dir"):
        p.add_argument(flag, default=None)
    p.add_argument("--limit-questions", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="rebuild results and report.html from a run directory")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LocauditError as e:
        print(f"locaudit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("locaudit: interrupted; finished work is saved, rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
