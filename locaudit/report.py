"""Results table, statistics, figures and a self-contained HTML report, all rebuilt from a run directory's
saved trials (`locaudit report DIR`), never from memory."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from locaudit import figures, replication, report_html, stats
from locaudit.errors import LocauditError
from locaudit.heads import parse_head
from locaudit.methods import METHODS, method_of, value_of
from locaudit.report_html import Figure
from locaudit.storage import atomic_write_json, atomic_write_text, read_json
from locaudit.training import FitConfig, recorded_status

COLUMNS = ["arm", "heads", "method", "alpha", "tau", "split", "truth", "info", "truth_info", "mc1", "mc2", "ce", "kl",
           "n_questions", "seconds", "selected"]


def load_trials(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((Path(run_dir) / "trials").glob("*/*.json")):
        rows.append(read_json(path))
    return rows


def selected_tests(trials: list[dict], selections: dict, run_dir: Path) -> dict[str, dict]:
    """Each arm's test trial at its hyper-parameter chosen on validation (a run made with judge "none" keeps a
    test trial per value until `locaudit judge` has chosen)."""
    if any(r.get("truth") is None for r in trials):
        raise LocauditError(f"{run_dir} holds answers that are not judged yet (a run with --judge none); "
                            f"score them with `locaudit judge {run_dir}`")
    tests: dict[str, dict] = {}
    for r in trials:
        if r["split"] != "test":
            continue
        hp = value_of(r)
        if r["arm"] not in selections or selections[r["arm"]] == hp:
            tests[r["arm"]] = r
    return tests


def _per_q(row: dict) -> tuple[np.ndarray, np.ndarray]:
    pq = row["per_question"]
    return np.asarray(pq["truth_p"], float), np.asarray(pq["info_p"], float)


def fit_status(row: dict, min_delta: float = FitConfig.min_delta) -> str | None:
    """How the arm's fit ended (training.STATUSES, or "flat": `training.recorded_status`), or None for arms
    without a fit (baseline, ITI)."""
    return recorded_status(row.get("fit"), min_delta)


# metrics compared between S* and the random null besides True*Info: True*Info as ITI computes it (product of
# the rates of answers judged true / informative), MC1, MC2 (higher is better) and KL (lower is better)
SIDE_METRICS = ("truth_info_pct", "mc1", "mc2", "kl")

# methods that edit a given head set: S* (the probe heads) is tested against random head sets for each of them
LOCATED = tuple(m for m in METHODS.values() if m.scope == "heads")


def compute_stats(tests: dict[str, dict], n_boot: int, seed: int = 0, probe_acc: np.ndarray | None = None,
                  min_delta: float = FitConfig.min_delta) -> dict:
    """Null tests (ITI, IPO) on True*Info and the side metrics, intervals, fraction of full alignment, single
    heads against full alignment and against their probe accuracy, fit statuses, verdicts.

    A fit that never left the identity ("stuck", after its retries) is not an optimal edit at its location: it
    is left out of the random null and listed, never counted silently. A "flat" fit (best validation loss less
    than `min_delta` below its start) stays in the null, as in the audit (a location where no edit helps is a
    measurement), and is listed; a flat fit at S* or full alignment gets a warning in the verdict (the audit goes
    further and gives no verdict on those)."""

    def status(row: dict) -> str | None:
        return fit_status(row, min_delta)

    def raw(row: dict) -> str | None:  # how the fit stopped (a flat fit may also have stopped at the step cap)
        return (row.get("fit") or {}).get("status")

    by_group = lambda method, group: [r for r in tests.values() if r["method"] == method and r["group"] == group]  # noqa: E731
    out: dict = {"arms": {}}
    for name, r in tests.items():
        t, i = _per_q(r)
        lo, hi = stats.truth_info_ci(t, i, n_boot=n_boot, seed=seed)
        out["arms"][name] = {"truth_info": r["truth_info"], "ci": [lo, hi], "n_questions": r["n_questions"],
                             "group": r["group"], "method": r["method"], "fit_status": status(r)}
    fitted = {name: status(r) for name, r in tests.items() if status(r) is not None}
    out["fits"] = {"n": len(fitted), "by_status": {k: sum(v == k for v in fitted.values()) for k in sorted(set(fitted.values()))},
                   "stuck": sorted(n for n, v in fitted.items() if v == "stuck"),
                   "flat": sorted(n for n, v in fitted.items() if v == "flat"),
                   "not_converged": sorted(n for n in fitted if raw(tests[n]) in ("step_cap", "fixed_schedule"))}
    full = tests.get("full")
    for m in LOCATED:
        method, label = m.name, m.label
        top = by_group(method, "top")
        rand = [r for r in by_group(method, "random") if status(r) != "stuck"]
        if not top:
            continue
        test = stats.null_test(top[0]["truth_info"], [r["truth_info"] for r in rand])
        verdict = stats.verdict(label, test)
        stuck = [r for r in by_group(method, "random") if status(r) == "stuck"]
        with_stuck = None
        if stuck:  # leaving fits out on their outcome is a choice: show what counting them as they are gives
            with_stuck = stats.null_test(top[0]["truth_info"], [r["truth_info"] for r in by_group(method, "random")])
            verdict += (f" {len(stuck)} random set(s) never left the identity and are left out of this null; counted "
                        f"at their unedited score, S* would sit at the {stats.ordinal(with_stuck.percentile)} percentile "
                        f"(rank p = {with_stuck.p_rank:.3f}).")
        # a fitted edit at S* or at random sets is compared with the fitted edit at every W^l (full alignment)
        for who, row in (("S*", top[0]), ("full alignment", full if m.needs_fit else None)):
            if row is not None and status(row) == "stuck":
                verdict += f" Warning: the fit at {who} never left the identity, so its score is the unedited model's."
            elif row is not None and status(row) == "flat":
                verdict += (f" Warning: the fit at {who} stayed flat (its best validation loss is less than "
                            f"{min_delta:.0%} below its start), so it may not be the optimal edit there.")
        unconverged = [r["arm"] for r in top + rand if raw(r) in ("step_cap", "fixed_schedule")]
        if unconverged:
            verdict += (f" Caution: {len(unconverged)} of the {len(top) + len(rand)} fits compared here were not trained to "
                        f"convergence (fixed schedule or step cap), so they measure how fast a location learns, not its "
                        f"optimal edit.")
        res = {"top_arm": top[0]["arm"], "test": test.as_dict(), "verdict": verdict,
               "random_scores": [r["truth_info"] for r in rand],
               "excluded_stuck": [r["arm"] for r in stuck],
               "test_including_stuck": with_stuck.as_dict() if with_stuck else None}
        res["side_metrics"] = {}
        for metric in SIDE_METRICS:
            if top[0].get(metric) is None or any(r.get(metric) is None for r in rand):
                continue
            # the null test asks "is S* better": KL is better when lower, so it runs on -KL (its t keeps that sign;
            # target and random_mean are reported as KL)
            sign = -1.0 if metric == "kl" else 1.0
            t_m = stats.null_test(sign * top[0][metric], [sign * r[metric] for r in rand])
            entry = {**t_m.as_dict(), "target": top[0][metric], "random_mean": sign * t_m.random_mean,
                     "higher_is_better": sign > 0, "random_scores": [r[metric] for r in rand]}
            per = top[0]["per_question"].get(metric)
            if per is not None and len(per) > 1:
                entry["ci"] = list(stats.mean_ci(per, n_boot=n_boot, seed=seed))
            res["side_metrics"][metric] = entry
        if full is not None and m.needs_fit:
            ratios = {}
            for r in top + rand + by_group(method, "all-heads"):
                p, lo, hi = stats.paired_ratio_ci(_per_q(r), _per_q(full), n_boot=n_boot, seed=seed)
                ratios[r["arm"]] = {"ratio": p, "ci": [lo, hi]}
            res["fraction_of_full"] = ratios
        out[method] = res
    singles = [r for r in by_group("ipo", "single-random") if status(r) != "stuck"]
    if full is not None:
        lo_full = out["arms"]["full"]["ci"][0]
        out["single"] = {
            "n": len(singles), "full_ci_low": lo_full,
            "n_reaching_full": int(sum(r["truth_info"] >= lo_full for r in singles)),
            "scores": {r["arm"]: r["truth_info"] for r in singles},
            "excluded_stuck": [r["arm"] for r in by_group("ipo", "single-random") if status(r) == "stuck"],
        }
        best = by_group("ipo", "single-best")
        if best:
            out["single"]["best_probe_head"] = {"arm": best[0]["arm"], "truth_info": best[0]["truth_info"]}
        if probe_acc is not None:
            pts = []
            for r in singles + [b for b in best if status(b) != "stuck"]:
                head = parse_head(r["heads"])
                l, h = head.layer, head.head
                pts.append({"arm": r["arm"], "probe_acc": float(probe_acc[l, h]), "truth_info": r["truth_info"],
                            "reaches_full": bool(r["truth_info"] >= lo_full)})
            out["single"]["vs_probe"] = pts
            if len(pts) >= 3:
                rho, p = stats.spearman(np.array([q["probe_acc"] for q in pts]), np.array([q["truth_info"] for q in pts]))
                out["single"]["spearman"] = {"rho": rho, "p": p, "n": len(pts)}
    return out


def console_summary(run_dir: Path, results: dict) -> str:
    """What `locaudit run` prints at the end: S*, one steered vs unsteered answer, and the verdicts."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    tests = selected_tests(load_trials(run_dir), run.get("selections", {}), run_dir)
    lines = []
    top = next((r for r in tests.values() if r["method"] == "iti" and r["group"] == "top"), None)
    if top is not None:
        lines.append(f"S* (top {len(top['heads'].split(','))} probe heads): {top['heads']}")
        base = tests.get("baseline")
        if base is not None and "question" in base["per_question"]:
            q, a0, a1 = (base["per_question"]["question"][0], base["per_question"]["answer"][0],
                         top["per_question"]["answer"][0])
            lines.append(f"Q: {q}\n  unsteered: {a0}\n  ITI at S* (alpha {top['alpha']:g}): {a1}")
    for m in LOCATED:
        if m.name in results["stats"]:
            lines.append(results["stats"][m.name]["verdict"])
    lines.append(f"report: {run_dir}/report.html")
    return "\n".join(lines)


SCHEMA_VERSION = 1  # of results.json; docs/results.md describes every key (and results.csv's columns)

# per-question scores whose differences the paired figure shows (stored in each trial's per_question)
PAIRED_SCORES = ("truth_p", "info_p")


def strict_json(obj):
    """`obj` with every non-finite float (a t-test on one random set, an undefined ratio) as None, so that
    results.json is standard JSON that any parser reads (Python would otherwise write NaN)."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not np.isfinite(obj):
        return None
    return obj


def paired_differences(tests: dict[str, dict], st: dict) -> dict:
    """Per test question, S*'s judge scores minus each random set's in the null (stuck fits left out, as in
    the null) and minus full alignment's, for each method that edits S*:
    {method: {"claim": arm, "qid": [...], "minus": {arm: {"truth_p": [...], "info_p": [...]}}}}, questions in
    the claim's order and matched by qid (every arm is scored on the same test questions)."""
    out = {}
    for m in LOCATED:
        if m.name not in st:
            continue
        claim = tests[st[m.name]["top_arm"]]
        others = sorted((r for r in tests.values() if r["method"] == m.name and r["group"] == "random"
                         and r["arm"] not in st[m.name]["excluded_stuck"]), key=lambda r: r["arm"])
        if "full" in tests:
            others.append(tests["full"])
        qid = _qids(claim)
        minus = {}
        for r in others:
            where = {q: i for i, q in enumerate(_qids(r))}
            if set(where) != set(qid):
                raise LocauditError(f"arms {claim['arm']} and {r['arm']} were scored on different test questions; "
                                    f"rerun the study into a fresh --out directory")
            minus[r["arm"]] = {k: [float(claim["per_question"][k][i]) - float(r["per_question"][k][where[q]])
                                   for i, q in enumerate(qid)] for k in PAIRED_SCORES}
        out[m.name] = {"claim": claim["arm"], "qid": qid, "minus": minus}
    return out


def _qids(row: dict) -> list:
    pq = row["per_question"]
    return list(pq["qid"]) if "qid" in pq else list(range(len(pq["truth_p"])))


def _curve_status(fit: dict, min_delta: float) -> str:
    """A recorded fit's status (`recorded_status`, "flat" included) from its edit.json or trial record."""
    start = (fit.get("val_curve") or [None])[0]
    return recorded_status({"status": fit.get("status", "unknown"), "best": fit.get("best"), "val_start": start},
                           min_delta) or "unknown"


def fit_records(run_dir: Path, trials: list[dict], selections: dict,
                min_delta: float = FitConfig.min_delta) -> list[dict]:
    """Every optimal-edit fit of the run, one per (arm, tau): its training-batch losses and validation losses
    ([[step, loss]]), kept checkpoint, status ("flat" as `compute_stats` calls it) and whether validation chose
    its tau. From each fitted edit's edit.json (train_curve, val_curve); a fit whose edit files are gone keeps its
    trials' val_curve."""
    fits: dict[tuple, dict] = {}
    for meta_path in sorted((Path(run_dir) / "edits").glob("*/*/edit.json")):
        meta = read_json(meta_path)
        if "val_curve" not in meta or "edit_label" not in meta:
            continue  # not a fitted edit of this study (an edit saved by another tool)
        key = (meta["edit_label"], float(meta["config"]["tau"]))
        fits[key] = {"train": [list(p) for p in meta.get("train_curve") or []],
                     "val": [[h["step"], h["val_loss"]] for h in meta["val_curve"]],
                     "best_step": (meta.get("best") or {}).get("step"), "status": _curve_status(meta, min_delta)}
    groups = {}
    for r in trials:
        if r.get("fit") and r.get("tau") is not None:
            key = (r["arm"], float(r["tau"]))
            groups[r["arm"]] = r["group"]
            if key not in fits and r["fit"].get("val_curve"):
                f = r["fit"]
                fits[key] = {"train": [], "val": [[h["step"], h["val_loss"]] for h in f["val_curve"]],
                             "best_step": (f.get("best") or {}).get("step"), "status": _curve_status(f, min_delta)}
    order = {"top": 0, "full": 1, "all-heads": 2, "single-best": 3, "random": 4, "single-random": 5}
    out = [{"arm": arm, "tau": tau, **f, "group": groups.get(arm),
            "selected": selections.get(arm) is not None and float(selections[arm]) == tau}
           for (arm, tau), f in fits.items()]
    return sorted(out, key=lambda f: (order.get(f["group"], 6), f["arm"], f["tau"]))


def write_report(run_dir: Path) -> dict:
    """Rebuild results.csv, results.json, figures/ and report.html from `run_dir`; returns results.json's
    content (with NaN where a number is undefined; the file has null there)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise LocauditError(f"{run_dir} is not a locaudit run directory (no config.json); give the --out of `locaudit run`")
    config = read_json(run_dir / "config.json")
    run = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    selections = run.get("selections", {})
    trials = load_trials(run_dir)
    if not trials:
        raise LocauditError(f"{run_dir} has no finished trials yet; run `locaudit run --out {run_dir}`")
    tests = selected_tests(trials, selections, run_dir)
    n_boot = config["preset"]["study"].get("n_boot", 2000)

    rows = []
    for r in trials:
        hp = value_of(r)
        rows.append({**{k: r.get(k) for k in COLUMNS if k not in ("seconds", "selected")},
                     "seconds": round(r.get("eval_seconds", 0) + r.get("fit_seconds", 0), 2),
                     "selected": int(r["split"] == "test" and selections.get(r["arm"], hp) == hp)})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row[k] is None else row[k]) for k in COLUMNS})
    atomic_write_text(run_dir / "results.csv", buf.getvalue())

    probe_npz = run_dir / "probes" / "probes.npz"
    probe_acc = np.load(probe_npz)["val_acc"] if probe_npz.is_file() else None
    min_delta = config["preset"].get("fit", {}).get("min_delta", FitConfig.min_delta)
    st = compute_stats(tests, n_boot, probe_acc=probe_acc, min_delta=min_delta)
    judge = next((r.get("judge") for r in trials if r.get("judge")), None)
    results = {"schema_version": SCHEMA_VERSION, "config": config, "run": run, "stats": st, "judge": judge,
               "replication": replication.replication_rows(st), "paired_differences": paired_differences(tests, st),
               "rows": [{k: v for k, v in r.items() if k != "per_question"} for r in trials]}
    atomic_write_json(run_dir / "results.json", strict_json(results))

    figs = _figures(run_dir, tests, trials, st, probe_acc, results["paired_differences"], fit_records(run_dir, trials, selections, min_delta))
    atomic_write_text(run_dir / "report.html", report_html.page(config, run, st, judge, tests, figs, results["replication"]))
    return results


def _figures(run_dir: Path, tests: dict, trials: list[dict], st: dict, probe_acc: np.ndarray | None, paired: dict,
             fits: list[dict]) -> list[Figure]:
    """Draw every figure under figures/ and say where each goes in the report (report_html.SECTIONS)."""
    fdir = run_dir / "figures"
    out: list[Figure] = []
    full = tests.get("full", {}).get("truth_info")
    # trade-off curves through each arm's grid on validation questions (every grid value has a validation trial),
    # with every arm whose method has the same hyper-parameter (IPO's curves include full alignment's)
    for method, hp, title in ((m.name, m.hyper, m.label) for m in LOCATED):
        curves = []
        for r_arm in sorted({r["arm"] for r in trials if method_of(r).hyper == hp}):
            rows = sorted((r for r in trials if r["arm"] == r_arm and r["split"] == "val"), key=lambda r: r[hp] or 0)
            if rows:
                kind = rows[0]["group"]
                if kind in ("top", "random", "full"):
                    curves.append({"label": {"top": "S* (probe heads)", "full": "full alignment"}.get(kind, r_arm),
                                   "kind": kind, "points": [{**r, "hp": r[hp]} for r in rows]})
        if any(len(c["points"]) > 1 for c in curves):
            for x, y, name in (("info", "truth", "truth_info"), ("kl", "mc2", "kl_mc2")):
                if all(p.get(x) is not None for c in curves for p in c["points"]):
                    path = figures.tradeoff_curves(curves, x, y, fdir / f"tradeoff_{method}_{name}.png",
                                                   f"{title}: {y} vs {x} over the {hp} grid (validation)")
                    out.append(Figure(path, "tradeoff", f"{title} trade-off, {y} vs {x}",
                                      f"{title} on the validation questions at each {hp} of the grid: {y} against {x}; "
                                      f"S* in red (labelled with its {hp}), random sets grey"
                                      + (", full alignment blue." if method == "ipo" and full is not None else ".")))
    for method, title in ((m.name, m.label) for m in LOCATED):
        if method in st:
            marks = {"S* (probe heads)": tests[st[method]["top_arm"]]["truth_info"]}
            if full is not None:
                marks["full alignment"] = full
            if "baseline" in tests:
                marks["unedited"] = tests["baseline"]["truth_info"]
            path = figures.null_histogram(st[method]["random_scores"], fdir / f"hist_{method}.png", marks,
                                          "True*Info (test)", f"{title}: random head sets vs S*")
            n = st[method]["test"]["n_random"]
            out.append(Figure(path, "null", f"{title} random null",
                              f"{title}: True*Info on the test questions at each of {n} random head sets (grey), at "
                              f"S*, with full alignment and the unedited model for reference."))
    if "single" in st:
        marks = {"full alignment": full}
        if "best_probe_head" in st["single"]:
            marks["best probe head"] = st["single"]["best_probe_head"]["truth_info"]
        if "ipo" in st:
            marks["S* (IPO)"] = tests[st["ipo"]["top_arm"]]["truth_info"]
        path = figures.null_histogram(list(st["single"]["scores"].values()), fdir / "hist_single.png", marks,
                                      "True*Info (test)", "Optimal edit at single random heads")
        out.append(Figure(path, "null", "single heads", "The optimal edit at single random heads, beside S*, the "
                                                        "head with the best probe and full alignment."))
    for method, title in ((m.name, m.label) for m in LOCATED):
        if paired.get(method, {}).get("minus"):
            d = paired[method]
            prefix = f"{method}-"
            rows = [{"label": "full alignment" if arm == "full" else arm.removeprefix(prefix),
                     "kind": "full" if arm == "full" else "random", **v} for arm, v in d["minus"].items()]
            rows.sort(key=lambda r: r["kind"] != "full")
            path = figures.paired_differences(rows, fdir / f"paired_{method}.png",
                                              f"{title}: S* ({d['claim']}) minus each comparison, per test question")
            out.append(Figure(path, "paired", f"{title} per-question differences",
                              f"{title}: for each of {len(d['qid'])} test questions, S*'s judge scores minus those of "
                              f"each random set in the null and of full alignment (results.json: "
                              f"paired_differences.{method})."))
    if fits:
        path = figures.fit_curves(fits, fdir / "fit_curves.png", "Optimal-edit fits: loss relative to the unedited model")
        n_arms = len({f["arm"] for f in fits})
        out.append(Figure(path, "fits", "training curves of every fit",
                          f"All {len(fits)} fits ({n_arms} arms): training-batch loss (thin) and validation loss (dots), "
                          f"divided by the validation loss at step 0; one colour per tau, the tau chosen on validation "
                          f"bold; the star is the kept checkpoint; dotted lines are fits that never left the identity, "
                          f"dash-dotted ones stayed flat (never min_delta below the start), dashed ones stopped at the "
                          f"step cap."))
    if probe_acc is not None:
        top = next((r["heads"] for r in tests.values() if r["method"] == "iti" and r["group"] == "top"), "")
        marked = [(h.layer, h.head) for h in map(parse_head, filter(None, top.split(",")))]
        path = figures.probe_heatmap(probe_acc, fdir / "probe_heatmap.png", marked)
        out.append(Figure(path, "more", "probe accuracy per head", "Probe validation accuracy of every head; S* boxed "
                                                                    "in red (how the claim was chosen)."))
    if "single" in st and st["single"].get("vs_probe"):
        path = figures.effect_vs_probe(st["single"]["vs_probe"], st["single"]["full_ci_low"],
                                       fdir / "single_vs_probe.png", "Single heads: optimal edit vs probe accuracy")
        out.append(Figure(path, "more", "single heads vs probe accuracy",
                          "Single heads: the optimal edit's True*Info against the head's probe accuracy."))
    pts = [{"truth": r["truth"], "info": r["info"], "mc1": r["mc1"], "kl": r["kl"],
            "method": f"{r['method']}:{r['group']}"} for r in tests.values()]
    path = figures.scatter(pts, "info", "truth", fdir / "truth_vs_info.png", "Truth vs informativeness (test)")
    out.append(Figure(path, "more", "truth vs informativeness", "Every arm's truth and informativeness on the test "
                                                                "questions."))
    if any(p["kl"] is not None for p in pts):
        path = figures.scatter(pts, "kl", "mc1", fdir / "kl_vs_mc1.png", "KL from unedited vs MC1 (test)")
        out.append(Figure(path, "more", "KL vs MC1", "Every arm's MC1 against its KL divergence from the unedited "
                                                    "model on reference text."))
    return out
