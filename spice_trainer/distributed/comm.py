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
  state. Communication per pick: ``world · 6 · 8`` bytes (the table: six float64 per rank) + ``d · 8`` bytes
  (the broadcast), as `spice_trainer.distributed.greedy.distributed_bytes_per_pick` counts it.
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

import logging
import os
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    pass

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


def gather_bytes(n: int, proj_dim: int) -> int:
    """Payload each rank receives for gather-then-greedy: the whole ``(n, d)`` float32 matrix, once."""
    return n * proj_dim * 4
