"""Feature-level cases for the distributed greedy, shared by the launched script and the test.

Each case gives the full ``(n, d)`` features and the arguments of `select_from_features`; under
torchrun every rank slices its own rows (`spice_trainer.distributed.local_rows`), in the test the single
process uses the whole matrix as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.core.stopping import PickHistory


class FlatScore:
    """A stateful rule reading the history: stop once the score fell less than ``slope`` x the first score per
    pick over the last ``window`` picks (a plateau of the penalized score curve)."""

    def __init__(self, window: int = 3, slope: float = 0.01) -> None:
        self.window, self.slope = window, slope

    def should_stop(self, gain: float, score: float, history: PickHistory) -> bool:
        if len(history) < self.window:
            return False
        return (history.scores[-self.window] - score) / self.window < self.slope * history.scores[0]

    def cut(self, gains: Sequence[float], scores: Sequence[float]) -> int:
        return len(gains)


class HalfScoreCut:
    """A post-hoc rule: keep the picks up to the last one scoring at least half the first."""

    def should_stop(self, gain: float, score: float, history: PickHistory) -> bool:
        return False

    def cut(self, gains: Sequence[float], scores: Sequence[float]) -> int:
        return max((t + 1 for t, s in enumerate(scores) if s >= 0.5 * scores[0]), default=0)


def _gauss(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def stop_on_rank1_rows(n: int = 24, d: int = 6) -> torch.Tensor:
    """Rows 0-2 (rank 0's with 2 or 4 ranks): three orthogonal norm-3 vectors, picked first.

    Every other row of the first half repeats one of them (gain ~0 once it is picked); the second half
    (the last rank's rows) holds moderate vectors along the other axes with gain ≈ log(1 + 1.5) ≈ 0.92,
    below 0.5 × log(1 + 9) ≈ 1.15 but above a repeat's log(1 + 9/10) ≈ 0.64. The 4th pick's winner is
    therefore one of the last rank's rows, and its gain triggers the early stop: the decision comes from
    rows only that rank holds.
    """
    feats = torch.zeros(n, d)
    for i in range(n // 2):
        feats[i, i % 3] = 3.0
    gen = torch.Generator().manual_seed(5)
    for i in range(n // 2, n):
        feats[i, 3 + i % 3] = 1.5**0.5 * (1.0 + 0.01 * float(torch.rand((), generator=gen)))
    return feats


def cases() -> dict[str, dict[str, Any]]:
    """name -> {features, config, initial, eligible, reference_gain, stopping (a rule factory)}."""
    nan_feats = _gauss(30, 5, 3)
    nan_feats[[4, 27]] = float("nan")
    overflow = _gauss(30, 5, 9).double()
    overflow[27] = 1e200  # ‖g‖² overflows float64: skipped, on the last rank's shard
    eligible_first_half_out = torch.ones(24, dtype=torch.bool)
    eligible_first_half_out[:12] = False
    return {
        "primal_budget": {
            "features": _gauss(40, 8, 0),
            "config": SpiceConfig(budget=12, conflict_weight=0.3, stop_rule="none", stop_ratio=None),
        },
        "dual_budget": {
            "features": _gauss(37, 32, 1),
            "config": SpiceConfig(budget=7, conflict_weight=0.1, stop_rule="none", stop_ratio=None, fisher_scale=0.5),
        },
        "early_stop_gain": {
            "features": _gauss(36, 4, 2),
            "config": SpiceConfig(budget=20, conflict_weight=0.2, stop_rule="ratio", stop_ratio=0.3),
        },
        "early_stop_score": {
            "features": _gauss(36, 4, 2),
            "config": SpiceConfig(budget=20, conflict_weight=0.5, stop_rule="ratio", stop_ratio=0.3, stop_on="score"),
        },
        "stop_on_rank1_rows": {
            "features": stop_on_rank1_rows(),
            "config": SpiceConfig(budget=10, conflict_weight=0.0, stop_rule="ratio", stop_ratio=0.5),
        },
        "only_rank1_eligible": {
            "features": _gauss(24, 6, 4),
            "config": SpiceConfig(budget=5, conflict_weight=0.1, stop_rule="none", stop_ratio=None),
            "eligible": eligible_first_half_out,
        },
        "initial_nan_reference": {
            "features": nan_feats,
            "config": SpiceConfig(budget=10, conflict_weight=0.2, stop_rule="ratio", stop_ratio=0.2),
            "initial": [25, 1, 14],
            "reference_gain": 2.0,
        },
        "overflow_row": {
            "features": overflow,
            "config": SpiceConfig(budget=8, conflict_weight=0.2, stop_rule="none", stop_ratio=None),
        },
        "plateau_rule": {
            "features": _gauss(60, 5, 7),
            "config": SpiceConfig(budget=30, conflict_weight=0.3, stop_rule="none", stop_ratio=None),
            "stopping": FlatScore,
        },
        "posthoc_cut": {
            "features": _gauss(60, 5, 8),
            "config": SpiceConfig(budget=30, conflict_weight=0.3, stop_rule="none", stop_ratio=None),
            "stopping": HalfScoreCut,
        },
        "exhausted": {
            "features": _gauss(10, 3, 6),
            "config": SpiceConfig(budget=8, stop_rule="none", stop_ratio=None),
            "eligible": torch.tensor([True, False] * 5),
        },
    }
