"""How well a proxy stands in for the live model: rank correlation of base gains and overlap of picks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spice_trainer.config import SpiceConfig
from spice_trainer.features.batches import Collator
from spice_trainer.features.gradients import GradientFeatures, adam_or_unit, compute_gradient_features, unit_rows
from spice_trainer.proxy.model import ProxyModel

#: Candidates in the agreement probe (seeded by ``config.seed``; the same rows every round).
PROBE_SIZE = 64

__all__ = ["PROBE_SIZE", "Agreement", "probe_rows", "proxy_agreement", "spearman"]


@dataclass
class Agreement:
    """How well the proxy stands in for the live model on a probe of candidates.

    Attributes:
        rank_corr: Spearman rank correlation of the base gains ``b_x = log(1 + α‖g_x‖²)`` (the first greedy
            step's gains, ``Δ_x(∅) = b_x``) of the probe rows with finite features under both models.
        overlap: ``|picks_proxy ∩ picks_target| / k`` for ``k`` greedy picks made on each model's features.
        jaccard: ``|∩| / |∪|`` of the same picks.
        k: picks per model.
        probe_rows: the probe (dataset rows).
        proxy_picks: the proxy's picks (dataset rows, pick order).
        target_picks: the live model's picks.
        seconds: wall-clock time of the report (both gradient passes and both greedy runs).
    """

    rank_corr: float
    overlap: float
    jaccard: float
    k: int
    probe_rows: list[int] = field(default_factory=list)
    proxy_picks: list[int] = field(default_factory=list)
    target_picks: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank_corr": self.rank_corr,
            "overlap": self.overlap,
            "jaccard": self.jaccard,
            "k": self.k,
            "probe_rows": self.probe_rows,
            "proxy_picks": self.proxy_picks,
            "target_picks": self.target_picks,
            "seconds": self.seconds,
        }


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's ρ of two ``(m,)`` samples (`scipy.stats.spearmanr`: ties get average ranks).

    NaN when ``m < 2`` or either sample is constant.
    """
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"spearman needs two 1-D samples of the same length, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.numel() < 2:
        return float("nan")
    import warnings

    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # NaN is the documented answer
        return float(stats.spearmanr(x.double().cpu().numpy(), y.double().cpu().numpy()).statistic)


def probe_rows(n: int, config: SpiceConfig, size: int = PROBE_SIZE) -> list[int]:
    """``min(size, n)`` distinct rows drawn with a local generator seeded by ``config.seed`` (sorted)."""
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    return sorted(torch.randperm(n, generator=gen)[: min(size, n)].tolist())


def proxy_agreement(
    proxy: ProxyModel,
    target: nn.Module,
    dataset: Any,
    config: SpiceConfig,
    data_collator: Collator | None = None,
    *,
    probe_size: int = PROBE_SIZE,
    picks: int | None = None,
    target_optimizer: torch.optim.Optimizer | None = None,
) -> Agreement:
    """Compare the proxy's and the live model's SPICE gains on a seeded probe of candidates.

    Both models' gradients of the probe rows (`probe_rows`) are computed with ``config`` (raw: ``feature_norm=
    "unit"`` normalises them afterwards); ``rank_corr`` is Spearman's ρ of the base gains of the raw gradients
    (unit features would all have the same), and each model's own candidate guards and exact greedy (no
    early stopping) pick ``k`` rows (default ``⌊m / 4⌋``: enough picks that one or two do not dominate the overlap, few
    enough that the choice is selective) for ``overlap`` and ``jaccard``. Neither model's weights,
    ``.grad``s or optimizer state change.

    Raises:
        ValueError: the target has no LoRA adapter (see `find_lora_weights`).
    """
    from spice_trainer.core.greedy import select_from_features
    from spice_trainer.pipeline import row_guards

    start = time.perf_counter()
    rows = probe_rows(len(dataset), config, probe_size)
    m = len(rows)
    k = max(1, m // 4) if picks is None else min(int(picks), m)
    probe_cfg = config.with_changes(budget=k, greedy="exact", stop_rule="none", stop_ratio=None, feature_store=None)
    unit = probe_cfg.feature_norm == "unit"
    if unit:  # the base gains of raw gradients tell rows apart; unit features are normalised below, for the picks
        probe_cfg = probe_cfg.with_changes(feature_norm="none")
    proxy_cfg = proxy.feature_config(probe_cfg)
    target_cfg = adam_or_unit(probe_cfg, target_optimizer)
    if proxy_cfg.feature_norm != target_cfg.feature_norm:  # one side has no Adam moments yet: both measure "unit"
        proxy_cfg = target_cfg = probe_cfg.with_changes(feature_norm="unit")
    ours = proxy.features(dataset, proxy_cfg, data_collator, indices=rows)
    theirs = compute_gradient_features(
        target, dataset, target_cfg, data_collator, indices=rows, optimizer=target_optimizer, show_progress=False
    )
    both = torch.isfinite(ours.features).all(dim=1) & torch.isfinite(theirs.features).all(dim=1)
    alpha = config.fisher_scale
    b_proxy = torch.log1p(alpha * ours.features[both].double().square().sum(dim=1))
    b_target = torch.log1p(alpha * theirs.features[both].double().square().sum(dim=1))
    rho = spearman(b_proxy, b_target)

    def picks_of(grads: GradientFeatures, cfg: SpiceConfig) -> list[int]:
        finite = torch.isfinite(grads.features).all(dim=1)
        if not bool(finite.any()) or not bool(grads.features[finite].any()):
            return []
        features = grads.features
        if unit:
            features = unit_rows(features)
        guards = row_guards(grads, cfg)
        chosen = select_from_features(guards.scale(features), cfg, eligible=guards.eligible)
        return [rows[i] for i in chosen.indices]

    proxy_picks, target_picks = picks_of(ours, proxy_cfg), picks_of(theirs, target_cfg)
    common = len(set(proxy_picks) & set(target_picks))
    union = len(set(proxy_picks) | set(target_picks))
    return Agreement(
        rank_corr=rho,
        overlap=common / k,
        jaccard=common / union if union else float("nan"),
        k=k,
        probe_rows=rows,
        proxy_picks=proxy_picks,
        target_picks=target_picks,
        seconds=time.perf_counter() - start,
    )
