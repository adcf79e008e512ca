"""What a selection round tells the user: the console line, the ``spice/...`` metrics and the trackers' plots.

- `round_line`: one line per round, e.g. ``spice: round 0 selected 300 of 3,000 rows (stop: budget) in 12.3 s;
  excluded 40 solved, 12 no supervised token`` (`SpiceDataCallback` logs it on the main process; the command
  line prints it).
- `round_metrics`: the numbers `SpiceDataCallback` logs through ``trainer.log`` (every tracker in
  ``report_to``, the console, ``trainer.state.log_history``). `STOP_REASONS` maps ``spice/stop_reason``'s
  number to its name.
- `send_to_trackers`: the round's plot (and the stop reason in words) to the trackers of ``report_to`` that
  take images and text: TensorBoard and Weights & Biases (MLflow gets the plot as an artifact).
- `use_trainer_log_level`: the ``spice_trainer`` loggers follow the trainer's ``log_level`` (main process) and
  ``log_level_replica`` (other processes), as transformers' own loggers do.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

from spice_trainer.core.selection import Selection

__all__ = [
    "LIBRARY_LOGGER",
    "STOP_REASONS",
    "round_line",
    "round_metrics",
    "send_to_trackers",
    "stop_reason_code",
    "use_trainer_log_level",
]

LIBRARY_LOGGER = "spice_trainer"

#: ``spice/stop_reason`` in the trainer's logs: trackers take numbers only, so each reason has a code.
STOP_REASONS: dict[str, tuple[int, str]] = {
    "budget": (0, "budget"),
    "early_stop": (1, "early stop"),
    "exhausted": (2, "no eligible row left"),
}


def stop_reason_code(reason: str) -> int:
    """The number ``spice/stop_reason`` logs for ``reason`` (`STOP_REASONS`; -1 for an unknown reason)."""
    return STOP_REASONS.get(reason, (-1, reason))[0]


def _excluded(metadata: dict[str, Any]) -> list[tuple[int, str]]:
    """``(count, reason)`` for each non-empty exclusion the round's eligibility guards recorded."""
    solved = metadata.get("solved_rows")
    guard = metadata.get("loss_guard_excluded")
    capped = metadata.get("loss_cap_rows")
    if capped is None and guard is not None:
        capped = int(guard) - int(solved or 0)
    no_target = int(metadata.get("no_supervised_token_rows") or 0)
    # non_finite_loss_rows includes the rows without a target (they have no loss): count each row once.
    non_finite = max(0, int(metadata.get("non_finite_loss_rows") or 0) - no_target)
    parts = [
        (solved, "solved"),
        (capped, "above the loss cap"),
        (no_target, "no supervised token"),
        (non_finite, "non-finite loss"),
    ]
    return [(int(count), words) for count, words in parts if count]


def round_line(selection: Selection, *, round_index: int | None = None, step: int | None = None) -> str:
    """The console line of a round: rows chosen of the total, the stop reason in words, seconds, exclusions.

    Example: ``spice: round 0 selected 300 of 3,000 rows (stop: budget) in 12.3 s; excluded 40 solved,
    12 no supervised token; 210 down-weighted as surprising labels (3 picked)``. In mode ``"grow"`` the kept
    and new rows are told apart.
    """
    meta = selection.metadata
    index = meta.get("round", 0) if round_index is None else round_index
    where = f"round {index}"
    at = meta.get("step") if step is None else step
    if at:
        where += f" at step {at}"
    total = len(selection.selected)
    chosen = f"{total:,}"
    if selection.initial:
        chosen += f" ({len(selection.initial):,} kept + {len(selection.indices):,} new)"
    words = STOP_REASONS.get(selection.stop_reason, (-1, selection.stop_reason))[1]
    line = f"spice: {where} selected {chosen} of {selection.n_candidates:,} rows (stop: {words})"
    seconds = meta.get("seconds")
    if isinstance(seconds, int | float) and math.isfinite(seconds):
        line += f" in {seconds:.1f} s"
    excluded = _excluded(meta)
    if excluded:
        line += "; excluded " + ", ".join(f"{count:,} {words}" for count, words in excluded)
    if selection.down_weighted_rows:
        line += (
            f"; {len(selection.down_weighted_rows):,} down-weighted as surprising labels "
            f"({selection.down_weighted_picks:,} picked)"
        )
    return line


def round_metrics(selection: Selection, *, round_index: int) -> dict[str, float]:
    """The ``spice/...`` numbers of a round, as logged through ``trainer.log`` (see docs/api.md)."""
    meta = selection.metadata
    conflicts = selection.conflicts
    metrics = {
        "spice/round": float(round_index),
        "spice/selected": float(len(selection.selected)),
        "spice/picked": float(len(selection.indices)),
        "spice/candidates": float(selection.n_candidates),
        "spice/first_gain": selection.gains[0] if selection.gains else 0.0,
        "spice/last_gain": selection.gains[-1] if selection.gains else 0.0,
        "spice/mean_conflict": sum(conflicts) / len(conflicts) if conflicts else 0.0,
        "spice/stop_step": float(len(selection.indices)),
        "spice/stop_reason": float(stop_reason_code(selection.stop_reason)),
        "spice/seconds": float(meta.get("seconds", 0.0)),
    }
    for count, words in _excluded(meta):
        metrics["spice/excluded_" + words.replace(" ", "_").replace("-", "_")] = float(count)
    if selection.down_weighted_rows:
        metrics["spice/down_weighted"] = float(len(selection.down_weighted_rows))
        metrics["spice/down_weighted_picked"] = float(selection.down_weighted_picks)
    for key in ("proxy_rank_corr", "proxy_overlap"):  # set by integrations/proxy_rounds.py
        if meta.get(key) is not None:
            metrics[f"spice/{key}"] = float(meta[key])
    return metrics


def send_to_trackers(
    trainer: Any, selection: Selection, *, round_index: int, step: int, plot: Path | None
) -> list[str]:
    """Send the round's plot and stop reason to the trainer's trackers that take images and text.

    TensorBoard (``report_to="tensorboard"``): the plot as image ``spice/round-N`` and the stop reason as text
    ``spice/stop_reason``; Weights & Biases: ``spice/round_plot`` (a ``wandb.Image``) and
    ``spice/stop_reason_name``; MLflow: the PNG as an artifact under ``spice/``. Called on the main process
    only, after the trackers are set up (the first round runs before they are).

    Returns:
        The names of the trackers that received something (for tests and the debug log).
    """
    reached = []
    reason = STOP_REASONS.get(selection.stop_reason, (-1, selection.stop_reason))[1]
    for callback in trainer.callback_handler.callbacks:
        kind = type(callback).__name__
        try:
            if kind == "TensorBoardCallback":
                writer = getattr(callback, "tb_writer", None)
                if writer is None:
                    continue
                writer.add_text("spice/stop_reason", f"round {round_index}: {reason}", step)
                if plot is not None:
                    from matplotlib.image import imread  # the PNG `Selection.plot` wrote (so matplotlib is there)

                    writer.add_image(f"spice/round-{round_index}", imread(str(plot))[..., :3], step, dataformats="HWC")
                writer.flush()
                reached.append("tensorboard")
            elif kind == "WandbCallback":
                wandb = getattr(callback, "_wandb", None)
                if wandb is None or getattr(wandb, "run", None) is None:
                    continue
                payload: dict[str, Any] = {"spice/stop_reason_name": reason, "train/global_step": step}
                if plot is not None:
                    payload["spice/round_plot"] = wandb.Image(str(plot), caption=f"round {round_index}")
                wandb.log(payload)
                reached.append("wandb")
            elif kind == "MLflowCallback" and plot is not None:
                mlflow = getattr(callback, "_ml_flow", None)
                if mlflow is None or mlflow.active_run() is None:
                    continue
                mlflow.log_artifact(str(plot), artifact_path="spice")
                reached.append("mlflow")
        except Exception as err:  # a tracker's failure must not cost the run
            logging.getLogger(__name__).warning("spice: could not send round %d to %s: %s", round_index, kind, err)
    return reached


class _FallbackHandler(logging.StreamHandler):
    """Writes ``spice_trainer`` records to stderr when the application configured no logging of its own.

    If the root logger has a handler (``logging.basicConfig``, pytest), records go there by propagation and this
    handler stays silent, so no line is printed twice.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.stream = sys.stderr  # the current stderr (as logging's last-resort handler does), not the import-time one
        super().emit(record)


def _ensure_handler() -> logging.Logger:
    library = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(h, _FallbackHandler) for h in library.handlers):
        handler = _FallbackHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        library.addHandler(handler)
    return library


def use_trainer_log_level(args: Any) -> int:
    """Set the ``spice_trainer`` loggers' level for this process from the trainer's arguments.

    The main process (``args.should_log``) uses ``log_level``, the others ``log_level_replica`` (transformers'
    `TrainingArguments.get_process_log_level` rule). ``"passive"`` keeps transformers' default for replicas
    (warnings only) and shows INFO on the main process, where the per-round console line is written.

    Returns:
        The level set.
    """
    from transformers.training_args import trainer_log_levels
    from transformers.utils import logging as hf_logging

    main = bool(getattr(args, "should_log", True))
    name = getattr(args, "log_level", "passive") if main else getattr(args, "log_level_replica", "warning")
    level = trainer_log_levels.get(name, -1)
    if level == -1:
        level = logging.INFO if main else hf_logging.get_verbosity()
    _ensure_handler().setLevel(level)
    return level
