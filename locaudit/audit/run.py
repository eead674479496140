"""Auditing one localization claim: the optimal edit at the claimed heads against the same edit at random
head sets of the same size and against full alignment, on any task.

Arms: `none` (the unedited model), `claim` (the optimal localized edit, delta r = s <a, o> W b with b non-zero
only on the claimed heads), `random-<i>` (the same edit at R random sets of the claim's size, drawn from every
layer or matched to the claim's layers), and `full` (a rank-1 LoRA on every layer's W: the common ceiling).
Each fitted arm is trained to its optimum at every tau of the grid (`fit_optimal_edit`), its tau chosen on
validation items by the task's statistic, and scored on test items. Every (arm, tau) trial is one JSON file
written atomically under `out/trials/`, so an interrupted audit resumes where it stopped and a rerun recomputes
nothing; the same seed gives the same audit.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from locaudit.errors import LocauditError
from locaudit.heads import HeadSet, parse_heads, random_heads, random_heads_like
from locaudit.interventions import Intervention, NoEdit, load_intervention
from locaudit.models import LoadedModel, load_model
from locaudit.storage import atomic_write_json, prepare_out_dir, read_json
from locaudit.tasks import ItemScores, Task, TaskSplit, load_task
from locaudit.training import FitConfig, fit_summary

AUDIT_VERSION = 1


@dataclass(frozen=True)
class AuditConfig:
    """How an audit is sized. `from_preset` takes these from a study preset (`smoke`, `quick`, `paper`)."""

    n_random: int = 16
    match_layers: bool = False  # random sets with the claim's number of heads in each of its layers
    taus: tuple[float, ...] = (0.1,)
    limit_items: int | None = None  # a stratified random subset of the task's items before splitting
    max_val_items: int | None = None
    max_test_items: int | None = None
    seed: int = 0
    n_boot: int = 2000
    batch_size: int = 16
    full: bool = True  # fit full alignment (the ceiling the claim's effect is measured against)
    fit: FitConfig = field(default_factory=FitConfig)

    def __post_init__(self):
        if isinstance(self.n_random, bool) or not isinstance(self.n_random, int) or self.n_random < 0:
            raise LocauditError(f"the number of random sets must be an integer >= 0, got {self.n_random!r}")
        if not self.taus or any(not t > 0 for t in self.taus):
            raise LocauditError(f"taus must be a non-empty list of values > 0, got {self.taus!r}")
        for name in ("limit_items", "max_val_items", "max_test_items"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise LocauditError(f"{name} must be positive, got {v}")
        if self.n_boot <= 0 or self.batch_size <= 0:
            raise LocauditError(f"n_boot and batch_size must be positive, got {self.n_boot}, {self.batch_size}")

    @classmethod
    def from_preset(cls, preset, **overrides) -> "AuditConfig":
        """Sizes from a study preset: its random sets, tau grid, question limits, bootstrap and fit settings."""
        from locaudit.study import load_preset

        p = load_preset(preset) if isinstance(preset, str) else preset
        base = dict(n_random=p.study.n_random_sets, taus=tuple(p.study.taus), limit_items=p.data.limit_questions,
                    max_val_items=p.study.max_val_questions, max_test_items=p.study.max_test_questions,
                    seed=p.data.seed, n_boot=p.study.n_boot, batch_size=p.eval.batch_size, fit=p.fit)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # none | claim | random | full
    heads: HeadSet | None  # None: no edit (none) or every layer (full)

    def describe(self) -> str:
        if self.kind == "none":
            return "unedited model"
        if self.kind == "full":
            return "full alignment (rank-1 LoRA on every layer)"
        return self.heads.spec()


def plan(claim: HeadSet, n_layers: int, n_heads: int, cfg: AuditConfig) -> list[Arm]:
    """The audit's arms in run order: none, claim, the random sets, full. A random draw equal to the claim is
    replaced by the next seed's draw; the seeds are `seed * 1000 + i + 1` (and on)."""
    arms = [Arm("none", "none", None), Arm("claim", "claim", claim)]
    draw = (lambda s: random_heads_like(claim, s, n_layers, n_heads)) if cfg.match_layers else \
        (lambda s: random_heads(len(claim), s, n_layers, n_heads))
    s = cfg.seed * 1000
    seen = {tuple(claim.heads)}
    for i in range(cfg.n_random):
        for _ in range(1000):
            s += 1
            hs = draw(s)
            if tuple(hs.heads) not in seen:
                break
        else:
            raise LocauditError(f"cannot draw {cfg.n_random} distinct random sets of {len(claim)} heads different from "
                                f"the claim in this model; ask for fewer random sets")
        seen.add(tuple(hs.heads))
        arms.append(Arm(f"random-{i:02d}", "random", hs))
    if cfg.full:
        arms.append(Arm("full", "full", None))
    return arms


def fit_edit(lm: LoadedModel, task: Task | str, heads: HeadSet | str | None, config: FitConfig | None = None,
             seed: int = 0, limit: int | None = None, split: TaskSplit | None = None, progress: bool = True):
    """The optimal edit at `heads` (names like "L12H3,L14H1", a HeadSet, or None for full alignment) for `task`,
    trained on its training items and early-stopped on its validation items (`FitConfig`: tau, steps, patience);
    returns the `training.FitResult` (`.edit` is the fitted edit, `.status` says whether it converged)."""
    from locaudit.experiments import fit_optimal_edit

    task = load_task(task)
    a = lm.arch
    if isinstance(heads, str):
        heads = parse_heads(heads, a.n_layers, a.n_heads)
    elif heads is not None:
        heads = heads.validate(a.n_layers, a.n_heads)
    split = split or task.split(seed, limit)
    cfg = replace(config or FitConfig(), seed=seed, fmt=task.prompt_format(lm).name)
    return fit_optimal_edit(lm, heads, task.pairs(split.train), task.pairs(split.val), cfg, seed=seed,
                            progress=progress)


def _tau_tag(tau: float) -> str:
    return f"tau{tau:g}"


@dataclass
class AuditRun:
    """Everything the trials of one audit share (built once)."""

    lm: LoadedModel
    task: Task
    claim: HeadSet
    cfg: AuditConfig
    out: Path
    split: TaskSplit
    progress: bool = True

    @property
    def val_items(self) -> tuple:
        n = self.cfg.max_val_items
        return self.split.val[:n] if n else self.split.val

    @property
    def test_items(self) -> tuple:
        n = self.cfg.max_test_items
        return self.split.test[:n] if n else self.split.test

    def log(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    def evaluate(self, edit: Intervention | None, items, tau: float) -> ItemScores:
        return self.task.evaluate(self.lm, edit, items, tau=tau, batch_size=self.cfg.batch_size, progress=False)

    def trial_path(self, arm: Arm, tau: float | None) -> Path:
        return self.out / "trials" / arm.name / (f"{_tau_tag(tau)}.json" if tau is not None else "eval.json")

    def run_trial(self, arm: Arm, tau: float | None) -> dict:
        """One (arm, tau): fit (unless `none`), save the edit, score validation (when there is a tau to choose)
        and test items; written atomically, and read back instead of recomputed when already there."""
        path = self.trial_path(arm, tau)
        if path.is_file():
            try:
                return read_json(path)
            except LocauditError:
                pass  # unreadable: recompute
        t0 = time.time()
        record = {"arm": arm.name, "kind": arm.kind, "heads": None if arm.heads is None else arm.heads.names,
                  "tau": tau, "split_hash": self.split.hash}
        if arm.kind == "none":
            edit = NoEdit()
        else:
            result = fit_edit(self.lm, self.task, arm.heads, replace(self.cfg.fit, tau=tau), seed=self.cfg.seed,
                              split=self.split, progress=self.progress)
            edit = result.edit
            summary = fit_summary(result)
            edit_dir = self.out / "edits" / f"{arm.name}-{_tau_tag(tau)}"
            edit.save(edit_dir, extra={"model": self.lm.name, "task": self.task.spec(), "arm": arm.name,
                                       "heads": record["heads"], "split_hash": self.split.hash, **summary})
            record["fit"] = {k: summary[k] for k in ("status", "steps", "best", "val_start", "seconds",
                                                      "n_train_pairs", "n_val_pairs", "attempts")}
            record["fit"]["lr"] = result.config.lr
            record["edit_dir"] = str(edit_dir.relative_to(self.out))
        if len(self.cfg.taus) > 1 and arm.kind != "none":
            record["val"] = self.evaluate(edit, self.val_items, tau).as_dict()
        record["test"] = self.evaluate(edit, self.test_items, tau if tau is not None else self.cfg.taus[0]).as_dict()
        record["seconds"] = time.time() - t0
        atomic_write_json(path, record)
        return record

    def load_edit(self, record: dict) -> Intervention:
        if record["kind"] == "none":
            return NoEdit()
        return load_intervention(self.out / record["edit_dir"], self.lm.arch)


def _trial_line(k: int, n: int, arm: Arm, tau: float | None, r: dict, primary: str, stored: bool) -> str:
    fit = r.get("fit")
    parts = [f"[{k}/{n}] {arm.name} ({arm.describe()})"]
    if tau is not None:
        parts.append(f"tau={tau:g}")
    parts.append(f"test {primary}={ItemScores.from_dict(r['test']).mean(primary):.3f}")
    if fit:
        parts.append(f"fit {fit['status']} after {fit['steps']} steps")
    parts.append("(stored)" if stored else f"{r['seconds']:.0f}s")
    return " ".join(parts)


def resolve_claim(claim: HeadSet | str, lm: LoadedModel, task: Task, split: TaskSplit, cfg: AuditConfig,
                  out: Path | None = None, progress: bool = False) -> HeadSet:
    """The claim as a HeadSet: given heads, names like "L12H3,L14H1", or "probe:K", the top K heads of ITI-style
    probes trained on the task's training items and ranked by accuracy on its validation items (the heuristic
    claim such a study would make; the probes are written under `out/probes`)."""
    from locaudit.probes import probe_task

    a = lm.arch
    if isinstance(claim, HeadSet):
        return claim.validate(a.n_layers, a.n_heads)
    text = claim.strip()
    if not text.lower().startswith("probe:"):
        return parse_heads(text, a.n_layers, a.n_heads)
    k = text.partition(":")[2].strip()
    if not k.isdigit() or not 0 < int(k) <= a.n_total_heads:
        raise LocauditError(f"claim {text!r}: give probe:K with K a number of heads from 1 to {a.n_total_heads}")
    result = probe_task(lm, task, split, seed=cfg.seed, batch_size=cfg.batch_size, progress=progress)
    if out is not None:
        result.save(out / "probes")
    top = result.top(int(k))
    return HeadSet(top.heads, f"probe-top{k}")


def _config_record(lm: LoadedModel, task: Task, claim: HeadSet, cfg: AuditConfig) -> dict:
    return {"version": AUDIT_VERSION, "model": lm.name, "task": task.spec(), "claim": claim.names,
            "config": json.loads(json.dumps(asdict(cfg)))}


def audit(claim: HeadSet | str, task: Task | str, out: str | Path, config: AuditConfig | None = None,
          lm: LoadedModel | str | None = None, progress: bool = True):
    """Audit the claim that `task`'s behaviour lives at the heads `claim` (module docstring); write trials, the
    report (report.md, report.html), results.json and results.csv under `out`; return the `AuditResult`.

    `claim`: a HeadSet or names like "L12H3,L14H1"; `task`: a Task or its spec (`truthfulqa`, `caa:sycophancy`,
    a .jsonl path); `lm`: a loaded model, a model id/path, or None for the embedded default."""
    from locaudit.audit.report import write_audit_report
    from locaudit.audit.verdict import summarize

    cfg = config or AuditConfig()
    task = load_task(task)
    out = prepare_out_dir(Path(out))
    if not isinstance(lm, LoadedModel):
        lm = load_model(lm) if lm is not None else load_model()
    a = lm.arch
    split = task.split(cfg.seed, cfg.limit_items)
    claim = resolve_claim(claim, lm, task, split, cfg, out, progress)
    record = _config_record(lm, task, claim, cfg)
    prev = out / "audit.json"
    if prev.is_file() and read_json(prev) != record:
        raise LocauditError(f"{out} holds an audit with different settings; give a new output directory or the same settings")
    atomic_write_json(prev, record)
    run = AuditRun(lm, task, claim, cfg, out, split, progress)
    arms = plan(claim, a.n_layers, a.n_heads, cfg)
    trials: dict[str, list[dict]] = {}
    t0 = time.time()
    todo = [(arm, tau) for arm in arms for tau in ((None,) if arm.kind == "none" else cfg.taus)]
    for k, (arm, tau) in enumerate(todo, 1):
        done = run.trial_path(arm, tau).is_file()
        r = run.run_trial(arm, tau)
        trials.setdefault(arm.name, []).append(r)
        run.log(_trial_line(k, len(todo), arm, tau, r, task.primary, done))
    result = summarize(run, arms, trials, wall_seconds=time.time() - t0)
    write_audit_report(result, out)
    return result
