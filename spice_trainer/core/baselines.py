"""Selection baselines to compare SPICE against: random, small-loss, gradient norm, reference similarity.

Plain tensor math on what the gradient pass already gives (`spice_trainer.features.gradients.GradientFeatures`:
``features: (n, d)`` projected per-example LoRA gradients and ``losses: (n,)``), so they cost nothing beyond
the features SPICE computes anyway. Each returns row indices in rank order (best first); ties go to the lower
index. Rows with a non-finite loss or feature are never picked.

========================  ===========================================================================================
baseline                  picks
========================  ===========================================================================================
`random_rows`             ``k`` rows uniformly at random (a seeded local generator)
`small_loss_rows`         the ``k`` lowest-loss rows above a solved floor (the small-loss criterion, Han et al. 2018)
`gradient_norm_rows`      the ``k`` rows with the largest gradient norm (the SPICE paper's shipped example ranks so)
`reference_similarity`    LESS-style (Xia et al. 2024): the ``k`` rows whose gradient has the largest cosine with the
                          mean gradient of a small trusted reference set
========================  ===========================================================================================

Imports only torch.
"""

from __future__ import annotations

import torch

__all__ = ["gradient_norm_rows", "random_rows", "reference_similarity_rows", "small_loss_rows", "top_k_rows"]


def top_k_rows(scores: torch.Tensor, k: int, *, eligible: torch.Tensor | None = None) -> list[int]:
    """The ``k`` highest-scoring eligible rows, best first; equal scores go to the lower index.

    Args:
        scores: ``(n,)``; non-finite scores are never picked.
        k: how many rows (fewer are returned when fewer are eligible).
        eligible: optional ``(n,)`` bool mask.

    Raises:
        ValueError: for ``k < 1`` or a mask of another length.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    scores = scores.detach().to("cpu", torch.float64).reshape(-1)
    keep = torch.isfinite(scores)
    if eligible is not None:
        if eligible.shape != scores.shape:
            raise ValueError(f"eligible must have shape {tuple(scores.shape)}, got {tuple(eligible.shape)}")
        keep &= eligible.to("cpu", torch.bool)
    candidates = torch.nonzero(keep).flatten()
    # A stable sort on -score keeps the index order among equal scores.
    order = torch.sort(-scores[candidates], stable=True).indices
    return candidates[order][:k].tolist()


def random_rows(n: int, k: int, *, seed: int = 0) -> list[int]:
    """``min(k, n)`` distinct rows of ``range(n)`` drawn uniformly with a local generator seeded by ``seed``."""
    if n < 1 or k < 1:
        raise ValueError(f"n and k must be >= 1, got n={n!r}, k={k!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].tolist()


def small_loss_rows(losses: torch.Tensor, k: int, *, min_loss: float = 0.1) -> list[int]:
    """The ``k`` lowest-loss rows whose loss is above ``min_loss`` (the rows below it are already solved).

    Args:
        losses: ``(n,)`` mean loss per supervised token of each row.
        k: how many rows (fewer when fewer rows are above the floor).
        min_loss: the solved floor in nats per token.
    """
    losses = losses.detach().to("cpu", torch.float64).reshape(-1)
    return top_k_rows(-losses, k, eligible=losses > min_loss)


def gradient_norm_rows(features: torch.Tensor, k: int) -> list[int]:
    """The ``k`` rows with the largest gradient-feature norm ``‖g_i‖`` (``features: (n, d)``)."""
    if features.ndim != 2:
        raise ValueError(f"features must be (n, d), got shape {tuple(features.shape)}")
    return top_k_rows(features.detach().double().norm(dim=1), k)


def reference_similarity_rows(features: torch.Tensor, reference: torch.Tensor, k: int) -> list[int]:
    """The ``k`` rows whose gradient is most aligned with the reference set's mean gradient (LESS-style).

    Score ``cos(g_i, ḡ_ref) = g_iᵀ ḡ_ref / (‖g_i‖ ‖ḡ_ref‖)``, ``ḡ_ref`` the mean of the finite reference rows.
    Rows with a zero gradient score 0.

    Args:
        features: ``(n, d)`` candidate gradient features.
        reference: ``(m, d)`` gradient features of the trusted reference rows, same projection.
        k: how many rows.

    Raises:
        ValueError: mismatched dimensions, or no finite reference row, or a zero mean reference gradient.
    """
    if features.ndim != 2 or reference.ndim != 2 or features.shape[1] != reference.shape[1]:
        raise ValueError(
            "features (n, d) and reference (m, d) must share d, "
            f"got {tuple(features.shape)} and {tuple(reference.shape)}"
        )
    ref = reference.detach().double()
    ref = ref[torch.isfinite(ref).all(dim=1)]
    if ref.shape[0] == 0:
        raise ValueError("the reference set has no row with a finite gradient feature")
    direction = ref.mean(dim=0)
    norm = direction.norm()
    if norm == 0:
        raise ValueError("the reference rows' mean gradient is zero: there is no direction to compare with")
    feats = features.detach().double()
    scores = feats @ (direction / norm) / feats.norm(dim=1).clamp_min(1e-300)
    return top_k_rows(scores, k)
