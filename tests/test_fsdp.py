"""Live-model selection under FSDP2 (``fully_shard``, 2 gloo ranks on CPU) and the Trainer's sharded paths.

The FSDP2 cases run every rank's share of the gradient pass on a model whose weights are sharded across the
ranks and compare the selection with the single-process one on the same (unsharded) model and rows:
uneven shards (the ranks run different numbers of batches, padded in lockstep), a row without targets, Adam
normalisation (sharded optimizer state), a cheap reselection round, and a bad label on one rank (every rank
raises, none hangs). The Trainer's FSDP (accelerate) and DeepSpeed ZeRO-3 paths need GPUs: they run where
those are available and are skipped with the reason elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import SCRIPTS, _per_rank, torchrun

from spice_trainer import select
from spice_trainer.features.reselect import FeatureCache

sys.path.insert(0, str(SCRIPTS))
fsdp_cases = importlib.import_module("fsdp_cases")


def _reference(name: str) -> dict[str, Any]:
    model, data, config = fsdp_cases.build_case(name)
    try:
        optimizer = fsdp_cases.train_step(model, data) if config.feature_norm == "adam" else None
        if name == "shortlist":
            cache = FeatureCache()
            select(model, data, config, show_progress=False, feature_cache=cache)
            return select(model, data, config, show_progress=False, feature_cache=cache).to_dict()
        return select(model, data, config, show_progress=False, optimizer=optimizer).to_dict()
    except ValueError as err:
        return {"error": f"{type(err).__name__}: {err}"}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("fsdp")
    torchrun("fsdp_select.py", 2, str(out), timeout=300)
    return _per_rank(out, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "uneven", "adam", "shortlist"])
def test_fsdp2_selection_equals_single_process(fsdp_run: list[dict[str, Any]], name: str) -> None:
    ref = _reference(name)
    for rank, got in enumerate(fsdp_run):
        assert "error" not in got[name], (rank, got[name])
        assert got[name]["indices"] == ref["indices"], rank
        assert got[name]["initial"] == ref["initial"] and got[name]["stop_reason"] == ref["stop_reason"]
        # The sharded pass computes the same float32 products in the same order per row; a sum over ranks'
        # all-gathered weight shards is exact, so the gains agree to float32 rounding of the features.
        assert got[name]["gains"] == pytest.approx(ref["gains"], rel=1e-5, abs=1e-7), rank
    if name == "uneven":
        assert 12 in ref["skipped"] and 12 not in ref["indices"]  # the target-less row on the last rank
    if name == "shortlist":
        assert fsdp_run[0][name]["metadata"]["reselect"]["shortlist"] == 8


@pytest.mark.slow
def test_fsdp2_bad_label_on_one_rank_stops_every_rank(fsdp_run: list[dict[str, Any]]) -> None:
    errors = [got["bad_label"].get("error", "") for got in fsdp_run]
    assert all(errors), errors  # every rank raised instead of waiting in a collective
    assert any("labels outside" in e and "14" in e for e in errors), errors
    assert _reference("bad_label")["error"].startswith("ValueError")


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.slow
@pytest.mark.skipif(_gpus() == 0, reason="accelerate runs FSDP only on accelerators (on CPU it falls back to DDP)")
def test_trainer_fsdp2_live_reselection_matches_across_ranks(tmp_path: Path) -> None:
    nproc = min(2, _gpus())
    out = tmp_path / "fsdp"
    out.mkdir()
    settings = json.dumps({"reselect_every_steps": 2, "min_loss": None})
    torchrun("trainer_run.py", nproc, str(out), settings, "2", "fsdp2", timeout=600)
    ranks = _per_rank(out, nproc)
    assert len(ranks[0]["rounds"]) >= 2
    for got in ranks[1:]:
        assert [r["indices"] for r in got["rounds"]] == [r["indices"] for r in ranks[0]["rounds"]]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
@pytest.mark.skipif(_gpus() == 0, reason="DeepSpeed ZeRO-3 needs an accelerator (its CPU backend needs oneCCL)")
def test_trainer_zero3_live_reselection_matches_across_ranks(tmp_path: Path) -> None:
    nproc = min(2, _gpus())
    out = tmp_path / "zero3"
    out.mkdir()
    settings = json.dumps({"reselect_every_steps": 2, "min_loss": None})
    torchrun("trainer_run.py", nproc, str(out), settings, "2", "zero3", timeout=600)
    ranks = _per_rank(out, nproc)
    assert len(ranks[0]["rounds"]) >= 2
    for got in ranks[1:]:
        assert [r["indices"] for r in got["rounds"]] == [r["indices"] for r in ranks[0]["rounds"]]
