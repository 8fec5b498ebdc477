"""Every relative link in the README and the docs points at a file of the checkout, and every ``#anchor`` at a
heading of its target (GitHub's slugs): moving a table or a section must not leave a dangling link behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted(
    p for d in ("docs", "benchmarks", "datasets", "tuning") for p in (ROOT / d).glob("*.md")
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {github_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def dangling_links(path: Path) -> list[str]:
    """The links of one markdown file (outside code blocks) whose file or anchor does not exist."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    bad = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            bad.append(f"{target} (no such heading)")
    return bad


def test_the_slug_is_githubs():
    assert github_slug("Semantic ids (`item_repr: semantic`)") == "semantic-ids-item_repr-semantic"
    assert (
        github_slug("1. retail-sim, given the history or the season") == "1-retail-sim-given-the-history-or-the-season"
    )


def test_a_dangling_link_and_a_missing_heading_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# A heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading) [gone](missing.md) [wrong](other.md#nope) [here](#top)\n"
        "```\n[in code](ignored.md)\n```\n# Top\n",
        encoding="utf-8",
    )
    assert dangling_links(page) == ["missing.md (no such file)", "other.md#nope (no such heading)"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert not dangling_links(path), f"{path.relative_to(ROOT)}: {dangling_links(path)}"
