"""Every doc the code cites is in the repository, with the section it cites.

A citation is ``docs/<file>.md`` optionally followed by sections (``§2.5``, ``§1.2/§1.3``,
``§4.1 and §4.3``). The file must exist under docs/, and each section must be a heading of it
(``## §2 ...``, ``### §2.5 ...`` or ``## 1. ...``). A bare ``docs §N`` does not say which doc it
means and is refused.
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("hybridlm", "tests", "benchmarks", "examples")
EXTRA_FILES = ("README.md",)

CITATION = re.compile(r"docs/([A-Za-z0-9_-]+\.md)((?:[ \t]*(?:,|/|and)?[ \t]*§\d+(?:\.\d+)*)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
BARE = re.compile(r"\bdocs[ \t]*§")
HEADING = re.compile(r"^#+\s+§?(\d+(?:\.\d+)*)\.?(?:\s|$)")


def cited_files() -> list[Path]:
    files = [p for d in SCANNED for p in sorted((REPO / d).rglob("*")) if p.suffix in (".py", ".md")
             and p.is_file() and "__pycache__" not in p.parts and p != Path(__file__).resolve()]  # its examples
    return files + [REPO / f for f in EXTRA_FILES if (REPO / f).is_file()]


def citations(text: str) -> list[tuple[int, str, list[str]]]:
    """(line, doc file, [sections]) for every citation in ``text``."""
    out = []
    for m in CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, m.group(1), SECTION.findall(m.group(2))))
    return out


def bare_citations(text: str) -> list[int]:
    return [text.count("\n", 0, m.start()) + 1 for m in BARE.finditer(text)]


def headings(markdown: str) -> set[str]:
    """Section numbers of the headings outside fenced code blocks."""
    found, fenced = set(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            found.add(m.group(1))
    return found


def problems_in(text: str, where: str, docs: Path) -> list[str]:
    out = [f"{where}:{line}: 'docs §…' without a file: write docs/<file>.md §…" for line in bare_citations(text)]
    for line, name, sections in citations(text):
        doc = docs / name
        if not doc.is_file():
            out.append(f"{where}:{line}: docs/{name} does not exist")
            continue
        missing = [s for s in sections if s not in headings(doc.read_text())]
        if missing:
            out.append(f"{where}:{line}: docs/{name} has no heading " + ", ".join(f"§{s}" for s in missing))
    return out


def test_every_cited_doc_and_section_exists():
    problems = []
    for path in cited_files():
        problems += problems_in(path.read_text(errors="replace"), str(path.relative_to(REPO)), REPO / "docs")
    assert not problems, "\n".join(problems)


def test_the_mamba3_doc_has_the_sections_the_code_is_written_against():
    expected = {"1", "1.1", "1.2", "1.3", "2", "2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "3", "4", "4.1", "4.2",
                "4.3", "5", "6", "7", "8"}
    assert expected <= headings((REPO / "docs" / "mamba3.md").read_text())


def test_the_checker_finds_missing_files_sections_and_bare_citations(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n## §1 One\n### §1.2 Sub\n```\n## §9 in a code block\n```\n"
                                   "## 3. Numbered\n")
    assert headings((tmp_path / "a.md").read_text()) == {"1", "1.2", "3"}
    assert citations("see docs/a.md §1.2/§1.3 and docs/a.md") == [(1, "a.md", ["1.2", "1.3"]), (1, "a.md", [])]
    text = "x  # docs/a.md §1\ny  # docs/a.md §1.2 and §9\nz  # docs/b.md\nw  # docs §2\nv  # docs/a.md §3 item 2\n"
    assert problems_in(text, "f.py", tmp_path) == [
        "f.py:4: 'docs §…' without a file: write docs/<file>.md §…",
        "f.py:2: docs/a.md has no heading §9",
        "f.py:3: docs/b.md does not exist",
    ]


OUTSIDE = re.compile(r"\.\./shared\b")


def test_nothing_shipped_cites_files_outside_the_repository():
    """Users get the repository alone: a path into the developers' ``../shared`` means nothing to them."""
    shipped = cited_files() + sorted((REPO / "docs").rglob("*.md")) + sorted((REPO / "specs").rglob("*"))
    problems = [f"{p.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: cites {m.group(0)}"
                for p in shipped if p.is_file() for text in [p.read_text(errors="replace")]
                for m in OUTSIDE.finditer(text)]
    assert not problems, "\n".join(problems)
