"""Every benchmark and example script's ``--help`` renders, with no escaped or unformatted ``%``.

The ``spice-trainer`` subcommands are checked in ``tests/test_cli.py``; these are the scripts beside the package
(``bench/*.py``, ``examples/*.py``), each run as ``__main__`` in this process with ``--help``: argparse prints the
help and exits 0 before the script does any work.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p
    for p in [*ROOT.glob("bench/*.py"), *ROOT.glob("examples/*.py")]
    if "argparse" in p.read_text(encoding="utf-8") and '__name__ == "__main__"' in p.read_text(encoding="utf-8")
)


def test_the_scripts_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"bench/greedy.py", "bench/quality.py", "examples/sft_spice.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_help_is_formatted(script: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # scripts that put the repository on sys.path
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    assert text.startswith("usage:"), text[:200]
    assert "%%" not in text and "%(" not in text
    assert "-h, --help" in text
