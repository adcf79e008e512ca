"""`SpiceSampler`: the training sampler that draws the selected subset and replays recorded subset switches.

`spice_trainer.integrations.trainer.SpiceDataCallback` builds it from the first round and switches it after every
later round. Positions are counted in the sampler's own stream: epoch ``e``, position ``p`` is the ``p``-th index
the sampler yields in epoch ``e`` (before the trainer cuts the stream into batches and shards them over ranks).

Where a new subset applies. A round runs after optimizer step ``s``; by then the dataloader has already drawn
ahead of the trainer (accelerate looks one batch ahead, each dataloader worker prefetches ``prefetch_factor``
batches), by an amount that depends on those settings. So a switch is placed at the first position the trainer
has not *consumed* — ``s`` optimizer steps × gradient accumulation × the global batch, from the trainer's own
counters (`BatchLayout.consumed`) — the same for any number of workers and any prefetch factor. Batches that were
drawn before the switch but lie after it are re-collated from the rows the recorded history assigns to their
positions when the trainer takes them (`SpiceSampler.stale`, done by the callback), so the run trains exactly
the recorded history, and a resumed run (which draws under the full history from the start) the same.

Only torch is imported (accelerate's `BatchSamplerShard` is recognised by `BatchLayout` when it is used).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, Sampler

__all__ = ["BatchLayout", "SpiceSampler", "SubsetSwitch"]


@dataclass
class SubsetSwitch:
    """A subset and the first sample position ``(epoch, position)`` it applies to."""

    round: int
    epoch: int
    position: int
    rows: list[int]


class SpiceSampler(Sampler[int]):
    """Yields rows of the selected subset, ``num_samples`` per epoch, in a seeded order.

    Epoch ``e`` under subset round ``r`` draws a permutation of the subset from a local generator seeded
    by ``(seed, e, r)``: if the subset has more rows than ``num_samples`` (mode ``"grow"``) the first
    ``num_samples`` of the permutation are drawn, if fewer it cycles. A new subset (`switch_to`) applies
    from a given position on (see the module docstring for which), so the length — and the trainer's step
    count — never change. The same ``(history, epoch)`` gives the same sequence in every process, which is what
    accelerate's batch sharding needs.

    Args:
        rows: the first subset (row indices of the training dataset).
        seed: the order's seed (`SpiceConfig.seed`).
        num_samples: rows per epoch; defaults to ``len(rows)``.
    """

    def __init__(self, rows: Sequence[int], *, seed: int = 42, num_samples: int | None = None) -> None:
        if len(rows) == 0:
            raise ValueError("SpiceSampler needs at least one row; the selection is empty")
        self.seed = seed
        self.num_samples = int(num_samples if num_samples is not None else len(rows))
        self.history: list[SubsetSwitch] = [SubsetSwitch(0, 0, 0, [int(r) for r in rows])]
        self.epoch = 0
        #: ``(epoch, position)`` of the first sample the trainer has not consumed (set by the callback).
        self.consumed: tuple[int, int] = (0, 0)
        self._drawing_epoch: int | None = None
        self._drawn: list[int] = []  # the row yielded at each position of the running epoch, in order

    def __len__(self) -> int:
        return self.num_samples

    @property
    def rows(self) -> list[int]:
        """The current subset."""
        return self.history[-1].rows

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer (and the callback) at the start of every epoch."""
        self.epoch = int(epoch)

    def consumed_position(self) -> tuple[int, int]:
        """``(epoch, position)`` of the first sample the trainer has not consumed yet."""
        return self.consumed

    def switch_to(self, rows: Sequence[int], round_index: int, at: tuple[int, int]) -> SubsetSwitch:
        """Draw from ``rows`` from position ``at = (epoch, position)`` on.

        Raises:
            ValueError: ``rows`` is empty, or ``at`` is not after the last switch.
        """
        if len(rows) == 0:
            raise ValueError("cannot switch the sampler to an empty subset")
        epoch, position = int(at[0]), int(at[1])
        last = self.history[-1]
        if (epoch, position) <= (last.epoch, last.position) or not 0 <= position < self.num_samples:
            raise ValueError(
                f"a subset switch must come after the last one at {(last.epoch, last.position)} and lie inside an "
                f"epoch of {self.num_samples} samples, got {(epoch, position)}"
            )
        switch = SubsetSwitch(round_index, epoch, position, [int(r) for r in rows])
        self.history.append(switch)
        return switch

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        self._drawing_epoch, self._drawn = epoch, []
        for position in range(self.num_samples):
            row = self.row_at(epoch, position)
            self._drawn.append(row)
            yield row

    def stale(self, epoch: int, positions: Sequence[int]) -> bool:
        """Whether a batch of ``positions`` drawn in ``epoch`` holds other rows than the history now assigns them
        (it was drawn ahead of the trainer, before a switch that covers it)."""
        if epoch != self._drawing_epoch:
            return False
        drawn = self._drawn
        return any(p < len(drawn) and drawn[p] != self.row_at(epoch, p) for p in positions)

    def row_at(self, epoch: int, position: int) -> int:
        """The row drawn at ``(epoch, position)`` under the recorded history."""
        active = self.history[0]
        for switch in self.history:
            if (switch.epoch, switch.position) <= (epoch, position):
                active = switch
        start = active.position if active.epoch == epoch else 0
        order = self._order(epoch, active)
        return order[(position - start) % len(order)]

    def _order(self, epoch: int, switch: SubsetSwitch) -> list[int]:
        key = (epoch, switch.round, switch.epoch, switch.position)
        cached = getattr(self, "_order_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + epoch * 1009 + switch.round)
        perm = torch.randperm(len(switch.rows), generator=gen).tolist()
        order = [switch.rows[i] for i in perm]
        self._order_cache = (key, order)
        return order

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "history": [vars(s) for s in self.history],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SpiceSampler:
        """The sampler of `state_dict` (validate untrusted input first: `spice_trainer.integrations.state`)."""
        history = [SubsetSwitch(**s) for s in state["history"]]
        sampler = cls(history[0].rows, seed=int(state["seed"]), num_samples=int(state["num_samples"]))
        sampler.history = history
        return sampler


class BatchLayout:
    """Which sampler positions each batch of this rank holds, and how far the trainer has consumed.

    The trainer's batch sampler (torch's `BatchSampler`, wrapped in accelerate's `BatchSamplerShard` under several
    processes) is rebuilt over the positions ``0 .. num_samples - 1`` instead of rows, so the layout is the one
    accelerate itself produces (batch size, ``drop_last``, ``even_batches`` padding, ``split_batches``), not a
    re-derivation of it.

    Args:
        batch_sampler: the prepared train dataloader's ``batch_sampler``.
        num_samples: the sampler's samples per epoch.

    Raises:
        ValueError: a batch sampler this class does not know (its layout over positions cannot be rebuilt).
    """

    def __init__(self, batch_sampler: Any, num_samples: int) -> None:
        self.num_samples = num_samples
        inner, shard = batch_sampler, None
        if type(batch_sampler).__name__ == "BatchSamplerShard":
            inner, shard = batch_sampler.batch_sampler, batch_sampler
        if not isinstance(inner, BatchSampler) or not isinstance(inner.batch_size, int):
            raise ValueError(
                f"SpiceDataCallback cannot map the train dataloader's batches ({type(batch_sampler).__name__}) to "
                "sampler positions; use the Trainer's own dataloader (a custom get_train_dataloader or "
                "dispatch_batches=True is not supported)"
            )
        positions = BatchSampler(range(num_samples), inner.batch_size, inner.drop_last)
        if shard is None:
            self.batches = [list(b) for b in positions]
            self.global_batch = inner.batch_size
        else:
            rebuilt = type(shard)(
                positions,
                num_processes=shard.num_processes,
                process_index=shard.process_index,
                split_batches=shard.split_batches,
                even_batches=shard.even_batches,
            )
            self.batches = [list(b) for b in rebuilt]
            self.global_batch = inner.batch_size * (1 if shard.split_batches else shard.num_processes)

    def positions(self, micro_batch: int) -> list[int]:
        """The positions of this rank's ``micro_batch``-th batch of an epoch (empty past the end)."""
        return self.batches[micro_batch] if 0 <= micro_batch < len(self.batches) else []

    def consumed(self, micro_batches: int) -> int:
        """Positions every rank together has consumed after ``micro_batches`` batches each (``num_samples`` once
        the epoch's batches are all taken)."""
        if micro_batches >= len(self.batches):
            return self.num_samples
        return min(micro_batches * self.global_batch, self.num_samples)
