"""An audit's outputs: results.json (schema in `AuditResult.as_dict`), results.csv (one row per arm), report.md
and a self-contained report.html (the verdict and the steering heuristic's comparison first, then their null
figures, then the arms table)."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path

from locaudit.audit.verdict import AuditResult
from locaudit.figures import audit_null
from locaudit.storage import atomic_write, atomic_write_json

CSV_FIELDS = ("arm", "kind", "units", "tau", "alpha", "value", "ci_lo", "ci_hi", "gain", "frac_full", "status", "steps",
              "fit_seconds")


def _num(x, nd: int = 6) -> str:
    """A number for a table cell; blank when undefined (None or NaN: a fraction of a zero gain)."""
    return "" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _opt(x) -> str:
    """A hyper-parameter for a table cell; blank where the arm has none."""
    return "" if x is None else f"{x:g}"


def _units(r: dict) -> str:
    return "all layers" if r["kind"] == "full" else ("-" if r["units"] is None else ",".join(r["units"]))


def _csv(result: AuditResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in result.rows:
        w.writerow([r["arm"], r["kind"], " ".join(r["units"] or []), r["tau"], _opt(r.get("alpha")),
                    f"{r['value']:.6f}",
                    f"{r['ci'][0]:.6f}", f"{r['ci'][1]:.6f}", f"{r['gain']:.6f}",
                    _num(r.get("frac_full")), r["status"] or "", r["steps"] or "",
                    "" if r["fit_seconds"] is None else f"{r['fit_seconds']:.1f}"])
    return buf.getvalue()


def _table_md(result: AuditResult) -> str:
    lines = ["| arm | units | tau | alpha | value (95% CI) | fraction of full | fit |", "|---|---|---|---|---|---|---|"]
    for r in result.rows:
        ff = _num(r.get("frac_full"), 2)
        fit = "" if r["status"] is None else f"{r['status']}, {r['steps']} steps"
        lines.append(f"| {r['arm']} | {_units(r)} | {_opt(r['tau'])} | {_opt(r.get('alpha'))} | {r['value']:.3f} "
                     f"({r['ci'][0]:.3f}-{r['ci'][1]:.3f}) | {ff} | {fit} |")
    return "\n".join(lines)


def _claim_line(result: AuditResult) -> str:
    h = result.heuristic
    return "" if h is None else f"Claim chosen by `{h['spec']}`: {h['what']} (scores under {h['files']}/).\n\n"


def markdown(result: AuditResult) -> str:
    st = result.steering
    steer = "" if st is None else f"**Steering heuristic ({st.strength}).** {st.verdict}\n\n"
    steer_fig = "" if st is None else "![steering null](figures/null_steer.png)\n\n"
    return (f"# locaudit audit: {', '.join(result.claim)} on {result.task}\n\n"
            f"{_claim_line(result)}"
            f"**Verdict ({result.strength}).** {result.verdict}\n\n{steer}"
            f"Statistic: {result.primary} (higher = more of the preferred behaviour), {result.n_test} test items, "
            f"hyper-parameters chosen on {result.n_val} validation items; wall time {result.wall_seconds:.0f} s.\n\n"
            f"![null](figures/null.png)\n\n{steer_fig}{_table_md(result)}\n")


def _img(path: Path, alt: str) -> str:
    return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"


def _html(result: AuditResult, figs: dict[str, Path]) -> str:
    e = html.escape
    rows = []
    for r in result.rows:
        cells = [r["arm"], _units(r), _opt(r["tau"]),
                 _opt(r.get("alpha")), f"{r['value']:.3f}", f"{r['ci'][0]:.3f}-{r['ci'][1]:.3f}",
                 _num(r.get("frac_full"), 2), "" if r["status"] is None else f"{r['status']} ({r['steps']} steps)"]
        rows.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    st = result.steering
    steer = "" if st is None else f"<p class='v'><b>Steering heuristic: {e(st.strength)}.</b> {e(st.verdict)}</p>"
    h = result.heuristic
    claim = "" if h is None else (f"<p>Claim chosen by <code>{e(h['spec'])}</code>: {e(h['what'])} (scores under "
                                  f"{e(h['files'])}/).</p>")
    imgs = _img(figs["null"], "random null") + ("" if "steer" not in figs else _img(figs["steer"], "steering null"))
    return ("<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            "<title>locaudit audit</title><style>body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em;"
            "overflow-wrap:break-word}"
            "table{border-collapse:collapse;max-width:100%}td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}"
            "th{background:#eee}.v{background:#f4f4ff;padding:.6em;border-left:4px solid #66f}img{max-width:100%}</style>"
            f"</head><body><h1>Audit: {e(', '.join(result.claim))} on {e(result.task)}</h1>{claim}"
            f"<p class='v'><b>Verdict: {e(result.strength)}.</b> {e(result.verdict)}</p>{steer}"
            f"<p>Model {e(result.model)}; statistic {e(result.primary)}; {result.n_test} test items, "
            f"{result.n_val} validation items; wall time {result.wall_seconds:.0f} s.</p>{imgs}"
            "<table><tr><th>arm</th><th>units</th><th>tau</th><th>alpha</th><th>value</th><th>95% CI</th>"
            f"<th>fraction of full</th><th>fit</th></tr>{''.join(rows)}</table></body></html>")


def write_audit_report(result: AuditResult, out: Path) -> None:
    out = Path(out)
    base = result.row("none")["value"]
    full = next((r["value"] for r in result.rows if r["kind"] == "full"), None)

    def null_fig(kind: str, claim_arm: str, name: str, title: str) -> Path:
        randoms = [r["value"] for r in result.rows if r["kind"] == kind and r["status"] != "stuck"]
        return audit_null(randoms, result.row(claim_arm)["value"], base, full, out / "figures" / name,
                          xlabel=result.primary, title=title)

    figs = {"null": null_fig("random", "claim", "null.png", "")}
    if result.steering is not None:
        figs["steer"] = null_fig("random-steer", "claim-steer", "null_steer.png",
                                 f"Steering heuristic ({result.steering.what}): claim vs random sets")
    atomic_write_json(out / "results.json", result.as_dict())
    atomic_write(out / "results.csv", lambda tmp: tmp.write_text(_csv(result)))
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(markdown(result)))
    atomic_write(out / "report.html", lambda tmp: tmp.write_text(_html(result, figs)))
