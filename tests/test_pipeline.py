"""pipeline.select: with a loss guard, losses first and gradients only of eligible rows (single process); ranks
agree on their rows before they select (2 gloo ranks under torchrun)."""

import json
import re

import pytest
import torch
import trainer_world as tw
from test_distributed import torchrun

from spice_trainer import SpiceConfig, select
from spice_trainer.core.greedy import select_from_features
from spice_trainer.features.gradients import compute_gradient_features
from spice_trainer.pipeline import row_guards


def _rows():
    data = tw.rows(40)
    data[5]["labels"] = [-100] * len(data[5]["labels"])  # no target: NaN features, reported as skipped
    return data


@pytest.mark.parametrize(
    "guards",
    [
        {"max_loss_quantile": 0.3},  # min_loss 0.1 and a 30 % loss quantile (the defaults before issue 11)
        {"min_loss": 4.2, "max_loss_quantile": 0.6},  # a floor inside this model's losses (4.13-4.28) too
        {"min_loss": None, "max_loss_quantile": 0.5},
    ],
)
@pytest.mark.parametrize("grow", [False, True])
def test_losses_first_selects_exactly_what_a_full_gradient_pass_selects(guards, grow):
    model, data = tw.model(), _rows()
    config = SpiceConfig(budget=6, proj_dim=24, batch_size=4, **guards)
    # Independent reference: every row's gradient features, the eligibility rule, then the greedy.
    full = compute_gradient_features(model, data, config, show_progress=False)
    guards = row_guards(full, config)
    eligible = guards.eligible
    assert 6 <= int(eligible.sum()) < 39  # the guard really leaves rows out
    # grow: one eligible and one ineligible initial row (its features are needed although it is not eligible).
    ineligible = [int(i) for i in (~eligible).nonzero().flatten() if int(i) != 5]  # row 5 has no features
    initial = [int(eligible.nonzero()[0]), ineligible[0]] if grow else None
    ref = select_from_features(guards.scale(full.features), config, eligible=eligible, initial=initial)
    got = select(model, data, config, show_progress=False, initial=initial)
    assert got.indices == ref.indices and got.initial == ref.initial
    assert got.skipped == ref.skipped == [5]
    assert got.gains == pytest.approx(ref.gains, rel=1e-5)
    assert got.conflicts == pytest.approx(ref.conflicts, rel=1e-4, abs=1e-7)
    assert got.metadata["loss_guard_excluded"] == int((~eligible).sum()) - 1  # row 5 counts as non-finite
    assert got.metadata["gradient_rows"] == len(set(eligible.nonzero().flatten().tolist()) | set(initial or []))


@pytest.mark.parametrize(
    "settings,losses_first",
    [
        ({"max_loss_quantile": 0.3}, True),  # at most 30 % of the pool is eligible
        ({}, False),  # the defaults: min_loss alone bounds nothing before the losses are known
        ({"max_loss_quantile": 0.9}, False),  # a forward over the pool would cost more than it saves
        ({"budget": 30}, False),  # the guard keeps at least the budget: 75 % of the pool
    ],
)
def test_losses_first_only_where_it_pays(settings, losses_first):
    model, data = tw.model(), _rows()
    config = SpiceConfig(**{"budget": 6, "proj_dim": 8, "batch_size": 8, **settings})
    got = select(model, data, config, show_progress=False)
    measured = got.metadata["gradient_rows"]
    assert (measured < 40) == losses_first, measured


def test_without_a_guard_every_row_is_measured():
    model, data = tw.model(), _rows()
    config = SpiceConfig(budget=6, proj_dim=24, batch_size=4, min_loss=None, max_loss_quantile=None)
    full = compute_gradient_features(model, data, config, show_progress=False)
    guards = row_guards(full, config)
    ref = select_from_features(guards.scale(full.features), config, eligible=guards.eligible)
    got = select(model, data, config, show_progress=False)
    assert got.indices == ref.indices and got.gains == pytest.approx(ref.gains, rel=1e-6)
    assert torch.isfinite(full.features).sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("length", r"different lengths \(rank 0: 16, rank 1: 15 rows\)"),
        ("shuffled", r"the same length \(16 rows\) but other rows or another order on rank\(s\) \[1\]"),
        ("labels", r"the same length \(16 rows\) but other rows or another order on rank\(s\) \[1\]"),
        ("rebuilt", None),
    ],
)
def test_ranks_with_other_rows_raise_the_same_clear_error(tmp_path, case, expected):
    # Before: both ranks returned a selection built from features attributed to the wrong rows.
    out = tmp_path / "out"
    out.mkdir()
    torchrun("rank_mismatch.py", 2, str(out), case, timeout=180)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    if expected is None:  # the same rows built another way: the content hashes agree, selection as usual
        assert r0["error"] is None and r0 == r1 and len(r0["indices"]) == 4
        return
    assert r0 == r1 and r0["error"] == "ValueError", (r0, r1)
    assert re.search(expected, r0["message"]), r0["message"]
    assert "every rank must pass the same train_dataset" in r0["message"]
