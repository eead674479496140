"""The study report and the audit report as a reader sees them, in headless Chromium (tests/browser.py): every
figure decodes to a real image, and nothing runs past the window at a laptop width (1280x800) or a narrow one
(800 wide), so no sideways scrolling; the study report's verdict fits the first screen, and as printed (print media at
a page's width) nothing overflows and figures and tables are not split across pages. A full-page screenshot of each is kept in the run directory (report.png at
1280 wide, report-800.png at 800) for a person to look at. Skipped without a browser (the skip says how to add one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from locaudit.audit import AuditConfig, audit
from locaudit.training import FitConfig
from tests.browser import ENABLE, LAYOUT_JS, Chromium, find_chromium
from tests.conftest import make_tiny
from tests.test_study import run as run_tiny_study

VIEWPORTS = ((1280, 800), (800, 800))


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        pytest.skip(f"no headless Chromium to render the reports: {ENABLE}")
    with Chromium(binary) as b:
        yield b


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """A smoke-preset study made tiny (tests/test_study.py): tiny Llama, hash judges, every figure kind."""
    tmp = tmp_path_factory.mktemp("browser_study")
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the per-test cache isolation
        mp.setenv("LOCAUDIT_CACHE", str(tmp / "cache"))
        run_tiny_study(tmp, "run")
    return tmp / "run"


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    """An audit of a 2-head claim on a preference file whose name, as a user's might, has no break opportunity
    (it appears in the heading and the verdict)."""
    tmp = tmp_path_factory.mktemp("browser_audit")
    task = tmp / "sycophancy_preference_pairs_written_by_hand_for_this_audit.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Item {i}:", "chosen": " a", "rejected": " b"}) + "\n"
                            for i in range(40)))
    cfg = AuditConfig(n_random=3, fit=FitConfig(max_steps=8, eval_every=4, patience=2, batch_size=4))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LOCAUDIT_CACHE", str(tmp / "cache"))
            audit("L1H0,L2H1", str(task), tmp / "run", cfg, lm=make_tiny("llama"), progress=False)
    finally:
        torch.set_num_threads(old)
    return tmp / "run"


def look(browser: Chromium, run_dir, width: int, height: int) -> dict:
    """Open RUN/report.html at this window size, measure it (LAYOUT_JS) and keep a full-page screenshot."""
    browser.set_viewport(width, height)
    browser.open(run_dir / "report.html")
    facts = browser.evaluate(LAYOUT_JS)
    facts["png"] = browser.screenshot(run_dir / ("report.png" if width == 1280 else f"report-{width}.png"))
    return facts


def assert_reads_well(facts: dict, width: int, n_images: int) -> None:
    assert facts["innerWidth"] == width
    imgs = facts["images"]
    assert len(imgs) == n_images
    broken = [i for i in imgs if not (i["naturalWidth"] > 0 and i["naturalHeight"] > 0 and i["width"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert facts["scrollWidth"] <= facts["innerWidth"], (
        f"the page is {facts['scrollWidth']} px wide in a {width} px window; too wide: {facts['wide'][:5]}")
    assert not facts["wide"], f"elements past the {width} px window: {facts['wide'][:5]}"
    with Image.open(facts["png"]) as im:  # the screenshot is the whole page, as wide as the window
        assert im.format == "PNG" and im.size == (width, facts["scrollHeight"])
        assert im.height >= 800
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # text and plots, not a blank page


@pytest.mark.parametrize("width,height", VIEWPORTS)
def test_study_report_in_a_browser(browser, study_run, width, height):
    facts = look(browser, study_run, width, height)
    figures = sorted((study_run / "figures").glob("*.png"))
    assert len(figures) >= 8  # histograms, trade-off curves, scatters, probe heat map
    assert_reads_well(facts, width, n_images=len(figures))


@pytest.mark.parametrize("width,height", VIEWPORTS)
def test_audit_report_in_a_browser(browser, audit_run, width, height):
    facts = look(browser, audit_run, width, height)
    assert_reads_well(facts, width, n_images=2)
    assert [i["alt"] for i in facts["images"]] == ["random null", "steering null"]


# the verdict section's box, and every figure's and table's break rule and width, as laid out now
VERDICT_JS = "(() => { const r = document.getElementById('verdict').getBoundingClientRect(); " \
             "return {top: r.top, bottom: r.bottom, text: document.getElementById('verdict').innerText}; })()"
BREAKS_JS = "Array.from(document.querySelectorAll('figure, table')).map(e => ({tag: e.tagName.toLowerCase(), " \
            "rule: getComputedStyle(e).breakInside, width: e.getBoundingClientRect().width}))"


def test_study_report_verdict_on_the_first_screen(browser, study_run):
    """At 1280x800 the claim, the table of what the edits at S* achieved and the evidence in words are all
    above the fold, and say the numbers of results.json."""
    browser.set_viewport(1280, 800)
    browser.open(study_run / "report.html")
    box = browser.evaluate(VERDICT_JS)
    assert 0 <= box["top"] < box["bottom"] <= 800, box
    res = json.loads((study_run / "results.json").read_text())
    st, text = res["stats"], box["text"]
    heads = next(r["heads"] for r in res["rows"] if r["arm"] == st["ipo"]["top_arm"])
    assert "Claim under test" in text and heads.replace(",", ", ") in text
    for m in ("ipo", "iti"):
        t = st[m]["test"]
        assert f"exact rank p = {t['p_rank']:.3f}" in text and f"n = {t['n_random']}" in text
    f = st["ipo"]["fraction_of_full"][st["ipo"]["top_arm"]]
    assert f"{f['ratio']:.2f} ({f['ci'][0]:.2f} to {f['ci'][1]:.2f})" in text


PAGE_WIDTH = 680  # A4 (794 CSS px at 96 dpi) less the report's 1.5 cm page margins on both sides


def test_study_report_prints(browser, study_run):
    """As printed: nothing wider than the page, every figure scaled into it, figures and tables kept whole."""
    browser.set_viewport(PAGE_WIDTH, 1000)
    browser.open(study_run / "report.html")
    browser.set_media("print")
    try:
        facts = browser.evaluate(LAYOUT_JS)
        breaks = browser.evaluate(BREAKS_JS)
        png = browser.screenshot(study_run / "report-print.png")
    finally:
        browser.set_media("")
    assert facts["scrollWidth"] <= PAGE_WIDTH and not facts["wide"], facts["wide"][:5]
    assert all(i["naturalWidth"] > 0 and 0 < i["width"] <= PAGE_WIDTH for i in facts["images"])
    assert {b["tag"] for b in breaks} == {"figure", "table"}
    assert all(b["rule"] == "avoid" for b in breaks), breaks
    with Image.open(png) as im:
        assert im.width == PAGE_WIDTH
    assert Path(png).stat().st_size > 10_000
