"""`locaudit` command line: argument parsing and error reporting only; every command calls a public
function of the library.

User errors (bad options, head names, data, models; `LocauditError`) print one line,
`locaudit: error: <problem>; <fix>`, and exit with code 2, before anything is written where possible: options,
head-name syntax, `--out`, the data and the preset are checked before a model is loaded, and an output
directory that a failed command created and left empty is removed again. Ctrl-C prints one line and exits
with 130; every finished artefact is already on disk (atomic writes), so rerunning the command resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import sys
from pathlib import Path

from locaudit.errors import LocauditError

INTERRUPTED = "locaudit: interrupted; finished work is saved, rerun the same command to resume"


class _UsageError(Exception):
    """A command-line syntax error (argparse), reported like a LocauditError."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `locaudit: error: <problem> (see `locaudit <cmd> --help`)`, exit 2."""

    def error(self, message: str):
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _int(text: str, minimum: int | None = None, what: str = "an integer") -> int:
    try:
        v = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {_show(text)}") from None
    if minimum is not None and v < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def _positive_int(text: str) -> int:
    return _int(text, 1, "a positive integer")


def _nonneg_int(text: str) -> int:
    return _int(text, 0, "an integer >= 0")


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {_show(text)}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {_show(text)}")
    return v


def _nonneg_float(text: str) -> float:
    v = _float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v:g}")
    return v


def _head_list(text: str) -> str:
    """Check a head list's syntax now (ranges need the model, checked once it is loaded)."""
    from locaudit.heads import parse_heads

    try:
        return parse_heads(text).spec()
    except LocauditError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _common(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), a HF id, a model directory or a .gguf file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)")
    p.add_argument("--data-dir", default=None, help="TruthfulQA directory (default: $LOCAUDIT_DATA or ../shared/data/truthfulqa)")
    # ranges of options that fill a config dataclass are that dataclass's checks (`DataConfig`, `FitConfig`)
    p.add_argument("--limit-questions", type=_int, default=None, help="use a seeded subset of N questions")
    p.add_argument("--seed", type=_int, default=0)
    if out:
        p.add_argument("--out", type=Path, required=True)


def _configs(args):
    from locaudit.config import DataConfig, ModelConfig

    return (ModelConfig(args.model, args.device, args.dtype),
            DataConfig(data_dir=args.data_dir, limit_questions=args.limit_questions, seed=args.seed))


def cmd_probe(args) -> None:
    from locaudit.stages import run_probe

    result = run_probe(*_configs(args), args.out, probe_format=args.probe_format, batch_size=args.batch_size, top_k=args.top_k)
    top = result.ranking[: args.top_k]
    print(f"top {len(top)} heads by probe validation accuracy:")
    for h in top:
        print(f"  {h.name}  {result.val_acc[h.layer, h.head]:.3f}")
    print(f"wrote {args.out}/probes.csv, top_heads.txt, probe_heatmap.png")


def cmd_steer(args) -> None:
    from locaudit.probes import ProbeResult
    from locaudit.stages import load, resolve_heads, run_steer

    mcfg, dcfg = _configs(args)
    lm = load(mcfg)
    probes = ProbeResult.load(args.probes) if args.probes else None
    heads = None
    if args.heads:
        heads = resolve_heads(lm, heads=args.heads)
    rows = run_steer(mcfg, dcfg, heads, args.alpha, [args.question] if args.question else None, probes=probes,
                     top_k=args.top_k, fmt=args.format, placement=args.iti_placement, lm=lm)
    print(f"ITI at {len(rows[0]['heads'])} heads ({','.join(rows[0]['heads'])}), alpha={args.alpha}, placement {args.iti_placement}")
    for r in rows:
        print(f"\nQ: {r['question']}\n  unsteered: {r['unsteered']}\n  steered:   {r['steered']}")


def cmd_fit(args) -> None:
    from locaudit.stages import load, resolve_heads, run_fit
    from locaudit.training import FitConfig

    mcfg, dcfg = _configs(args)
    cfg = FitConfig(objective=args.objective, tau=args.tau, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                    fmt=args.format, max_train_pairs=args.max_train_pairs, max_val_pairs=args.max_val_pairs,
                    average_logprobs=not args.sum_logprobs, seed=dcfg.seed, max_steps=args.max_steps,
                    eval_every=args.eval_every, patience=args.patience)  # bad values fail here, before the model loads
    lm = load(mcfg)
    heads = None if args.full else resolve_heads(lm, heads=args.heads, top_k=args.top_k, probes=args.probes,
                                                 random_k=args.random, seed=dcfg.seed, all_=args.all_heads)
    summary = run_fit(lm, dcfg, heads, cfg, args.out)
    b, s = summary["best"], summary["val_start"]
    print(f"{summary['edit_label']}: val {summary['config']['objective'].upper()} loss {s['val_loss']:.3f} -> {b['val_loss']:.3f}, "
          f"preference accuracy {s['val_pref_acc']:.3f} -> {b['val_pref_acc']:.3f} "
          f"({summary['n_train_pairs']} train / {summary['n_val_pairs']} val pairs, {summary['seconds']:.0f}s)")
    print(f"fit status: {summary['status']} after {summary['steps']} steps at lr {summary['lr']:.3g}"
          + (f" ({len(summary['attempts'])} earlier attempt(s) at higher learning rates never left the identity)"
             if summary["attempts"] else ""))
    print(f"wrote {args.out}/edit.safetensors, edit.json, training_curve.png")


def cmd_eval(args) -> None:
    from locaudit.stages import run_eval

    m = run_eval(*_configs(args), args.out, edit_dir=args.edit, iti=args.iti, heads=args.heads, top_k=args.top_k,
                 probes=args.probes, alpha=args.alpha, fmt=args.format, split=args.split, judge=args.judge,
                 text_docs=args.text_docs, text_source=args.text, max_new_tokens=args.max_new_tokens,
                 placement=args.iti_placement)
    keys = ("truth", "info", "truth_info", "mc1", "mc2", "ce", "kl", "n_questions")
    print("  ".join(f"{k}={m[k]:.3f}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys))
    print(f"wrote {args.out}/metrics.json, answers.jsonl")


def cmd_export(args) -> None:
    from locaudit.config import ModelConfig
    from locaudit.stages import load
    from locaudit.export import check_out_dir, export_peft
    from locaudit.interventions import load_intervention

    check_out_dir(args.peft)  # before the model is loaded
    if not ((args.edit_dir / "edit.json").is_file() and (args.edit_dir / "edit.safetensors").is_file()):
        raise LocauditError(f"{args.edit_dir} is not an edit directory (needs edit.json and edit.safetensors); "
                            f"give the --out of `locaudit fit`")
    lm = load(ModelConfig(args.model, args.device, args.dtype))
    what = export_peft(load_intervention(args.edit_dir, lm.arch), lm, args.peft)
    print(f"wrote {what} to {args.peft}")


def cmd_judge(args) -> None:
    if args.action == "run":
        from locaudit.report import console_summary
        from locaudit.study import judge_run

        if args.run_dir is None:
            raise LocauditError("`locaudit judge run` needs the run directory: locaudit judge run RUN_DIR")
        print(console_summary(args.run_dir, judge_run(args.run_dir, args.judge)))
        return
    from locaudit.evaluation.judges import build_processes, judge_report

    rep = judge_report(args.judge, data_dir=args.data_dir, processes=build_processes(4))
    print(json.dumps(rep, indent=2, default=str))


def cmd_run(args) -> None:
    from datetime import datetime

    from locaudit.study import load_preset, make_backend, run_study, with_overrides

    # the backend's and the preset's dataclasses check every setting as they are built (a missing Ray too)
    backend = make_backend(args.backend, workers=args.workers, address=args.address, gpus_per_arm=args.gpus_per_arm,
                           cpus_per_arm=args.cpus_per_arm)
    preset = with_overrides(load_preset(args.preset), model=args.model, device=args.device, dtype=args.dtype,
                            data_dir=args.data_dir, limit_questions=args.limit_questions, seed=args.seed,
                            judge=args.judge)
    if args.packing is not None:
        preset = dataclasses.replace(preset, study=dataclasses.replace(preset.study, packing=args.packing))
    preset.data.load_split()  # bad data fails now, before the model is loaded
    out = args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    from locaudit.report import console_summary

    results = run_study(preset, out, backend=backend)
    if results.get("deferred"):
        print(f"stored the answers of {results['n_trials']} trials in {out} without judging them (--judge none); "
              f"score them and write the report with: locaudit judge run {out}")
        return
    print(console_summary(out, results))


def cmd_audit(args) -> None:
    from datetime import datetime

    from locaudit.audit import AuditConfig, audit
    from locaudit.audit.claims import claim_kind
    from locaudit.models import load_model
    from locaudit.study import load_preset, make_backend, with_overrides
    from locaudit.tasks import TruthfulQATask, load_task

    preset = with_overrides(load_preset(args.preset), model=args.model, device=args.device, dtype=args.dtype,
                            data_dir=args.data_dir, seed=args.seed)
    claim = args.heads if args.heads is not None else args.units
    kind = claim_kind(claim)  # unit-name and heuristic syntax fail now, before the model is loaded
    if args.heads is not None and kind != "heads":
        raise LocauditError(f"--heads {claim.strip()} names {kind}, not attention heads; give it with --units")
    if args.task == "truthfulqa":
        task = TruthfulQATask(data_dir=preset.data.data_dir, fmt=preset.eval.fmt, judge=preset.eval.judge,
                              max_new_tokens=preset.eval.max_new_tokens)
    else:
        task = load_task(args.task)
    cfg = AuditConfig.from_preset(preset, n_random=args.random, match_layers=args.match_layers or None,
                                  limit_items=args.limit_items, steering=False if args.no_steering else None,
                                  packing=args.packing)
    task.split(cfg.seed, cfg.limit_items)  # bad or too little data fails now, before the model is loaded
    out = args.out or Path("runs") / ("audit-" + datetime.now().strftime("%Y%m%d-%H%M%S"))
    backend = None if args.backend is None else make_backend(
        args.backend, workers=args.workers, address=args.address, gpus_per_arm=args.gpus_per_arm,
        cpus_per_arm=args.cpus_per_arm)  # checks its options (and a missing Ray) before the model loads
    lm = load_model(preset.model.model, device=preset.model.device, dtype=preset.model.dtype)
    result = audit(claim, task, out, cfg, lm=lm, backend=backend)
    steering = "" if result.steering is None else f"\n{result.steering.verdict}"
    print(f"{result.verdict}{steering}\nreport: {Path(out) / 'report.html'}")


def cmd_report(args) -> None:
    from locaudit.report import write_report

    write_report(args.run_dir)
    print(f"rebuilt {args.run_dir}/results.csv, results.json, figures/, report.html")


def build_parser() -> argparse.ArgumentParser:
    from locaudit.audit.claims import heuristic_help

    parser = _Parser(prog="locaudit", description="Does editing provide evidence for localization? Audit a head-level localization claim.")
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
    g.add_argument("--heads", type=_head_list, help="comma list like L3H1,L7H4")
    g.add_argument("--top-k", type=_positive_int, default=None, help="the top-K probe heads (default 16)")
    p.add_argument("--probes", type=Path, default=None, help="output dir of `locaudit probe` (default: probe now)")
    p.add_argument("--alpha", type=_float, default=15.0)
    p.add_argument("--question", default=None)
    p.add_argument("--format", default="qa", choices=["qa", "plain", "chat"])
    p.add_argument("--iti-placement", default="iti", choices=["iti", "all"],
                   help="iti (default): shift the last prompt token and generated tokens, MC answer tokens, every "
                        "position for CE/KL, as ITI's code does; all: every position, the prompt included")
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("fit", help="train the optimal localized edit (IPO) at a head set, or full rank-1 LoRA")
    _common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--heads", type=_head_list, help="comma list like L3H1,L7H4")
    g.add_argument("--top-k", type=_positive_int, help="top-K probe heads (with --probes DIR)")
    g.add_argument("--random", type=_positive_int, metavar="K", help="K random heads, drawn with --seed")
    g.add_argument("--all-heads", action="store_true", help="localized edit with S = every head")
    g.add_argument("--full", action="store_true", help="ordinary rank-1 LoRA on every W^l (full alignment)")
    p.add_argument("--probes", type=Path, default=None)
    p.add_argument("--objective", default="ipo", choices=["ipo", "dpo"])
    # the ranges of these are FitConfig's checks
    p.add_argument("--tau", type=_float, default=0.1)
    p.add_argument("--epochs", type=_int, default=2)
    p.add_argument("--lr", type=_float, default=None, help="default: by head-set size")
    p.add_argument("--batch-size", type=_int, default=4)
    p.add_argument("--max-train-pairs", type=_int, default=None)
    p.add_argument("--max-val-pairs", type=_int, default=None,
                   help="cap the validation pairs (default all; pi0 and every validation pass score them all)")
    p.add_argument("--format", default="qa", choices=["qa", "plain", "chat"])
    p.add_argument("--sum-logprobs", action="store_true", help="sum answer-token log-probs instead of averaging")
    p.add_argument("--max-steps", type=_int, default=None, help="step cap (with --patience: train to the optimum)")
    p.add_argument("--eval-every", type=_int, default=None, help="validate every N steps (default: once per epoch)")
    p.add_argument("--patience", type=_int, default=None,
                   help="stop when validation loss has not improved by 1%% for N validations (needs --eval-every; "
                        "the cap is --max-steps, else --epochs)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("eval", help="generate, judge, MC1/MC2, CE and KL for no edit, ITI, or a fitted edit")
    _common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--edit", type=Path, help="an edit directory written by `locaudit fit`, or a PEFT rank-1 LoRA "
                                             "adapter on the attention output projections")
    g.add_argument("--iti", action="store_true", help="ITI steering (with --heads or --top-k, and --alpha)")
    g.add_argument("--none", action="store_true", help="the unedited model")
    p.add_argument("--heads", type=_head_list, default=None)
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--probes", type=Path, default=None)
    p.add_argument("--alpha", type=_float, default=15.0)
    p.add_argument("--iti-placement", default="iti", choices=["iti", "all"],
                   help="iti (default): shift the last prompt token and generated tokens, MC answer tokens, every "
                        "position for CE/KL, as ITI's code does; all: every position, the prompt included")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--format", default="qa", choices=["qa", "plain", "chat"])
    p.add_argument("--judge", default="default", help="default, hf:TRUTH_DIR,INFO_DIR or openai:BASE_URL#TRUTH_MODEL,INFO_MODEL")
    p.add_argument("--text", default="wiki", help="general text for CE/KL: the built-in corpus or a text file")
    p.add_argument("--text-docs", type=_nonneg_int, default=100, help="0 skips CE/KL")
    p.add_argument("--max-new-tokens", type=_positive_int, default=50)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a fitted edit as a PEFT LoRA adapter (ITI with placement all: the "
                                      "merged model) for use outside locaudit")
    p.add_argument("edit_dir", type=Path, help="an edit directory (edit.json + edit.safetensors): the --out of "
                                                     "`locaudit fit`, or RUN/edits/ARM/tauT of a study run")
    p.add_argument("--peft", type=Path, required=True, metavar="OUT", help="new directory for the adapter")
    p.add_argument("--model", default="smollm2-135m", help="the model the edit was fitted on")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="float32 (default; a merged ITI model is saved in it), "
                                                      "bfloat16 or float16")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("judge", help="report the judges' held-out accuracy (`judge report`), or score a run made with "
                                      "--judge none and write its report (`judge run RUN_DIR`)")
    p.add_argument("action", choices=["report", "run"])
    p.add_argument("run_dir", type=Path, nargs="?", default=None, help="with `run`: the run directory to judge")
    p.add_argument("--judge", default="default")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("run", help="the whole study, resumable, with statistics and an HTML report")
    p.add_argument("--preset", default="quick", help="smoke, demo, quick (default), paper, or a .toml file")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<timestamp>)")
    for flag in ("--model", "--device", "--dtype", "--data-dir"):
        p.add_argument(flag, default=None)
    p.add_argument("--limit-questions", type=_int, default=None)
    p.add_argument("--seed", type=_int, default=None)
    p.add_argument("--judge", default=None, help="the preset's judge (default); `none` stores answers only, to be "
                                                 "scored later by `locaudit judge run DIR` (e.g. on a machine without judges)")
    p.add_argument("--backend", default="local",
                   help="where the arms run: local (default: this machine) or ray (a Ray cluster; pip install "
                        "locaudit[ray]; --out must then be on a filesystem every node mounts, see docs/distributed.md)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="workers that run arms in parallel (local: processes, default one per CPU core up to 8, or one "
                        "per GPU, worker i on cuda:i mod n_gpus; ray: at most this many, default as many as the "
                        "cluster holds)")
    p.add_argument("--address", default=None, help="ray: the cluster's head node HOST:PORT, or local for a new "
                                                   "instance here (default: the Ray instance this machine runs, else "
                                                   "a new one)")
    p.add_argument("--gpus-per-arm", type=_nonneg_float, default=None,
                   help="ray: GPUs each worker holds, a fraction shares one (default 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-arm", type=_float, default=None, help="ray: CPUs each worker holds (default 1)")
    p.add_argument("--packing", choices=["auto", "on", "off"], default=None,
                   help="fit each arm's tau grid in one pass (on), fit by fit (off), or as a short timing of both on "
                        "this device decides (auto, the preset's default; the decision is logged and kept in the run)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("audit", help="audit a localization claim: the optimal edit (and the claim's steering "
                                     "heuristic) at the claimed units vs random sets of the same size, and full "
                                     "alignment, on any task")
    claim = p.add_mutually_exclusive_group(required=True)
    claim.add_argument("--heads", help="a claim about attention heads, e.g. L12H3,L14H1 (L12A: every head of layer 12), "
                                       "or a heuristic's: " + heuristic_help("heads"))
    claim.add_argument("--units", help="a claim about any units: heads L12H3,L14H1, MLP neurons L3N100,L3N7, or layers "
                                       "L12 (the residual stream after block 12), one kind per claim; or a heuristic's "
                                       "claim (scores written under OUT/heuristic/): " + heuristic_help())
    p.add_argument("--task", required=True, help="truthfulqa, caa:<behaviour> (sycophancy, refusal, survival-instinct, "
                                                 "corrigibility, myopic-reward, hallucination, coordinate-other-ais), "
                                                 "or a preference .jsonl file (TRL format)")
    p.add_argument("--preset", default="quick", help="sizes the audit like `run`: smoke, demo, quick (default), paper, "
                                                    "or a .toml file")
    p.add_argument("--out", type=Path, default=None, help="audit directory (default runs/audit-<timestamp>)")
    for flag in ("--model", "--device", "--dtype", "--data-dir"):
        p.add_argument(flag, default=None)
    p.add_argument("--random", type=_nonneg_int, default=None, help="random sets (default: the preset's n_random_sets)")
    p.add_argument("--match-layers", action="store_true",
                   help="draw each random set with the claim's number of units in each of its layers")
    p.add_argument("--limit-items", type=_positive_int, default=None,
                   help="a stratified random subset of the task's items (default: the preset's limit_questions)")
    p.add_argument("--no-steering", action="store_true",
                   help="skip the steering arms (the claim's steering heuristic, ITI for heads and mean-difference "
                        "steering for neurons and layers, at the claim and at each random set)")
    p.add_argument("--packing", choices=["auto", "on", "off"], default=None,
                   help="fit each arm's tau grid in one pass (on), fit by fit (off), or as a short timing of both on "
                        "this device decides (auto, the preset's default; the decision is logged and kept in the run)")
    p.add_argument("--seed", type=_nonneg_int, default=None)
    p.add_argument("--backend", default=None,
                   help="run the arms on an execution backend instead of one after another here: local (worker "
                        "processes, --workers N) or ray (a Ray cluster, as for `run`; docs/distributed.md)")
    p.add_argument("--workers", type=_positive_int, default=None, help="with --backend: workers running arms")
    p.add_argument("--address", default=None, help="--backend ray: the cluster's head node HOST:PORT, or local")
    p.add_argument("--gpus-per-arm", type=_nonneg_float, default=None, help="--backend ray: GPUs per worker")
    p.add_argument("--cpus-per-arm", type=_float, default=None, help="--backend ray: CPUs per worker (default 1)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("report", help="rebuild results and report.html from a run directory")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_report)
    return parser


# ---------------------------------------------------------------------------------------------------------
# Checks that run before any model is loaded or anything is written


def _check_out(out: Path | None) -> None:
    """--out must be a directory or creatable as one (no existing file on the way, writable)."""
    if out is None:
        return
    if out.exists():
        if not out.is_dir():
            raise LocauditError(f"--out {out} is an existing file; give a directory path")
        if not os.access(out, os.W_OK | os.X_OK):
            raise LocauditError(f"--out {out} is not writable; give a directory you can write to")
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LocauditError(f"--out {out} cannot be created: {parent} is a file; give a directory path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LocauditError(f"--out {out} cannot be created: {parent} is not writable; give a directory you can write to")


def _check_data(args) -> None:
    """Load and split the data now (fast), so bad data fails before the model is loaded."""
    from locaudit.config import DataConfig

    if getattr(args, "command", None) in ("probe", "steer", "fit", "eval"):
        DataConfig(data_dir=args.data_dir, limit_questions=args.limit_questions, seed=args.seed).load_split()
    elif getattr(args, "command", None) == "judge" and args.data_dir is not None:
        from locaudit.data.truthfulqa import find_data_dir

        find_data_dir(args.data_dir, download=False)


def _check_inputs(args) -> None:
    """Input directories and files named on the command line exist and look right (before loading a model)."""
    edit = getattr(args, "edit", None)
    if edit is not None and not ((edit / "edit.json").is_file() and (edit / "edit.safetensors").is_file()
                                 or (edit / "adapter_config.json").is_file()):
        raise LocauditError(f"--edit {edit} is not an edit directory (needs edit.json and edit.safetensors, or a "
                            f"PEFT adapter's adapter_config.json); give the --out of `locaudit fit`")
    probes = getattr(args, "probes", None)
    if probes is not None and not (probes / "probes.npz").is_file():
        raise LocauditError(f"--probes {probes} has no probes.npz; give the --out of `locaudit probe`")
    text = getattr(args, "text", None)
    if args.command == "eval" and args.text_docs > 0 and text not in ("wiki", "lee") and not Path(text).is_file():
        raise LocauditError(f"--text {text} is neither a built-in corpus (wiki, lee) nor a file; give a UTF-8 text file")
    if args.command == "fit" and args.top_k is not None and probes is None:
        raise LocauditError("--top-k needs --probes DIR (the output of `locaudit probe`)")


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def main(argv: list[str] | None = None) -> int:
    out, created = None, None
    try:
        args = build_parser().parse_args(argv)
        out = getattr(args, "out", None)
        _check_out(out)
        created = _first_missing(out)
        _check_inputs(args)
        _check_data(args)
        args.func(args)
    except (LocauditError, _UsageError) as e:
        print(f"locaudit: error: {_one_line(e)}", file=sys.stderr)
        _remove_if_empty(out, created)
        return 2
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"locaudit: error: {_one_line(e.strerror or e)}{where}; free disk space or fix permissions and rerun "
              f"the same command to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        _remove_if_empty(out, created)
        return 130
    return 0


def _first_missing(out: Path | None) -> Path | None:
    """The topmost directory of `out` that does not exist yet (what the command will create), if any."""
    if out is None or out.exists():
        return None
    top = out
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def _remove_if_empty(out: Path | None, created: Path | None) -> None:
    """A command that failed leaves no trace: remove the directories it created for --out if still empty."""
    if out is None or created is None:
        return
    d = out
    while True:
        try:
            d.rmdir()  # only succeeds when empty
        except OSError:
            return
        if d == created or d.parent == d:
            return
        d = d.parent


if __name__ == "__main__":
    sys.exit(main())
