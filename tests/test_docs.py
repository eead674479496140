"""The README a newcomer scans: short, the two commands first, every docs/ page linked from it, no dead links.

Links are read from the Markdown outside code (fenced blocks and inline code spans are dropped first); a link's
#anchor must name a heading of the target page, slugged as GitHub slugs headings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 150
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> str:
    """The Markdown with fenced code blocks and inline code spans removed (links inside code are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    """Every link and image target in a Markdown file, in order."""
    return LINK.findall(prose(path.read_text()))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a linked heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, duplicates numbered -1, -2, ... as GitHub numbers them."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file whose file is missing, or whose #anchor is no heading of its page."""
    bad = []
    for target in links(path):
        if target.startswith(EXTERNAL):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.is_file():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {os.path.relpath(dest, path.parent)})")
    return bad


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def readme_sections() -> list[str]:
    return re.findall(r"^## (.+?)\s*$", FENCE.sub("", README.read_text()), re.M)


def test_readme_begins_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[0].startswith("# "), "README must start with its title"
    body = [l for l in lines[1:] if l.strip()]
    assert body[0].startswith("```"), f"the first thing after the title must be the commands block, got {body[0]!r}"
    end = next(i for i in range(1, len(body)) if body[i].startswith("```"))
    commands = [l.split("#")[0].split() for l in body[1:end]]
    assert commands == [["make", "run"], ["make", "test"]]


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README has {n} lines; move detail into docs/ (at most {MAX_README_LINES})"


def test_readme_keeps_its_sections_in_order():
    sections = readme_sections()
    wanted = ["A measured result", "Audit your own claim", "Where to go next"]
    assert [s for s in sections if s in wanted] == wanted, sections
    text = README.read_text()
    audit = text.index("## Audit your own claim")
    snippet = text.index("<!-- notebook-snippet")
    assert audit < snippet < text.index("## Where to go next")
    assert text[snippet:].split("\n", 2)[1] == "```python", "tests/test_api.py expects the snippet's python block"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README) if not t.startswith(EXTERNAL)}
    pages = doc_pages()
    assert len(pages) >= 9
    missing = [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_readme_links_resolve():
    targets = [t for t in links(README) if t.startswith("docs/")]
    assert "docs/results-quick.md" in targets and "docs/audit.md" in targets
    assert not broken_links(README)


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_page_links_resolve(page):
    assert page.read_text().startswith("# "), f"{page.name} needs a title"
    assert not broken_links(page)


def test_link_checker_catches_dead_links(tmp_path):
    """The checker itself: a missing file, a missing anchor and a link only in code are told apart."""
    (tmp_path / "other.md").write_text("# Other page\n\n## Training to the optimum: where SmolLM2's plateau is\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n[ok](other.md#training-to-the-optimum-where-smollm2s-plateau-is) [self](#page)\n"
                    "[gone](nowhere.md) [bad anchor](other.md#nothing) ![img](fig.png) [web](https://example.org)\n"
                    "`[in code](missing.md)`\n```\n[in a fence](missing2.md)\n```\n")
    assert broken_links(page) == ["nowhere.md (no such file)",
                                  "other.md#nothing (no heading #nothing in other.md)",
                                  "fig.png (no such file)"]
