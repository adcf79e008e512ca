"""When a greedy run stops adding rows: the stop reasons, the history a rule reads, and the rules.

The greedy loop (`spice_trainer.core.greedy.run_greedy`) asks its `StoppingRule` twice:

1. **before every pick**, ``rule.should_stop(gain, score, history)`` with the best candidate's ``Δ`` and
   ``Δ − λc`` and the `PickHistory` of the picks accepted so far. True means: do not add this candidate, and
   end the run (the pooled regime ends only the current pool; the stream goes on with the next one). In the
   distributed greedy every rank calls it with the same numbers and the same history, so every rank takes
   the same decision.
2. **once, after the loop**, ``rule.cut(gains, scores)`` with every pick's ``Δ`` and ``Δ − λc``: how many
   picks to keep (a prefix). A rule that needs the whole curve (a plateau of the penalized score) decides
   here; the run goes on to the budget and the prefix is kept. Every rank again sees the same lists.

A rule object serves one run: it may keep state between calls. `stopping_rule` builds the configured one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

from spice_trainer.config import SpiceConfig

#: Why a greedy run ended (`Selection.stop_reason`).
StopReason = Literal["budget", "early_stop", "exhausted"]

#: Every stop reason and what it means: the one place they are documented.
STOP_REASONS: dict[str, str] = {
    "budget": "the budget was reached (initial rows count towards it)",
    "early_stop": (
        "the stopping rule ended the run: `should_stop` refused a candidate, or `cut` kept fewer picks than were "
        "made (pooled: the rule ended at least one pool's picks and the budget was not reached)"
    ),
    "exhausted": "no eligible candidate was left (pooled: the stream of pools ran out)",
}
assert set(STOP_REASONS) == set(get_args(StopReason))


@dataclass
class PickHistory:
    """The picks accepted so far in this run, in pick order, and the run's reference gain.

    Attributes:
        gains: ``Δ`` of each pick.
        scores: ``Δ − λc`` of each pick.
        conflicts: ``c`` of each pick.
        reference_gain: the caller's base for ratio rules (`None`: the run's first gain, see `reference`).
    """

    gains: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    conflicts: list[float] = field(default_factory=list)
    reference_gain: float | None = None

    def __len__(self) -> int:
        return len(self.gains)

    @property
    def reference(self) -> float | None:
        """``reference_gain`` when given, else the first pick's ``Δ`` (`None` before it)."""
        if self.reference_gain is not None:
            return self.reference_gain
        return self.gains[0] if self.gains else None

    def append(self, gain: float, score: float, conflict: float) -> None:
        """Record an accepted pick."""
        self.gains.append(gain)
        self.scores.append(score)
        self.conflicts.append(conflict)

    def truncate(self, keep: int) -> None:
        """Keep the first ``keep`` picks."""
        del self.gains[keep:], self.scores[keep:], self.conflicts[keep:]


class StoppingRule(Protocol):
    """Ends a greedy run (see the module docstring for when and how the loop calls it)."""

    def should_stop(self, gain: float, score: float, history: PickHistory) -> bool:
        """True to refuse the candidate with gain ``Δ`` = ``gain`` and score ``Δ − λc`` = ``score`` and end
        the run (pooled: the pool). ``history`` holds the picks accepted before it."""
        ...

    def cut(self, gains: Sequence[float], scores: Sequence[float]) -> int:
        """How many of the run's picks to keep, ``0 <= k <= len(gains)``; ``len(gains)`` keeps them all."""
        ...


class NeverStop:
    """Select the whole budget: never refuses a pick, keeps every pick."""

    def should_stop(self, gain: float, score: float, history: PickHistory) -> bool:
        return False

    def cut(self, gains: Sequence[float], scores: Sequence[float]) -> int:
        return len(gains)


class RatioStop:
    """The paper's rule (SPICE+, ``ω`` = ``stop_ratio``): stop at the first candidate whose watched quantity is
    ``≤ ω · reference``.

    The watched quantity is ``Δ`` (``watch="gain"``, the paper) or ``Δ − λc`` (``"score"``). The reference is
    `PickHistory.reference`: the caller's ``reference_gain`` (then the rule applies from the first pick on), else
    the run's first ``Δ`` (then the first pick is always kept). The refused candidate is not added.

    Args:
        ratio: ``ω`` in ``[0, 1)``.
        watch: ``"gain"`` or ``"score"``.
    """

    def __init__(self, ratio: float, watch: Literal["gain", "score"] = "gain") -> None:
        if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
            raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
        if watch not in ("gain", "score"):
            raise ValueError(f"watch must be 'gain' or 'score', got {watch!r}")
        self.ratio = ratio
        self.watch = watch

    def should_stop(self, gain: float, score: float, history: PickHistory) -> bool:
        reference = history.reference
        if reference is None:
            return False  # the first pick sets the reference and is kept
        return (gain if self.watch == "gain" else score) <= self.ratio * reference

    def cut(self, gains: Sequence[float], scores: Sequence[float]) -> int:
        return len(gains)


def stopping_rule(config: SpiceConfig) -> StoppingRule:
    """The rule ``config`` asks for: `RatioStop` (``stop_ratio``, ``stop_on``), or `NeverStop` when
    ``stop_ratio`` is `None`."""
    if config.stop_ratio is None:
        return NeverStop()
    return RatioStop(config.stop_ratio, config.stop_on)


def check_cut(keep: object, picks: int) -> int:
    """``keep`` as returned by `StoppingRule.cut`, validated against the number of picks."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= picks:
        raise ValueError(f"StoppingRule.cut must return an int in [0, {picks}] (the picks to keep), got {keep!r}")
    return keep
