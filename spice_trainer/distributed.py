"""Selection across processes: shard the candidates, gather or score them in place, agree on every pick.

Under ``torchrun``, ``accelerate launch``, DeepSpeed or FSDP every rank runs the same selection
round. The gradient pass is the expensive part, so each rank computes features for its own shard of
the candidates (`shard_rows`); then either

- **gather-then-greedy** (`gather_rows`): every rank receives all ``n × d`` features (all_gather, padded
  for uneven shards) and runs the single-process greedy on identical input, so the picks are identical
  by construction. Communication: ``n · d · 4`` bytes once (float32), nothing per pick. Memory: the
  whole ``(n, d)`` matrix on every rank.
- **distributed greedy** (`distributed_greedy`): each rank keeps only its shard's rows and row state.
  Per pick: every rank scores its shard through the objective, the best ``(score, global index)`` and the
  pick's numbers are agreed with one all_gather of a few float64 per rank, the owner broadcasts the
  picked feature vector ``g_j: (d,)``, and every rank applies the same vector to its copy of the set
  state. Communication per pick: ``world · 8 · 8`` bytes (the table) + ``d · 8`` bytes (the broadcast).
  Memory: ``n · d / world`` per rank.

`choose_strategy` picks gather-then-greedy while the whole matrix is small enough to hold on every rank:
``n · d · 4 bytes <= gather_limit_bytes`` (default 1 GiB, e.g. 1M candidates at d = 256; override with
the environment variable ``SPICE_GATHER_LIMIT_BYTES``), else the distributed greedy.

Every decision that ends or shapes the loop (which row wins, early stop, exhaustion) is computed from
the same gathered table on every rank, so all ranks take the same branch and no rank waits on a
collective the others skipped.

Collectives run over the default process group. Tensors are moved to the backend's device: CUDA for
NCCL (``torch.cuda.current_device()``), CPU for gloo/mpi; results come back on the caller's device.
Without an initialised process group (or with world size 1) everything here is a no-op.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from spice_trainer.config import SpiceConfig

if TYPE_CHECKING:
    from spice_trainer.selection import Selection, StopReason

logger = logging.getLogger(__name__)

Strategy = Literal["gather", "distributed"]

#: Default bound on ``n · d · 4`` bytes for gather-then-greedy (see `choose_strategy`).
DEFAULT_GATHER_LIMIT_BYTES = 1 << 30
GATHER_LIMIT_ENV = "SPICE_GATHER_LIMIT_BYTES"


# --- ranks -------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True when a default process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes in the default group; 1 without torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group; 0 without torch.distributed."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def collective_device() -> torch.device:
    """The device tensors must be on for collectives of the default group's backend.

    NCCL only moves CUDA tensors, gloo and MPI work on CPU tensors. A mixed backend such as
    ``"cuda:nccl,cpu:gloo"`` (accelerate's FSDP with CPU offload) accepts both; CUDA is used then.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- sharding ----------------------------------------------------------------------------------


def shard_bounds(num_items: int, num_shards: int, shard: int) -> tuple[int, int]:
    """``[start, stop)`` of shard ``shard`` when ``num_items`` are cut into ``num_shards`` contiguous parts.

    The first ``num_items % num_shards`` shards get one item more (sizes differ by at most one).
    """
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, num_shards), got shard={shard}, num_shards={num_shards}")
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    base, extra = divmod(num_items, num_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


def shard_rows(n: int, num_ranks: int, rank_id: int, *, chunk_rows: int = 1) -> range:
    """The candidate rows rank ``rank_id`` of ``num_ranks`` computes: one contiguous block.

    Rows are grouped in chunks of ``chunk_rows`` (the feature store's chunks; 1 without a store) and
    whole chunks are dealt out contiguously, balanced to within one chunk. Contiguous blocks keep the
    rank → rows map trivial (rank r holds ``[start_r, stop_r)``) and memmap writes sequential.

    Example: ``n = 10``, 3 ranks, ``chunk_rows = 1`` → ``range(0, 4)``, ``range(4, 7)``, ``range(7, 10)``.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    num_chunks = -(-n // chunk_rows)
    first, last = shard_bounds(num_chunks, num_ranks, rank_id)
    return range(min(n, first * chunk_rows), min(n, last * chunk_rows))


def shard_chunks(num_chunks: int, num_ranks: int, rank_id: int) -> range:
    """The chunk ids rank ``rank_id`` owns (the chunks of `shard_rows`)."""
    return range(*shard_bounds(num_chunks, num_ranks, rank_id))


def local_rows(n: int, *, chunk_rows: int = 1) -> range:
    """`shard_rows` for this process (all rows in a single process)."""
    return shard_rows(n, world_size(), rank(), chunk_rows=chunk_rows)


# --- collectives ---------------------------------------------------------------------------------


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``local`` along dim 0, in rank order (all_gather, padded for uneven shards).

    Args:
        local: ``(m_r, *rest)`` on any device; ``m_r`` may differ between ranks (even 0), ``rest`` may not.
            Bool tensors are sent as uint8 (gloo has no bool all_gather).

    Returns:
        ``(Σ_r m_r, *rest)`` on ``local``'s device with ``local``'s dtype; ``local`` itself in a single process.
    """
    if not is_distributed():
        return local
    device = collective_device()
    out_device, out_dtype = local.device, local.dtype
    send = local.to(device)
    if send.dtype == torch.bool:
        send = send.to(torch.uint8)
    sizes = all_gather_ints([send.shape[0]])
    counts = [int(row[0]) for row in sizes]
    width = max(counts)
    if send.shape[0] < width:
        pad = torch.zeros((width - send.shape[0], *send.shape[1:]), dtype=send.dtype, device=device)
        send = torch.cat([send, pad])
    buffers = [torch.empty_like(send) for _ in counts]
    dist.all_gather(buffers, send.contiguous())
    out = torch.cat([buf[:count] for buf, count in zip(buffers, counts, strict=True)])
    return out.to(device=out_device, dtype=out_dtype)


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's list of ints (same length on every rank), in rank order."""
    if not is_distributed():
        return [list(values)]
    device = collective_device()
    send = torch.tensor(values, dtype=torch.int64, device=device)
    buffers = [torch.empty_like(send) for _ in range(world_size())]
    dist.all_gather(buffers, send)
    return [[int(v) for v in buf.tolist()] for buf in buffers]


def all_gather_table(row: torch.Tensor) -> torch.Tensor:
    """Stack every rank's 1-D float64 ``row`` into ``(world, len(row))`` on CPU (same length on every rank)."""
    row = row.to(torch.float64).reshape(-1)
    if not is_distributed():
        return row.unsqueeze(0).cpu()
    device = collective_device()
    send = row.to(device)
    buffers = [torch.empty_like(send) for _ in range(world_size())]
    dist.all_gather(buffers, send)
    return torch.stack(buffers).cpu()


def broadcast_tensor(
    tensor: torch.Tensor | None, src: int, *, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` on every rank (others pass `None`); returned on CPU."""
    if not is_distributed():
        assert tensor is not None
        return tensor.detach().to("cpu", dtype).reshape(shape)
    device = collective_device()
    if rank() == src:
        assert tensor is not None
        buf = tensor.detach().to(device=device, dtype=dtype).reshape(shape).contiguous()
    else:
        buf = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buf, src=src)
    return buf.cpu()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (the object itself in a single process)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=collective_device())
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (all_reduce MAX)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_ranks(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on all of them (all_reduce MIN)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


# --- strategy ----------------------------------------------------------------------------------


def gather_limit_bytes() -> int:
    """The gather-then-greedy bound: ``$SPICE_GATHER_LIMIT_BYTES`` if set, else `DEFAULT_GATHER_LIMIT_BYTES`."""
    raw = os.environ.get(GATHER_LIMIT_ENV)
    if raw is None or raw == "":
        return DEFAULT_GATHER_LIMIT_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{GATHER_LIMIT_ENV} must be an integer number of bytes, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{GATHER_LIMIT_ENV} must be >= 0, got {value}")
    return value


def choose_strategy(n: int, proj_dim: int, *, limit_bytes: int | None = None) -> Strategy:
    """``"gather"`` when ``n · d · 4`` bytes (the float32 feature matrix) fit under the limit, else ``"distributed"``.

    Gathering costs every rank the whole matrix in memory but lets every greedy regime run unchanged
    and needs no communication per pick; the distributed greedy keeps ``n · d / world`` per rank and
    pays two small collectives per pick (see the module docstring for the byte counts).
    """
    limit = gather_limit_bytes() if limit_bytes is None else limit_bytes
    return "gather" if n * proj_dim * 4 <= limit else "distributed"


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

    1. each rank takes its best eligible unpicked row with `spice_trainer.greedy.best_candidate`, the same
       rule as one process: its rows' scores ``Δ_x(S) − λ c_x(S)`` screen (float32 row state), the few best
       are re-scored exactly in float64 from the set state, and their argmax is the rank's candidate;
    2. one all_gather of ``(has, score, global row, Δ, c, b)`` per rank; every rank reads the same table
       and takes the winner: the highest score, ties to the lowest global row (as `torch.argmax` does in a
       single process over rows in order);
    3. the early-stopping rule (`spice_trainer.greedy`'s, the same code) runs on the winner's numbers, so
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
    from spice_trainer.greedy import _check_initial, _progress, _Run, best_candidate
    from spice_trainer.objective import SpiceObjective
    from spice_trainer.selection import Selection

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
    objective = SpiceObjective(clean, config.fisher_scale, capacity=capacity, method="auto", track_rows=True)
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
                at, gain_j, conflict_j, score_j = best_candidate(objective, ~mask, remaining, config.conflict_weight)
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


def gather_bytes(n: int, proj_dim: int) -> int:
    """Payload each rank receives for gather-then-greedy: the whole ``(n, d)`` float32 matrix, once."""
    return n * proj_dim * 4
