"""The README is a short front page and docs/ holds one page per topic; these checks keep
that true as text moves between them: every relative link (and #anchor) resolves, every
page is reachable from the README, and the README keeps the commands CI and people rely on
as its first lines. Pure text checks: milliseconds, no imports of the package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.runs import REPO

# The README is what a newcomer reads in one go; a topic that grows it past this belongs in
# docs/ (a page of its own, linked from "Read on").
README_MAX_LINES = 200

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, where `#` and `[x](y)` are markdown."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((number, line))
    return out


def anchors(text: str) -> set[str]:
    """The #fragments GitHub gives the headings of a page: lower case, punctuation dropped,
    spaces to hyphens, a repeated heading suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(2).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code blocks and code spans."""
    return [
        (number, target)
        for number, line in prose_lines(text)
        for target in _LINK.findall(_CODE_SPAN.sub("", line))
    ]


def broken_links(page: Path) -> list[str]:
    """One 'file:line: target: why' per relative link of `page` that points nowhere."""
    problems = []
    for number, target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.name}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file {dest}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text()):
            problems.append(f"{where}: {dest.name} has no heading with anchor #{fragment}")
    return problems


PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {
        (REPO / target.partition("#")[0]).resolve()
        for _, target in links((REPO / "README.md").read_text(encoding="utf-8"))
    }
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert orphans == [], "add each docs/ page to the README's 'Read on' list"


def test_readme_opens_with_the_commands_and_stays_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    first_block = lines[lines.index("```bash") + 1 :]
    first_block = first_block[: first_block.index("```")]
    assert [line.split()[:2] for line in first_block] == [
        ["make", "demo"],
        ["make", "test"],
        ["make", "test-fast"],
    ]
    assert not any(line.startswith("## ") for line in lines[: lines.index("```bash")])
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the topic's "
        "text to a page under docs/ and link it from 'Read on'"
    )


def test_the_checker_finds_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Know this: a b\n\n## Twice\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n"
        "[ok](other.md) [ok](other.md#know-this-a-b) [ok](other.md#twice-1) [ok](#page)\n"
        "[web](https://example.com/x.md) `[code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n# not a heading\n```\n"
        "[gone](missing.md) [bad](other.md#no-such) [self](#not-a-heading)\n"
    )
    problems = broken_links(page)
    assert [p.split(": ")[1] for p in problems] == [
        "missing.md",
        "other.md#no-such",
        "#not-a-heading",
    ]
    assert all(p.startswith("page.md:8: ") for p in problems)
