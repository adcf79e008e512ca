"""``spice-trainer report``: a markdown report (and plots) from saved selection rounds."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from spice_trainer.cli.errors import CliError
from spice_trainer.integrations.reporting import STOP_REASONS

# --------------------------------------------------------------------------------------------------


def find_selections(path: str | Path) -> list[Path]:
    """The selection files under ``path``: ``spice/round-*.json``, ``round-*.json`` or ``selection.json``.

    ``path`` may also be one selection file. Rounds are ordered by their number.

    Raises:
        CliError: nothing found.
    """
    path = Path(path)
    if not path.exists():
        raise CliError(f"report: no such file or folder: {path}")
    if path.is_file():
        return [path]
    for folder in (path / "_spice", path / "spice", path):
        rounds = sorted(folder.glob("round-*.json"), key=_round_number)
        if rounds:
            return rounds
    if (path / "selection.json").exists():
        return [path / "selection.json"]
    raise CliError(
        f"report: found no selection in {path}; expected {path / 'spice'}/round-*.json (written by "
        "SpiceDataCallback), round-*.json or selection.json (written by `spice-trainer select`)"
    )


def _round_number(path: Path) -> tuple[int, str]:
    digits = "".join(ch for ch in path.stem.split("-")[-1] if ch.isdigit())
    return (int(digits) if digits else -1, path.name)


def render_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.md`` (and one gain/conflict plot per round) for the selections under ``path``.

    Returns:
        The path of the markdown report (``out``/report.md; ``out`` defaults to the folder of the rounds).
    """
    from spice_trainer.core.selection import Selection

    files = find_selections(path)
    out_dir = Path(out) if out is not None else files[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# SPICE selection report",
        "",
        f"Source: `{Path(path)}` ({len(files)} round{'s' if len(files) != 1 else ''})",
        "",
        "| round | file | picked | initial | candidates | stop | first Δ | last Δ | last/first | mean conflict "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for number, file in enumerate(files):
        try:
            selection = Selection.load(file)
        except (ValueError, TypeError, json.JSONDecodeError) as err:
            raise CliError(f"report: {file} is not a selection file: {err}") from err
        k = len(selection.indices)
        first = selection.gains[0] if k else math.nan
        last = selection.gains[-1] if k else math.nan
        mean_c = sum(selection.conflicts) / k if k else math.nan
        seconds = selection.metadata.get("seconds", math.nan)
        ratio = last / first if k and first else math.nan
        lines.append(
            f"| {number} | `{file.name}` | {k} | {len(selection.initial)} | {selection.n_candidates} | "
            f"{_stop_words(selection.stop_reason)} | {first:.4g} | {last:.4g} | {ratio:.3g} | {mean_c:.3g} | "
            f"{_fmt(seconds)} |"
        )
        png = out_dir / f"{file.stem}.png"
        plotted = k > 0 and selection.plot(png, missing_ok=True)
        details += ["", f"## {file.stem}", "", "```", selection.summary(), "```"]
        if plotted:
            details += ["", f"![gain decay and conflicts of {file.stem}]({png.name})"]
    report = out_dir / "report.md"
    report.write_text("\n".join([*lines, *details]) + "\n", encoding="utf-8")
    return report


def _stop_words(reason: str) -> str:
    return STOP_REASONS.get(reason, (-1, reason))[1]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def run_report(args: argparse.Namespace) -> int:
    """``spice-trainer report``: see `build_parser`."""
    report = render_report(args.dir, args.out)
    print(report.read_text(encoding="utf-8").split("\n## ")[0].rstrip())
    print(f"\nreport written to {report}")
    return 0
