"""The README stays true: its config reference is the schema's, and its quick start is two commands."""

from pathlib import Path

from config_utils.reference import reference_markdown

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_config_reference_matches_the_schema():
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    documented = README[README.index(start) + len(start) : README.index(end)].strip()
    assert documented == reference_markdown().strip(), "run: python -m config_utils.reference and paste it"


def test_quick_start_is_make_demo_and_make_test():
    quick_start = README.split("## Quick start", 1)[1].split("```", 2)[1]
    assert quick_start.split() == ["make", "demo", "make", "test"]
