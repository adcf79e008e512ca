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


class PlateauStop:
    """Stop when the marginal (penalized) gain has levelled off: "stop adding data when the gain levels off".

    With ``v_1, v_2, …`` the watched quantity of the accepted picks (``Δ − λc`` for ``watch="score"``, ``Δ`` for
    ``"gain"``) and ``v`` the candidate's, the candidate is refused, and the run ends, when the mean of the
    last ``window`` values (the candidate and the ``window − 1`` picks before it) is at most ``ratio`` times the
    mean of every pick before those::

        mean(v_{t−w+2}, …, v_t, v) ≤ ratio · mean(v_1, …, v_{t−w+1})

    The rule reads the curve against its own history, so it does not depend on the scale of the features, on
    the first pick alone (the paper's ω rule), or on the budget: on a greedy curve that flattens into a tail
    (the informative rows are taken, what is left adds little) it fires where the tail begins; on a curve that
    keeps decaying smoothly (``v_t ∝ 1/t``: the recent mean over the history mean is ``≈ 1/ln t``) it does not
    fire before ``t ≈ e^{1/ratio}``. The window keeps a single low pick (a conflict penalty) from ending the run.
    The rule needs ``2 · window − 1`` accepted picks before it can fire. Every rank of a distributed run sees
    the same numbers and takes the same decision.

    Args:
        ratio: in ``(0, 1)``; smaller values stop later (`SpiceConfig.plateau_ratio`).
        watch: ``"score"`` (``Δ − λc``, the default) or ``"gain"`` (``Δ``).
        window: how many values the recent mean averages (``>= 1``).
    """

    def __init__(self, ratio: float = 0.2, watch: Literal["gain", "score"] = "score", window: int = 3) -> None:
        if not (math.isfinite(ratio) and 0.0 < ratio < 1.0):
            raise ValueError(f"ratio must be in (0, 1), got {ratio!r}")
        if watch not in ("gain", "score"):
            raise ValueError(f"watch must be 'gain' or 'score', got {watch!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.ratio = ratio
        self.watch = watch
        self.window = window
        # Running sum of the history's values up to `_summed` (the history only grows during a run).
        self._summed = 0
        self._total = 0.0

    def should_stop(self, gain: float, score: float, history: PickHistory) -> bool:
        values = history.scores if self.watch == "score" else history.gains
        recent_picks = self.window - 1
        older = len(values) - recent_picks
        if older < self.window:
            return False
        if older < self._summed:  # the history was cut back (a new run reusing the rule): start over
            self._summed, self._total = 0, 0.0
        self._total += math.fsum(values[self._summed : older])
        self._summed = older
        recent = (math.fsum(values[older:]) + (score if self.watch == "score" else gain)) / self.window
        return recent <= self.ratio * (self._total / older)

    def cut(self, gains: Sequence[float], scores: Sequence[float]) -> int:
        return len(gains)


def stopping_rule(config: SpiceConfig) -> StoppingRule:
    """The rule ``config`` asks for (``stop_rule``): `PlateauStop` (``plateau_ratio``, ``stop_on``), `RatioStop`
    (``stop_ratio``, ``stop_on``) or `NeverStop`."""
    if config.stop_rule == "plateau":
        return PlateauStop(config.plateau_ratio, config.stop_on)
    if config.stop_rule == "ratio":
        assert config.stop_ratio is not None  # SpiceConfig validates it
        return RatioStop(config.stop_ratio, config.stop_on)
    return NeverStop()


def check_cut(keep: object, picks: int) -> int:
    """``keep`` as returned by `StoppingRule.cut`, validated against the number of picks."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= picks:
        raise ValueError(f"StoppingRule.cut must return an int in [0, {picks}] (the picks to keep), got {keep!r}")
    return keep
