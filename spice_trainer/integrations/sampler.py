"""`SpiceSampler`: the training sampler that draws the selected subset and replays recorded subset switches.

Only torch is imported. `spice_trainer.integrations.trainer.SpiceDataCallback` builds it from the first round
and switches it after every later round.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["SpiceSampler", "SubsetSwitch"]


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
    from the next position not yet drawn, so the length — and the trainer's step count — never change.
    The same ``(history, epoch)`` gives the same sequence in every process, which is what accelerate's
    batch sharding needs.

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
        self._drawn = 0  # positions already yielded in the running epoch
        self._drawing_epoch: int | None = None

    def __len__(self) -> int:
        return self.num_samples

    @property
    def rows(self) -> list[int]:
        """The current subset."""
        return self.history[-1].rows

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer (and the callback) at the start of every epoch."""
        self.epoch = int(epoch)

    def drawn_position(self) -> tuple[int, int]:
        """``(epoch, position)`` of the next sample not yet drawn."""
        if self._drawing_epoch is None:
            return self.epoch, 0
        if self._drawn >= self.num_samples:
            return self._drawing_epoch + 1, 0
        return self._drawing_epoch, self._drawn

    def switch_to(self, rows: Sequence[int], round_index: int, at: tuple[int, int] | None = None) -> SubsetSwitch:
        """Draw from ``rows`` from position ``at`` (default: the next position not yet drawn) on."""
        if len(rows) == 0:
            raise ValueError("cannot switch the sampler to an empty subset")
        epoch, position = at if at is not None else self.drawn_position()
        switch = SubsetSwitch(round_index, epoch, position, [int(r) for r in rows])
        self.history.append(switch)
        return switch

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        self._drawing_epoch, self._drawn = epoch, 0
        for position in range(self.num_samples):
            yield self.row_at(epoch, position)
            self._drawn = position + 1

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
        history = [SubsetSwitch(**s) for s in state["history"]]
        sampler = cls(history[0].rows, seed=int(state["seed"]), num_samples=int(state["num_samples"]))
        sampler.history = history
        return sampler
