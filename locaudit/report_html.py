"""The study report as one self-contained page (report.html), verdict first: the claim (S*, the top-K probe heads),
what the optimal edit (IPO) and ITI at S* achieved against the random null and against full alignment, and how
strong that evidence is, in words with n and intervals; then the figures; then the tables. Every number comes
from the run's statistics (`report.compute_stats`, `replication.replication_rows`); nothing is computed here
but wording. Figures are embedded as data URIs; the page fits a laptop window and prints without cut figures."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from locaudit.methods import METHODS
from locaudit.replication import ALPHA, separates
from locaudit.stats import ordinal

# methods that edit a given head set, the optimal edit first: it is the paper's test of the claim
LOCATED = tuple(sorted((m for m in METHODS.values() if m.scope == "heads"), key=lambda m: not m.needs_fit))

SECTIONS = {  # figure section -> (heading, what to look for)
    "tradeoff": ("Trade-off curves", "Each line runs through one arm's hyper-parameter grid on the validation "
                 "questions; an arm further up and to the right is better on both axes."),
    "null": ("S* against the random null", "The same edit at random head sets of S*'s size: where S* falls in "
             "their spread is the evidence for (far right) or against (inside) the localization."),
    "paired": ("Per question: S* minus each comparison", "The same test questions for every arm: each dot is one "
               "question's difference in the judges' scores, S* minus a random set (grey) or minus full alignment "
               "(blue); black bars are the mean differences. Dots right of the dashed line favour S*."),
    "fits": ("Every fit's training curve", "Each optimal-edit fit's loss relative to the unedited model (1 = no "
             "change). A fit is only an optimal edit if it converged: flat validation loss at the kept "
             "checkpoint (star)."),
    "more": ("More figures", ""),
}

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;max-width:1100px;margin:auto;
  padding:0 1em 2em}
h1{font-size:1.45em;margin:.5em 0 .15em}
h2{font-size:1.15em;margin:1.3em 0 .45em;padding-bottom:.15em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:1em 0 .3em}
.meta{color:#555;margin:0 0 .5em}
.claim{background:#f6f6f6;padding:.5em .75em;border-left:4px solid #888;margin:.4em 0}
.v{background:#f4f4ff;padding:.45em .75em;border-left:4px solid #66f;margin:.45em 0}
.v.yes{background:#effaf0;border-color:#2a8a3a}.v.no{background:#fdf0f0;border-color:#c0392b}
.v.unclear,.v.inconclusive,.v.caution{background:#fff8ea;border-color:#d48a00}
table{border-collapse:collapse;margin:.3em 0;max-width:100%}
td,th{border:1px solid #bbb;padding:2px 6px;text-align:right;vertical-align:top;overflow-wrap:anywhere}
th{background:#eee}
table.glance{width:100%}table.glance td,table.glance th,table.text td,table.text th{text-align:left}
table.glance td:first-child{font-weight:600}
figure{margin:.8em 0 1.4em}figure img{display:block;max-width:100%;height:auto;margin:auto}
figcaption{color:#444;font-size:.9em;margin-top:.3em}
.k{white-space:nowrap}
.intro{color:#444;margin:.2em 0 .6em}
pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:.8em;background:#fafafa;padding:.5em}
@page{margin:1.5cm}
@media print{
  body{max-width:none;margin:0;padding:0;font-size:10pt}
  h2,h3{break-after:avoid;page-break-after:avoid}
  figure,table,tr,.v,.claim{break-inside:avoid;page-break-inside:avoid}
  figure img{max-width:100%!important;max-height:23cm;width:auto;height:auto}
  td,th{padding:1px 4px}
  pre{font-size:7pt;background:none}
  a{color:inherit;text-decoration:none}
  .v,.claim,th{-webkit-print-color-adjust:exact;print-color-adjust:exact}
}
"""


@dataclass(frozen=True)
class Figure:
    """A figure of the report: its PNG, its section (a key of SECTIONS), alt text and caption."""

    path: Path
    section: str
    alt: str
    caption: str = ""


def fmt(v, nd: int = 3) -> str:
    """A table cell: floats to `nd` decimals, undefined numbers (None, NaN) empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not np.isfinite(v) else f"{v:.{nd}f}"
    return str(v)


def _num(v: float, nd: int = 3) -> str:
    """A number in a sentence: "undefined" rather than empty when it is NaN."""
    return f"{v:.{nd}f}" if v is not None and np.isfinite(v) else "undefined"


def _ci(ci, nd: int = 3) -> str:
    return f"{_num(ci[0], nd)} to {_num(ci[1], nd)}"


def _n(count: int, noun: str, plural: str | None = None) -> str:
    """"1 random set", "2 random sets"."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _keep(text: str) -> str:
    """Escaped text that does not break inside (a number with its interval) unless it must."""
    return f"<span class='k'>{html.escape(text)}</span>"


def _img(fig: Figure) -> str:
    data = base64.b64encode(Path(fig.path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(fig.alt)}">'


EVIDENCE = {  # replication.separates' answer -> the plain-words heading of the evidence
    "yes": "evidence that S* is special",
    "no": "no evidence that S* is special",
    "unclear": "too little evidence to tell",
    "inconclusive": "no comparison possible",
}


def _value(m, row: dict) -> str:
    v = row.get(m.hyper) if m.hyper else None
    return f"{m.hyper} {v:g}" if v is not None else ""


def _claim(st: dict, tests: dict, run: dict, preset: dict) -> str:
    e = html.escape
    m = next((m for m in LOCATED if m.name in st), None)
    if m is None:
        return "<p class='claim'>No edit at S* has finished yet, so there is nothing to judge.</p>"
    heads = tests[st[m.name]["top_arm"]]["heads"].split(",")
    model = run.get("model", preset["model"]["model"])
    return (f"<p class='claim'><b>Claim under test:</b> truthfulness in <b>{e(str(model))}</b> is localized in "
            f"<b>S*</b>, the top {len(heads)} attention heads by probe accuracy (linear probes on each head's output "
            f"telling true from false answers, as ITI selects them): {e(', '.join(heads))}. If it is, an edit at S* "
            f"should beat the same edit at random sets of {len(heads)} heads (the random null) and come close to the "
            f"same edit on every layer (full alignment).</p>")


def _glance(st: dict, tests: dict) -> str:
    """One row per edit at S*: its score, the random null and the fraction of full alignment; then the
    reference arms (full alignment, the unedited model)."""
    e = html.escape
    rows = ["<table class='glance'><tr><th>edit at S*</th><th>True*Info at S* (95% CI)</th>"
            "<th>random sets of the same size</th><th>S* in the random null</th>"
            "<th>fraction of full alignment (paired 95% CI)</th></tr>"]
    for m in LOCATED:
        if m.name not in st:
            continue
        s, t = st[m.name], st[m.name]["test"]
        a = st["arms"][s["top_arm"]]
        rand = f"{_keep('mean ' + _num(t['random_mean']))}, {_keep('n = ' + str(t['n_random']))}"
        if s["excluded_stuck"]:
            rand += f" ({e(_n(len(s['excluded_stuck']), 'stuck fit'))} left out)"
        null = (f"{_keep(ordinal(t['percentile']) + ' percentile')}, {_keep('exact rank p = ' + _num(t['p_rank']))}"
                if t["n_random"] else "no random sets")
        f = (s.get("fraction_of_full") or {}).get(s["top_arm"])
        frac = (f"{_keep(_num(f['ratio'], 2))} {_keep('(' + _ci(f['ci'], 2) + ')')}" if f else
                "computed for fitted edits only" if not m.needs_fit else "no full-alignment arm")
        rows.append(f"<tr><td>{e(m.label)}, {_keep(_value(m, tests[s['top_arm']]))}</td>"
                    f"<td>{_keep(_num(a['truth_info']))} {_keep('(' + _ci(a['ci']) + ')')}</td>"
                    f"<td>{rand}</td><td>{null}</td><td>{frac}</td></tr>")
    for name, label in (("full", "Full alignment (reference)"), ("baseline", "Unedited model (reference)")):
        if name in st["arms"]:
            a = st["arms"][name]
            rows.append(f"<tr><td>{label}</td><td>{_keep(_num(a['truth_info']))} {_keep('(' + _ci(a['ci']) + ')')}</td>"
                        f"<td></td><td></td><td>{'1 (itself)' if name == 'full' else ''}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _evidence(m, st: dict, tests: dict) -> str:
    """How strong the evidence from one edit is, in words: the null test's answer with n and the interval, the
    floor a small null puts on the rank p, stuck fits left out, and the comparison with full alignment."""
    e = html.escape
    s = st[m.name]
    t, arm = s["test"], s["top_arm"]
    a = st["arms"][arm]
    k = len(tests[arm]["heads"].split(","))
    sep, _ = separates(t)
    n = t["n_random"]
    words = [f"S* scores {_num(t['target'])} True*Info (95% CI {_ci(a['ci'])}, n = {a['n_questions']} test questions)."]
    if n == 0:
        words.append(f"No random set of {k} heads was evaluated, so nothing to compare with.")
    else:
        n_ge = int(round(t["p_rank"] * (n + 1))) - 1  # random sets scoring at least S*'s value
        words.append(f"{n_ge} of {_n(n, f'random set of {k} heads', f'random sets of {k} heads')} "
                     f"{'scores' if n_ge == 1 else 'score'} at least as much (random mean {_num(t['random_mean'])}): S* "
                     f"is at the {ordinal(t['percentile'])} percentile, exact rank p = {_num(t['p_rank'])}.")
        floor = 1 / (n + 1)
        if sep == "unclear" and floor > ALPHA:  # S* above the median, but the null is too small to separate it
            need = int(np.ceil(1 / ALPHA)) - 1
            words.append(f"With {_n(n, 'random set')} the rank p cannot fall below {floor:.3f} whatever the scores; "
                         f"reaching {ALPHA:g} takes at least {need} sets.")
    wi = s.get("test_including_stuck")
    if s["excluded_stuck"] and wi:
        words.append(f"{_n(len(s['excluded_stuck']), 'random set')} whose fit never left the identity "
                     f"{'is' if len(s['excluded_stuck']) == 1 else 'are'} left out; counted at the unedited score, S* "
                     f"would be at the {ordinal(wi['percentile'])} percentile (rank p = {_num(wi['p_rank'])}).")
    f = (s.get("fraction_of_full") or {}).get(arm)
    if f:
        lo, hi = f["ci"]
        where = ("the interval includes 1, so S* cannot be told apart from full alignment" if lo <= 1 <= hi else
                 "the whole interval is below 1: S* does less than full alignment" if hi < 1 else
                 "the whole interval is above 1: S* does more than full alignment")
        words.append(f"Against full alignment: S* reaches {_num(f['ratio'], 2)} of its True*Info (paired 95% CI "
                     f"{_ci(f['ci'], 2)}); {where}.")
    return (f"<p class='v {sep}'><b>{e(m.label)}: {EVIDENCE[sep]}.</b> {e(' '.join(words))}</p>")


def _fits_note(st: dict) -> str:
    fits = st.get("fits") or {}
    if not fits.get("n") or not (fits["stuck"] or fits["not_converged"] or fits.get("flat")):
        return ""
    by = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in fits["by_status"].items())
    return (f"<p class='v caution'><b>Caution:</b> of {fits['n']} optimal-edit fits, {html.escape(by)}. A stuck fit "
            f"never left the unedited model; a flat fit's best validation loss stayed within the preset's "
            f"min_delta of its start; a fit "
            f"stopped at the step cap may not be optimal. See "
            f"<a href='#fits'>every fit's training curve</a>.</p>")


def verdict_section(st: dict, tests: dict, run: dict, preset: dict) -> str:
    """The first screen: the claim, the table of what the edits at S* achieved, the evidence in words."""
    parts = ["<section id='verdict'><h2>Verdict</h2>", _claim(st, tests, run, preset)]
    if any(m.name in st for m in LOCATED):
        parts.append(_glance(st, tests))
        parts += [_evidence(m, st, tests) for m in LOCATED if m.name in st]
    parts += [_fits_note(st), "</section>"]
    return "\n".join(p for p in parts if p)


def figure_sections(figs: list[Figure]) -> str:
    parts = []
    for key, (title, intro) in SECTIONS.items():
        mine = [f for f in figs if f.section == key]
        if not mine:
            continue
        parts.append(f"<h2 id='{key}'>{html.escape(title)}</h2>")
        if intro:
            parts.append(f"<p class='intro'>{html.escape(intro)}</p>")
        parts += [f"<figure>{_img(f)}<figcaption>{html.escape(f.caption)}</figcaption></figure>" for f in mine]
    return "\n".join(parts)


def _details(st: dict) -> list[str]:
    """The statistics' own verdict sentences (with every caveat), single heads and fit statuses."""
    e = html.escape
    parts = ["<h2>Detailed verdicts</h2>"]
    parts += [f"<p class='v'>{e(st[m.name]['verdict'])}</p>" for m in LOCATED if m.name in st]
    if "single" in st:
        s = st["single"]
        parts.append(f"<p class='v'>Single heads: {s['n_reaching_full']} of {s['n']} random single heads reach the "
                     f"full-alignment score's 95% interval (lower bound {_num(s['full_ci_low'])}).</p>")
        if "spearman" in s:
            sp = s["spearman"]
            hi = [q["arm"] for q in s["vs_probe"] if q["reaches_full"]]
            parts.append(f"<p class='v'>Single heads: Spearman correlation of the optimal edit's True*Info with the "
                         f"head's probe accuracy rho = {_num(sp['rho'], 2)} (p = {sp['p']:.2g}, n = {sp['n']}); reaching "
                         f"full alignment's interval: {e(', '.join(hi) or 'none')}.</p>")
    fits = st.get("fits") or {}
    if fits.get("n"):
        by = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in fits["by_status"].items())
        msg = f"Optimal-edit fits: {fits['n']} ({by})."
        if fits["not_converged"]:
            msg += (" Not converged (a fixed schedule, or stopped at the step cap while validation loss still improved), "
                    "so not shown to be optimal: " + ", ".join(fits["not_converged"]) + ".")
        if fits.get("flat"):
            msg += (" Flat (best validation loss within min_delta of the start; kept in the random null, as a location "
                    "where no edit helped): " + ", ".join(fits["flat"]) + ".")
        if fits["stuck"]:
            msg += (" Never left the identity even at lower learning rates, so left out of the random null: "
                    + ", ".join(fits["stuck"]) + ".")
        parts.append(f"<p class='v'>{e(msg)}</p>")
    return parts


SIDE_NAMES = {"truth_info_pct": "True*Info as ITI computes it (% true x % informative / 100)", "mc1": "MC1",
              "mc2": "MC2", "kl": "KL from unedited (lower is better)"}


def table_sections(config: dict, run: dict, st: dict, judge: dict | None, tests: dict, findings: list[dict]) -> str:
    e = html.escape
    preset = config["preset"]
    parts = []
    if findings:
        parts.append("<h2>The paper's findings beside this run</h2><table class='text'><tr><th>finding</th>"
                     "<th>paper (Alpaca-7B)</th><th>measured here</th><th>verdict</th></tr>")
        for r in findings:
            parts.append("<tr>" + "".join(f"<td>{e(r[k])}</td>" for k in ("finding", "paper", "measured"))
                         + f"<td><b>{e(r['verdict'])}</b>: {e(r['because'])}</td></tr>")
        parts.append("</table>")
    parts += _details(st)
    side = [(m.name, k, v) for m in LOCATED if m.name in st for k, v in st[m.name].get("side_metrics", {}).items()]
    if side:
        parts.append("<h2>S* against the random null on other metrics</h2><table><tr><th>method</th><th>metric</th>"
                     "<th>S*</th><th>S* 95% CI</th><th>random mean</th><th>n random</th><th>percentile</th><th>rank p</th>"
                     "<th>t-test p</th></tr>")
        for m, k, v in side:
            ci = v.get("ci")
            parts.append(f"<tr><td>{m.upper()}</td><td style='text-align:left'>{e(SIDE_NAMES[k])}</td><td>{fmt(v['target'])}</td>"
                         f"<td>{fmt(ci[0]) + ' to ' + fmt(ci[1]) if ci else ''}</td><td>{fmt(v['random_mean'])}</td>"
                         f"<td>{v['n_random']}</td><td>{fmt(v['percentile'], 0)}</td><td>{fmt(v['p_rank'])}</td>"
                         f"<td>{fmt(v['p_ttest'], 3)}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Test results (hyper-parameter chosen on validation)</h2><table><tr>" + "".join(
        f"<th>{c}</th>" for c in ("arm", "method", "alpha", "tau", "truth", "info", "True*Info", "95% CI", "MC1", "MC2",
                                  "CE", "KL", "n")) + "</tr>")
    for name, r in tests.items():
        ci = st["arms"][name]["ci"]
        parts.append("<tr>" + "".join(f"<td>{e(fmt(v))}</td>" for v in (
            name, r["method"], r["alpha"], r["tau"], r["truth"], r["info"], r["truth_info"]))
            + f"<td>{fmt(ci[0])} to {fmt(ci[1])}</td>"
            + "".join(f"<td>{fmt(r.get(k))}</td>" for k in ("mc1", "mc2", "ce", "kl", "n_questions")) + "</tr>")
    parts.append("</table>")
    samples = run.get("samples") or {}
    if samples:
        rows = []
        for name, label in (("test", "Test"), ("val", "Validation")):
            c = samples.get(name)
            if c:
                types = ", ".join(f"{e(t)} {n}" for t, n in c["type"].items())
                rows.append(f"{label} questions (a seeded random sample stratified by Type and Category): n={c['n']}, "
                            f"{types}; {len(c['category'])} categories.")
        parts.append("<h2>Questions</h2><p>" + "<br>".join(rows) + "</p>")
    if judge:
        parts.append("<h2>Judges</h2><table><tr><th>judge</th><th>version</th><th>held-out answers acc</th>"
                     "<th>held-out questions acc</th></tr>")
        for k in ("truth", "info"):
            j = judge.get(k, {})
            parts.append(f"<tr><td>{k}</td><td>{e(str(j.get('version')))}</td><td>{fmt(j.get('heldout_answer_acc'))}</td>"
                         f"<td>{fmt(j.get('heldout_question_acc'))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Statistics</h2><pre>" + e(json.dumps({k: v for k, v in st.items() if k != "arms"}, indent=1, default=str)) + "</pre>")
    parts.append("<h2>Settings, timings, software</h2><pre>" + e(json.dumps(
        {"preset": preset, "stage_seconds": run.get("stage_seconds"), "software": config.get("software")}, indent=1)) + "</pre>")
    return "\n".join(parts)


def page(config: dict, run: dict, st: dict, judge: dict | None, tests: dict, figs: list[Figure],
         findings: list[dict]) -> str:
    """The whole report.html."""
    e = html.escape
    preset = config["preset"]
    model = run.get("model", preset["model"]["model"])
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             "<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>locaudit report: {e(str(model))}</title><style>{STYLE}</style></head><body>",
             f"<h1>Does editing show that truthfulness lives in S*? locaudit on {e(str(model))}</h1>",
             f"<p class='meta'>Preset <b>{e(preset['name'])}</b>; {run.get('n_test_questions', '?')} test / "
             f"{run.get('n_val_questions', '?')} validation TruthfulQA questions (split {e(str(run.get('split_hash', '')))}, "
             f"seed {preset['data']['seed']}); True*Info = mean truth x mean informativeness, judged on generated answers."
             "</p>"]
    if run.get("partial"):
        parts.append("<p class='v caution'><b>Partial run</b>: the study stopped before every arm finished; this report "
                     "covers the finished trials only (rerun the same `locaudit run` command to complete it).</p>")
    parts.append(verdict_section(st, tests, run, preset))
    parts.append(figure_sections(figs))
    parts.append(table_sections(config, run, st, judge, tests, findings))
    parts.append("</body></html>")
    return "\n".join(parts)
