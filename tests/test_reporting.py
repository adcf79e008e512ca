"""The round's console line, metrics, stop-reason codes, log levels and trackers (integrations/reporting.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from spice_trainer.core.selection import Selection
from spice_trainer.integrations import reporting


def _selection(**metadata: object) -> Selection:
    sel = Selection.from_picks(
        indices=[5, 2, 9],
        gains=[3.0, 2.0, 1.0],
        base_gains=[3.0, 2.5, 2.0],
        conflicts=[0.0, 0.1, 0.2],
        conflict_weight=0.1,
        objective=[3.0, 5.0, 6.0],
        n_candidates=3000,
        stop_reason="budget",
    )
    sel.metadata.update(metadata)
    return sel


def test_round_line_names_rows_stop_reason_seconds_and_exclusions() -> None:
    sel = _selection(
        seconds=12.34,
        solved_rows=40,
        loss_cap_rows=7,
        loss_guard_excluded=47,
        no_supervised_token_rows=12,
        non_finite_loss_rows=13,  # the 12 rows without a target have no loss, plus one NaN
    )
    assert reporting.round_line(sel, round_index=0, step=0) == (
        "spice: round 0 selected 3 of 3,000 rows (stop: budget) in 12.3 s; excluded 40 solved, "
        "7 above the loss cap, 12 no supervised token, 1 non-finite loss"
    )
    sel.initial = [1, 4]
    sel.stop_reason = "early_stop"
    line = reporting.round_line(sel, round_index=2, step=150)
    assert line.startswith("spice: round 2 at step 150 selected 5 (2 kept + 3 new) of 3,000 rows (stop: early stop)")


def test_round_line_and_metrics_count_down_weighted_rows() -> None:
    sel = _selection(seconds=1.0)
    sel.down_weighted_rows, sel.down_weights = [9, 100, 7], [0.5, 0.1, 0.2]  # row 9 is one of the picks
    assert reporting.round_line(sel, round_index=0).endswith("; 3 down-weighted as surprising labels (1 picked)")
    assert "down-weighted (surprising labels): 3 rows, 1 of them picked" in sel.summary()
    metrics = reporting.round_metrics(sel, round_index=0)
    assert metrics["spice/down_weighted"] == 3.0 and metrics["spice/down_weighted_picked"] == 1.0
    assert "spice/down_weighted" not in reporting.round_metrics(_selection(), round_index=0)


def test_metrics_and_stop_reason_codes() -> None:
    sel = _selection(seconds=2.0, solved_rows=4, loss_cap_rows=0, no_supervised_token_rows=0)
    metrics = reporting.round_metrics(sel, round_index=1)
    assert metrics["spice/stop_reason"] == 0.0 and metrics["spice/selected"] == 3.0
    assert metrics["spice/candidates"] == 3000.0 and metrics["spice/excluded_solved"] == 4.0
    assert "spice/excluded_above_the_loss_cap" not in metrics  # zero counts are left out
    assert metrics["spice/mean_conflict"] == pytest.approx(0.1)
    assert all(isinstance(v, float) for v in metrics.values())
    codes = {name: reporting.stop_reason_code(name) for name in ("budget", "early_stop", "exhausted")}
    assert codes == {"budget": 0, "early_stop": 1, "exhausted": 2}


@pytest.mark.parametrize(
    ("should_log", "log_level", "log_level_replica", "expected"),
    [
        (True, "passive", "warning", logging.INFO),  # the main process shows the round line by default
        (True, "error", "warning", logging.ERROR),
        (False, "info", "warning", logging.WARNING),  # a replica follows log_level_replica
        (False, "info", "debug", logging.DEBUG),
    ],
)
def test_loggers_follow_the_trainers_log_levels(should_log, log_level, log_level_replica, expected) -> None:
    library = logging.getLogger("spice_trainer")
    saved = library.level
    try:
        args = SimpleNamespace(should_log=should_log, log_level=log_level, log_level_replica=log_level_replica)
        assert reporting.use_trainer_log_level(args) == expected
        assert logging.getLogger("spice_trainer.integrations.trainer").getEffectiveLevel() == expected
    finally:
        library.setLevel(saved)


def test_fallback_handler_prints_only_without_application_logging(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], logging.getLogger("spice_trainer").level
    try:
        reporting.use_trainer_log_level(SimpleNamespace(should_log=True, log_level="passive"))
        root.handlers = []
        logging.getLogger("spice_trainer.x").info("spice: hello")
        assert capsys.readouterr().err == "spice: hello\n"
        root.handlers = [logging.NullHandler()]  # the application configured logging: no second copy from us
        logging.getLogger("spice_trainer.x").info("spice: again")
        assert capsys.readouterr().err == ""
    finally:
        root.handlers = saved_handlers
        logging.getLogger("spice_trainer").setLevel(saved_level)


class _Writer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.calls.append(("text", tag, step))

    def add_image(self, tag: str, image: object, step: int, dataformats: str) -> None:
        self.calls.append(("image", tag, step))

    def flush(self) -> None:
        pass


def test_trackers_without_a_writer_are_skipped(tmp_path: Path) -> None:
    TensorBoardCallback = type("TensorBoardCallback", (), {})
    idle, live = TensorBoardCallback(), TensorBoardCallback()
    idle.tb_writer, live.tb_writer = None, _Writer()
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[idle, live]))
    sel = _selection()
    png = tmp_path / "round-0.png"
    assert sel.plot(png, missing_ok=True)
    assert reporting.send_to_trackers(trainer, sel, round_index=0, step=0, plot=png) == ["tensorboard"]
    assert live.tb_writer.calls == [("text", "spice/stop_reason", 0), ("image", "spice/round-0", 0)]
