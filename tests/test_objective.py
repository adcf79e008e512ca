"""The Fisher log-det state and the conflict tracker against from-scratch references (torch.logdet, explicit cos)."""

from __future__ import annotations

import math

import pytest
import torch

from spice_trainer.core.objective import CONFLICT_ETA, ConflictTracker, FisherLogDet, SpiceObjective


def _features(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=dtype)


def _logdet_gain(feats: torch.Tensor, selected: list[int], x: int, alpha: float) -> float:
    """logdet(I + α F_{S∪x}) − logdet(I + α F_S), straight from the definition."""
    d = feats.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    g_s = feats[selected].double()
    g_sx = feats[[*selected, x]].double()
    before = torch.logdet(eye + alpha * g_s.T @ g_s)
    after = torch.logdet(eye + alpha * g_sx.T @ g_sx)
    return float(after - before)


def _conflict(feats: torch.Tensor, selected: list[int], x: int) -> float:
    """max(0, −cos(g_x, mean of g_S)) with η in the denominator; 0 for S = ∅."""
    if not selected:
        return 0.0
    g = feats[x].double()
    mean = feats[selected].double().mean(dim=0)
    cos = float(g @ mean) / (float(g.norm()) * float(mean.norm()) + CONFLICT_ETA)
    return max(0.0, -cos)


@pytest.mark.parametrize("method", ["primal", "dual"])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_incremental_gains_match_logdet_for_every_candidate(method: str, alpha: float) -> None:
    feats = _features(30, 6, seed=0)
    order = [3, 17, 8, 25, 0, 11, 29, 4, 19]  # more than d picks: M⁻¹ becomes well-populated
    objective = SpiceObjective(feats, alpha, capacity=len(order), method=method, conflict_weight=0.25)  # type: ignore[arg-type]
    assert objective.method == method
    selected: list[int] = []
    for row in order:
        gains, conflicts, scores = objective.scores()
        for x in range(feats.shape[0]):
            assert gains[x].item() == pytest.approx(_logdet_gain(feats, selected, x, alpha), rel=1e-9, abs=1e-10)
            assert conflicts[x].item() == pytest.approx(_conflict(feats, selected, x), rel=1e-9, abs=1e-12)
            assert scores[x].item() == pytest.approx(gains[x].item() - 0.25 * conflicts[x].item(), abs=1e-12)
        gain = objective.add(feats[row])
        assert gain.item() == pytest.approx(_logdet_gain(feats, selected, row, alpha), rel=1e-9)
        selected.append(row)
        g_s = feats[selected]
        expected = torch.logdet(torch.eye(6, dtype=torch.float64) + alpha * g_s.T @ g_s).item()
        assert objective.logdet == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_scores_at_equals_tracked_scores(method: str) -> None:
    feats = _features(40, 8, seed=1)
    tracked = SpiceObjective(feats, 1.0, capacity=5, method=method, conflict_weight=0.5)  # type: ignore[arg-type]
    direct = SpiceObjective(feats, 1.0, capacity=5, method=method, conflict_weight=0.5, rows="direct")  # type: ignore[arg-type]
    for row in [5, 9, 33, 2, 14]:
        tracked.add(feats[row])
        direct.add(feats[row])
        rows = torch.tensor([0, 7, 21, 39])
        for a, b in zip(tracked.scores(), direct.scores_at(rows), strict=True):
            torch.testing.assert_close(a[rows], b, rtol=1e-10, atol=1e-12)


def test_primal_and_dual_states_agree() -> None:
    feats = _features(50, 20, seed=2)
    primal = FisherLogDet(20, 0.7, capacity=12, method="primal")
    dual = FisherLogDet(20, 0.7, capacity=12, method="dual")
    for row in range(12):
        gp, up, dp = primal.add(feats[row])
        gd, ud, dd = dual.add(feats[row])
        torch.testing.assert_close(gp, gd, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(up, ud, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(dp, dd, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(primal.quad(feats), dual.quad(feats), rtol=1e-9, atol=1e-11)
    assert primal.logdet == pytest.approx(dual.logdet, rel=1e-12)
    with pytest.raises(RuntimeError, match="capacity"):
        dual.add(feats[13])


def test_auto_method_follows_the_cheaper_side() -> None:
    assert FisherLogDet(64, 1.0, capacity=10).method == "dual"
    assert FisherLogDet(64, 1.0, capacity=100).method == "primal"


def test_state_is_updated_by_a_vector_not_an_index() -> None:
    """A shard that never saw row j still reaches the same gains when handed g_j (the distributed contract)."""
    feats = _features(24, 5, seed=3)
    whole = SpiceObjective(feats, 1.0, capacity=4, conflict_weight=0.3)
    shard = SpiceObjective(feats[12:], 1.0, capacity=4, conflict_weight=0.3)
    for row in [1, 20, 7, 15]:  # rows 1 and 7 live outside the shard
        whole.add(feats[row])
        shard.add(feats[row])
    for a, b in zip(whole.scores(), shard.scores(), strict=True):
        torch.testing.assert_close(a[12:], b, rtol=1e-10, atol=1e-12)


def test_restrict_starts_a_pool_midstream() -> None:
    feats = _features(60, 7, seed=4)
    objective = SpiceObjective(feats, 1.0, capacity=6, conflict_weight=0.1, rows="direct")
    selected = [2, 40, 11]
    for row in selected:
        objective.add(feats[row])
    objective.track(feats[30:45], "incremental")
    gains, conflicts, _ = objective.scores()
    for local, x in enumerate(range(30, 45)):
        assert gains[local].item() == pytest.approx(_logdet_gain(feats, selected, x, 1.0), rel=1e-9, abs=1e-12)
        assert conflicts[local].item() == pytest.approx(_conflict(feats, selected, x), rel=1e-9, abs=1e-12)


def test_conflict_tracker_uses_the_mean_direction() -> None:
    tracker = ConflictTracker(2)
    dots = torch.tensor([1.0, -1.0], dtype=torch.float64)
    norms = torch.ones(2, dtype=torch.float64)
    assert tracker.conflicts(dots, norms).tolist() == [0.0, 0.0]  # S = ∅ → no conflict
    tracker.add(torch.tensor([3.0, 0.0]))
    tracker.add(torch.tensor([1.0, 0.0]))
    # Σg = (4, 0); candidates (0.5, 0) and (-1, 0): dots are 2 and -4; mean = (2, 0).
    c = tracker.conflicts(torch.tensor([2.0, -4.0], dtype=torch.float64), torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert c[0].item() == 0.0
    assert c[1].item() == pytest.approx(2.0 / (2.0 + CONFLICT_ETA), rel=1e-15)


def test_zero_vector_has_zero_gain_and_zero_conflict() -> None:
    feats = torch.zeros(3, 4, dtype=torch.float64)
    feats[0, 0] = 2.0
    objective = SpiceObjective(feats, 1.0, capacity=2, conflict_weight=0.1)
    objective.add(feats[0])
    gains, conflicts, _ = objective.scores()
    assert gains[1].item() == 0.0 and conflicts[1].item() == 0.0
    assert objective.logdet == pytest.approx(math.log(5.0))


# --- bounds for the lazy greedy ---------------------------------------------------------------------------


def _exact_s(feats: torch.Tensor, selected: list[int], alpha: float) -> torch.Tensor:
    """``s_x = g_xᵀ (I + α F_S)⁻¹ g_x`` for every row, from an explicitly built and solved ``M`` (float64)."""
    g = feats.double()
    d = g.shape[1]
    m = torch.eye(d, dtype=torch.float64) + alpha * g[selected].T @ g[selected]
    return (g * torch.linalg.solve(m, g.T).T).sum(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_bounds_bound_every_later_gain_and_screens_bracket_it(dtype: torch.dtype) -> None:
    """`upper_bounds` (refreshed or stale) and `bound_after` never fall below a row's exact gain at any later
    set. Float32 features make the refresh product float32 (its certified error bar is in the bound)."""
    alpha = 0.8
    feats = _features(400, 10, seed=5).to(dtype)
    objective = SpiceObjective(feats, alpha, capacity=60, conflict_weight=0.3, rows="bounds")
    selected: list[int] = []
    kept: list[tuple[int, torch.Tensor]] = []  # (step, bounds taken then)
    order = torch.randperm(400, generator=torch.Generator().manual_seed(0))[:60].tolist()
    for step, row in enumerate(order):
        exact_gain = torch.log1p(alpha * _exact_s(feats, selected, alpha))
        for _, bounds in kept:
            assert bool((bounds >= exact_gain - 1e-12).all())  # valid for this later set (λ·c ≥ 0)
        everything = torch.arange(400)
        exact = objective.scores_at(everything)
        torch.testing.assert_close(exact.gains, exact_gain, rtol=1e-10, atol=1e-12)
        if step % 7 == 0:
            kept.append((step, objective.upper_bounds().clone()))
            kept.append((step, objective.bound_after(everything, exact.gains)))
        if step % 11 == 10:
            objective.refresh_bounds()
        objective.add(feats[row])
        selected.append(row)
    assert objective.rows is not None and objective.bounds_version >= 5


def test_fixed_conflict_reference_scores_against_the_given_direction() -> None:
    feats = _features(50, 6, seed=8)
    reference = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    objective = SpiceObjective(feats, 1.0, capacity=5, conflict_weight=0.4, conflict_reference=reference)
    for step in range(4):
        gains, conflicts, scores = objective.scores()
        for x in range(50):
            g = feats[x]
            cos = float(g @ reference) / (float(g.norm()) * float(reference.norm()) + CONFLICT_ETA)
            assert conflicts[x].item() == pytest.approx(max(0.0, -cos), rel=1e-12, abs=1e-15)
        torch.testing.assert_close(scores, gains - 0.4 * conflicts)
        objective.add(feats[step * 3])
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        SpiceObjective(feats, 1.0, capacity=5, conflict_reference=torch.ones(5))
    with pytest.raises(ValueError, match="zero vector"):
        SpiceObjective(feats, 1.0, capacity=5, conflict_reference=torch.zeros(6))
    with pytest.raises(ValueError, match="NaN or inf"):
        SpiceObjective(feats, 1.0, capacity=5, conflict_reference=torch.full((6,), float("nan")))
