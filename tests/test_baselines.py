"""Selection baselines (`spice_trainer.core.baselines`) against brute force in plain Python / float64."""

from __future__ import annotations

import math

import pytest
import torch

from spice_trainer.core import baselines


def _brute_top(scores: list[float], k: int, eligible: list[bool]) -> list[int]:
    """Rank by score (descending), ties by index: Python's sort on (-score, index)."""
    ranked = sorted((-s, i) for i, s in enumerate(scores) if eligible[i] and math.isfinite(s))
    return [i for _, i in ranked[:k]]


def _features(n: int = 40, d: int = 6, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen) * 3
    feats[3] = float("nan")  # a row without a usable gradient
    feats[7] = 0.0  # a solved row: zero gradient
    return feats


@pytest.mark.parametrize("k", [1, 5, 39, 100])
def test_top_k_rows_matches_a_python_sort_with_ties(k: int) -> None:
    scores = torch.tensor([0.5, 2.0, 2.0, float("nan"), -1.0, 2.0, float("inf") * -1, 0.5, 3.0] * 4)
    eligible = torch.ones_like(scores, dtype=torch.bool)
    eligible[8] = False
    got = baselines.top_k_rows(scores, k, eligible=eligible)
    assert got == _brute_top(scores.tolist(), k, eligible.tolist())
    assert got[:3] == [17, 26, 35][:k]  # the 3.0 rows left after masking row 8, in index order


def test_small_loss_rows_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    losses = torch.rand(50, generator=gen).double() * 2
    losses[:5] = 0.05  # solved
    losses[10] = float("nan")
    got = baselines.small_loss_rows(losses, 12, min_loss=0.1)
    values = losses.tolist()
    expected = sorted((v, i) for i, v in enumerate(values) if math.isfinite(v) and v > 0.1)[:12]
    assert got == [i for _, i in expected]
    # fewer rows above the floor than asked: all of them
    assert sorted(baselines.small_loss_rows(losses, 100, min_loss=1.5)) == sorted(
        i for i, v in enumerate(values) if math.isfinite(v) and v > 1.5
    )


def test_gradient_norm_rows_brute_force() -> None:
    feats = _features()
    got = baselines.gradient_norm_rows(feats, 10)
    norms = [math.sqrt(sum(float(x) ** 2 for x in row)) for row in feats.tolist()]
    assert got == _brute_top(norms, 10, [True] * len(norms))
    assert 3 not in baselines.gradient_norm_rows(feats, 40)  # NaN row never picked


def test_reference_similarity_rows_brute_force() -> None:
    feats = _features()
    reference = _features(8, 6, seed=5)
    got = baselines.reference_similarity_rows(feats, reference, 15)
    ref_rows = [r for r in reference.tolist() if all(math.isfinite(x) for x in r)]
    mean = [sum(col) / len(ref_rows) for col in zip(*ref_rows, strict=True)]
    mean_norm = math.sqrt(sum(x * x for x in mean))

    def cosine(row: list[float]) -> float:
        norm = math.sqrt(sum(x * x for x in row))
        return sum(a * b for a, b in zip(row, mean, strict=True)) / (norm * mean_norm) if norm > 0 else 0.0

    scores = [cosine(r) for r in feats.tolist()]
    assert got == _brute_top(scores, 15, [True] * len(scores))
    # scale invariance: a row scaled up by 100 keeps its score (cosine), unlike the gradient norm
    scaled = feats.clone()
    scaled[got[-1]] *= 100
    assert baselines.reference_similarity_rows(scaled, reference, 15) == got


def test_random_rows_are_seeded_distinct_and_leave_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a = baselines.random_rows(100, 10, seed=3)
    assert a == baselines.random_rows(100, 10, seed=3) != baselines.random_rows(100, 10, seed=4)
    assert len(set(a)) == 10 and all(0 <= i < 100 for i in a)
    assert sorted(baselines.random_rows(5, 10, seed=0)) == [0, 1, 2, 3, 4]
    assert torch.equal(state, torch.random.get_rng_state())


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        baselines.top_k_rows(torch.zeros(3), 0)
    with pytest.raises(ValueError, match="share d"):
        baselines.reference_similarity_rows(torch.zeros(4, 3), torch.zeros(2, 5), 2)
    with pytest.raises(ValueError, match="no row with a finite"):
        baselines.reference_similarity_rows(torch.ones(4, 3), torch.full((2, 3), float("nan")), 2)
    with pytest.raises(ValueError, match="mean gradient is zero"):
        baselines.reference_similarity_rows(torch.ones(4, 3), torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match="eligible must have shape"):
        baselines.top_k_rows(torch.zeros(3), 1, eligible=torch.ones(4, dtype=torch.bool))
