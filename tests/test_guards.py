"""Candidate guards against a row-by-row transcription of their definition, on small random pools."""

from __future__ import annotations

import math

import pytest
import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.core.guards import EXCLUSION_REASONS, candidate_guards, surprise_threshold_nats


def _pool(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    losses = torch.rand(n, generator=gen, dtype=torch.float64) * 3.0
    losses[torch.rand(n, generator=gen) < 0.2] = 0.01  # solved rows
    tokens = torch.randint(1, 6, (n,), generator=gen)
    tokens[torch.rand(n, generator=gen) < 0.05] = 0
    losses[tokens == 0] = float("nan")
    # The least likely token costs at least the mean loss.
    max_token = losses * (1.0 + torch.rand(n, generator=gen, dtype=torch.float64) * 2.0)
    finite = torch.rand(n, generator=gen) > 0.05
    return losses, tokens, max_token, finite


def _by_hand(losses, tokens, max_token, finite, config, vocab):
    """Each row decided on its own, the definition written out (the quantile cap from a sorted list)."""
    n = len(losses)
    reasons: dict[int, str] = {}
    for i in range(n):
        loss = float(losses[i])
        if int(tokens[i]) <= 0:
            reasons[i] = "no_supervised_token"
        elif not math.isfinite(loss):
            reasons[i] = "non_finite_loss"
        elif not bool(finite[i]):
            reasons[i] = "non_finite_gradient"
        elif config.min_loss is not None and loss <= config.min_loss:
            reasons[i] = "solved"
    if config.max_loss_quantile is not None:
        rest = sorted(float(losses[i]) for i in range(n) if i not in reasons)
        if rest:
            q = config.max_loss_quantile * (len(rest) - 1)  # torch.quantile's linear interpolation
            lo, frac = math.floor(q), q - math.floor(q)
            cap = rest[lo] + (rest[min(lo + 1, len(rest) - 1)] - rest[lo]) * frac
            k = min(config.budget_count(n), len(rest))
            cap = max(cap, rest[k - 1])
            for i in range(n):
                if i not in reasons and float(losses[i]) > cap:
                    reasons[i] = "loss_cap"
    tau = None
    if config.surprise_threshold == "uniform":
        tau = math.log(vocab)
    elif config.surprise_threshold is not None:
        tau = float(config.surprise_threshold)
    weights = []
    for i in range(n):
        m = float(max_token[i])
        if tau is None or i in reasons or m <= tau:
            weights.append(1.0)
        else:
            weights.append(math.exp(tau - m))
    return reasons, weights


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"max_loss_quantile": 0.5},
        {"surprise_threshold": 1.5, "min_loss": None},
        {"surprise_threshold": None, "max_loss_quantile": 0.9, "budget": 30},
    ],
)
def test_guards_match_the_definition_row_by_row(seed: int, changes: dict) -> None:
    losses, tokens, max_token, finite = _pool(60, seed)
    config = SpiceConfig(**changes)
    vocab = 37
    guards = candidate_guards(
        losses, tokens, config, max_token_losses=max_token, vocab_size=vocab, finite_features=finite
    )
    reasons, weights = _by_hand(losses, tokens, max_token, finite, config, vocab)
    assert guards.eligible.tolist() == [i not in reasons for i in range(60)]
    for reason in EXCLUSION_REASONS:
        assert guards.excluded.get(reason, []) == sorted(i for i, r in reasons.items() if r == reason), reason
    assert set(guards.excluded) <= set(EXCLUSION_REASONS)
    # exp of a float64 difference: a few ulps apart from math.exp of the same difference written the other way.
    torch.testing.assert_close(guards.weights, torch.tensor(weights, dtype=torch.float64), rtol=1e-14, atol=0)
    rows, row_weights = guards.down_weighted
    assert rows == [i for i in range(60) if weights[i] < 1.0]
    assert row_weights == pytest.approx([weights[i] for i in rows], rel=1e-14)
    counts = guards.counts()
    assert sum(v for k, v in counts.items() if k != "down_weighted") == len(reasons)
    assert counts["down_weighted"] == len(rows)


def test_scaling_multiplies_each_fisher_term_by_its_weight() -> None:
    losses, tokens, max_token, finite = _pool(40, 7)
    config = SpiceConfig(surprise_threshold=1.0, min_loss=None)
    guards = candidate_guards(losses, tokens, config, max_token_losses=max_token, finite_features=finite)
    feats = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scaled = guards.scale(feats)
    for i in range(40):
        # g̃ g̃ᵀ = w g gᵀ, row by row.
        torch.testing.assert_close(
            torch.outer(scaled[i], scaled[i]), guards.weights[i] * torch.outer(feats[i], feats[i]), rtol=1e-12, atol=0
        )
    # A shard of the pool scales by its own rows' weights.
    rows = torch.tensor([3, 17, 29])
    torch.testing.assert_close(guards.scale(feats[rows], rows), scaled[rows], rtol=0, atol=0)
    untouched = candidate_guards(losses, tokens, SpiceConfig(surprise_threshold=None))
    assert untouched.scale(feats) is feats


def test_uniform_threshold_is_log_vocab_and_errors_name_the_fix() -> None:
    assert surprise_threshold_nats(SpiceConfig(), 1000) == pytest.approx(math.log(1000), rel=1e-15)
    assert surprise_threshold_nats(SpiceConfig(surprise_threshold=2.5), None) == 2.5
    assert surprise_threshold_nats(SpiceConfig(surprise_threshold=None), 1000) is None
    with pytest.raises(ValueError, match="vocabulary size"):
        surprise_threshold_nats(SpiceConfig(), None)
    losses = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="max_token_losses"):
        candidate_guards(losses, torch.tensor([1, 1]), SpiceConfig(), vocab_size=10)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        candidate_guards(losses, torch.tensor([1, 1, 1]), SpiceConfig(surprise_threshold=None))
    for bad in ("log", "unifrom", -1.0, 0, float("inf"), True):  # one message, listing what is valid
        with pytest.raises(ValueError, match=r"surprise_threshold must be 'uniform', a number of nats > 0 or None"):
            SpiceConfig(surprise_threshold=bad)
