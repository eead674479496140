"""An audit's statistics and verdict, computed from its stored trials.

All arms are scored on the same test items, so every comparison is paired: bootstrap resamples of the items
(the same resample for every arm) give the intervals. With S the task's statistic (mean of its primary per-item
score; True*Info for TruthfulQA), base the unedited model:
- the claim's place in the random null: its percentile among the random sets' S and the exact rank p-value
  (1 + #random >= claim) / (R + 1) (`stats.null_test`), since the null has no distributional form to assume;
- the claim's fraction of full alignment's gain, (S_claim - S_base) / (S_full - S_base), with a paired
  percentile interval;
- each random set's fraction of full alignment (the paper's observation: random sets often reach most of it).
A random set whose fit never left the identity ("stuck", after retries) is left out of the null, which makes
the null harder to beat (the verdict says what counting it would give). A fit that stopped with its best
validation loss less than its `min_delta` (relative) below its start is "flat": it never left its starting
plateau, whatever the stopping rule called it. A flat random set stays in the null (a location where no edit
helps is a measurement too: the planted tests' random heads are flat because they cannot move the behaviour),
and the verdict says how many there were; a flat claim or full alignment gets no verdict ("inconclusive",
"uninformative"), since its edit may not be the optimal one there.

With steering arms (`AuditConfig.steering`), a second, parallel comparison (`Comparison`, results.json's
`steering`): the claim's steering heuristic (ITI for heads, mean-difference steering for neurons and layers) at
the claim against the same heuristic at the random sets, with the same statistics (percentile, rank p, fraction
of full alignment's gain) and its own strength and sentence (`uninformative` when steering moves the behaviour
measurably neither at the claim nor at any random set).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from locaudit.audit.steering import STEERING
from locaudit.packing import stored_choices
from locaudit.stats import NullTest, null_test, ordinal
from locaudit.tasks import ItemScores
from locaudit.training import recorded_status

LEVEL = 0.95
ALPHA = 0.05


@dataclass
class Comparison:
    """The steering heuristic at the claim against the same heuristic at the random sets (module docstring)."""

    heuristic: str  # audit.steering.STEERING's name: iti | meandiff | caa
    what: str  # how the verdict names it
    null: NullTest
    frac_full: tuple[float, float, float]  # point, lo, hi
    random_frac_full: list[float]
    strength: str  # singled-out | weak | none | uninformative | inconclusive
    verdict: str

    def as_dict(self) -> dict:
        return {"heuristic": self.heuristic, "what": self.what, "null": self.null.as_dict(),
                "frac_full": {"point": self.frac_full[0], "lo": self.frac_full[1], "hi": self.frac_full[2],
                              "level": LEVEL},
                "random_frac_full": self.random_frac_full, "strength": self.strength, "verdict": self.verdict}


@dataclass
class AuditResult:
    task: str
    primary: str
    model: str
    claim: list[str]
    n_test: int
    n_val: int
    rows: list[dict]  # one per arm: arm, kind, units, tau, alpha, value, ci, gain, status, steps, fit_seconds, metrics
    null: NullTest
    null_including_stuck: NullTest
    frac_full: tuple[float, float, float]  # point, lo, hi
    random_frac_full: list[float]
    strength: str  # singled-out | weak | none | uninformative | inconclusive
    verdict: str
    wall_seconds: float
    config: dict = field(default_factory=dict)
    steering: Comparison | None = None  # None: no steering arms
    heuristic: dict | None = None  # the heuristic that chose the claim (audit.json's record); None: named units

    def row(self, arm: str) -> dict:
        return next(r for r in self.rows if r["arm"] == arm)

    def as_dict(self) -> dict:
        return _finite({"task": self.task, "primary": self.primary, "model": self.model, "claim": self.claim,
                "n_test_items": self.n_test, "n_val_items": self.n_val, "arms": self.rows,
                "null": self.null.as_dict(), "null_including_stuck": self.null_including_stuck.as_dict(),
                "frac_full": {"point": self.frac_full[0], "lo": self.frac_full[1], "hi": self.frac_full[2],
                              "level": LEVEL},
                "random_frac_full": self.random_frac_full, "strength": self.strength, "verdict": self.verdict,
                "wall_seconds": self.wall_seconds, "config": self.config, "heuristic": self.heuristic,
                "steering": None if self.steering is None else self.steering.as_dict()})


def _finite(obj):
    """JSON has no NaN: undefined numbers (a ratio to a zero gain, a null with no sets) become null."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _select(task, rows: list[dict]) -> dict:
    """The arm's trial at the tau whose validation statistic is highest (the only one without a grid)."""
    if len(rows) == 1 or any("val" not in r for r in rows):
        return rows[0]
    return max(rows, key=lambda r: task.statistic(ItemScores.from_dict(r["val"])))


def _interval(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size < 2:
        return float("nan"), float("nan")
    a = (1 - LEVEL) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def _ratio(num, den):
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.where(np.abs(den) > 1e-12, num / np.where(np.abs(den) > 1e-12, den, 1.0), np.nan)


UNTRAINED = ("stuck", "flat")  # fits whose edit may not be the optimal one: no verdict on a claim or ceiling like that


def summarize(run, arms, trials: dict[str, list[dict]], wall_seconds: float = 0.0) -> AuditResult:
    task, cfg = run.task, run.cfg
    chosen = {a.name: _select(task, trials[a.name]) for a in arms}
    scores = {k: ItemScores.from_dict(r["test"]) for k, r in chosen.items()}
    ids = scores["none"].ids
    for k, s in scores.items():
        if s.ids != ids:
            raise AssertionError(f"arm {k} was scored on different test items")
    n = len(ids)
    idx = np.random.default_rng(cfg.seed).integers(0, n, size=(cfg.n_boot, n))
    stat = {k: task.statistic(s) for k, s in scores.items()}
    boot = {k: np.asarray(task.statistic(s, idx), float) for k, s in scores.items()}
    base = stat["none"]
    rows = []
    for a in arms:
        r = chosen[a.name]
        fit = r.get("fit") or {}
        rows.append({
            "arm": a.name, "kind": a.kind, "units": None if a.units is None else a.units.names, "tau": r.get("tau"),
            "alpha": r.get("alpha"), "steering": r.get("steering"), "value": stat[a.name],
            "ci": list(_interval(boot[a.name])), "gain": stat[a.name] - base,
            "gain_ci": list(_interval(boot[a.name] - boot["none"])),
            "status": recorded_status(fit, cfg.fit.min_delta), "steps": fit.get("steps"), "fit_seconds": fit.get("seconds"),
            "metrics": {m: scores[a.name].mean(m) for m in scores[a.name].scores},
        })
    randoms = [r for r in rows if r["kind"] == "random"]
    live = [r for r in randoms if r["status"] != "stuck"]
    claim_row = next(r for r in rows if r["kind"] == "claim")
    null = null_test(claim_row["value"], [r["value"] for r in live])
    null_all = null_test(claim_row["value"], [r["value"] for r in randoms])
    full_row = next((r for r in rows if r["kind"] == "full"), None)
    if full_row is not None:
        point = float(_ratio(stat["claim"] - base, stat["full"] - base))
        lo, hi = _interval(_ratio(boot["claim"] - boot["none"], boot["full"] - boot["none"]))
        frac = (point, lo, hi)
        rand_frac = [float(_ratio(r["value"] - base, stat["full"] - base)) for r in live]
        for r in rows:
            r["frac_full"] = float(_ratio(r["value"] - base, stat["full"] - base))
    else:
        frac, rand_frac = (float("nan"),) * 3, []
    # fits stopped at the step cap while still improving (a flat one may have too): not shown to be optima
    capped = [r["arm"] for r in rows if (chosen[r["arm"]].get("fit") or {}).get("status") == "step_cap"
              and r["kind"] in ("claim", "random", "full")]
    strength, text = _verdict(task, run, claim_row, full_row, base, null, null_all, frac, rand_frac, n,
                              n_stuck=len(randoms) - len(live), n_flat=sum(r["status"] == "flat" for r in randoms))
    if capped:
        text += (f" Caution: {len(capped)} of the fits compared ({', '.join(capped)}) stopped at the step cap while "
                 f"still improving, so they show how far a location gets in that budget, not its optimal edit.")
    steering = _steering(task, run, rows, stat, boot, base, full_row)
    config = {"n_random": cfg.n_random, "match_layers": cfg.match_layers, "taus": list(cfg.taus),
              "n_boot": cfg.n_boot, "seed": cfg.seed, "steering": cfg.steering, "packing": cfg.packing,
              "packing_decisions": stored_choices(run.out / "packing"), "placement": run.placement}
    if cfg.steering:
        config.update(alphas=list(cfg.alphas), meandiff_alphas=list(cfg.meandiff_alphas))
    resolved = run.resolved
    return AuditResult(task.spec(), task.primary, run.lm.name, run.claim.names, n, len(run.val_items), rows, null,
                       null_all, frac, rand_frac, strength, text, wall_seconds, config=config, steering=steering,
                       heuristic=None if resolved is None else resolved.heuristic)


def _steering(task, run, rows: list[dict], stat: dict, boot: dict, base: float, full: dict | None) -> Comparison | None:
    """The steering heuristic's comparison (module docstring); None without steering arms."""
    claim = next((r for r in rows if r["kind"] == "claim-steer"), None)
    if claim is None:
        return None
    randoms = [r for r in rows if r["kind"] == "random-steer"]
    null = null_test(claim["value"], [r["value"] for r in randoms])
    if full is not None:
        point = float(_ratio(stat["claim-steer"] - base, stat["full"] - base))
        lo, hi = _interval(_ratio(boot["claim-steer"] - boot["none"], boot["full"] - boot["none"]))
        frac = (point, lo, hi)
        rand_frac = [r["frac_full"] for r in randoms]
    else:
        frac, rand_frac = (float("nan"),) * 3, []
    heuristic = STEERING[run.claim.kind]
    strength, text = _steering_verdict(task, heuristic.what, claim, randoms, full, base, null, frac, rand_frac)
    return Comparison(heuristic.name, heuristic.what, null, frac, rand_frac, strength, text)


def _unit_word(units) -> str:
    noun = units.unit_kind.noun
    return noun if len(units) == 1 else noun + "s"


def _f(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _verdict(task, run, claim: dict, full: dict | None, base: float, null: NullTest, null_all: NullTest,
             frac: tuple, rand_frac: list[float], n: int, n_stuck: int, n_flat: int = 0) -> tuple[str, str]:
    """(strength, plain-words verdict with n and intervals)."""
    what = "True*Info" if task.primary == "truth_info" else task.primary
    head = (f"Claim {','.join(run.claim.names)} ({len(run.claim)} {_unit_word(run.claim)}) on "
            f"{task.spec()}, {run.lm.name}, n={n} test items: the optimal edit at the claim moves {what} from "
            f"{_f(base)} (unedited) to {_f(claim['value'])} (95% CI {_f(claim['ci'][0])}-{_f(claim['ci'][1])}).")
    if claim["status"] == "stuck":
        return "inconclusive", head + (" The claim's fit never left the identity, even at lower learning rates: "
                                       "no verdict; check the task's data and the learning rate.")
    if claim["status"] == "flat":
        return "inconclusive", head + (" The claim's fit stopped within its min_delta of its starting validation loss: "
                                       "it never left its starting plateau, so it is not the optimal edit there; no "
                                       "verdict; give the fits more steps or patience (docs/audit.md).")
    if full is not None and full["status"] in UNTRAINED:
        return "uninformative", head + (f" Full alignment's fit is {full['status']} (it never left its starting "
                                        f"plateau), so the ceiling is not at its optimum: no verdict; give the fits "
                                        f"more steps or patience (docs/audit.md).")
    parts = [head]
    if full is not None:
        parts.append(f"Full alignment reaches {_f(full['value'])} (gain {_f(full['gain'])}, 95% CI "
                     f"{_f(full['gain_ci'][0])}-{_f(full['gain_ci'][1])}); the claim achieves {_f(frac[0])} of full "
                     f"alignment's gain (paired 95% CI {_f(frac[1])}-{_f(frac[2])}).")
        if not full["gain_ci"][0] > 0:
            return "uninformative", " ".join(parts) + (
                " Even full alignment does not move the behaviour measurably on these items, so editing cannot "
                "say where it lives: use more items or a behaviour the model can be moved on.")
    if null.n_random == 0:
        return "inconclusive", " ".join(parts) + " No random set was fitted (or every one was stuck): no comparison."
    rv = [r for r in rand_frac if np.isfinite(r)]
    parts.append(f"Optimal edits at {null.n_random} random sets of the same size reach {_f(null.random_mean)} on "
                 f"average (sd {_f(null.random_sd)}); the claim is at the {ordinal(null.percentile)} percentile of "
                 f"this null (rank p = {null.p_rank:.3f})"
                 + (f", and random sets reach a median {np.median(rv):.2f} of full alignment's gain." if rv else "."))
    if n_stuck:
        parts.append(f"{n_stuck} random set(s) never trained (stuck) and are left out; counting them the claim is at "
                     f"the {ordinal(null_all.percentile)} percentile (rank p = {null_all.p_rank:.3f}).")
    if n_flat:
        parts.append(f"{n_flat} random set(s) stopped on their starting plateau (flat) and count in the null as "
                     f"measured.")
    place = _place(claim["value"], null)
    floor = 1 / (null.n_random + 1)
    ending = {
        "singled-out": " Editing singles out the claimed units: the optimal edit there beats random locations of the "
                       "same size.",
        "floor": f" The claim beats every random set, but with {null.n_random} sets the rank p cannot fall below "
                 f"{floor:.3f}: weak evidence at most; run more random sets.",
        "weak": " The claim scores above the random average but not beyond what random locations reach: weak "
                "evidence at most.",
        "none": " Random locations do as well: editing gives no evidence that the behaviour is localized at the "
                "claimed units."}[place]
    return ("weak" if place == "floor" else place), " ".join(parts) + ending


def _place(value: float, null: NullTest) -> str:
    """Where the claim's value falls in a random null: singled-out (above the random mean, rank p <= ALPHA),
    floor (above every random set, but too few sets for rank p <= ALPHA), weak (above the mean) or none."""
    above = value > null.random_mean
    if above and null.p_rank <= ALPHA:
        return "singled-out"
    floor = 1 / (null.n_random + 1)
    if above and floor > ALPHA and null.p_rank <= floor + 1e-12:
        return "floor"
    return "weak" if above else "none"


def _moved(row: dict) -> bool:
    """Whether the arm changes the statistic measurably: its paired 95% interval of the gain excludes 0."""
    lo, hi = row["gain_ci"]
    return bool(lo > 0 or hi < 0)


def _steering_verdict(task, what: str, claim: dict, randoms: list[dict], full: dict | None, base: float,
                      null: NullTest, frac: tuple, rand_frac: list[float]) -> tuple[str, str]:
    """(strength, plain-words sentence) of the steering comparison, worded like the optimal edit's. It is
    `uninformative` when steering moves the behaviour measurably neither at the claim nor at any random set (a
    steering edit can move what a short fit of full alignment does not, so full alignment does not gate it)."""
    stat = "True*Info" if task.primary == "truth_info" else task.primary
    parts = [f"{what} at the claim, with the multiplier chosen on validation items ({claim['alpha']:g}), moves {stat} "
             f"from {_f(base)} to {_f(claim['value'])} (95% CI {_f(claim['ci'][0])}-{_f(claim['ci'][1])})"
             + (f", {_f(frac[0])} of full alignment's gain (paired 95% CI {_f(frac[1])}-{_f(frac[2])})."
                if full is not None else ".")]
    if null.n_random == 0:
        return "inconclusive", " ".join(parts) + " No random set was steered: no comparison."
    if not any(_moved(r) for r in [claim, *randoms]):
        return "uninformative", " ".join(parts) + (f" {what} moves the behaviour measurably neither at the claim nor at "
                                                   f"any of the {null.n_random} random sets on these items, so it "
                                                   f"cannot say where the behaviour lives.")
    rv = [r for r in rand_frac if r is not None and np.isfinite(r)]
    parts.append(f"The same heuristic at {null.n_random} random sets of the same size reaches {_f(null.random_mean)} "
                 f"on average (sd {_f(null.random_sd)}); the claim is at the {ordinal(null.percentile)} percentile "
                 f"(rank p = {null.p_rank:.3f})"
                 + (f", and random sets reach a median {np.median(rv):.2f} of full alignment's gain." if rv else "."))
    place = _place(claim["value"], null)
    floor = 1 / (null.n_random + 1)
    ending = {
        "singled-out": f" {what} works better at the claimed units than at random units of the same size.",
        "floor": f" The claim beats every random set, but with {null.n_random} sets the rank p cannot fall below "
                 f"{floor:.3f}: weak evidence at most; run more random sets.",
        "weak": f" {what} works somewhat better at the claimed units than at random ones, but not beyond what random "
                f"units reach: weak evidence at most.",
        "none": f" {what} works as well at random units: steering gives no evidence that the behaviour is localized "
                f"at the claimed units."}[place]
    return ("weak" if place == "floor" else place), " ".join(parts) + ending
