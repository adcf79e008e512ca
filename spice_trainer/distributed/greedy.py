"""The distributed exact greedy: candidates sharded across ranks, every pick agreed by all of them.

It is a `spice_trainer.core.greedy.CandidateSource` (`ShardedSource`) run by the one greedy loop
(`spice_trainer.core.greedy.run_greedy`), so the stopping rule and the `Selection` are the single-process ones.
See `spice_trainer.distributed.comm` for the strategy (gather-then-greedy vs this) and the collectives.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from spice_trainer.config import SpiceConfig
from spice_trainer.core.greedy import (
    TIE,
    Candidate,
    ExactSource,
    RowCheck,
    check_initial,
    check_usable,
    greedy_threads,
    progress_bar,
    run_greedy,
    selection_from_run,
    usable_rows,
)
from spice_trainer.core.objective import SpiceObjective
from spice_trainer.core.selection import Selection
from spice_trainer.core.stopping import StoppingRule, stopping_rule
from spice_trainer.distributed.comm import (
    all_gather_ints,
    all_gather_table,
    broadcast_tensor,
    collective_device,
    gather_rows,
    is_distributed,
    is_main_process,
    rank,
    world_size,
)

__all__ = ["ShardedSource", "distributed_bytes_per_pick", "distributed_greedy"]


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
    conflict_reference: torch.Tensor | None = None,
    stopping: StoppingRule | None = None,
    show_progress: bool = False,
) -> Selection:
    """Exact SPICE greedy over candidates sharded across ranks; the same `Selection` on every rank.

    Every rank holds the features of its own rows only and the full set state (``M⁻¹`` or the dual
    Cholesky factor, ``Σ_S g``; ``O(d²)`` or ``O(k d)``), and runs the one greedy loop
    (`spice_trainer.core.greedy.run_greedy`) over a `ShardedSource`: each rank's best row by the configured
    search (``config.exact_search``), one all_gather to agree on the winner, one broadcast of its vector.

    The set state sees the same vectors in the same order on every rank and in a single process, the
    searches are exact, and every candidate's numbers are evaluated alone from the set state, so the picks
    and the numbers equal `select_from_features` with ``greedy="exact"`` on the concatenated features. The
    stopping rule sees the same candidates and history on every rank, so every rank stops at the same step.

    Args:
        local_features: ``(m_r, d)`` features of this rank's rows (non-finite rows are never picked).
        rows: the global indices of those rows, strictly increasing; the ranks' rows partition ``range(n)``.
        n: the number of candidates over all ranks.
        config: the selection settings (``greedy`` is treated as ``"exact"``).
        initial: global rows already selected (mode ``"grow"``), inserted first, in order.
        local_eligible: ``(m_r,)`` bool mask over this rank's rows; `None` = all finite rows.
        reference_gain: base of the ``ω`` rule; `None` = the first pick's ``Δ``.
        conflict_reference: ``(d,)`` a fixed conflict direction (the same on every rank), as in
            `select_from_features`.
        stopping: the stopping rule of this run (a fresh object per rank); `None` = `stopping_rule(config)`.
        show_progress: a tqdm bar on rank 0.

    Returns:
        The `Selection` (identical lists on every rank); ``metadata["distributed"]`` holds the world size,
        the strategy and the bytes sent per pick.

    Raises:
        ValueError: shapes or rows inconsistent across ranks, or the same input errors as
            `select_from_features` (budget above ``n``, bad ``initial``, every row non-finite).
    """
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
    # The single-process checks on the whole pool: each rank checks its rows, every rank reads all of them
    # (n flags and norms), so every rank raises the same error or skips the same rows.
    mine = usable_rows(local_features, config.fisher_scale) if m else None
    parts = (
        (mine.finite, mine.usable, mine.nonzero, mine.sqnorms)
        if mine is not None
        else (torch.zeros(0, dtype=torch.bool),) * 3 + (torch.zeros(0, dtype=torch.float64),)
    )
    check = RowCheck(*(gather_rows(part.cpu()) for part in parts))
    skipped = check_usable(check, config.fisher_scale, warn=is_main_process())
    usable = mine.usable if mine is not None else torch.zeros(0, dtype=torch.bool, device=device)
    clean = torch.where(usable.unsqueeze(1), local_features, torch.zeros((), dtype=local_features.dtype))
    init = check_initial(initial, n, skipped)
    position = {row: i for i, row in enumerate(row_list)}
    mask = usable.clone()
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
    n_eligible = sum(c[0] for c in all_gather_ints([int(mask.sum())]))

    to_pick = max(0, budget - len(init))
    # Same state and method choice as the single-process exact greedy ("auto": dual while k < d).
    objective = SpiceObjective(
        clean[:0],
        config.fisher_scale,
        capacity=len(init) + to_pick,
        conflict_weight=config.conflict_weight,
        conflict_reference=conflict_reference,
        rows="direct",
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
    initial_objective = objective.logdet
    local = ExactSource(objective, clean, mask, search=config.exact_search, rows=row_list)
    source = ShardedSource(local, d)
    rule = stopping if stopping is not None else stopping_rule(config)
    progress = progress_bar(to_pick, show_progress and is_main_process())
    try:
        with greedy_threads(config, device, n * d * to_pick):
            run = run_greedy(source, rule, to_pick, reference_gain=reference_gain, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    world = world_size()
    metadata: dict[str, Any] = {
        "greedy": "exact",
        "n_eligible": n_eligible,
        "budget": budget,
        "method": objective.method,
        "exact_search": config.exact_search,
        "seconds": time.perf_counter() - start,
        "distributed": {
            "world_size": world,
            "strategy": "distributed",
            "bytes_per_pick": distributed_bytes_per_pick(d, world),
        },
    }
    return selection_from_run(
        run,
        config,
        n_candidates=n,
        initial=init,
        skipped=skipped,
        initial_objective=initial_objective,
        metadata=metadata,
    )


class ShardedSource:
    """A `CandidateSource` over rows sharded across ranks: each rank's best, agreed by every rank.

    One pick:

    1. each rank asks its `ExactSource` (its shard, the configured search: the same rule as one process) for
       its best eligible unpicked row, with its numbers evaluated alone from the set state;
    2. one all_gather of ``(has, score, global row, Δ, c, b)`` per rank; every rank reads the same table
       and takes the winner: the highest score, ties (within `spice_trainer.core.greedy.TIE`) to the lowest
       global row, as one process does over rows in order; a table with no candidate ends the block;
    3. the loop offers the winner to the stopping rule on every rank (same numbers, same decision);
    4. `accept`: the owner broadcasts ``g_j: (d,)`` (float64) and every rank adds it to its set state and its
       rows' state; the owner takes the row out of its search.

    Args:
        local: this rank's source (its rows carry their global indices).
        dim: ``d``.
    """

    def __init__(self, local: ExactSource, dim: int) -> None:
        self.local = local
        self.dim = dim
        self.rank = rank()
        self.owner = -1

    def propose(self) -> Candidate | None:
        entry = torch.zeros(_TABLE_WIDTH, dtype=torch.float64)
        mine = self.local.propose()
        if mine is not None:
            entry[_HAS] = 1.0
            entry[_SCORE] = mine.score
            entry[_ROW] = float(mine.row)
            entry[_GAIN] = mine.gain
            entry[_CONFLICT] = mine.conflict
            entry[_BASE] = mine.base
        table = all_gather_table(entry)
        owner = _winner(table)
        if owner is None:
            return None
        self.owner = owner
        win = table[owner].tolist()
        return Candidate(int(win[_ROW]), win[_GAIN], win[_CONFLICT], win[_SCORE], win[_BASE])

    def accept(self, candidate: Candidate) -> None:
        position = self.local.position_of(candidate.row) if self.owner == self.rank else None
        vector = self.local.objective.vector(position) if position is not None else None
        g = broadcast_tensor(vector, self.owner, shape=(self.dim,), dtype=torch.float64)
        self.local.insert(g.to(self.local.objective.device), position)

    def next_block(self) -> bool:
        return False

    def metadata(self) -> dict[str, Any]:
        return self.local.metadata()


def _winner(table: torch.Tensor) -> int | None:
    """The rank whose candidate wins: the lowest global row among the candidates within `TIE` of the highest
    score (the single-process rule); `None` if no rank has a candidate."""
    entries = [row for row in table.tolist() if row[_HAS]]
    if not entries:
        return None
    top = max(row[_SCORE] for row in entries)
    tied = [row for row in entries if row[_SCORE] >= top - TIE * abs(top)]
    row = min(tied, key=lambda entry: entry[_ROW])[_ROW]
    return next(r for r, entry in enumerate(table.tolist()) if entry[_HAS] and entry[_ROW] == row)


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
