"""The Markdown docs link only to files and headings that exist; README's layout names real files.

Checks every inline link ``[text](target)`` and image ``![alt](target)`` of README.md,
CHANGELOG.md and docs/*.md outside code: a relative target must exist relative to the
Markdown file, and a ``#anchor`` (in the same file or another ``.md``) must be the slug of one
of its headings, by GitHub's rules. URLs (``http:``, ``https:``, ``mailto:``, ...) are not
fetched.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_LAYOUT_PATH = re.compile(r"`(qbackprop/[^`\s]*\.py)`")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, every character that is
    not a letter, mark, digit, ``_``, ``-`` or space dropped, spaces turned into ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = [
        c for c in text if c in "_- " or unicodedata.category(c)[0] in "LMN"
    ]  # letters, marks, numbers
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link and image outside code."""
    out = []
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        prose = _CODE_SPAN.sub("code", line)
        out.extend((number, m.group(1)) for m in _LINK.finditer(prose))
    return out


def broken_links(path: Path) -> list[str]:
    """One line per link of ``path`` whose file or heading does not exist."""
    problems = []
    for number, target in links(path):
        where = f"{path.name}:{number}: ({target})"
        if not target:
            problems.append(f"{where}: empty target")
            continue
        if _SCHEME.match(target):
            continue  # a URL: not checked offline
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{where}: no file {file_part}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {dest.name}")
    return problems


def layout_paths(readme: Path) -> list[str]:
    """The ``qbackprop/...py`` paths written in backticks in README's Layout section."""
    section, inside = [], False
    for _, line in _prose_lines(readme.read_text(encoding="utf-8")):
        heading = _HEADING.match(line)
        if heading and len(heading.group(1)) <= 2:
            inside = heading.group(2).strip().lower() == "layout"
            continue
        if inside:
            section.append(line)
    return _LAYOUT_PATH.findall("\n".join(section))


def test_every_markdown_link_and_anchor_exists():
    problems = [p for doc in DOCS if doc.exists() for p in broken_links(doc)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_layout_names_real_files():
    paths = layout_paths(ROOT / "README.md")
    assert len(paths) > 20, f"README's Layout section names too few files: {paths}"
    missing = [p for p in paths if not (ROOT / p).is_file()]
    assert not missing, f"README's Layout names files that do not exist: {missing}"
    tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "qbackprop").rglob("*.py")}
    left_out = sorted(tree - set(paths) - {p for p in tree if p.endswith("/__init__.py")})
    assert not left_out, f"README's Layout leaves out: {left_out}"


def test_the_checker_reports_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Per-layer bits: `tune` (the issue)\n")
    (tmp_path / "pic.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## A section\n\n"
        "[ok](other.md) [ok anchor](other.md#per-layer-bits-tune-the-issue) ![ok](pic.png)\n"
        "[same file](#a-section) [url](https://example.com/missing.md) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[gone](missing.md) ![gone](missing.png) [bad anchor](other.md#no-such-heading)\n"
        "[bad local](#no-such-section)\n"
    )
    problems = broken_links(page)
    assert len(problems) == 4, problems
    for text in ("missing.md", "missing.png", "#no-such-heading", "#no-such-section"):
        assert any(text in p for p in problems), (text, problems)
    assert slug("The engine: ops, no syncs (the `engine` issue)") == (
        "the-engine-ops-no-syncs-the-engine-issue"
    )
    assert slug("Faithful gradients (`scripts/bench_fidelity.py --zoo`)") == (
        "faithful-gradients-scriptsbench_fidelitypy---zoo"
    )
