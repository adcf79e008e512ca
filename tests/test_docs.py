"""Every code block in the README and docs either runs here or is marked as an illustration.

Convention (for every author of ``README.md``, ``docs/*.md`` and ``examples/README.md``):

- a fenced ``python`` block runs as it is, on its own, in a fresh namespace and an empty working folder
  (offline, CPU): it must be self-contained;
- any other block (shell commands, console output, YAML) and any python block that cannot run on its own
  (it needs a real model, a GPU, several processes, or names defined elsewhere) carries the line
  ``<!-- illustration -->`` right above its opening fence.

`bench/README.md` is the benchmarks' own record (their commands and measured output) and is not checked here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
MARKER = "<!-- illustration -->"
FENCE = re.compile(r"^```(\w*)\s*$")


def code_blocks(path: Path) -> list[tuple[int, str, str, bool]]:
    """``(line, language, code, marked)`` for every fenced block of a markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start, language = i, match.group(1)
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        previous = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        blocks.append((start + 1, language, "\n".join(lines[start + 1 : j]), previous == MARKER))
        i = j + 1
    return blocks


ALL_BLOCKS = [(path, *block) for path in DOCS for block in code_blocks(path)]
RUNNABLE = [b for b in ALL_BLOCKS if b[2] == "python" and not b[4]]


def test_every_block_runs_or_is_marked() -> None:
    unmarked = [
        f"{p.relative_to(ROOT)}:{line} ({lang or 'no language'})"
        for p, line, lang, _, marked in ALL_BLOCKS
        if lang != "python" and not marked
    ]
    assert not unmarked, f"mark these blocks with {MARKER} or make them runnable python: {unmarked}"
    assert RUNNABLE, "the docs should show at least one block that runs"


def test_the_parser_sees_markers(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(f"text\n\n{MARKER}\n```bash\nls\n```\n\n```python\nx = 1\n```\n")
    assert code_blocks(doc) == [(4, "bash", "ls", True), (8, "python", "x = 1", False)]


@pytest.mark.parametrize(
    ("path", "line", "code"),
    [pytest.param(p, line, code, id=f"{p.relative_to(ROOT)}:{line}") for p, line, _, code, _ in RUNNABLE],
)
def test_python_block_runs(path: Path, line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict[str, object] = {"__name__": f"doc_block_{line}"}
    exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
    assert os.getcwd() == str(tmp_path)


# Files the docs and the code point readers to: markdown links, ``docs/x.md`` paths and upper-case names such
# as ``README.md`` (lower-case bare names like ``report.md`` are files the library writes, not references).
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")
CITED = re.compile(r"(?<![\w/.-])((?:docs/|examples/|bench/)?[\w-]+\.md)\b")
CODE = sorted(p for folder in ("spice_trainer", "tests", "bench", "examples") for p in (ROOT / folder).rglob("*.py"))
SOURCES = [*DOCS, ROOT / "bench" / "README.md", *(p for p in CODE if p != Path(__file__).resolve())]  # not our examples


def _cited(path: Path) -> list[tuple[str, Path]]:
    """``(as written, resolved path)`` of every document ``path`` points to."""
    text = path.read_text(encoding="utf-8")
    found = [(m, (path.parent / m).resolve()) for m in LINK.findall(text) if "://" not in m]
    for name in CITED.findall(text):
        if "/" in name or name.split(".")[0].isupper():
            found.append((name, ROOT / name))
    return found


def test_cited_documents_exist() -> None:
    missing = [f"{p.relative_to(ROOT)}: {name}" for p in SOURCES for name, target in _cited(p) if not target.is_file()]
    assert not missing, "documents cited but not in the repository:\n" + "\n".join(missing)


def test_the_citation_finder_sees_links_paths_and_names(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("see [a](a.md#part), docs/b.md, DESIGN.md, and report.md (written by the demo)\n")
    assert [name for name, _ in _cited(doc)] == ["a.md", "docs/b.md", "DESIGN.md"]
