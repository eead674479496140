"""The study runner on a tiny random model with a deterministic stand-in judge: every arm runs, trials are
stored and reused on rerun, results are reproducible, statistics and the report are built from the store."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from locaudit.study import load_preset
from tests.conftest import make_tiny
from tests.study_child import HashJudge


def tiny_preset():
    p = load_preset("smoke")
    study = replace(p.study, top_k=3, n_random_sets=2, n_single=2, alphas=(5.0, 15.0), taus=(0.1,),
                    max_val_questions=3, max_test_questions=4, all_heads_arm=True)
    return replace(p, study=study, fit=replace(p.fit, max_train_pairs=8, max_val_pairs=4, max_steps=6, eval_every=2, patience=2),
                   eval=replace(p.eval, max_new_tokens=6, text_docs=2, text_tokens=24, val_side_metrics=True))


def run(tmp, name, workers=1):
    import torch

    from locaudit.study import run_study

    lm = make_tiny("llama")
    # one thread, as in every unit test: the module fixture runs before the per-test thread setting, and float
    # sums may round differently with another thread count
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_study(tiny_preset(), tmp / name, progress=False, lm=lm,
                         judges=(HashJudge("truth"), HashJudge("info")), workers=workers)
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the per-test cache isolation
        mp.setenv("LOCAUDIT_CACHE", str(tmp / "cache"))
        run(tmp, "a")
    return tmp


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_arm_and_output(study_dir):
    out = study_dir / "a"
    rows = read_csv(out / "results.csv")
    arms = {r["arm"] for r in rows}
    assert {"baseline", "iti-top3", "ipo-top3", "full", "iti-random3-s0", "iti-random3-s1",
            "ipo-random3-s0", "ipo-random3-s1"} <= arms
    assert any(a.startswith("ipo-single-") for a in arms)
    # ITI has two alphas: both evaluated on val, exactly one selected and evaluated on test
    iti_top = [r for r in rows if r["arm"] == "iti-top3"]
    assert sorted(r["alpha"] for r in iti_top if r["split"] == "val") == ["15.0", "5.0"]
    test_rows = [r for r in iti_top if r["split"] == "test"]
    assert len(test_rows) == 1 and test_rows[0]["selected"] == "1"
    val_ti = {r["alpha"]: float(r["truth_info"]) for r in iti_top if r["split"] == "val"}
    assert test_rows[0]["alpha"] == max(val_ti, key=val_ti.get)  # chosen on validation, not test
    for r in rows:
        if r["split"] == "test":
            ti = float(r["truth_info"])
            assert abs(ti - float(r["truth"]) * float(r["info"])) < 1e-9
            assert r["kl"] != "" and float(r["kl"]) >= 0
    assert float(next(r for r in rows if r["arm"] == "baseline" and r["split"] == "test")["kl"]) == 0.0
    for f in ("results.json", "report.html", "figures/hist_iti.png", "figures/hist_ipo.png", "figures/truth_vs_info.png",
              "figures/probe_heatmap.png", "figures/hist_single.png", "figures/kl_vs_mc1.png"):
        assert (out / f).is_file(), f
    html = (out / "report.html").read_text()
    assert "Verdict" in html and "data:image/png;base64" in html


def test_rerun_reuses_trials(study_dir, monkeypatch):
    from locaudit import training
    from locaudit.evaluation import metrics

    before = {p: p.read_bytes() for p in (study_dir / "a" / "trials").glob("*/*.json")}
    # a run written before `study.packing` and `fit.retry_flat` existed resumes as the same run
    path = study_dir / "a" / "config.json"
    rec = json.loads(path.read_text())
    del rec["preset"]["study"]["packing"], rec["preset"]["fit"]["retry_flat"]
    path.write_text(json.dumps(rec))
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("refit a finished trial"))
    monkeypatch.setattr(metrics, "evaluate", lambda *a, **k: pytest.fail("re-evaluated a finished trial"))
    run(study_dir, "a")
    after = {p: p.read_bytes() for p in (study_dir / "a" / "trials").glob("*/*.json")}
    assert before == after


def test_same_seed_same_results(study_dir):
    run(study_dir, "b")
    assert _without_seconds(study_dir / "a" / "results.csv") == _without_seconds(study_dir / "b" / "results.csv")


def _without_seconds(path):
    rows = read_csv(path)
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_report_rebuild(study_dir):
    from locaudit.report import write_report

    (study_dir / "a" / "report.html").unlink()
    res = write_report(study_dir / "a")
    assert (study_dir / "a" / "report.html").is_file()
    st = res["stats"]
    assert st["iti"]["test"]["n_random"] == 2 and 0 <= st["iti"]["test"]["percentile"] <= 100
    assert "fraction_of_full" in st["ipo"]


def test_console_summary_shows_heads_and_steered_answer(study_dir):
    import json

    from locaudit.report import console_summary

    text = console_summary(study_dir / "a", json.loads((study_dir / "a" / "results.json").read_text()))
    assert text.startswith("S* (top 3 probe heads): L") and "unsteered: " in text and "ITI at S* (alpha " in text
    assert "ITI: S* scores" in text and "Optimal edit (IPO): S* scores" in text


def test_deferred_judging_equals_inline(study_dir, monkeypatch):
    """A run with judge "none" stores answers only (every alpha also on test); `judge_run` then scores them,
    selects on validation and reports exactly what the inline-judged run "a" reported."""
    import torch

    from locaudit.evaluation import judges as judges_mod
    from locaudit.report import write_report
    from locaudit.storage import read_json
    from locaudit.study import judge_run, run_study

    preset = tiny_preset()
    preset = replace(preset, eval=replace(preset.eval, judge="none"))
    out = study_dir / "deferred"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_study(preset, out, progress=False, lm=make_tiny("llama"), workers=1)
    finally:
        torch.set_num_threads(old)
    assert res["deferred"] is True
    trials = [read_json(p) for p in (out / "trials").glob("*/*.json")]
    assert trials and all(t["truth"] is None and t["mc1"] is not None or t["split"] == "val" for t in trials)
    iti_tests = [t for t in trials if t["arm"] == "iti-top3" and t["split"] == "test"]
    assert sorted(t["alpha"] for t in iti_tests) == [5.0, 15.0]  # both values kept for later selection
    assert read_json(out / "run.json")["judged"] is False
    with pytest.raises(Exception, match="locaudit judge"):
        write_report(out)

    monkeypatch.setattr(judges_mod, "load_judges", lambda *a, **k: (HashJudge("truth"), HashJudge("info")))
    judge_run(out, progress=False)
    inline = {(r["arm"], r["split"], r["alpha"], r["tau"]): r for r in read_csv(study_dir / "a" / "results.csv")}
    for r in read_csv(out / "results.csv"):
        if r["split"] == "test" and r["selected"] == "0":
            continue  # the deferred run's extra test trials at values validation did not choose
        ref = inline[(r["arm"], r["split"], r["alpha"], r["tau"])]
        for k in ("heads", "truth", "info", "truth_info", "mc1", "ce", "kl", "n_questions", "selected"):
            assert r[k] == ref[k], (r["arm"], k)
        assert (r["mc2"] == ref["mc2"] == "") or float(r["mc2"]) == pytest.approx(float(ref["mc2"]), rel=1e-9)
    assert read_json(out / "run.json")["selections"] == read_json(study_dir / "a" / "run.json")["selections"]
    # judging again is a no-op on already-judged trials
    before = {p: p.read_bytes() for p in (out / "trials").glob("*/*.json")}
    judge_run(out, progress=False)
    assert before == {p: p.read_bytes() for p in (out / "trials").glob("*/*.json")}


def test_parallel_workers_give_the_same_results(study_dir):
    """Arms in two worker processes: the same trials, selections and results as in one process."""
    run(study_dir, "parallel", workers=2)
    assert _without_seconds(study_dir / "parallel" / "results.csv") == _without_seconds(study_dir / "a" / "results.csv")
    from locaudit.storage import read_json

    assert read_json(study_dir / "parallel" / "run.json")["workers"] == 2


def test_judging_a_partial_deferred_run(study_dir, monkeypatch):
    """A deferred run stopped before its end (no run.json, some arms missing) is judged and reported as far as
    it got, and says so."""
    import shutil

    from locaudit.evaluation import judges as judges_mod
    from locaudit.storage import read_json
    from locaudit.study import judge_run

    src = study_dir / "deferred"
    if not (src / "config.json").is_file():
        pytest.skip("needs test_deferred_judging_equals_inline's run")
    part = study_dir / "partial"
    shutil.copytree(src, part)
    (part / "run.json").unlink()
    for arm in ("full", "ipo-single-L2H0"):
        shutil.rmtree(part / "trials" / arm, ignore_errors=True)
    for p in (part / "trials").glob("*/*.json"):  # back to unjudged answers
        r = read_json(p)
        r.update(truth=None, info=None, truth_info=None, judge=None)
        p.write_text(__import__("json").dumps(r))
    monkeypatch.setattr(judges_mod, "load_judges", lambda *a, **k: (HashJudge("truth"), HashJudge("info")))
    res = judge_run(part, progress=False)
    run = read_json(part / "run.json")
    assert run["partial"] is True and run["n_test_questions"] == 4 and run["n_val_questions"] == 3
    assert "full" not in run["selections"] and run["selections"]["iti-top3"] in (5.0, 15.0)
    assert "Partial run" in (part / "report.html").read_text() and "iti" in res["stats"]


def test_fit_statuses_and_stuck_fits_left_out_of_the_null(study_dir):
    from locaudit.report import compute_stats, load_trials, selected_tests

    out = study_dir / "a"
    res = json.loads((out / "results.json").read_text())
    st = res["stats"]
    fits = {}
    for path in (out / "trials").glob("*/*.test.json"):
        r = json.loads(path.read_text())
        if r.get("fit"):
            assert r["fit"]["status"] in ("converged", "step_cap", "stuck") and r["fit"]["steps"] <= 6
            assert r["fit"]["val_curve"][0]["step"] == 0 and r["fit"]["lr"] > 0
            fits[r["arm"]] = r["fit"]["status"]
    assert st["fits"]["n"] == len(fits) == sum(st["fits"]["by_status"].values())
    stuck = sorted(a for a, s in fits.items() if s == "stuck")
    assert st["fits"]["stuck"] == stuck
    random_ipo = [a for a in fits if a.startswith("ipo-random")]
    assert st["ipo"]["excluded_stuck"] == [a for a in sorted(random_ipo) if fits[a] == "stuck"]
    assert st["ipo"]["test"]["n_random"] == sum(fits[a] != "stuck" for a in random_ipo)
    # "flat" (best validation loss < min_delta below the start) is read from the recorded curve, as in the audit
    flat = sorted(a for a, r in st["arms"].items() if r["fit_status"] == "flat")
    assert st["fits"]["flat"] == flat
    for a, status in fits.items():
        r = json.loads(next((out / "trials" / a).glob("*.test.json")).read_text())["fit"]
        is_flat = status != "stuck" and r["best"]["val_loss"] > 0.99 * r["val_start"]["val_loss"]
        assert (a in flat) == is_flat
    # a flat S* and a flat random set: the random set stays in the null, S* gets a warning
    tests = selected_tests(load_trials(out), res["run"]["selections"], out)
    top, rand = st["ipo"]["top_arm"], sorted(a for a in random_ipo if fits[a] != "stuck")[0]
    for a in (top, rand):
        start = tests[a]["fit"]["val_start"]["val_loss"]
        tests[a]["fit"] = {**tests[a]["fit"], "status": "converged", "best": {"step": 2, "val_loss": start * 0.995}}
    flat_st = compute_stats(tests, 20)
    assert {top, rand} <= set(flat_st["fits"]["flat"])
    assert flat_st["ipo"]["test"]["n_random"] == st["ipo"]["test"]["n_random"]
    assert "the fit at S* stayed flat" in flat_st["ipo"]["verdict"]
    assert "stayed flat" not in compute_stats(tests, 20, min_delta=0.001)["ipo"]["verdict"]  # 0.5% is > 0.1%
    # side metrics: MC1/MC2/KL and rate-based True*Info against the same null
    assert set(st["iti"]["side_metrics"]) == {"truth_info_pct", "mc1", "mc2", "kl"}
    assert st["iti"]["side_metrics"]["kl"]["higher_is_better"] is False
    # trade-off curves through the alpha grid (validation trials carry MC and KL with val_side_metrics)
    for f in ("tradeoff_iti_truth_info.png", "tradeoff_iti_kl_mc2.png", "single_vs_probe.png"):
        assert (out / "figures" / f).is_file(), f
    val = [json.loads(p.read_text()) for p in (out / "trials" / "iti-top3").glob("*.val.json")]
    assert len(val) == 2 and all(r["mc2"] is not None and r["kl"] is not None for r in val)
    pts = st["single"]["vs_probe"]
    assert {p["arm"] for p in pts} >= set(st["single"]["scores"]) and all(0 <= p["probe_acc"] <= 1 for p in pts)
    # the reparameterised edit with S = all heads: a LocalizedRank1 over every head, at lr_all, beside full LoRA
    allh = json.loads((out / "edits" / "ipo-allheads" / "tau0.1" / "edit.json").read_text())
    assert allh["kind"] == "localized" and len(allh["heads"]) == 12 and allh["config"]["lr"] == 0.03
    assert "ipo-allheads" in st["ipo"]["fraction_of_full"]
    run = json.loads((out / "run.json").read_text())
    assert run["samples"]["test"]["n"] == 4 and sum(run["samples"]["test"]["type"].values()) == 4
    assert "stratified by Type and Category" in (out / "report.html").read_text()
    keys = {r["key"] for r in res["replication"]}
    assert {"iti_special", "ipo_random", "ipo_full", "single"} <= keys
    assert all(r["verdict"].startswith(("replicates", "does not", "inconclusive")) for r in res["replication"])
    assert "The paper's findings beside this run" in (out / "report.html").read_text()


# --- the report: verdict first, the new figures, results.json's documented schema ---------------------------

def _selected_test_trial(out, arm):
    """The arm's test trial at the value validation chose, read straight from its trial file."""
    import json

    chosen = json.loads((out / "run.json").read_text())["selections"][arm]
    for path in (out / "trials" / arm).glob("*.test.json"):
        r = json.loads(path.read_text())
        if chosen is None or chosen in (r.get("alpha"), r.get("tau")):
            return r
    raise AssertionError(f"no selected test trial for {arm}")


def test_report_reads_verdict_first(study_dir):
    """The verdict (claim, the numbers of results.json, the evidence in words) comes first, then the figures in
    the order trade-offs, nulls, per-question differences, training curves, then the tables."""
    import json
    import re

    out = study_dir / "a"
    html = (out / "report.html").read_text()
    st = json.loads((out / "results.json").read_text())["stats"]
    verdict = html[html.index("<section id='verdict'>"):html.index("</section>")]
    heads = _selected_test_trial(out, st["ipo"]["top_arm"])["heads"].replace(",", ", ")
    assert "the top 3 attention heads by probe accuracy" in verdict and heads in verdict
    for m, label in (("ipo", "Optimal edit (IPO)"), ("iti", "ITI")):
        t, arm = st[m]["test"], st["arms"][st[m]["top_arm"]]
        ordinal = re.escape(f"{round(t['percentile'])}")
        assert re.search(ordinal + r"(st|nd|rd|th) percentile", verdict)
        assert f"exact rank p = {t['p_rank']:.3f}" in verdict and f"n = {t['n_random']}" in verdict
        assert f"{arm['truth_info']:.3f}" in verdict and f"{arm['ci'][0]:.3f} to {arm['ci'][1]:.3f}" in verdict
        assert f"<b>{label}: " in verdict  # the evidence in words, one paragraph per edit
    f = st["ipo"]["fraction_of_full"][st["ipo"]["top_arm"]]
    assert f"{f['ratio']:.2f}" in verdict and f"{f['ci'][0]:.2f} to {f['ci'][1]:.2f}" in verdict
    assert f"n = {st['arms'][st['ipo']['top_arm']]['n_questions']} test questions" in verdict
    order = ["<section id='verdict'>", "id='tradeoff'", "id='null'", "id='paired'", "id='fits'",
             "The paper's findings beside this run", "Test results (hyper-parameter"]
    at = [html.index(s) for s in order]
    assert at == sorted(at), dict(zip(order, at))
    assert "<table" not in html[:html.index("<section id='verdict'>")]


def test_new_figures_drawn_from_the_stored_scores_and_fits(study_dir, monkeypatch):
    """The per-question figure draws S* minus each random set in the null and minus full alignment, exactly the
    stored per-question judge scores' differences (results.json keeps them too); the training-curve figure draws
    every fit's stored curves. Both are embedded in the page."""
    import base64
    import json

    from locaudit import figures, report

    out = study_dir / "a"
    drawn: dict = {}

    def keep(name, fn):
        def wrapper(data, path, *a, **k):
            drawn[Path(path).stem] = data
            return fn(data, path, *a, **k)
        monkeypatch.setattr(figures, name, wrapper)

    keep("paired_differences", figures.paired_differences)
    keep("fit_curves", figures.fit_curves)
    report.write_report(out)
    res = json.loads((out / "results.json").read_text())
    st = res["stats"]
    html = (out / "report.html").read_text()
    for name in ("paired_ipo", "paired_iti", "fit_curves"):
        png = (out / "figures" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and base64.b64encode(png).decode() in html, name

    for m in ("ipo", "iti"):
        claim = _selected_test_trial(out, st[m]["top_arm"])
        randoms = sorted(a for a in st["arms"] if st["arms"][a]["group"] == "random" and st["arms"][a]["method"] == m
                         and a not in st[m]["excluded_stuck"])
        assert len(randoms) == st[m]["test"]["n_random"]
        stored = res["paired_differences"][m]
        assert stored["claim"] == claim["arm"] and stored["qid"] == claim["per_question"]["qid"]
        assert sorted(stored["minus"]) == sorted(randoms + ["full"])
        rows = {r["label"]: r for r in drawn[f"paired_{m}"]}
        assert len(rows) == len(randoms) + 1
        for arm in randoms + ["full"]:
            other = _selected_test_trial(out, arm)
            where = {q: i for i, q in enumerate(other["per_question"]["qid"])}
            for k in ("truth_p", "info_p"):
                want = [claim["per_question"][k][i] - other["per_question"][k][where[q]]
                        for i, q in enumerate(claim["per_question"]["qid"])]
                assert stored["minus"][arm][k] == want
                label = "full alignment" if arm == "full" else arm.removeprefix(f"{m}-")
                assert rows[label][k] == want and rows[label]["kind"] == ("full" if arm == "full" else "random")
        # S* minus itself would be all zeros: the claim is never a comparison
        assert claim["arm"] not in stored["minus"]

    fits = drawn["fit_curves"]
    metas = {}
    for p in (out / "edits").glob("*/*/edit.json"):
        meta = json.loads(p.read_text())
        metas[(meta["edit_label"], meta["config"]["tau"])] = meta
    assert {(f["arm"], f["tau"]) for f in fits} == set(metas) and len(fits) == len(metas) == 8
    for f in fits:
        meta = metas[(f["arm"], f["tau"])]
        assert f["train"] == meta["train_curve"] and len(f["train"]) == meta["steps"]
        assert f["val"] == [[h["step"], h["val_loss"]] for h in meta["val_curve"]]
        flat = meta["status"] != "stuck" and meta["best"]["val_loss"] > 0.99 * meta["val_curve"][0]["val_loss"]
        assert f["status"] == ("flat" if flat else meta["status"]) and f["best_step"] == meta["best"]["step"]
        assert f["selected"]  # one tau in this run: every fit is the chosen one
    assert fits[0]["arm"] == st["ipo"]["top_arm"]  # S* first


def test_results_json_is_strict_json(study_dir):
    """Undefined numbers (the t-test on a single random set) are null, not NaN: any JSON parser reads it."""
    import json

    def refuse(name):
        raise AssertionError(f"results.json holds {name}")

    res = json.loads((study_dir / "a" / "results.json").read_text(), parse_constant=refuse)
    assert res["schema_version"] == 1
    t = res["stats"]["ipo"]["test"]
    assert t["n_random"] == 1 and t["random_sd"] is None and t["p_ttest"] is None and t["p_rank"] == 0.5


# ---- docs/results.md: every key of results.json and every column of results.csv, and nothing else

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def doc_tables() -> dict[str, list[list[str]]]:
    """The markdown tables of docs/results.md by section heading: rows of cells, backticks removed."""
    tables: dict[str, list[list[str]]] = {}
    section = None
    for line in DOCS.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("| `") and section:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            tables.setdefault(section, []).append([cells[0].strip("`")] + cells[1:])
    return tables


def key_paths(obj, prefix=()):
    """Every key of a JSON document as a tuple of segments; items of a list of objects add "name[]"."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from key_paths(v, prefix + (k,))
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        for x in obj:
            yield from key_paths(x, prefix[:-1] + (prefix[-1] + "[]",))


def test_results_schema_is_documented(study_dir, monkeypatch, tmp_path):
    """Every key results.json has, in the smoke run, in a partial run and in a run whose single heads all fit,
    matches a row of docs/results.md; every row marked "always" is in the smoke run, and every other row in one
    of the three; results.csv's columns are the documented ones, in order."""
    import json
    import shutil

    import numpy as np

    from locaudit.evaluation import judges as judges_mod
    from locaudit.report import COLUMNS, LOCATED, SIDE_METRICS, compute_stats, load_trials, selected_tests
    from locaudit.study import judge_run
    from locaudit.training import STATUSES

    tables = doc_tables()
    rows = tables["results.json"]
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)), "a key documented twice"
    assert all(len(r) == 4 and r[1] and r[2] and r[3] for r in rows), "every row needs type, present, meaning"

    out = study_dir / "a"
    smoke = json.loads((out / "results.json").read_text())
    # a partial run: the same trials judged before the study wrote run.json
    part = tmp_path / "partial"
    shutil.copytree(out, part)
    (part / "run.json").unlink()
    monkeypatch.setattr(judges_mod, "load_judges", lambda *a, **k: (HashJudge("truth"), HashJudge("info")))
    judge_run(part, progress=False)
    partial = json.loads((part / "results.json").read_text())
    assert partial["run"]["partial"] is True
    # statistics of a run where no fit was stuck (enough single heads for the Spearman correlation)
    tests = selected_tests(load_trials(out), smoke["run"]["selections"], out)
    for r in tests.values():
        if r.get("fit"):
            r["fit"] = {**r["fit"], "status": "converged"}
    unstuck = {"stats": compute_stats(tests, 20, probe_acc=np.load(out / "probes" / "probes.npz")["val_acc"])}
    assert "spearman" in unstuck["stats"]["single"]

    arms = {r["arm"] for r in smoke["rows"]}
    allowed = {"<arm>": arms, "<method>": {m.name for m in LOCATED}, "<metric>": set(SIDE_METRICS),
               "<status>": set(STATUSES) | {"flat"}, "<judge>": {"truth", "info"}, "<split>": {"test", "val"},
               "<stage>": None, "<type>": None, "<category>": None, "<part>": None}  # None: any name
    for k in keys:
        for seg in k.split("."):
            if seg.startswith("<"):
                assert seg in allowed, f"unknown placeholder {seg} in {k}"

    def documented(path):
        pats = [k for k in keys if len(k.split(".")) == len(path) and all(
            p == s or (p in allowed and (allowed[p] is None or s in allowed[p])) for p, s in zip(k.split("."), path))]
        return pats

    produced = {}
    for name, doc in (("smoke", smoke), ("partial", partial), ("unstuck", unstuck)):
        for path in set(key_paths(doc)):
            pats = documented(path)
            assert pats, f"{'.'.join(path)} (in the {name} run's results.json) is not in docs/results.md"
            for p in pats:
                produced.setdefault(p, set()).add(name)
    always = [r[0] for r in rows if r[2] == "always"]
    assert [k for k in always if "smoke" not in produced.get(k, ())] == []
    assert [k for k in keys if k not in produced] == []
    # results.csv
    with open(out / "results.csv") as f:
        header = f.readline().strip().split(",")
    assert header == COLUMNS == [r[0] for r in tables["results.csv"]]
