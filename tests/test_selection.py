"""The `Selection` record: JSON round trip, summary text, plot, invariants."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.core.greedy import select_from_features
from spice_trainer.core.selection import Selection


def _selection() -> Selection:
    gen = torch.Generator(device="cpu").manual_seed(0)
    feats = torch.randn(120, 10, generator=gen)
    feats[7, 3] = float("nan")
    sel = select_from_features(feats, SpiceConfig(budget=25, stop_rule="ratio", stop_ratio=0.2), initial=[0, 1])
    sel.metadata["round"] = 3
    return sel


def test_json_round_trip_is_exact(tmp_path: Path) -> None:
    sel = _selection()
    path = tmp_path / "nested" / "round-3.json"
    sel.save(path)
    loaded = Selection.load(path)
    assert loaded == sel
    assert loaded.to_dict() == sel.to_dict()
    assert loaded.gains == sel.gains  # floats bit-identical, not approximately equal
    assert loaded.selected == [0, 1, *sel.indices]
    assert len(loaded) == len(sel.indices)


def test_load_rejects_foreign_json(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"indices": [], "foo": 1}')
    with pytest.raises(ValueError, match="unknown keys"):
        Selection.load(path)


def test_per_pick_lists_must_align() -> None:
    with pytest.raises(ValueError, match="gains"):
        Selection(indices=[1, 2], gains=[0.1])
    with pytest.raises(ValueError, match="stop_reason"):
        Selection(stop_reason="tired")  # type: ignore[arg-type]


def test_summary_contains_the_key_numbers() -> None:
    sel = _selection()
    text = sel.summary()
    assert f"{len(sel)} picked + 2 initial of 120 candidates" in text
    assert f"stop: {sel.stop_reason}" in text
    assert f"first {sel.gains[0]:.4g}, last {sel.gains[-1]:.4g}" in text
    assert f"{sel.objective[-1]:.6g}" in text
    assert "skipped (non-finite features): 1" in text
    assert "conflict_weight=0.1" in text


def test_empty_selection_summary() -> None:
    text = Selection(n_candidates=5, stop_reason="early_stop").summary()
    assert "0 picked + 0 initial of 5 candidates (stop: early_stop)" in text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "gains.png"
    _selection().plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_names_the_extra_when_matplotlib_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'spice-trainer\[plot\]'"):
        _selection().plot(tmp_path / "x.png")


def test_to_dataset_has_the_chosen_rows_and_their_numbers() -> None:
    import datasets

    sel = _selection()
    pool = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(120)], "label": list(range(120))})
    ds = sel.to_dataset(pool)
    assert ds["spice_row"] == sel.selected and ds["text"] == [f"row {i}" for i in sel.selected]
    assert ds["label"] == sel.selected
    k0 = len(sel.initial)
    assert ds["spice_pick"] == [None] * k0 + list(range(len(sel.indices)))
    assert ds["spice_gain"][k0:] == sel.gains and ds["spice_base_gain"][k0:] == sel.base_gains
    assert ds["spice_conflict"][k0:] == sel.conflicts and ds["spice_score"][k0:] == sel.scores
    assert ds["spice_gain"][:k0] == [None] * k0
    assert set(ds["spice_round"]) == {3}

    # rows= maps the selection into another dataset (e.g. the user's rows behind a tokenised copy).
    reversed_pool = pool.select(range(119, -1, -1))
    mapped = sel.to_dataset(reversed_pool, rows=[119 - r for r in sel.selected])
    assert mapped["text"] == ds["text"]
    # A selection dataset can be scored again by a later round: the spice_ columns are replaced.
    again = sel.to_dataset(ds, rows=list(range(len(ds))))
    assert again["spice_gain"] == ds["spice_gain"] and again.column_names == ds.column_names

    with pytest.raises(ValueError, match="rows has 3 entries"):
        sel.to_dataset(pool, rows=[1, 2, 3])
    with pytest.raises(ValueError, match=r"out of range for a train_dataset of 10 rows"):
        sel.to_dataset(pool.select(range(10)))


def test_core_selection_imports_no_datasets() -> None:
    import subprocess

    code = "import sys, spice_trainer.core.selection; print('datasets' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
