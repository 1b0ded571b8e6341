"""The README stays true and short: its first screen shows what you get and the quick start, its config reference
(now docs/config-reference.md) is the schema's, and every relative link in it and in docs/ reaches a file (and a
heading, where it names one)."""

import os
import re
from pathlib import Path

from config_utils.reference import reference_markdown

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]

# the first screen: the README's first 60 lines (a terminal or a browser window without scrolling)
FIRST_SCREEN_LINES = 60
FIGURE = "](images/demo_topic_expert_heatmap.png)"
VERDICT_PLACEHOLDER = "<!-- verdict-table -->"

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
TABLE = re.compile(r"^\|.*\|\s*\n\|(?:\s*:?-+:?\s*\|)+\s*$", re.M)


def prose(text: str) -> str:
    """The text without code: fenced blocks and inline code spans (a link inside code is no link)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(heading) for heading in HEADING.findall(FENCE.sub("", text))}


def link_problems(text: str, page: Path) -> list[str]:
    """Every relative link of a page (images included) that names no file, or a heading its file lacks."""
    problems = []
    body = prose(text)
    for target in LINK.findall(body) + REFERENCE_LINK.findall(body):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve()
        if path and not file.exists():
            problems.append(f"{page.name}: link to {target}: no file {os.path.relpath(file, REPO)}")
        elif anchor and (not path or file.suffix == ".md"):
            if anchor not in anchors(file.read_text(encoding="utf-8") if path else text):
                problems.append(
                    f"{page.name}: link to {target}: {(file if path else page).name} has no heading #{anchor}"
                )
    return problems


def test_config_reference_matches_the_schema():
    page = (REPO / "docs" / "config-reference.md").read_text(encoding="utf-8")
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    documented = page[page.index(start) + len(start) : page.index(end)].strip()
    assert documented == reference_markdown().strip(), (
        "run: python -m config_utils.reference and paste it into docs/config-reference.md"
    )


def test_quick_start_is_make_demo_and_make_test():
    quick_start = README.split("## Quick start", 1)[1].split("```", 2)[1]
    assert quick_start.split() == ["make", "demo", "make", "test"]


def test_the_first_screen_shows_the_figure_the_verdict_the_quick_start_and_the_contents():
    first_screen = "\n".join(README.split("\n")[:FIRST_SCREEN_LINES])
    assert FIGURE in first_screen, "the per-topic expert figure belongs on the first screen"
    assert VERDICT_PLACEHOLDER in first_screen or TABLE.search(first_screen), "the verdict table belongs there too"
    assert "## Quick start\n\n```\nmake demo\nmake test\n```" in first_screen, "and the quick start"
    unlisted = [page.name for page in DOCS if f"](docs/{page.name})" not in first_screen]
    assert not unlisted, f"the contents list on the first screen links no {unlisted}"


def test_every_docs_page_opens_with_a_title_and_a_link_back():
    assert len(DOCS) >= 9, [page.name for page in DOCS]
    for page in DOCS:
        title, blank, back = page.read_text(encoding="utf-8").split("\n")[:3]
        assert title.startswith("# ") and not blank and "](../README.md)" in back, page.name


def test_every_relative_link_reaches_a_file_and_heading():
    problems = [problem for page in PAGES for problem in link_problems(page.read_text(encoding="utf-8"), page)]
    assert not problems, "\n".join(problems)


def test_the_link_check_finds_a_broken_link():
    scratch = REPO / "docs" / "scratch.md"  # never written: link_problems reads the text it is given
    text = (
        "# Scratch\n\n## A heading\n\n"
        "[ok](../README.md) [ok](results.md) [ok](#a-heading) ![ok](../images/architecture.png) [web](https://x.org)\n"
        "`[in code](nowhere.md)`\n\n```\n[in a block](nowhere.md)\n```\n"
        "[gone](nowhere.md#x) ![gone](images/architecture.png) [bad anchor](#no-heading) [bad](results.md#nothing)\n"
    )
    problems = link_problems(text, scratch)
    assert len(problems) == 4, problems
    assert [problem.split(": ")[1] for problem in problems] == [
        "link to nowhere.md#x",
        "link to images/architecture.png",
        "link to #no-heading",
        "link to results.md#nothing",
    ]
