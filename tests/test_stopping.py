"""Stopping rules: the paper's ω rule against its definition, and the interface a new rule plugs into (a
stateful `should_stop` that reads the history, a post-hoc `cut`), through every regime."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.core.greedy import select_from_features
from spice_trainer.core.stopping import (
    STOP_REASONS,
    NeverStop,
    PickHistory,
    PlateauStop,
    RatioStop,
    check_cut,
    stopping_rule,
)


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    feats = torch.randn(n, d, generator=gen, dtype=torch.float64)
    feats[::2] *= -1.0
    feats[::5] *= 0.3
    return feats


def _cfg(**changes: object) -> SpiceConfig:
    base: dict[str, object] = {"fisher_scale": 1.0, "conflict_weight": 0.5, "stop_rule": "none"}
    base.update(changes)
    return SpiceConfig(**base)  # type: ignore[arg-type]


def test_ratio_rule_follows_its_definition() -> None:
    rule = RatioStop(0.5, "gain")
    history = PickHistory()
    assert not rule.should_stop(0.1, -5.0, history)  # no reference yet: the first pick is kept
    history.append(2.0, 1.9, 0.2)
    assert history.reference == 2.0
    assert not rule.should_stop(1.01, -5.0, history) and rule.should_stop(1.0, 5.0, history)
    on_score = RatioStop(0.5, "score")
    assert on_score.should_stop(5.0, 1.0, history) and not on_score.should_stop(0.0, 1.01, history)
    given = PickHistory(reference_gain=4.0)
    assert given.reference == 4.0 and rule.should_stop(1.9, 1.9, given)  # from the first pick on
    assert rule.cut([3.0, 2.0, 1.0], [3.0, 2.0, 1.0]) == 3
    assert isinstance(stopping_rule(_cfg()), NeverStop)
    assert isinstance(stopping_rule(_cfg(stop_rule="ratio", stop_ratio=0.2, stop_on="score")), RatioStop)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        RatioStop(1.0)
    with pytest.raises(ValueError, match="watch"):
        RatioStop(0.5, "loss")  # type: ignore[arg-type]


def test_stop_reasons_are_documented_in_one_place() -> None:
    assert set(STOP_REASONS) == {"budget", "early_stop", "exhausted"}
    assert all(text for text in STOP_REASONS.values())
    assert check_cut(3, 5) == 3
    for bad in (-1, 6, 2.0, True):
        with pytest.raises(ValueError, match=r"int in \[0, 5\]"):
            check_cut(bad, 5)


class ScorePlateau:
    """A stateful rule of the kind the interface is for: stop once the penalized score curve flattens, i.e. the
    candidate's score is less than ``slope · first score`` per pick below the score ``window`` picks earlier
    (it reads the history; the count of calls is kept to check what the loop passes)."""

    def __init__(self, window: int, slope: float) -> None:
        self.window, self.slope = window, slope
        self.calls: list[int] = []

    def should_stop(self, gain: float, score: float, history: PickHistory) -> bool:
        self.calls.append(len(history))
        if len(history) < self.window:
            return False
        return (history.scores[-self.window] - score) / self.window < self.slope * history.scores[0]

    def cut(self, gains: Sequence[float], scores: Sequence[float]) -> int:
        return len(gains)


class KneeCut:
    """A post-hoc rule: keep picks up to the last one whose score is at least ``fraction`` of the first."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.seen: list[list[float]] = []

    def should_stop(self, gain: float, score: float, history: PickHistory) -> bool:
        return False

    def cut(self, gains: Sequence[float], scores: Sequence[float]) -> int:
        self.seen.append(list(scores))
        keep = 0
        for t, score in enumerate(scores):
            if score >= self.fraction * scores[0]:
                keep = t + 1
        return keep


def _expected_plateau_stop(scores: list[float], window: int, slope: float) -> int:
    """The plateau rule applied by hand to an unstopped run's score curve: the first refused pick."""
    for t in range(window, len(scores)):
        if (scores[t - window] - scores[t]) / window < slope * scores[0]:
            return t
    return len(scores)


@pytest.mark.parametrize("search", ["lazy", "incremental"])
def test_a_stateful_rule_reading_the_history_stops_exact_greedy(search: str) -> None:
    feats = _features(120, 6, seed=3)
    full = select_from_features(feats, _cfg(budget=60, exact_search=search))
    expected = _expected_plateau_stop(full.scores, 4, 0.01)
    assert 4 < expected < 60  # the premise: the curve flattens inside the budget
    rule = ScorePlateau(4, 0.01)
    sel = select_from_features(feats, _cfg(budget=60, exact_search=search), stopping=rule)
    assert sel.indices == full.indices[:expected]
    assert sel.stop_reason == "early_stop"
    assert rule.calls == list(range(expected + 1))  # one call per candidate, the history of the picks before it


def test_a_post_hoc_cut_keeps_a_prefix_in_every_regime() -> None:
    feats = _features(200, 6, seed=4)
    for greedy in ("exact", "stochastic", "pooled"):
        cfg = _cfg(budget=50, greedy=greedy, pool_size=20, picks_per_pool=5)
        full = select_from_features(feats, cfg)
        keep = max(t + 1 for t, s in enumerate(full.scores) if s >= 0.4 * full.scores[0])
        assert 0 < keep < 50, greedy  # the premise
        rule = KneeCut(0.4)
        sel = select_from_features(feats, cfg, stopping=rule)
        assert rule.seen == [full.scores]  # called once, after the loop, with the whole curve
        assert sel.indices == full.indices[:keep] and sel.gains == full.gains[:keep], greedy
        assert sel.objective == full.objective[:keep] and sel.stop_reason == "early_stop", greedy
    # Keeping everything leaves the run as it was.
    whole = select_from_features(feats, _cfg(budget=50), stopping=KneeCut(-math.inf))
    assert whole.stop_reason == "budget" and len(whole) == 50


def test_a_stop_ends_one_pool_and_the_stream_goes_on() -> None:
    feats = _features(100, 6, seed=5)
    cfg = _cfg(budget=30, greedy="pooled", pool_size=10, picks_per_pool=3)

    class EverySecondCandidate:
        """Refuses every second candidate it is offered."""

        def __init__(self) -> None:
            self.offered = 0

        def should_stop(self, gain: float, score: float, history: PickHistory) -> bool:
            self.offered += 1
            return self.offered % 2 == 0

        def cut(self, gains: Sequence[float], scores: Sequence[float]) -> int:
            return len(gains)

    sel = select_from_features(feats, cfg, stopping=EverySecondCandidate())
    # Pool p: its first candidate is accepted, its second refused (ends the pool): one pick per pool, 10 pools.
    assert len(sel) == 10 and sel.metadata["pools_visited"] == 10 and sel.metadata["pools_stopped_early"] == 10
    assert [row // 10 for row in sel.indices] == list(range(10))
    assert sel.stop_reason == "early_stop"


# --- the plateau rule (the default) -----------------------------------------------------------------------


def _plateau_by_hand(values: list[float], ratio: float, window: int) -> int:
    """The plateau rule's definition applied to a finished curve, every mean recomputed from scratch: the number
    of picks kept (the first refused candidate's position), or ``len(values)``."""
    for t in range(len(values)):
        older = t - (window - 1)
        if older < window:
            continue
        recent = sum(values[older : t + 1]) / window
        if recent <= ratio * (sum(values[:older]) / older):
            return t
    return len(values)


def _replay(rule: PlateauStop, values: list[float]) -> int:
    """Offer the values one by one to ``rule`` as a loop would; the number accepted."""
    history = PickHistory()
    for t, value in enumerate(values):
        if rule.should_stop(value, value, history):
            return t
        history.append(value, value, 0.0)
    return len(values)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("ratio", "window"), [(0.2, 3), (0.1, 1), (0.5, 5)])
def test_plateau_rule_follows_its_definition(seed: int, ratio: float, window: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    # Curves of several shapes: a decay to a floor with noise, a plain decay, a flat start then a drop.
    t = torch.arange(1, 301, dtype=torch.float64)
    floor = float(torch.rand((), generator=gen, dtype=torch.float64)) * 0.05
    knee = 20 + int(torch.randint(150, (), generator=gen))
    shapes = [
        torch.where(t < knee, 0.7 - 0.3 * t / knee, floor) + 0.01 * torch.rand(300, generator=gen, dtype=torch.float64),
        1.0 / t,
        torch.rand(300, generator=gen, dtype=torch.float64).sort(descending=True).values,
    ]
    for curve in shapes:
        values = curve.tolist()
        assert _replay(PlateauStop(ratio, "score", window), values) == _plateau_by_hand(values, ratio, window)


def test_plateau_rule_stops_at_the_tail_and_not_on_a_smooth_decay() -> None:
    flat_tail = [0.7 - 0.004 * i for i in range(100)] + [0.01] * 200
    kept = _replay(PlateauStop(0.2), flat_tail)
    assert 100 <= kept <= 102  # the first tail values pull the 3-pick mean under a fifth of ~0.5
    # v_t = 1/t: recent / history mean ≈ 1/(ln t + 0.58), which reaches 0.2 only near t ≈ e^(5 - 0.58) ≈ 83.
    kept = _replay(PlateauStop(0.2), [1.0 / (i + 1) for i in range(300)])
    assert 60 <= kept <= 110
    assert _replay(PlateauStop(0.2), [0.5] * 300) == 300  # a flat curve from the start never "levels off" below itself
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\)"):
        PlateauStop(0.0)
    with pytest.raises(ValueError, match="window"):
        PlateauStop(0.2, window=0)
    assert isinstance(stopping_rule(SpiceConfig()), PlateauStop)  # the default


def test_plateau_rule_on_a_mostly_redundant_pool_stops_well_short_of_half() -> None:
    # 400 rows: 30 informative unit directions, and 370 rows that add little: copies of those directions
    # carrying a fifth of a row's weight (what the surprise weights and the exhausted directions leave them).
    # Budget 50 %: the rule must stop right after the informative rows, far short of 200.
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(30, 64, generator=gen, dtype=torch.float64)
    basis = basis / basis.norm(dim=1, keepdim=True)
    copies = basis[torch.arange(370) % 30] + 0.05 * torch.randn(370, 64, generator=gen, dtype=torch.float64)
    copies = 0.2 * copies / copies.norm(dim=1, keepdim=True)
    rows = torch.cat([basis, copies])[torch.randperm(400, generator=gen)]
    sel = select_from_features(rows, SpiceConfig(budget=0.5))
    assert sel.stop_reason == "early_stop"
    assert 28 <= len(sel) <= 45, len(sel)
    # What it kept is exactly the rule applied by hand to the unstopped run's curve.
    full = select_from_features(rows, SpiceConfig(budget=0.5, stop_rule="none"))
    assert sel.indices == full.indices[: _plateau_by_hand(full.scores, 0.2, 3)]
