"""bench/quality.py's reporting: tables and curve summaries from synthetic records (no training)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


def _record(method: str, seed: int, acc: float, **extra):  # type: ignore[no-untyped-def]
    kinds = {k: 0.0 for k in ("clean", "solved", "almost", "surprising", "prior", "duplicate", "noise", "dup-noise")}
    kinds["clean"] = 0.5
    kinds["noise"] = 0.25
    rec = {
        "world": "base",
        "scenario": "curated",
        "seed": seed,
        "method": method,
        "rows": 100,
        "pool_size": 1000,
        "accuracy": acc,
        "kinds": kinds,
        "select_seconds": 1.0,
        "train_seconds": 2.0,
        "stop_reason": None,
        "base_accuracy": 0.3,
    }
    rec.update(extra)
    return rec


def test_world_table_pairs_by_seed_and_prints_composition(bench) -> None:  # type: ignore[no-untyped-def]
    records = [
        _record("random", 0, 0.2),
        _record("random", 1, 0.4),
        _record("defaults", 0, 0.3, stop_reason="budget"),
        _record("defaults", 1, 0.6, stop_reason="budget"),
    ]
    text = bench.world_tables(records, "base", ["random", "defaults"])
    # paired differences 0.1 and 0.2: mean 0.15, sd 0.0707
    assert "| curated | defaults | 100 | **0.450 ± 0.212** | +0.150 ± 0.071 | 2 | 1.0 | 2.0 | budget |" in text
    assert "| curated | defaults | 50% | 0% | 0% | 0% | 0% | 0% | 25% |" in text
    overview = bench.overview_table(records, ["base"], ["random", "defaults"])
    assert "| base | curated | 0.300 | 0.450 |" in overview


def test_curve_table_marks_short_runs_and_the_stop(bench) -> None:  # type: ignore[no-untyped-def]
    records = []
    for size, acc, rows in ((0.025, 0.2, 25), (0.05, 0.3, 50), (0.1, 0.5, 100), (0.2, 0.4, 150), (0.4, 0.4, 150)):
        records.append(_record("defaults", 0, acc, budget=size, stops=False, rows=rows))
    records.append(_record("defaults", 0, 0.49, budget=0.4, stops=True, rows=120, stop_reason="early_stop"))
    text = bench.curve_tables(records, "defaults", None)
    assert "| 0.400 (15.0%) |" in text  # the 20 % and 40 % runs selected only 150 rows
    assert "| 0.1: 0.500 | 12.0% (early_stop): 0.490 ± 0.000 | 98% |" in text
