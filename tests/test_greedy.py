"""The greedy loops against a brute-force SPICE greedy written from the definitions (logdet, mean, cos)."""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import pytest
import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.core.greedy import (
    REGIMES,
    SEARCHES,
    Candidate,
    ExactSource,
    run_greedy,
    select_from_features,
)
from spice_trainer.core.objective import CONFLICT_ETA, SpiceObjective
from spice_trainer.core.stopping import NeverStop, RatioStop


def _features(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)


def _cfg(**changes: object) -> SpiceConfig:
    base: dict[str, object] = {
        "fisher_scale": 1.0,
        "conflict_weight": 0.1,
        "stop_rule": "none",
        "stop_ratio": None,
        "greedy": "exact",
    }
    base.update(changes)
    return SpiceConfig(**base)  # type: ignore[arg-type]


def _logdet(feats: torch.Tensor, rows: list[int], alpha: float) -> float:
    d = feats.shape[1]
    g = feats[rows].double()
    return float(torch.logdet(torch.eye(d, dtype=torch.float64) + alpha * g.T @ g))


def _brute_force(
    feats: torch.Tensor,
    k: int,
    alpha: float,
    lam: float,
    *,
    initial: tuple[int, ...] = (),
    eligible: list[bool] | None = None,
    reference: torch.Tensor | None = None,
) -> tuple[list[int], list[float], list[float]]:
    """Greedy on Δ − λc with every quantity recomputed from scratch; ties → lowest index. ``reference``: a
    fixed conflict direction instead of the selected set's mean."""
    feats = feats.double()
    n = feats.shape[0]
    selected = list(initial)
    picks: list[int] = []
    gains: list[float] = []
    conflicts: list[float] = []
    while len(selected) < k:
        base = _logdet(feats, selected, alpha)
        best: tuple[float, int, float, float] | None = None
        for x in range(n):
            if x in selected or (eligible is not None and not eligible[x]):
                continue
            gain = _logdet(feats, [*selected, x], alpha) - base
            if selected or reference is not None:
                mean = feats[selected].mean(dim=0) if reference is None else reference.double()
                g = feats[x]
                cos = float(g @ mean) / (float(g.norm()) * float(mean.norm()) + CONFLICT_ETA)
                conflict = max(0.0, -cos)
            else:
                conflict = 0.0
            score = gain - lam * conflict
            if best is None or score > best[0]:
                best = (score, x, gain, conflict)
        if best is None:
            break
        selected.append(best[1])
        picks.append(best[1])
        gains.append(best[2])
        conflicts.append(best[3])
    return picks, gains, conflicts


# --- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "d", "k", "lam", "alpha"),
    [
        (40, 6, 15, 0.1, 1.0),  # k > d: primal
        (40, 12, 8, 0.5, 0.5),  # k < d: dual
        (30, 5, 12, 0.0, 1.0),  # λ = 0: plain log-det greedy
        (30, 16, 10, 0.0, 2.0),  # λ = 0, dual
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_pick_is_the_brute_force_argmax(
    n: int, d: int, k: int, lam: float, alpha: float, dtype: torch.dtype
) -> None:
    # float32 input takes the screened path (float32 row copy, exact float64 decision among the best few).
    feats = _features(n, d, seed=n + d + k, dtype=dtype)
    # Shift some rows against the mean so that the conflict term actually changes picks.
    feats[::3] *= -0.7
    sel = select_from_features(feats, _cfg(budget=k, conflict_weight=lam, fisher_scale=alpha))
    picks, gains, conflicts = _brute_force(feats, k, alpha, lam)
    assert sel.indices == picks
    assert sel.metadata["method"] == ("dual" if k < d else "primal")
    assert sel.gains == pytest.approx(gains, rel=1e-9, abs=1e-12)
    assert sel.conflicts == pytest.approx(conflicts, rel=1e-9, abs=1e-12)
    assert sel.scores == pytest.approx([g - lam * c for g, c in zip(gains, conflicts, strict=True)], abs=1e-10)
    for t in range(k):
        assert sel.objective[t] == pytest.approx(_logdet(feats, picks[: t + 1], alpha), rel=1e-10)
        b = math.log1p(alpha * float(feats[picks[t]].double().square().sum()))
        assert sel.base_gains[t] == pytest.approx(b, rel=1e-12)
        assert sel.interactions[t] == pytest.approx(gains[t] - b, abs=1e-9)
        assert sel.interactions[t] <= 1e-12
    assert sel.stop_reason == "budget"


def test_conflict_weight_changes_picks_on_opposing_rows() -> None:
    """A sanity check that λ matters: rows opposing the mean are penalised relative to λ = 0."""
    feats = _features(60, 4, seed=7)
    feats[:, 0] += 1.5  # a shared direction
    feats[::4, 0] -= 4.0  # rows pointing against it, with large norms
    plain = select_from_features(feats, _cfg(budget=20, conflict_weight=0.0))
    spice = select_from_features(feats, _cfg(budget=20, conflict_weight=2.0))
    assert plain.indices != spice.indices
    assert spice.indices == _brute_force(feats, 20, 1.0, 2.0)[0]
    assert sum(spice.conflicts) < sum(plain.conflicts)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_go_to_the_lowest_index(dtype: torch.dtype) -> None:
    feats = torch.zeros(6, 3, dtype=dtype)
    feats[[1, 4], 0] = 1.0  # identical rows: equal gains, no conflict
    feats[[2, 5], 1] = 1.0
    sel = select_from_features(feats, _cfg(budget=2))
    assert sel.indices == [1, 2]
    # More tied rows than the float32 path re-scores exactly (8), spread so that topk's order among ties
    # would not give the lowest index: 12 orthogonal unit rows (after a first, larger pick), then copies.
    feats = torch.zeros(40, 16, dtype=dtype)
    feats[0, 15] = 2.0
    for i in range(1, 40):
        feats[i, (i - 1) % 12] = 1.0
    sel = select_from_features(feats, _cfg(budget=14))
    assert sel.indices == [0, *range(1, 13), 13]


# --- initial, eligible, non-finite --------------------------------------------------------------


def test_initial_rows_enter_first_and_count_towards_budget() -> None:
    feats = _features(25, 6, seed=11)
    sel = select_from_features(feats, _cfg(budget=9), initial=[4, 17, 2])
    picks, gains, _ = _brute_force(feats, 9, 1.0, 0.1, initial=(4, 17, 2))
    assert sel.indices == picks and len(sel) == 6
    assert sel.selected == [4, 17, 2, *picks]
    assert not set(sel.indices) & {4, 17, 2}
    assert sel.gains == pytest.approx(gains, rel=1e-9)
    assert sel.metadata["initial_objective"] == pytest.approx(_logdet(feats, [4, 17, 2], 1.0), rel=1e-10)
    assert sel.objective[-1] == pytest.approx(_logdet(feats, sel.selected, 1.0), rel=1e-10)


def test_initial_filling_the_budget_picks_nothing() -> None:
    sel = select_from_features(_features(10, 3, seed=0), _cfg(budget=2), initial=[0, 1, 2])
    assert sel.indices == [] and sel.stop_reason == "budget" and sel.initial == [0, 1, 2]


def test_eligible_mask_is_respected() -> None:
    feats = _features(30, 5, seed=12)
    mask = torch.ones(30, dtype=torch.bool)
    mask[::2] = False
    sel = select_from_features(feats, _cfg(budget=8), eligible=mask)
    assert sel.indices == _brute_force(feats, 8, 1.0, 0.1, eligible=mask.tolist())[0]
    assert all(i % 2 == 1 for i in sel.indices)


def test_exhausted_when_no_eligible_row_is_left() -> None:
    feats = _features(10, 3, seed=0)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[3, 7]] = True
    sel = select_from_features(feats, _cfg(budget=5), eligible=mask)
    assert sorted(sel.indices) == [3, 7] and sel.stop_reason == "exhausted"


def test_non_finite_rows_are_skipped_and_reported() -> None:
    feats = _features(20, 4, seed=13)
    feats[3, 1] = float("nan")
    feats[8, 0] = float("inf")
    feats[3] *= 100  # would dominate if it were considered
    sel = select_from_features(feats, _cfg(budget=19))
    assert sel.skipped == [3, 8]
    assert 3 not in sel.indices and 8 not in sel.indices
    assert sel.stop_reason == "exhausted" and len(sel) == 18
    clean = feats.clone()
    clean[[3, 8]] = 0.0
    mask = [i not in (3, 8) for i in range(20)]
    assert sel.indices == _brute_force(clean, 18, 1.0, 0.1, eligible=mask)[0]


def test_zero_vectors_come_last_and_early_stopping_ends_the_run() -> None:
    feats = torch.zeros(8, 8, dtype=torch.float64)
    feats[0, 0], feats[1, 1], feats[2, 2] = 2.0, 1.5, 1.0
    sel = select_from_features(feats, _cfg(budget=6))
    assert sel.indices[:3] == [0, 1, 2] and sel.gains[3:] == [0.0, 0.0, 0.0]
    stopped = select_from_features(feats, _cfg(budget=6, stop_rule="ratio", stop_ratio=0.0))
    assert stopped.indices == [0, 1, 2] and stopped.stop_reason == "early_stop"


# --- early stopping -----------------------------------------------------------------------------


def _orthogonal(gains: list[float], d: int) -> torch.Tensor:
    """Rows a_i e_i: Δ_i = log(1 + a_i²) whatever S is (orthogonal), and c = 0."""
    feats = torch.zeros(len(gains), d, dtype=torch.float64)
    for i, gain in enumerate(gains):
        feats[i, i] = math.sqrt(math.expm1(gain))
    return feats


def test_early_stop_fires_at_the_first_gain_below_the_ratio() -> None:
    # Gains 2, 1.5, 1.2, 0.99, ... with ω = 0.5: the threshold is 1.0, so the fourth pick is refused.
    gains = [2.0, 1.5, 1.2, 0.99, 0.9, 0.5]
    feats = _orthogonal(gains, 8)
    sel = select_from_features(feats, _cfg(budget=6, stop_rule="ratio", stop_ratio=0.5))
    assert sel.indices == [0, 1, 2]
    assert sel.gains == pytest.approx(gains[:3], rel=1e-12)
    assert sel.stop_reason == "early_stop"
    assert sel.metadata["reference_gain"] == pytest.approx(2.0)
    # With an outside reference the rule applies from the first pick: 0.5 × 2.5 = 1.25 refuses the 1.2.
    ref = select_from_features(feats, _cfg(budget=6, stop_rule="ratio", stop_ratio=0.5), reference_gain=2.5)
    assert ref.indices == [0, 1] and ref.stop_reason == "early_stop"
    # A reference so large that even the first pick fails: nothing is added.
    none = select_from_features(feats, _cfg(budget=6, stop_rule="ratio", stop_ratio=0.5), reference_gain=10.0)
    assert none.indices == [] and none.stop_reason == "early_stop"
    # Budget reached before the rule fires.
    assert select_from_features(feats, _cfg(budget=3, stop_rule="ratio", stop_ratio=0.5)).stop_reason == "budget"


@pytest.mark.parametrize("stop_on", ["gain", "score"])
def test_early_stop_follows_the_watched_quantity(stop_on: str) -> None:
    feats = _features(80, 6, seed=21)
    feats[::2] *= -1.0
    feats[::5] *= 0.3
    lam = 0.5
    full = select_from_features(feats, _cfg(budget=40, conflict_weight=lam))
    watched = full.gains if stop_on == "gain" else full.scores
    ref = full.gains[0]
    for omega in (0.05, 0.1, 0.2, 0.4):
        # The rule, applied by hand to the unstopped run: first t ≥ 2 whose watched value is ≤ ω · Δ_1.
        expected = next((t for t in range(1, 40) if watched[t] <= omega * ref), 40)
        sel = select_from_features(
            feats, _cfg(budget=40, conflict_weight=lam, stop_rule="ratio", stop_ratio=omega, stop_on=stop_on)
        )
        assert sel.indices == full.indices[:expected], omega
        assert sel.stop_reason == ("early_stop" if expected < 40 else "budget")


def test_score_and_gain_modes_differ_when_conflicts_matter() -> None:
    feats = _features(80, 6, seed=21)
    feats[::2] *= -1.0
    feats[::5] *= 0.3
    full = select_from_features(feats, _cfg(budget=40, conflict_weight=0.5))
    ref = full.gains[0]

    def stop_step(values: list[float], omega: float) -> int:
        return next((t for t in range(1, 40) if values[t] <= omega * ref), 40)

    # An ω at which the two rules stop at different steps (the score falls below first).
    omega = next(w for w in (x / 200 for x in range(1, 200)) if stop_step(full.scores, w) < stop_step(full.gains, w))
    by_gain = select_from_features(
        feats, _cfg(budget=40, conflict_weight=0.5, stop_rule="ratio", stop_ratio=omega, stop_on="gain")
    )
    by_score = select_from_features(
        feats, _cfg(budget=40, conflict_weight=0.5, stop_rule="ratio", stop_ratio=omega, stop_on="score")
    )
    assert len(by_gain) == stop_step(full.gains, omega)
    assert len(by_score) == stop_step(full.scores, omega) < len(by_gain)


# --- regimes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_ratio", [None, 0.35])
def test_pooled_equals_exact_greedy_on_each_pool_in_turn(stop_ratio: float | None) -> None:
    feats = _features(130, 6, seed=31)
    rule = "none" if stop_ratio is None else "ratio"
    cfg = _cfg(greedy="pooled", pool_size=20, picks_per_pool=4, budget=22, stop_rule=rule, stop_ratio=stop_ratio)
    sel = select_from_features(feats, cfg)
    picked: list[int] = []
    reference: float | None = None
    stopped = 0
    for begin in range(0, 130, 20):
        if len(picked) >= 22:
            break
        mask = torch.zeros(130, dtype=torch.bool)
        mask[begin : begin + 20] = True
        quota = min(4, 22 - len(picked))
        exact_cfg = cfg.with_changes(greedy="exact", budget=len(picked) + quota)
        step = select_from_features(feats, exact_cfg, initial=picked, eligible=mask, reference_gain=reference)
        if reference is None and step.gains:
            reference = step.gains[0]
        stopped += step.stop_reason == "early_stop"
        picked += step.indices
    assert sel.indices == picked
    assert sel.metadata["pools_stopped_early"] == stopped
    if stop_ratio is None:
        assert sel.stop_reason == "budget" and len(sel) == 22
    else:
        assert stopped > 0 and sel.stop_reason == ("budget" if len(picked) == 22 else "early_stop")


def test_pooled_stream_can_run_out() -> None:
    feats = _features(50, 4, seed=3)
    sel = select_from_features(feats, _cfg(greedy="pooled", pool_size=10, picks_per_pool=2, budget=20))
    assert len(sel) == 10 and sel.stop_reason == "exhausted"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stochastic_reaches_95_percent_of_exact(seed: int) -> None:
    feats = _features(1500, 24, seed=100 + seed, dtype=torch.float32)
    exact = select_from_features(feats, _cfg(budget=150, seed=seed))
    stoch = select_from_features(feats, _cfg(budget=150, greedy="stochastic", seed=seed))
    assert len(stoch) == 150 and len(set(stoch.indices)) == 150
    assert stoch.objective[-1] >= 0.95 * exact.objective[-1]
    again = select_from_features(feats, _cfg(budget=150, greedy="stochastic", seed=seed))
    assert again.indices == stoch.indices
    # Its recorded numbers are exact for the picks it made.
    assert stoch.objective[-1] == pytest.approx(_logdet(feats, stoch.indices, 1.0), rel=1e-8)


def test_stochastic_seed_changes_picks_and_respects_masks() -> None:
    feats = _features(400, 8, seed=5)
    mask = torch.ones(400, dtype=torch.bool)
    mask[:100] = False
    a = select_from_features(feats, _cfg(budget=40, greedy="stochastic", seed=1), eligible=mask)
    b = select_from_features(feats, _cfg(budget=40, greedy="stochastic", seed=2), eligible=mask)
    assert a.indices != b.indices
    assert min(a.indices) >= 100 and min(b.indices) >= 100


def test_stochastic_does_not_touch_global_rng() -> None:
    state = torch.get_rng_state()
    select_from_features(_features(200, 4, seed=0), _cfg(budget=20, greedy="stochastic"))
    assert torch.equal(state, torch.get_rng_state())


# --- dtypes and devices ---------------------------------------------------------------------------


def test_float32_and_float64_inputs_agree() -> None:
    feats64 = _features(300, 16, seed=41)
    a = select_from_features(feats64, _cfg(budget=60))
    b = select_from_features(feats64.float(), _cfg(budget=60))
    assert a.indices == b.indices
    assert a.objective[-1] == pytest.approx(b.objective[-1], rel=1e-6)


def test_bfloat16_input_works_and_matches_its_upcast() -> None:
    feats = _features(200, 12, seed=42, dtype=torch.bfloat16)
    a = select_from_features(feats, _cfg(budget=30))
    b = select_from_features(feats.double(), _cfg(budget=30))
    assert a.indices == b.indices
    # Picks are decided on exact float64 scores (the float32 row copy only screens), so the numbers agree.
    assert a.gains == pytest.approx(b.gains, rel=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("greedy", ["exact", "stochastic", "pooled"])
def test_cuda_matches_cpu(greedy: str) -> None:
    feats = _features(500, 32, seed=43, dtype=torch.float32)
    cpu = select_from_features(feats, _cfg(budget=50, greedy=greedy, pool_size=60, picks_per_pool=6))
    gpu = select_from_features(feats.cuda(), _cfg(budget=50, greedy=greedy, pool_size=60, picks_per_pool=6))
    assert cpu.indices == gpu.indices
    assert cpu.objective[-1] == pytest.approx(gpu.objective[-1], rel=1e-9)


# --- bad inputs -----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    cfg = _cfg(budget=2)
    feats = _features(5, 3, seed=0)
    with pytest.raises(ValueError, match="empty"):
        select_from_features(torch.zeros(0, 3), cfg)
    with pytest.raises(ValueError, match="2-D"):
        select_from_features(torch.zeros(5), cfg)
    with pytest.raises(TypeError, match="floating"):
        select_from_features(torch.zeros(5, 3, dtype=torch.int64), cfg)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        select_from_features([[1.0, 2.0]], cfg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exceeds the pool size"):
        select_from_features(feats, _cfg(budget=6))
    with pytest.raises(ValueError, match="NaN or inf"):
        select_from_features(torch.full((4, 3), float("nan")), cfg)
    with pytest.raises(ValueError, match="outside"):
        select_from_features(feats, cfg, initial=[0, 5])
    with pytest.raises(ValueError, match="outside"):
        select_from_features(feats, cfg, initial=[-1])
    with pytest.raises(ValueError, match="duplicated"):
        select_from_features(feats, cfg, initial=[1, 1])
    with pytest.raises(ValueError, match="shape"):
        select_from_features(feats, cfg, eligible=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        select_from_features(feats, cfg, eligible=torch.ones(5))
    bad = feats.clone()
    bad[2, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        select_from_features(bad, cfg, initial=[2])


def test_progress_bar_does_not_change_the_result() -> None:
    feats = _features(100, 8, seed=9)
    assert (
        select_from_features(feats, _cfg(budget=10), show_progress=True).indices
        == select_from_features(feats, _cfg(budget=10)).indices
    )


def test_import_does_not_need_transformers() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['peft'] = None\n"
        "import spice_trainer.core.greedy, spice_trainer.core.selection, spice_trainer.core.objective\n"
        "assert 'matplotlib' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the lazy exact greedy against the incremental one ------------------------------------------------


def _mixture(n: int, d: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``center[c] + 0.7 noise`` around 16 centres: clustered like real gradients, so that gains shrink
    together and the lazy greedy's bounds are often close (its hard case)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centers = torch.randn(16, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(16, (n,), generator=gen)
    return ((centers[labels] + 0.7 * torch.randn(n, d, generator=gen, dtype=torch.float64)) / math.sqrt(d)).to(dtype)


def _assert_same_picks(feats: torch.Tensor, **changes: object) -> None:
    lazy = select_from_features(feats, _cfg(exact_search="lazy", **changes))
    incremental = select_from_features(feats, _cfg(exact_search="incremental", **changes))
    assert lazy.indices == incremental.indices
    assert lazy.stop_reason == incremental.stop_reason
    # Both record the float64 numbers of the set state; the incremental greedy's come from a batch.
    assert lazy.gains == pytest.approx(incremental.gains, rel=1e-10, abs=1e-13)
    assert lazy.conflicts == pytest.approx(incremental.conflicts, rel=1e-9, abs=1e-12)
    assert lazy.objective == pytest.approx(incremental.objective, rel=1e-12)


@pytest.mark.parametrize(
    ("n", "d", "k", "lam", "seed"),
    [
        (2000, 24, 300, 0.0, 0),  # k > d (primal), λ = 0: plain log-det greedy
        (2000, 24, 300, 0.1, 1),
        (1500, 64, 40, 0.5, 2),  # k < d (dual), a strong conflict term
        (3000, 8, 250, 0.3, 3),  # k ≫ d: every gain shrinks, bounds crowd together
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lazy_greedy_makes_the_incremental_greedys_picks(
    n: int, d: int, k: int, lam: float, seed: int, dtype: torch.dtype
) -> None:
    feats = _mixture(n, d, seed, dtype)
    feats[::5] *= -1.0  # rows against the mean: the conflict term changes picks
    _assert_same_picks(feats, budget=k, conflict_weight=lam)
    # The shortlist was rebuilt along the way (n is larger than its first length).
    assert select_from_features(feats, _cfg(budget=k, conflict_weight=lam)).metadata["shortlist_rebuilds"] > 1


@pytest.mark.parametrize("lam", [0.0, 0.2])
def test_lazy_greedy_breaks_ties_and_zero_rows_like_the_incremental_greedy(lam: float) -> None:
    gen = torch.Generator(device="cpu").manual_seed(7)
    base = _mixture(300, 12, 7, torch.float64)
    # Every row three times, shuffled (exact ties between distinct rows), and 400 zero rows (gain 0, bound 0).
    feats = torch.cat([base, base, base, torch.zeros(400, 12, dtype=torch.float64)])
    feats = feats[torch.randperm(feats.shape[0], generator=gen)]
    # Past the 300 distinct directions come the duplicates (gain small but > 0) and the zero rows (score 0).
    _assert_same_picks(feats, budget=1000, conflict_weight=lam)
    lazy = select_from_features(feats, _cfg(budget=1000, conflict_weight=lam))
    zero_picks = [t for t, i in enumerate(lazy.indices) if not feats[i].any()]
    assert len(zero_picks) >= 100
    zero_rows = [lazy.indices[t] for t in zero_picks]
    assert zero_rows == sorted(zero_rows)  # all tied at score 0: in row order
    if lam == 0.0:
        assert zero_picks[0] == 900  # every duplicate (Δ > 0) before the first zero row


def test_lazy_greedy_with_initial_rows_masks_and_early_stopping() -> None:
    feats = _mixture(2500, 16, 11, torch.float32)
    mask = torch.ones(2500, dtype=torch.bool)
    mask[::3] = False
    lazy = select_from_features(
        feats,
        _cfg(budget=200, conflict_weight=0.2, stop_rule="ratio", stop_ratio=0.3),
        initial=[5, 9, 700],
        eligible=mask,
    )
    incremental = select_from_features(
        feats,
        _cfg(budget=200, conflict_weight=0.2, stop_rule="ratio", stop_ratio=0.3, exact_search="incremental"),
        initial=[5, 9, 700],
        eligible=mask,
    )
    assert lazy.indices == incremental.indices and lazy.stop_reason == incremental.stop_reason == "early_stop"
    assert all(mask[i] for i in lazy.indices)


# --- a fixed conflict reference --------------------------------------------------------------------------


@pytest.mark.parametrize(("greedy", "search"), [("exact", "lazy"), ("exact", "incremental"), ("pooled", "lazy")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_fixed_conflict_reference_matches_the_brute_force(greedy: str, search: str, dtype: torch.dtype) -> None:
    """``c_x = max(0, −cos(g_x, r))`` against a given ``r``, from the first pick on (the set's mean is unused)."""
    feats = _features(60, 5, seed=17, dtype=dtype)
    reference = torch.tensor([1.0, 0.5, -0.2, 0.0, 2.0])
    cfg = _cfg(budget=14, conflict_weight=0.8, greedy=greedy, exact_search=search, pool_size=60, picks_per_pool=14)
    sel = select_from_features(feats, cfg, conflict_reference=reference)
    picks, gains, conflicts = _brute_force(feats, 14, 1.0, 0.8, reference=reference)
    assert sel.indices == picks
    assert sel.gains == pytest.approx(gains, rel=1e-9, abs=1e-12)
    assert sel.conflicts == pytest.approx(conflicts, rel=1e-9, abs=1e-12)
    assert sel.conflicts[0] > 0 or feats[picks[0]].double() @ reference.double() >= 0  # c applies to the first pick
    assert sel.metadata["conflict_reference"] == "fixed"
    # It changes the picks against the set's mean (the premise of the option).
    assert picks != _brute_force(feats, 14, 1.0, 0.8)[0]


def test_a_fixed_conflict_reference_with_the_lazy_search_on_a_large_pool() -> None:
    """The lazy bounds subtract λ times the (constant) conflict: still the incremental greedy's picks."""
    feats = _mixture(2500, 16, 23, torch.float32)
    feats[::4] *= -1.0
    reference = feats[:200].double().mean(dim=0)
    lazy = select_from_features(feats, _cfg(budget=250, conflict_weight=0.5), conflict_reference=reference)
    incremental = select_from_features(
        feats, _cfg(budget=250, conflict_weight=0.5, exact_search="incremental"), conflict_reference=reference
    )
    assert lazy.indices == incremental.indices and lazy.metadata["shortlist_rebuilds"] > 1
    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        select_from_features(feats, _cfg(budget=5), conflict_reference=torch.ones(3))


# --- the loop, with a scripted source ----------------------------------------------------------------------


class _Scripted:
    """A `CandidateSource` that offers fixed (row, score) candidates, block by block."""

    def __init__(self, blocks: list[list[tuple[int, float]]]) -> None:
        self.blocks, self.block, self.at, self.accepted = blocks, 0, 0, []

    def propose(self) -> Candidate | None:
        if self.at >= len(self.blocks[self.block]):
            return None
        row, score = self.blocks[self.block][self.at]
        return Candidate(row, score, 0.0, score, score)

    def accept(self, candidate: Candidate) -> None:
        self.accepted.append(candidate.row)
        self.at += 1

    def next_block(self) -> bool:
        if self.block + 1 >= len(self.blocks):
            return False
        self.block, self.at = self.block + 1, 0
        return True

    def metadata(self) -> dict[str, object]:
        return {}


def test_the_loop_stops_for_the_documented_reasons() -> None:
    one = [[(0, 5.0), (1, 4.0), (2, 1.0), (3, 0.5)]]
    assert run_greedy(_Scripted(one), NeverStop(), 2).stop_reason == "budget"
    run = run_greedy(_Scripted(one), NeverStop(), 9)
    assert run.rows == [0, 1, 2, 3] and run.stop_reason == "exhausted"
    run = run_greedy(_Scripted(one), RatioStop(0.5), 9)  # 1.0 <= 0.5 × 5.0 is refused
    assert run.rows == [0, 1] and run.stop_reason == "early_stop" and run.rule_stops == 1
    # Blocks: a refusal ends the block, the next one opens; a stream that runs out after a refusal is an early stop.
    stream = [[(0, 5.0), (1, 1.0), (2, 4.0)], [(10, 4.5), (11, 3.0)], [(20, 2.0)]]
    run = run_greedy(_Scripted(stream), RatioStop(0.5), 9)
    assert run.rows == [0, 10, 11] and run.rule_stops == 2 and run.stop_reason == "early_stop"
    run = run_greedy(_Scripted(stream), NeverStop(), 9)
    assert run.rows == [0, 1, 2, 10, 11, 20] and run.stop_reason == "exhausted"
    assert run.history.scores == [5.0, 1.0, 4.0, 4.5, 3.0, 2.0] and run.bases == run.history.scores
    assert run_greedy(_Scripted(stream), NeverStop(), 0).stop_reason == "budget"


def test_regimes_and_searches_are_looked_up_by_name() -> None:
    assert set(REGIMES) == {"exact", "stochastic", "pooled"}
    assert set(SEARCHES) == {"lazy", "incremental"}
    feats = _features(50, 4, seed=2)
    objective = SpiceObjective(feats[:0], 1.0, capacity=5, rows="direct")
    with pytest.raises(ValueError, match="search must be one of"):
        ExactSource(objective, feats, torch.ones(50, dtype=torch.bool), search="greedy")


# --- numbers at the edges of floating point ----------------------------------------------------------------


def _rational_greedy(feats: torch.Tensor, k: int, alpha: float) -> tuple[list[int], list[float]]:
    """Plain log-det greedy (λ = 0) in exact rational arithmetic: ``det(I + α Σ_S g gᵀ)`` by fraction-exact
    elimination, gains ``log(det_{S∪x} / det_S)``; ties → lowest index. Independent of float range."""
    rows = [[Fraction(float(v)) for v in row] for row in feats.double().tolist()]
    d = len(rows[0])
    a = Fraction(alpha)

    def det(selected: list[int]) -> Fraction:
        m = [[Fraction(int(i == j)) for j in range(d)] for i in range(d)]
        for s in selected:
            for i in range(d):
                for j in range(d):
                    m[i][j] += a * rows[s][i] * rows[s][j]
        out = Fraction(1)
        for c in range(d):
            p = next(r for r in range(c, d) if m[r][c] != 0)
            if p != c:
                m[c], m[p] = m[p], m[c]
                out = -out
            out *= m[c][c]
            for r in range(c + 1, d):
                f = m[r][c] / m[c][c]
                for j in range(c, d):
                    m[r][j] -= f * m[c][j]
        return out

    picks: list[int] = []
    gains: list[float] = []
    for _ in range(k):
        base = det(picks)
        ratios = {x: det([*picks, x]) / base for x in range(len(rows)) if x not in picks}
        best = max(ratios, key=lambda x: (ratios[x], -x))
        picks.append(best)
        gains.append(math.log(ratios[best]))
    return picks, gains


@pytest.mark.parametrize(
    ("greedy", "search"), [("exact", "lazy"), ("exact", "incremental"), ("stochastic", "lazy"), ("pooled", "lazy")]
)
def test_float32_features_whose_squares_overflow_float32_are_selected_exactly(greedy: str, search: str) -> None:
    """Entries of 1e20: ‖g‖² ~ 1e40 is beyond float32 (3.4e38) but the features themselves are float32. While
    the picks do not span the space (k < d), the identity in I + αF stays resolved in float64 and every gain is
    exact to rounding; past that, no float64 method resolves it (cond ~ 1e40), which a warning says."""
    feats = (_features(12, 5, seed=29) * 1e20).float()
    assert bool(torch.isinf(feats.square()).any())  # the premise
    cfg = _cfg(budget=4, conflict_weight=0.0, greedy=greedy, exact_search=search, pool_size=12, picks_per_pool=4)
    sel = select_from_features(feats, cfg)
    picks, gains = _rational_greedy(feats, 4, 1.0)
    assert sel.indices == picks and sel.skipped == []
    # Δ ≈ 90 here; each gain is a log of a ratio known to ~1e-16 relative after a few downdates.
    assert sel.gains == pytest.approx(gains, rel=1e-9)
    assert all(math.isfinite(v) for v in [*sel.gains, *sel.conflicts, *sel.objective])


def test_a_row_beyond_float64s_range_is_skipped_and_named(caplog: pytest.LogCaptureFixture) -> None:
    feats = _features(20, 4, seed=31)
    feats[3] = 1e200  # ‖g‖² = 4e400 overflows float64
    with caplog.at_level(logging.WARNING, logger="spice_trainer.core.greedy"):
        sel = select_from_features(feats, _cfg(budget=6))
    assert sel.skipped == [3] and 3 not in sel.indices
    assert all(math.isfinite(g) for g in sel.gains)
    clean = feats.clone()
    clean[3] = 0.0
    assert sel.indices == _brute_force(clean, 6, 1.0, 0.1, eligible=[i != 3 for i in range(20)])[0]
    assert "[3]" in caplog.text and "float64" in caplog.text
    with pytest.raises(ValueError, match=r"initial rows \[3\]"):
        select_from_features(feats, _cfg(budget=6), initial=[0, 3])


def test_features_too_large_for_the_identity_to_matter_warn(caplog: pytest.LogCaptureFixture) -> None:
    feats = _features(30, 3, seed=33) * 1e10  # α‖g‖² ~ 1e20 > 2**50: I is below float64's resolution of αF
    with caplog.at_level(logging.WARNING, logger="spice_trainer.core.greedy"):
        sel = select_from_features(feats, _cfg(budget=6))
    assert len(sel) == 6 and all(math.isfinite(v) for v in [*sel.gains, *sel.scores])
    assert "feature_norm" in caplog.text and "fisher_scale" in caplog.text


def test_features_too_small_for_float64_are_refused() -> None:
    feats = _features(20, 4, seed=32) * 1e-170  # α‖g‖² ~ 1e-340: below float64's normal range
    with pytest.raises(ValueError, match="underflow"):
        select_from_features(feats, _cfg(budget=3))


def test_the_loop_runs_under_the_selection_thread_policy() -> None:
    """A small pool runs on one thread whatever the caller's count (no idle-core probe), ``threads`` is used as
    given, and the caller's count is restored afterwards."""
    seen: list[int] = []

    class Watch(NeverStop):
        def should_stop(self, gain: float, score: float, history: object) -> bool:
            seen.append(torch.get_num_threads())
            return False

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        select_from_features(_features(50, 4, seed=1), _cfg(budget=5), stopping=Watch())  # type: ignore[arg-type]
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        select_from_features(_features(50, 4, seed=1), _cfg(budget=5, threads=2), stopping=Watch())  # type: ignore[arg-type]
        assert set(seen) == {2} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
