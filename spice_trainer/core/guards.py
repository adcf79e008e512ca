"""Candidate guards: which rows may be picked, and how much each eligible row is trusted.

The greedy measures information with the rows' gradients; the guards decide what it may measure. Two kinds:

- **exclusions** (a row is never picked), each recorded per row in `Selection.excluded` under its first
  reason, in this order: ``"no_supervised_token"``, ``"non_finite_loss"``, ``"non_finite_gradient"``,
  ``"solved"`` (mean loss at or below ``min_loss``: nothing left to learn), ``"loss_cap"`` (the optional
  ``max_loss_quantile`` cap).
- **trust weights** (a row stays eligible and counts less): a label the model finds *surprising* — its least
  likely supervised token has surprisal ``m = −log p`` above ``τ`` = ``surprise_threshold`` nats
  (``"uniform"``: ``τ = log V``, a token less likely than a uniform guess over the model's ``V`` outputs) —
  contradicts what the model believes, and mislabeled, junk and other-rule rows are exactly such rows. The
  row's weight is ``w = exp(τ − m) = p / e^{−τ}`` (its least likely token's probability over the threshold
  probability), its feature is scaled by ``√w`` so that its Fisher contribution ``g gᵀ`` is scaled by ``w``.
  Weights are recorded in `Selection.down_weighted_rows` / `Selection.down_weights`.

A correct row the model confidently gets wrong looks the same to a single forward pass as a wrong label; the
weight does not exclude it, it only lets the trusted rows go first, so a task whose every row surprises the
model is still reached once the trusted directions are covered. Imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from spice_trainer.config import SpiceConfig

__all__ = ["EXCLUSION_REASONS", "Guards", "candidate_guards", "surprise_threshold_nats"]

#: Why a row is never eligible, in the order the reasons are checked (a row is recorded under the first).
EXCLUSION_REASONS: tuple[str, ...] = (
    "no_supervised_token",
    "non_finite_loss",
    "non_finite_gradient",
    "solved",
    "loss_cap",
)


@dataclass
class Guards:
    """What the guards decided for a pool of ``n`` rows.

    Attributes:
        eligible: ``(n,)`` bool, the rows the greedy may pick.
        weights: ``(n,)`` float64 trust weights in ``(0, 1]`` (1 for ineligible rows too, which never count).
        excluded: reason -> rows (ascending), every ineligible row under its first reason.
        threshold: the surprise threshold ``τ`` in nats that was applied (`None` when trust is off).
    """

    eligible: torch.Tensor
    weights: torch.Tensor
    excluded: dict[str, list[int]] = field(default_factory=dict)
    threshold: float | None = None

    @property
    def down_weighted(self) -> tuple[list[int], list[float]]:
        """``(rows, weights)`` of the eligible rows whose weight is below 1, rows ascending."""
        rows = (self.eligible & (self.weights < 1.0)).nonzero().flatten()
        return rows.tolist(), self.weights[rows].tolist()

    def counts(self) -> dict[str, int]:
        """Rows per exclusion reason, plus ``"down_weighted"``."""
        out = {reason: len(rows) for reason, rows in self.excluded.items()}
        out["down_weighted"] = int((self.eligible & (self.weights < 1.0)).sum())
        return out

    def scale(self, features: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` with each row scaled by ``√w`` (``rows``: which pool rows ``features`` holds, for a
        shard or a pool; default every row). Returns ``features`` itself when every weight is 1."""
        weights = self.weights if rows is None else self.weights[rows]
        if bool((weights >= 1.0).all()):
            return features
        factor = weights.sqrt().to(device=features.device, dtype=features.dtype).unsqueeze(1)
        return features * factor


def surprise_threshold_nats(config: SpiceConfig, vocab_size: int | None) -> float | None:
    """``τ`` in nats for ``config.surprise_threshold`` (``"uniform"`` -> ``log V``), `None` when trust is off.

    Raises:
        ValueError: ``"uniform"`` without a known vocabulary size.
    """
    threshold = config.surprise_threshold
    if threshold is None:
        return None
    if threshold == "uniform":
        if vocab_size is None or vocab_size < 2:
            raise ValueError(
                f"surprise_threshold='uniform' needs the model's vocabulary size, got {vocab_size!r}; pass a "
                "threshold in nats (e.g. surprise_threshold=10.0) or surprise_threshold=None"
            )
        return math.log(vocab_size)
    return float(threshold)


def candidate_guards(
    losses: torch.Tensor,
    num_tokens: torch.Tensor,
    config: SpiceConfig,
    *,
    max_token_losses: torch.Tensor | None = None,
    vocab_size: int | None = None,
    finite_features: torch.Tensor | None = None,
) -> Guards:
    """Apply the guards of ``config`` to a pool.

    Args:
        losses: ``(n,)`` each row's mean loss per supervised token (NaN without one).
        num_tokens: ``(n,)`` supervised tokens per row.
        config: uses ``min_loss``, ``max_loss_quantile``, ``surprise_threshold`` and ``budget`` (the loss cap
            never leaves fewer eligible rows than the budget).
        max_token_losses: ``(n,)`` the surprisal of each row's least likely supervised token; required when
            ``config.surprise_threshold`` is set.
        vocab_size: the model's output vocabulary, for ``surprise_threshold="uniform"``.
        finite_features: ``(n,)`` bool, False for rows whose gradient features are not finite (`None`: all are).

    Raises:
        ValueError: a trust threshold without ``max_token_losses``, or shapes that do not match.
    """
    n = losses.shape[0]
    for name, value in (("num_tokens", num_tokens), ("max_token_losses", max_token_losses)):
        if value is not None and tuple(value.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},) like losses, got {tuple(value.shape)}")
    losses = losses.double().cpu()
    reasons = [
        ("no_supervised_token", num_tokens.cpu() <= 0),  # such a row's loss is NaN too: this reason first
        ("non_finite_loss", ~torch.isfinite(losses)),
    ]
    if finite_features is not None:
        reasons.append(("non_finite_gradient", ~finite_features.cpu()))
    if config.min_loss is not None:
        reasons.append(("solved", losses <= config.min_loss))
    excluded: dict[str, list[int]] = {}
    eligible = torch.ones(n, dtype=torch.bool)
    for reason, hit in reasons:
        newly = eligible & hit
        if bool(newly.any()):
            excluded[reason] = newly.nonzero().flatten().tolist()
        eligible &= ~hit
    if config.max_loss_quantile is not None and bool(eligible.any()):
        candidates = losses[eligible]
        cap = torch.quantile(candidates, config.max_loss_quantile).item()
        # The cap never shrinks the pool below the budget: on a clean pool few rows are unsolved.
        budget = min(config.budget_count(n), candidates.numel())
        cap = max(cap, torch.kthvalue(candidates, budget).values.item())
        capped = eligible & (losses > cap)
        if bool(capped.any()):
            excluded["loss_cap"] = capped.nonzero().flatten().tolist()
        eligible &= ~capped
    weights = torch.ones(n, dtype=torch.float64)
    threshold = surprise_threshold_nats(config, vocab_size)
    if threshold is not None:
        if max_token_losses is None:
            raise ValueError(
                "surprise_threshold needs each row's least likely token (max_token_losses); pass them, or "
                "surprise_threshold=None"
            )
        surprise = max_token_losses.double().cpu()
        excess = (surprise - threshold).clamp_min(0.0)
        weights = torch.where(eligible & torch.isfinite(surprise), torch.exp(-excess), weights)
    return Guards(eligible=eligible, weights=weights, excluded=excluded, threshold=threshold)
