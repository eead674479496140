"""An audit's outputs: results.json (schema in `AuditResult.as_dict`), results.csv (one row per arm), report.md
and a self-contained report.html (verdict first, then the null figure, then the arms table)."""

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

CSV_FIELDS = ("arm", "kind", "units", "tau", "value", "ci_lo", "ci_hi", "gain", "frac_full", "status", "steps",
              "fit_seconds")


def _num(x, nd: int = 6) -> str:
    """A number for a table cell; blank when undefined (None or NaN: a fraction of a zero gain)."""
    return "" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _csv(result: AuditResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in result.rows:
        w.writerow([r["arm"], r["kind"], " ".join(r["units"] or []), r["tau"], f"{r['value']:.6f}",
                    f"{r['ci'][0]:.6f}", f"{r['ci'][1]:.6f}", f"{r['gain']:.6f}",
                    _num(r.get("frac_full")), r["status"] or "", r["steps"] or "",
                    "" if r["fit_seconds"] is None else f"{r['fit_seconds']:.1f}"])
    return buf.getvalue()


def _table_md(result: AuditResult) -> str:
    lines = ["| arm | units | tau | value (95% CI) | fraction of full | fit |", "|---|---|---|---|---|---|"]
    for r in result.rows:
        heads = "all layers" if r["kind"] == "full" else ("-" if r["units"] is None else ",".join(r["units"]))
        ff = _num(r.get("frac_full"), 2)
        fit = "" if r["status"] is None else f"{r['status']}, {r['steps']} steps"
        tau = "" if r["tau"] is None else f"{r['tau']:g}"
        lines.append(f"| {r['arm']} | {heads} | {tau} | {r['value']:.3f} ({r['ci'][0]:.3f}-{r['ci'][1]:.3f}) | {ff} | {fit} |")
    return "\n".join(lines)


def markdown(result: AuditResult) -> str:
    return (f"# locaudit audit: {', '.join(result.claim)} on {result.task}\n\n"
            f"**Verdict ({result.strength}).** {result.verdict}\n\n"
            f"Statistic: {result.primary} (higher = more of the preferred behaviour), {result.n_test} test items, "
            f"hyper-parameters chosen on {result.n_val} validation items; wall time {result.wall_seconds:.0f} s.\n\n"
            f"![null](figures/null.png)\n\n{_table_md(result)}\n")


def _html(result: AuditResult, fig: Path) -> str:
    e = html.escape
    img = base64.b64encode(fig.read_bytes()).decode()
    rows = []
    for r in result.rows:
        cells = [r["arm"], "all layers" if r["kind"] == "full" else ",".join(r["units"] or []) or "-",
                 "" if r["tau"] is None else f"{r['tau']:g}", f"{r['value']:.3f}",
                 f"{r['ci'][0]:.3f}-{r['ci'][1]:.3f}", _num(r.get("frac_full"), 2),
                 "" if r["status"] is None else f"{r['status']} ({r['steps']} steps)"]
        rows.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            "<title>locaudit audit</title><style>body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em;"
            "overflow-wrap:break-word}"
            "table{border-collapse:collapse;max-width:100%}td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}"
            "th{background:#eee}.v{background:#f4f4ff;padding:.6em;border-left:4px solid #66f}img{max-width:100%}</style>"
            f"</head><body><h1>Audit: {e(', '.join(result.claim))} on {e(result.task)}</h1>"
            f"<p class='v'><b>Verdict: {e(result.strength)}.</b> {e(result.verdict)}</p>"
            f"<p>Model {e(result.model)}; statistic {e(result.primary)}; {result.n_test} test items, "
            f"{result.n_val} validation items; wall time {result.wall_seconds:.0f} s.</p>"
            f"<img alt='random null' src='data:image/png;base64,{img}'>"
            "<table><tr><th>arm</th><th>units</th><th>tau</th><th>value</th><th>95% CI</th><th>fraction of full</th>"
            f"<th>fit</th></tr>{''.join(rows)}</table></body></html>")


def write_audit_report(result: AuditResult, out: Path) -> None:
    out = Path(out)
    randoms = [r["value"] for r in result.rows if r["kind"] == "random" and r["status"] != "stuck"]
    full = next((r["value"] for r in result.rows if r["kind"] == "full"), None)
    fig = audit_null(randoms, result.row("claim")["value"], result.row("none")["value"], full,
                     out / "figures" / "null.png", xlabel=result.primary)
    atomic_write_json(out / "results.json", result.as_dict())
    atomic_write(out / "results.csv", lambda tmp: tmp.write_text(_csv(result)))
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(markdown(result)))
    atomic_write(out / "report.html", lambda tmp: tmp.write_text(_html(result, fig)))
