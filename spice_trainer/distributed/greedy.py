"""The distributed exact greedy: candidates sharded across ranks, every pick agreed by all of them.

See `spice_trainer.distributed.comm` for the strategy (gather-then-greedy vs this) and the collectives.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from spice_trainer.config import SpiceConfig
from spice_trainer.distributed.comm import (
    all_gather_ints,
    all_gather_table,
    any_rank,
    broadcast_tensor,
    collective_device,
    gather_rows,
    is_distributed,
    is_main_process,
    world_size,
)

if TYPE_CHECKING:
    from spice_trainer.core.selection import Selection, StopReason

logger = logging.getLogger(__name__)


# --- the distributed exact greedy ----------------------------------------------------------------

# Columns of the per-pick table every rank contributes (float64; row indices are exact below 2**53).
_HAS, _SCORE, _ROW, _GAIN, _CONFLICT, _BASE = range(6)
_TABLE_WIDTH = 6


def distributed_greedy(
    local_features: torch.Tensor,
    rows: range | Sequence[int],
    n: int,
    config: SpiceConfig,
    *,
    initial: Sequence[int] | None = None,
    local_eligible: torch.Tensor | None = None,
    reference_gain: float | None = None,
    show_progress: bool = False,
) -> Selection:
    """Exact SPICE greedy over candidates sharded across ranks; the same `Selection` on every rank.

    Every rank holds the features of its own rows only and the full set state (``M⁻¹`` or the dual
    Cholesky factor, ``Σ_S g``; ``O(d²)`` or ``O(k d)``). One pick:

    1. each rank takes its best eligible unpicked row with `spice_trainer.core.greedy.best_candidate`, the same
       rule as one process: its rows' scores ``Δ_x(S) − λ c_x(S)`` screen (float32 row state), the few best
       are re-scored exactly in float64 from the set state, and their argmax is the rank's candidate;
    2. one all_gather of ``(has, score, global row, Δ, c, b)`` per rank; every rank reads the same table
       and takes the winner: the highest score, ties to the lowest global row (as `torch.argmax` does in a
       single process over rows in order);
    3. the early-stopping rule (`spice_trainer.core.greedy`'s, the same code) runs on the winner's numbers, so
       every rank stops at the same step; a table with no candidate ends the run as ``"exhausted"``;
    4. the owner broadcasts ``g_j: (d,)`` (float64) and every rank applies it: ``objective.add(g_j)``
       (Sherman-Morrison / Cholesky extension of the set state, ``s_i`` and ``g_iᵀΣ_S g`` for its rows).

    The set state sees the same vectors in the same order on every rank and in a single process, each
    row's state is updated with the same arithmetic, and the winner's numbers are the exact float64 ones,
    so the picks equal `select_from_features` with ``greedy="exact"`` on the concatenated features. The
    only possible difference: one process re-scores its global top few screened rows, ``w`` ranks re-score
    each their own top few (a superset); they could disagree only if float32 screening ranked the exact
    winner below several candidates that tie with it to within float32 rounding.

    Args:
        local_features: ``(m_r, d)`` features of this rank's rows (non-finite rows are never picked).
        rows: the global indices of those rows, strictly increasing; the ranks' rows partition ``range(n)``.
        n: the number of candidates over all ranks.
        config: the selection settings (``greedy`` is treated as ``"exact"``).
        initial: global rows already selected (mode ``"grow"``), inserted first, in order.
        local_eligible: ``(m_r,)`` bool mask over this rank's rows; `None` = all finite rows.
        reference_gain: base of early stopping; `None` = the first pick's ``Δ``.
        show_progress: a tqdm bar on rank 0.

    Returns:
        The `Selection` (identical lists on every rank); ``metadata["distributed"]`` holds the world size,
        the strategy and the bytes sent per pick.

    Raises:
        ValueError: shapes or rows inconsistent across ranks, or the same input errors as
            `select_from_features` (budget above ``n``, bad ``initial``, every row non-finite).
    """
    from spice_trainer.core.greedy import _check_initial, _progress, _Run, best_candidate
    from spice_trainer.core.objective import SpiceObjective
    from spice_trainer.core.selection import Selection

    start = time.perf_counter()
    if local_features.ndim != 2 or not local_features.is_floating_point():
        raise ValueError(
            f"local_features must be a 2-D floating tensor (m, d), got shape {tuple(local_features.shape)} "
            f"and dtype {local_features.dtype}"
        )
    row_list = list(rows)
    m, d = local_features.shape
    if len(row_list) != m:
        raise ValueError(f"rows has {len(row_list)} entries but local_features has {m} rows; pass one index per row")
    if any(b <= a for a, b in itertools.pairwise(row_list)):
        raise ValueError("rows must be strictly increasing global indices (e.g. the range from shard_rows)")
    shapes = all_gather_ints([m, d, n])
    if sum(s[0] for s in shapes) != n or any(s[1] != d or s[2] != n for s in shapes):
        raise ValueError(
            f"ranks disagree on the candidate pool: (rows, proj_dim, n) per rank = {shapes}; every rank must pass "
            f"the same n and proj_dim, and the ranks' rows must partition range(n)"
        )
    device = local_features.device
    budget = config.budget_count(n)
    finite = torch.isfinite(local_features).all(dim=1) if m else torch.zeros(0, dtype=torch.bool, device=device)
    local_skipped = [row_list[i] for i in (~finite).nonzero().flatten().tolist()]
    skipped = sorted(gather_rows(torch.tensor(local_skipped, dtype=torch.int64)).tolist())
    if len(skipped) == n:
        raise ValueError(
            f"every row of features ({n} rows) has a NaN or inf entry; nothing can be selected. "
            "Check the gradient pass (e.g. a diverged model or a loss of inf)"
        )
    clean = torch.where(finite.unsqueeze(1), local_features, torch.zeros((), dtype=local_features.dtype))
    if not any_rank(bool(clean.any())):
        raise ValueError(
            f"every finite row of features ({n - len(skipped)} of {n}) is exactly zero, so every gain is 0 and "
            "there is nothing to select on. The gradients carry no signal: check that the loss reaches the LoRA "
            "adapter (both lora_A and lora_B at zero, a disabled/merged adapter, or every label masked)"
        )
    init = _check_initial(initial, n, skipped)
    position = {row: i for i, row in enumerate(row_list)}
    mask = finite.clone()
    if local_eligible is not None:
        if local_eligible.dtype != torch.bool or tuple(local_eligible.shape) != (m,):
            raise ValueError(
                f"local_eligible must be a bool tensor of shape ({m},), got {local_eligible.dtype} "
                f"{tuple(local_eligible.shape)}"
            )
        mask &= local_eligible.to(device)
    for row in init:
        if row in position:
            mask[position[row]] = False
    remaining = int(mask.sum())
    n_eligible = sum(c[0] for c in all_gather_ints([remaining]))
    if skipped:
        logger.warning("spice: %d of %d rows have non-finite features; they are never picked", len(skipped), n)

    to_pick = max(0, budget - len(init))
    capacity = len(init) + to_pick
    run = _Run(conflict_weight=config.conflict_weight, stop_ratio=config.stop_ratio, stop_on=config.stop_on)
    run.reference = reference_gain
    run.reference_given = reference_gain is not None
    # Same state and method choice as the single-process exact greedy ("auto": dual while k < d).
    objective = SpiceObjective(
        clean, config.fisher_scale, capacity=capacity, conflict_weight=config.conflict_weight, rows="incremental"
    )
    if init:
        # Every rank needs every initial vector, in order: owners fill their rows, one all_reduce(SUM).
        block = torch.zeros(len(init), d, dtype=torch.float64)
        for i, row in enumerate(init):
            if row in position:
                block[i] = clean[position[row]].to("cpu", torch.float64)
        block = _all_reduce_sum(block)
        for i in range(len(init)):
            objective.add(block[i].to(device))
    run.initial_logdet = objective.logdet
    base_gains: list[float] = []
    progress = _progress(to_pick, show_progress and is_main_process())
    reason: StopReason = "budget"
    try:
        for _ in range(to_pick):
            entry = torch.zeros(_TABLE_WIDTH, dtype=torch.float64)
            if remaining > 0:
                # The same pick rule as the single-process greedy (float32 screening, exact float64 decision).
                at, _, _, _ = best_candidate(objective, ~mask, remaining)
                # The winner's numbers from the set state alone, as the single-process exact greedy records them.
                gain_j, conflict_j, score_j = (value[0] for value in objective.scores_at(at.reshape(1)))
                j = int(at)
                entry[_HAS] = 1.0
                entry[_SCORE] = score_j
                entry[_ROW] = float(row_list[j])
                entry[_GAIN] = gain_j
                entry[_CONFLICT] = conflict_j
                entry[_BASE] = objective.base_gains_at(at.reshape(1))[0]  # as select_from_features computes b
            table = all_gather_table(entry)
            owner = _winner(table)
            if owner is None:
                reason = "exhausted"
                break
            win = table[owner]
            gain, score = float(win[_GAIN]), float(win[_SCORE])
            if run.should_stop(gain, score):
                reason = "early_stop"
                break
            row = int(win[_ROW])
            local = position.get(row)
            g = broadcast_tensor(clean[local] if local is not None else None, owner, shape=(d,), dtype=torch.float64)
            objective.add(g.to(device))
            if local is not None:
                mask[local] = False
                remaining -= 1
            run.record(row, win[_GAIN].clone(), win[_CONFLICT].clone())
            base_gains.append(float(win[_BASE]))
            if progress is not None:
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()

    gains_list = [float(g) for g in run.gains]
    conflicts_list = [float(c) for c in run.conflicts]
    lam = config.conflict_weight
    objective_curve = np.cumsum([run.initial_logdet, *gains_list])[1:].tolist()
    world = world_size()
    metadata: dict[str, Any] = {
        "greedy": "exact",
        "n_eligible": n_eligible,
        "budget": budget,
        "method": objective.method,
        "reference_gain": run.reference,
        "initial_objective": run.initial_logdet,
        "seconds": time.perf_counter() - start,
        "distributed": {
            "world_size": world,
            "strategy": "distributed",
            "bytes_per_pick": distributed_bytes_per_pick(d, world),
        },
    }
    return Selection.from_picks(
        indices=list(run.indices),
        gains=gains_list,
        base_gains=base_gains,
        conflicts=conflicts_list,
        conflict_weight=lam,
        objective=objective_curve,
        stop_reason=reason,
        n_candidates=n,
        skipped=skipped,
        initial=init,
        config=config.to_dict(),
        metadata=metadata,
    )


def _winner(table: torch.Tensor) -> int | None:
    """The rank whose candidate wins: highest score, ties to the lowest global row; `None` if no candidate."""
    best: int | None = None
    for r in range(table.shape[0]):
        if table[r, _HAS] == 0:
            continue
        if best is None:
            best = r
            continue
        score, top = float(table[r, _SCORE]), float(table[best, _SCORE])
        if score > top or (score == top and table[r, _ROW] < table[best, _ROW]):
            best = r
    return best


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return tensor
    buf = tensor.to(collective_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def distributed_bytes_per_pick(proj_dim: int, world: int) -> int:
    """Bytes each rank sends per pick in `distributed_greedy`: its table row plus (owner) the ``d`` float64 vector.

    Counted as payload (what the collectives carry into every rank): the all_gather delivers
    ``world × 6`` float64 to each rank, the broadcast ``d`` float64.
    """
    return world * _TABLE_WIDTH * 8 + proj_dim * 8
