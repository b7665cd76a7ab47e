"""The README and docs/ hold together: every relative link and image resolves (to a file, and to a heading where it
names one), every docs/ page is linked from the README, and the README stays a landing page."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers.paths import PROJECT_ROOT, README

DOCS = sorted((PROJECT_ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 200
# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional "title" may follow).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(path: Path, code_spans: bool = False) -> str:
    """The Markdown of path without fenced code blocks (a `# comment` in a bash block is no heading), and without
    inline code spans unless asked (`[x](y)` in backticks is no link; a heading's anchor keeps their text)."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    text = "\n".join(lines)
    return text if code_spans else re.sub(r"`[^`]*`", "", text)  # a code span may run over a line break


def links(path: Path) -> list[str]:
    """The relative targets path links to (web and mail links left out)."""
    return [t for t in LINK.findall(prose(path)) if not re.match(r"(https?|mailto):", t)]


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes from a page's headings: lower case, punctuation dropped, spaces as hyphens, a
    repeated heading numbered (-1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path, code_spans=True), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no such heading in {path.name})")
    assert not broken, f"{page.relative_to(PROJECT_ROOT)} links to what is not there: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README) if t.partition("#")[0]}
    missing = [p.relative_to(PROJECT_ROOT).as_posix() for p in DOCS if p.resolve() not in linked]
    assert DOCS and not missing, f"docs pages the README does not link: {missing}"


def test_readme_is_a_landing_page():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, more than {README_MAX_LINES}: move the detail "
                                       "into a docs/ page and link it")


def test_the_link_check_sees_broken_links(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading, with `code`\n\n```bash\n# not a heading\n```\n")
    page.write_text("[ok](there.md) [ok](there.md#a-heading-with-code) ![img](gone.png) [web](https://x.org/y) "
                    "`[code](nowhere.md)` [bad anchor](there.md#not-a-heading)\n")
    assert links(page) == ["there.md", "there.md#a-heading-with-code", "gone.png", "there.md#not-a-heading"]
    assert anchors(tmp_path / "there.md") == {"a-heading-with-code"}
