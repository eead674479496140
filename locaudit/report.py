"""Results table, statistics, figures and a self-contained HTML report, all rebuilt from a run directory's
saved trials (`locaudit report DIR`), never from memory."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from locaudit import figures, replication, stats
from locaudit.errors import LocauditError
from locaudit.heads import parse_head
from locaudit.methods import METHODS, method_of, value_of
from locaudit.storage import atomic_write_json, atomic_write_text, read_json

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


def _fmt(v, nd=3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not np.isfinite(v) else f"{v:.{nd}f}"
    return str(v)


def fit_status(row: dict) -> str | None:
    """How the arm's fit ended (training.STATUSES), or None for arms without a fit (baseline, ITI)."""
    return (row.get("fit") or {}).get("status")


# metrics compared between S* and the random null besides True*Info: True*Info as ITI computes it (product of
# the rates of answers judged true / informative), MC1, MC2 (higher is better) and KL (lower is better)
SIDE_METRICS = ("truth_info_pct", "mc1", "mc2", "kl")

# methods that edit a given head set: S* (the probe heads) is tested against random head sets for each of them
LOCATED = tuple(m for m in METHODS.values() if m.scope == "heads")


def compute_stats(tests: dict[str, dict], n_boot: int, seed: int = 0, probe_acc: np.ndarray | None = None) -> dict:
    """Null tests (ITI, IPO) on True*Info and the side metrics, intervals, fraction of full alignment, single
    heads against full alignment and against their probe accuracy, fit statuses, verdicts.

    A fit that never left the identity ("stuck", after its retries) is not an optimal edit at its location: it
    is left out of the random null and listed, never counted silently."""
    by_group = lambda method, group: [r for r in tests.values() if r["method"] == method and r["group"] == group]  # noqa: E731
    out: dict = {"arms": {}}
    for name, r in tests.items():
        t, i = _per_q(r)
        lo, hi = stats.truth_info_ci(t, i, n_boot=n_boot, seed=seed)
        out["arms"][name] = {"truth_info": r["truth_info"], "ci": [lo, hi], "n_questions": r["n_questions"],
                             "group": r["group"], "method": r["method"], "fit_status": fit_status(r)}
    fitted = {name: fit_status(r) for name, r in tests.items() if fit_status(r) is not None}
    out["fits"] = {"n": len(fitted), "by_status": {k: sum(v == k for v in fitted.values()) for k in sorted(set(fitted.values()))},
                   "stuck": sorted(n for n, v in fitted.items() if v == "stuck"),
                   "not_converged": sorted(n for n, v in fitted.items() if v in ("step_cap", "fixed_schedule"))}
    full = tests.get("full")
    for m in LOCATED:
        method, label = m.name, m.label
        top = by_group(method, "top")
        rand = [r for r in by_group(method, "random") if fit_status(r) != "stuck"]
        if not top:
            continue
        test = stats.null_test(top[0]["truth_info"], [r["truth_info"] for r in rand])
        verdict = stats.verdict(label, test)
        stuck = [r for r in by_group(method, "random") if fit_status(r) == "stuck"]
        with_stuck = None
        if stuck:  # leaving fits out on their outcome is a choice: show what counting them as they are gives
            with_stuck = stats.null_test(top[0]["truth_info"], [r["truth_info"] for r in by_group(method, "random")])
            verdict += (f" {len(stuck)} random set(s) never left the identity and are left out of this null; counted "
                        f"at their unedited score, S* would sit at the {stats.ordinal(with_stuck.percentile)} percentile "
                        f"(rank p = {with_stuck.p_rank:.3f}).")
        # a fitted edit at S* or at random sets is compared with the fitted edit at every W^l (full alignment)
        for who, row in (("S*", top[0]), ("full alignment", full if m.needs_fit else None)):
            if row is not None and fit_status(row) == "stuck":
                verdict += f" Warning: the fit at {who} never left the identity, so its score is the unedited model's."
        unconverged = [r["arm"] for r in top + rand if fit_status(r) in ("step_cap", "fixed_schedule")]
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
    singles = [r for r in by_group("ipo", "single-random") if fit_status(r) != "stuck"]
    if full is not None:
        lo_full = out["arms"]["full"]["ci"][0]
        out["single"] = {
            "n": len(singles), "full_ci_low": lo_full,
            "n_reaching_full": int(sum(r["truth_info"] >= lo_full for r in singles)),
            "scores": {r["arm"]: r["truth_info"] for r in singles},
            "excluded_stuck": [r["arm"] for r in by_group("ipo", "single-random") if fit_status(r) == "stuck"],
        }
        best = by_group("ipo", "single-best")
        if best:
            out["single"]["best_probe_head"] = {"arm": best[0]["arm"], "truth_info": best[0]["truth_info"]}
        if probe_acc is not None:
            pts = []
            for r in singles + [b for b in best if fit_status(b) != "stuck"]:
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


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def write_report(run_dir: Path) -> dict:
    """Rebuild results.csv, results.json, figures/ and report.html from `run_dir`; returns results.json."""
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
    st = compute_stats(tests, n_boot, probe_acc=probe_acc)
    judge = next((r.get("judge") for r in trials if r.get("judge")), None)
    results = {"config": config, "run": run, "stats": st, "judge": judge, "replication": replication.replication_rows(st),
               "rows": [{k: v for k, v in r.items() if k != "per_question"} for r in trials]}
    atomic_write_json(run_dir / "results.json", results)

    figs = _figures(run_dir, tests, trials, st, probe_acc)
    atomic_write_text(run_dir / "report.html", _html(config, run, st, judge, tests, figs, results["replication"]))
    return results


def _figures(run_dir: Path, tests: dict, trials: list[dict], st: dict, probe_acc: np.ndarray | None) -> dict[str, Path]:
    fdir = run_dir / "figures"
    out = {}
    full = tests.get("full", {}).get("truth_info")
    for method, title in ((m.name, m.label) for m in LOCATED):
        if method in st:
            marks = {"S* (probe heads)": tests[st[method]["top_arm"]]["truth_info"]}
            if full is not None:
                marks["full alignment"] = full
            if "baseline" in tests:
                marks["unedited"] = tests["baseline"]["truth_info"]
            out[f"hist_{method}"] = figures.null_histogram(st[method]["random_scores"], fdir / f"hist_{method}.png", marks,
                                                           "True*Info (test)", f"{title}: random head sets vs S*")
    if "single" in st:
        marks = {"full alignment": full}
        if "best_probe_head" in st["single"]:
            marks["best probe head"] = st["single"]["best_probe_head"]["truth_info"]
        if "ipo" in st:
            marks["S* (IPO)"] = tests[st["ipo"]["top_arm"]]["truth_info"]
        out["hist_single"] = figures.null_histogram(list(st["single"]["scores"].values()), fdir / "hist_single.png", marks,
                                                    "True*Info (test)", "Optimal edit at single random heads")
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
                    out[f"tradeoff_{method}_{name}"] = figures.tradeoff_curves(
                        curves, x, y, fdir / f"tradeoff_{method}_{name}.png",
                        f"{title}: {y} vs {x} over the {hp} grid (validation)")
    if "single" in st and st["single"].get("vs_probe"):
        out["single_vs_probe"] = figures.effect_vs_probe(st["single"]["vs_probe"], st["single"]["full_ci_low"],
                                                         fdir / "single_vs_probe.png",
                                                         "Single heads: optimal edit vs probe accuracy")
    pts = [{"truth": r["truth"], "info": r["info"], "mc1": r["mc1"], "kl": r["kl"],
            "method": f"{r['method']}:{r['group']}"} for r in tests.values()]
    out["truth_info"] = figures.scatter(pts, "info", "truth", fdir / "truth_vs_info.png", "Truth vs informativeness (test)")
    if any(p["kl"] is not None for p in pts):
        out["kl_mc1"] = figures.scatter(pts, "kl", "mc1", fdir / "kl_vs_mc1.png", "KL from unedited vs MC1 (test)")
    if probe_acc is not None:
        top = next((r["heads"] for r in tests.values() if r["method"] == "iti" and r["group"] == "top"), "")
        marked = [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in top.split(",") if h]
        out["probe_heatmap"] = figures.probe_heatmap(probe_acc, fdir / "probe_heatmap.png", marked)
    return out


def _html(config: dict, run: dict, st: dict, judge: dict | None, tests: dict, figs: dict, findings: list[dict]) -> str:
    e = html.escape
    preset = config["preset"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>locaudit report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}"
             "th{background:#eee}.v{background:#f4f4ff;padding:.6em;border-left:4px solid #66f}"
             "pre{white-space:pre-wrap;overflow-wrap:anywhere}</style></head><body>",
             "<h1>locaudit: does editing provide evidence for localization?</h1>",
             f"<p>Model <b>{e(str(run.get('model', preset['model']['model'])))}</b>, preset <b>{e(preset['name'])}</b>, "
             f"{run.get('n_test_questions', '?')} test / {run.get('n_val_questions', '?')} validation questions "
             f"(split {e(str(run.get('split_hash', '')))}, seed {preset['data']['seed']}).</p>"]
    samples = run.get("samples") or {}
    if samples:
        rows = []
        for name, label in (("test", "Test"), ("val", "Validation")):
            c = samples.get(name)
            if c:
                types = ", ".join(f"{e(t)} {n}" for t, n in c["type"].items())
                rows.append(f"{label} questions (a seeded random sample stratified by Type and Category): n={c['n']}, "
                            f"{types}; {len(c['category'])} categories.")
        parts.append("<p>" + "<br>".join(rows) + "</p>")
    if run.get("partial"):
        parts.append("<p class='v'><b>Partial run</b>: the study stopped before every arm finished; this report covers "
                     "the finished trials only (rerun the same `locaudit run` command to complete it).</p>")
    parts.append("<h2>Verdict</h2>")
    for m in LOCATED:
        if m.name in st:
            parts.append(f"<p class='v'>{e(st[m.name]['verdict'])}</p>")
    if "single" in st:
        s = st["single"]
        parts.append(f"<p class='v'>Single heads: {s['n_reaching_full']} of {s['n']} random single heads reach the "
                     f"full-alignment score's 95% interval (lower bound {s['full_ci_low']:.3f}).</p>")
    if "ipo" in st and "fraction_of_full" in st["ipo"]:
        f = st["ipo"]["fraction_of_full"].get(st["ipo"]["top_arm"])
        if f:
            parts.append(f"<p class='v'>The optimal edit at S* reaches {f['ratio']:.2f} of full alignment's True*Info "
                         f"(95% CI {f['ci'][0]:.2f} to {f['ci'][1]:.2f}).</p>")
    fits = st.get("fits") or {}
    if fits.get("n"):
        by = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in fits["by_status"].items())
        msg = f"Optimal-edit fits: {fits['n']} ({by})."
        if fits["not_converged"]:
            msg += (" Not converged (a fixed schedule, or stopped at the step cap while validation loss still improved), "
                    "so not shown to be optimal: " + ", ".join(fits["not_converged"]) + ".")
        if fits["stuck"]:
            msg += (" Never left the identity even at lower learning rates, so left out of the random null: "
                    + ", ".join(fits["stuck"]) + ".")
        parts.append(f"<p class='v'>{e(msg)}</p>")
    if "single" in st and "spearman" in st["single"]:
        sp = st["single"]["spearman"]
        hi = [q["arm"] for q in st["single"]["vs_probe"] if q["reaches_full"]]
        parts.append(f"<p class='v'>Single heads: Spearman correlation of the optimal edit's True*Info with the head's "
                     f"probe accuracy rho = {sp['rho']:.2f} (p = {sp['p']:.2g}, n = {sp['n']}); reaching full alignment's "
                     f"interval: {e(', '.join(hi) or 'none')}.</p>")
    if findings:
        parts.append("<h2>The paper's findings beside this run</h2><table><tr><th>finding</th><th>paper (Alpaca-7B)</th>"
                     "<th>measured here</th><th>verdict</th></tr>")
        for r in findings:
            parts.append("<tr>" + "".join(f"<td style='text-align:left'>{e(r[k])}</td>" for k in ("finding", "paper", "measured"))
                         + f"<td style='text-align:left'><b>{e(r['verdict'])}</b>: {e(r['because'])}</td></tr>")
        parts.append("</table>")
    side = [(m.name, k, v) for m in LOCATED if m.name in st for k, v in st[m.name].get("side_metrics", {}).items()]
    if side:
        names = {"truth_info_pct": "True*Info as ITI computes it (% true x % informative / 100)", "mc1": "MC1",
                 "mc2": "MC2", "kl": "KL from unedited (lower is better)"}
        parts.append("<h2>S* against the random null on other metrics</h2><table><tr><th>method</th><th>metric</th>"
                     "<th>S*</th><th>S* 95% CI</th><th>random mean</th><th>n random</th><th>percentile</th><th>rank p</th>"
                     "<th>t-test p</th></tr>")
        for m, k, v in side:
            ci = v.get("ci")
            parts.append(f"<tr><td>{m.upper()}</td><td style='text-align:left'>{e(names[k])}</td><td>{_fmt(v['target'])}</td>"
                         f"<td>{_fmt(ci[0]) + ' to ' + _fmt(ci[1]) if ci else ''}</td><td>{_fmt(v['random_mean'])}</td>"
                         f"<td>{v['n_random']}</td><td>{_fmt(v['percentile'], 0)}</td><td>{_fmt(v['p_rank'])}</td>"
                         f"<td>{_fmt(v['p_ttest'], 3)}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Test results (hyper-parameter chosen on validation)</h2><table><tr>" + "".join(
        f"<th>{c}</th>" for c in ("arm", "method", "alpha", "tau", "truth", "info", "True*Info", "95% CI", "MC1", "MC2", "CE", "KL", "n")) + "</tr>")
    for name, r in tests.items():
        ci = st["arms"][name]["ci"]
        parts.append("<tr>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in (
            name, r["method"], r["alpha"], r["tau"], r["truth"], r["info"], r["truth_info"]))
            + f"<td>{_fmt(ci[0])} to {_fmt(ci[1])}</td>"
            + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in ("mc1", "mc2", "ce", "kl", "n_questions")) + "</tr>")
    parts.append("</table>")
    parts.append("<h2>Figures</h2>" + "".join(f"<div>{_img(p)}</div>" for p in figs.values()))
    if judge:
        parts.append("<h2>Judges</h2><table><tr><th>judge</th><th>version</th><th>held-out answers acc</th>"
                     "<th>held-out questions acc</th></tr>")
        for k in ("truth", "info"):
            j = judge.get(k, {})
            parts.append(f"<tr><td>{k}</td><td>{e(str(j.get('version')))}</td><td>{_fmt(j.get('heldout_answer_acc'))}</td>"
                         f"<td>{_fmt(j.get('heldout_question_acc'))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Statistics</h2><pre>" + e(json.dumps({k: v for k, v in st.items() if k != "arms"}, indent=1, default=str)) + "</pre>")
    parts.append("<h2>Settings, timings, software</h2><pre>" + e(json.dumps(
        {"preset": preset, "stage_seconds": run.get("stage_seconds"), "software": config.get("software")}, indent=1)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
