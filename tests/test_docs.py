"""The docs hold together.

* Every section reference (``SPEC §N``, ``spec §N.M``, lists such as
  ``SPEC §2, §4`` and ranges such as ``SPEC §2-§5``) in the code, tests,
  benchmarks and docs names a numbered heading of ``docs/spec.md``. Every
  ``§`` followed by a number in those files counts as such a reference.
* Every relative markdown link in ``README.md`` and ``docs/*.md`` reaches an
  existing file, and a ``#fragment`` into a markdown file names one of its
  headings.

Failures name the file and line. Pure text checks: no extension needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"
SCANNED = ("robustloss_fast", "csrc", "tests", "benchmarks", "docs", "README.md")
TEXT_SUFFIXES = {
    ".py", ".pyi", ".h", ".hpp", ".c", ".cc", ".cpp", ".cu", ".cuh",
    ".md", ".rst", ".txt", ".sh", ".toml", ".cfg", ".ini", ".yml", ".yaml",
}  # fmt: skip
SKIPPED_DIRS = {"__pycache__", "build", ".pytest_cache", ".benchmarks"}
#: What sections 1-6 are about: the code cites them by number, so their meaning is fixed.
CORE_SECTIONS = {
    "1": "inputs",
    "2": "row statistics",
    "3": "gradient",
    "4": "schemes",
    "5": "reduction",
    "6": "numbers",
}

SECTION = r"(\d+(?:\.\d+)*)"
# "§4", "§ 4.2", and ranges "§2-§5" / "§2–5" (the second number is then a range end).
REFERENCE = re.compile(r"§\s*" + SECTION + r"(?:\s*[-–]\s*§?\s*" + SECTION + r")?")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
NUMBERED = re.compile(r"^" + SECTION + r"\.?\s+\S")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def markdown_lines(text: str):
    """(line number, line) of a markdown text outside fenced code blocks."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, line


def headings(text: str):
    """(line number, level, title) of every markdown heading."""
    for number, line in markdown_lines(text):
        match = HEADING.match(line)
        if match:
            yield number, len(match.group(1)), match.group(2)


def slug(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set:
    seen: dict = {}
    out = set()
    for _, _, title in headings(text):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def spec_sections(text: str) -> dict:
    """{number: (line, level, title)} of the numbered headings of the spec."""
    out = {}
    for number, level, title in headings(text):
        match = NUMBERED.match(title)
        if match and level >= 2:
            out[match.group(1)] = (number, level, title)
    return out


def _key(section: str):
    return tuple(int(part) for part in section.split("."))


def bad_references(text: str, sections, where: str) -> list:
    """One message per reference in ``text`` that names no section of ``sections``."""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in REFERENCE.finditer(line):
            first, last = match.group(1), match.group(2)
            wanted = [first]
            if last is not None:
                if _key(last) <= _key(first):
                    problems.append(f"{where}:{number}: backwards or empty range {match.group(0)!r}")
                    continue
                wanted.append(last)
                if "." not in first and "." not in last:
                    wanted += [str(k) for k in range(int(first) + 1, int(last))]
            for section in wanted:
                if section not in sections:
                    problems.append(
                        f"{where}:{number}: {match.group(0)!r} names section {section}, "
                        f"which docs/spec.md does not have: {line.strip()!r}"
                    )
    return problems


def bad_links(md: Path, text: str) -> list:
    """One message per relative link of the markdown file ``md`` that reaches nothing."""
    problems = []
    own_anchors = None
    for number, line in markdown_lines(text):
        stripped = INLINE_CODE.sub("", line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(stripped)]
        ref = REFERENCE_LINK.match(stripped)
        if ref:
            targets.append(ref.group(1))
        for target in targets:
            if not target or URL_SCHEME.match(target):
                continue  # absolute URLs (http:, mailto:) are not checked here
            path_part, _, fragment = target.partition("#")
            where = f"{_rel(md)}:{number}"
            if path_part:
                dest = (md.parent / unquote(path_part)).resolve()
                if not dest.exists():
                    problems.append(f"{where}: link to {target!r}: {_rel(dest)} does not exist")
                    continue
            else:
                dest = md
            if fragment and dest.suffix == ".md" and dest.is_file():
                if dest == md:
                    own_anchors = own_anchors if own_anchors is not None else anchors(text)
                    names = own_anchors
                else:
                    names = anchors(dest.read_text(encoding="utf-8"))
                if unquote(fragment).lower() not in names:
                    problems.append(f"{where}: link to {target!r}: {_rel(dest)} has no heading #{fragment}")
    return problems


def scanned_files():
    for name in SCANNED:
        top = ROOT / name
        if top.is_file():
            yield top
            continue
        for path in sorted(top.rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and not SKIPPED_DIRS.intersection(path.parts):
                yield path


def _text(path: Path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


@pytest.fixture(scope="module")
def sections():
    assert SPEC.is_file(), "docs/spec.md is missing: the code's SPEC references have nothing to resolve to"
    return spec_sections(SPEC.read_text(encoding="utf-8"))


def test_spec_sections_are_numbered_in_order(sections):
    """Top-level sections 1..K in order, subsections N.1, N.2, ... under their section."""
    text = SPEC.read_text(encoding="utf-8")
    problems = []
    top, sub = 0, 0
    for number, level, title in headings(text):
        match = NUMBERED.match(title)
        if level == 2 and match:
            parts = _key(match.group(1))
            if parts != (top + 1,):
                problems.append(f"docs/spec.md:{number}: {title!r}: expected section {top + 1}")
            top, sub = parts[0], 0
        elif level == 3 and match:
            parts = _key(match.group(1))
            if parts != (top, sub + 1):
                problems.append(f"docs/spec.md:{number}: {title!r}: expected subsection {top}.{sub + 1}")
            sub = parts[-1]
    assert top >= len(CORE_SECTIONS), "docs/spec.md has too few numbered sections"
    assert not problems, "\n".join(problems)


def test_core_sections_keep_their_meaning(sections):
    for number, topic in CORE_SECTIONS.items():
        assert number in sections, f"docs/spec.md has no section {number} ({topic})"
        line, _, title = sections[number]
        assert topic in title.lower(), f"docs/spec.md:{line}: section {number} is {title!r}, expected {topic!r}"


def test_every_section_reference_resolves(sections):
    problems, count = [], 0
    for path in scanned_files():
        text = _text(path)
        if text is None or "§" not in text:
            continue
        count += len(REFERENCE.findall(text))
        problems += bad_references(text, sections, _rel(path))
    assert count > 0, "found no section reference at all: the scan is broken"
    assert not problems, "\n".join(problems)


def test_relative_links_reach_files():
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    problems = []
    for md in files:
        problems += bad_links(md, md.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


# The checks themselves: a planted bad reference or link must be reported, with its line.
# (The section sign is spelled as an escape so that this file holds no reference of its own.)
S = "\N{SECTION SIGN}"


def test_checker_reports_a_planted_bad_reference(sections):
    text = f"fine: SPEC {S}2, {S}4 and spec {S}5, SPEC {S}2-{S}6, {S}4.2\n"
    assert bad_references(text, sections, "x.py") == []
    planted = f"ok SPEC {S}3\n// see SPEC {S}99 here\nrange spec {S}4.2-{S}4.77\nbackwards SPEC {S}5-{S}2\n"
    problems = bad_references(planted, sections, "x.cpp")
    assert len(problems) == 3, problems
    assert problems[0].startswith("x.cpp:2: ") and "section 99" in problems[0]
    assert problems[1].startswith("x.cpp:3: ") and "section 4.77" in problems[1]
    assert problems[2].startswith("x.cpp:4: ") and "backwards" in problems[2]
    # A range is checked in full: a gap in the middle is reported.
    gap = {k: v for k, v in sections.items() if k != "3"}
    assert bad_references(f"SPEC {S}2-{S}4", gap, "y.h") != []


def test_checker_reports_a_planted_bad_link(tmp_path):
    (tmp_path / "there.md").write_text("# Title\n\n## 2. A section\n")
    md = tmp_path / "doc.md"
    text = (
        "[ok](there.md) [ok](there.md#2-a-section) [web](https://example.com) [self](#local)\n"
        "## Local\n"
        "```\n[inside a fence](missing.md)\n```\n"
        "[gone](missing.md)\n"
        "[bad anchor](there.md#3-nothing)\n"
        "`[in code](missing.md)` ![img](img/none.png)\n"
    )
    md.write_text(text)
    problems = bad_links(md, text)
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{md}:6: ") and "missing.md" in problems[0]
    assert problems[1].startswith(f"{md}:7: ") and "#3-nothing" in problems[1]
    assert problems[2].startswith(f"{md}:8: ") and "none.png" in problems[2]
