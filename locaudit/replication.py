"""The paper's findings beside what a run measured: one row per finding of Wang & Veitch (2025), with the
paper's number, the measured number (with n and a 95% interval) and "replicates / does not / inconclusive,
because ...", generated from a run's statistics (`report.compute_stats`), never written by hand.

The paper's numbers are those its text states (p = 1.6e-8, 5 of 24 single heads) or, where it gives only
figures, ranges read off them (marked "figure").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from locaudit.stats import ordinal

ALPHA = 0.05


@dataclass(frozen=True)
class Finding:
    key: str
    claim: str
    paper: str
    judge: Callable[[dict, dict], tuple[str, str, str] | None]  # (stats, tests) -> (measured, verdict, because)


def _null_text(t: dict, fmt: str = "{:.3f}") -> str:
    if t["n_random"] == 0:
        return f"S* {fmt.format(t['target'])}; no random set was evaluated (every one stuck, or none planned)"
    return (f"S* {fmt.format(t['target'])} vs random mean {fmt.format(t['random_mean'])} (n={t['n_random']} sets): "
            f"{ordinal(t['percentile'])} percentile, rank p = {t['p_rank']:.3f}, t-test p = {t['p_ttest']:.2g}")


def _ci(arms: dict, name: str) -> str:
    lo, hi = arms[name]["ci"]
    return f"[{lo:.3f}, {hi:.3f}], n={arms[name]['n_questions']} questions"


def separates(t: dict) -> tuple[str, str]:
    """Whether S* is singled out in a null test: by the rank test, as the verdicts read it."""
    if t["n_random"] == 0:
        return "inconclusive", "no random sets were evaluated"
    if t["target"] > t["random_mean"] and t["p_rank"] <= ALPHA:
        return "yes", f"S* beats the random null (rank p = {t['p_rank']:.3f} <= {ALPHA})"
    if t["percentile"] <= 50:
        return "no", f"S* is at or below the random sets' median ({ordinal(t['percentile'])} percentile)"
    floor = 1 / (t["n_random"] + 1)
    extra = f"; with {t['n_random']} sets the rank p cannot fall below {floor:.3f}" if floor > ALPHA else ""
    return "unclear", f"S* is above the median but not separated (rank p = {t['p_rank']:.3f}){extra}"


def _iti_special(st: dict, tests: dict):
    if "iti" not in st:
        return None
    t = st["iti"]["test"]
    sep, why = separates(t)
    verdict = {"yes": "replicates", "no": "does not replicate", "unclear": "inconclusive", "inconclusive": "inconclusive"}[sep]
    return _null_text(t) + f"; S* {_ci(st['arms'], st['iti']['top_arm'])}", verdict, why


def _mc2_special(method: str):
    def judge(st: dict, tests: dict):
        m = st.get(method, {}).get("side_metrics", {}).get("mc2")
        if m is None:
            return None
        sep, why = separates(m)
        ci = f", S* 95% CI [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]" if m.get("ci") else ""
        if method == "iti":
            verdict = {"yes": "replicates", "no": "does not replicate"}.get(sep, "inconclusive")
        else:  # the paper: probe heads only slightly better under IPO
            verdict = {"yes": "replicates (S* better)", "no": "does not replicate (S* no better)"}.get(sep, "inconclusive")
        return _null_text(m) + ci, verdict, why
    return judge


def _ipo_random_as_good(st: dict, tests: dict):
    if "ipo" not in st:
        return None
    t = st["ipo"]["test"]
    n_ge = sum(s >= t["target"] for s in st["ipo"]["random_scores"])
    sep, why = separates(t)
    measured = _null_text(t) + f"; {n_ge} of {t['n_random']} random sets score at least S*'s True*Info"
    if sep == "yes":
        return measured, "does not replicate", why + ": here the probe heads are special"
    if n_ge > 0:
        return measured, "replicates", f"{n_ge} random set(s) do at least as well as S*; {why}"
    return measured, "inconclusive", f"no random set reaches S*; {why}"


def _s_star_vs_full(st: dict, tests: dict):
    f = st.get("ipo", {}).get("fraction_of_full", {}).get(st.get("ipo", {}).get("top_arm"))
    if not f or "full" not in st["arms"]:
        return None
    lo, hi = f["ci"]
    measured = (f"S* reaches {f['ratio']:.2f} of full alignment's True*Info (paired 95% CI {lo:.2f} to {hi:.2f}); "
                f"full alignment {st['arms']['full']['truth_info']:.3f} {_ci(st['arms'], 'full')}")
    if hi < 1:
        return measured, "does not replicate", "the whole interval lies below full alignment"
    if lo >= 0.9 or lo <= 1 <= hi:
        return measured, "replicates", "the interval includes full alignment's score (or lies above it)"
    return measured, "inconclusive", "the interval is too wide to tell"


def _random_vs_full(st: dict, tests: dict):
    ff = st.get("ipo", {}).get("fraction_of_full", {})
    top = st.get("ipo", {}).get("top_arm")
    rand = {k: v for k, v in ff.items() if k != top}
    if not rand:
        return None
    n_reach = sum(v["ci"][1] >= 1 for v in rand.values())
    best = max(rand.items(), key=lambda kv: kv[1]["ratio"])
    measured = (f"{n_reach} of {len(rand)} random sets' paired 95% CIs reach full alignment; best {best[0]} at "
                f"{best[1]['ratio']:.2f} of full ({best[1]['ci'][0]:.2f} to {best[1]['ci'][1]:.2f})")
    if n_reach:
        return measured, "replicates", "optimal edits at random locations can match aligning the whole model"
    return measured, "does not replicate", "no random set's interval reaches full alignment"


def _single_heads(st: dict, tests: dict):
    s = st.get("single")
    if not s or s["n"] == 0:
        return None
    sp = s.get("spearman")
    measured = f"{s['n_reaching_full']} of {s['n']} random single heads reach full alignment's 95% CI (lower end {s['full_ci_low']:.3f})"
    if sp:
        measured += f"; Spearman rho of effect vs probe accuracy {sp['rho']:.2f} (p = {sp['p']:.2g}, n = {sp['n']})"
    if s["n"] < 10:
        return measured, "inconclusive", f"{s['n']} random single heads are an anecdote, not a distribution (paper: 24)"
    if s["n_reaching_full"] > 0:
        return measured, "replicates", "some single heads do as well as full alignment"
    return measured, "does not replicate", "no single head reaches full alignment"


FINDINGS = (
    Finding("iti_special", "ITI at the probe heads S* beats ITI at random 16-head sets (True*Info)",
            "p = 1.6e-8 (t-test); S* about 0.54 vs random sets 0.39 to 0.53 (figure)", _iti_special),
    Finding("iti_mc2", "Under ITI the probe heads are better on MC2",
            "S* MC2 0.454 to 0.546 over alpha vs random sets 0.40 to 0.47 (figure)", _mc2_special("iti")),
    Finding("ipo_random", "The optimal edit (IPO) at random 16-head sets works about as well as at S*",
            "about half of 16 random sets at or above S*'s True*Info of about 0.79 (figure)", _ipo_random_as_good),
    Finding("ipo_full", "The optimal edit at S* is about as good as full alignment",
            "IPO at S* truth 0.63 to 0.87 / info 0.98 to 0.91 vs all heads 0.68 to 0.96 / 0.96 to 0.93 (figure)",
            _s_star_vs_full),
    Finding("random_full", "Optimal edits at random sets can match full alignment",
            "random sets' best True*Info 0.73 to 0.86 (figure)", _random_vs_full),
    Finding("single", "Some single heads match full alignment, none of them with high probe accuracy",
            "5 of 24 random single heads; none with high probe accuracy", _single_heads),
    Finding("ipo_mc2", "Under IPO the probe heads are at most slightly better on MC2",
            "S* MC2 0.65 to 0.79 vs random sets 0.72 to 0.82 at higher KL (figure)", _mc2_special("ipo")),
)


def replication_rows(st: dict, tests: dict | None = None) -> list[dict]:
    """[{"key", "finding", "paper", "measured", "verdict", "because"}] for every finding the run can speak to."""
    rows = []
    for f in FINDINGS:
        got = f.judge(st, tests or {})
        if got is not None:
            measured, verdict, because = got
            rows.append({"key": f.key, "finding": f.claim, "paper": f.paper, "measured": measured,
                         "verdict": verdict, "because": because})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| finding | paper (Alpaca-7B) | measured | verdict |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['finding']} | {r['paper']} | {r['measured']} | **{r['verdict']}**: {r['because']} |")
    return "\n".join(lines)
