"""The SPICE greedy: one selection loop, candidate sources looked up by name, and the public entry point.

apricot's split (``apricot/optimizers.py`` vs ``apricot/functions/``): every gain, conflict and score comes from
an `spice_trainer.core.objective.Objective`; the code here only compares numbers. Three layers:

- **the loop** (`run_greedy`): asks a `CandidateSource` for the best candidate, asks the `StoppingRule`
  (`spice_trainer.core.stopping`) whether to take it, and records the pick. The stopping rule, the stop
  reasons and the `Selection` assembly (`selection_from_run`) exist only here.
- **candidate sources** (the regimes, `REGIMES`, looked up by `SpiceConfig.greedy`): ``"exact"`` (`ExactSource`:
  the exact argmax over the whole pool), ``"stochastic"`` (`StochasticSource`: the best of a random sample) and
  ``"pooled"`` (`PooledSource`: exact greedy inside consecutive pools, the paper's stream; its pools may come
  from a feature function with a callback before each pool, which is how the proxy's online regime runs). The
  distributed greedy (`spice_trainer.distributed.greedy`) is another source over an `ExactSource` per rank.
- **searches** (`SEARCHES`, looked up by `SpiceConfig.exact_search`): how an exact source finds its argmax,
  ``"lazy"`` (`LazySearch`) or ``"incremental"`` (`IncrementalSearch`). Same picks.

Greedy rule (docs/concepts.md, section 2): pick ``argmax_x Δ_x(S) − λ c_x(S)`` over eligible, unpicked rows; scores
within `TIE` (relative) of the best count as tied and the lowest row wins.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.core.objective import (
    BoundedObjective,
    FisherMethod,
    IncrementalObjective,
    Objective,
    RowState,
    SpiceObjective,
)
from spice_trainer.core.selection import Selection
from spice_trainer.core.stopping import PickHistory, StoppingRule, StopReason, check_cut, stopping_rule
from spice_trainer.core.threads import SelectionThreads

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_SQNORM",
    "REGIMES",
    "SEARCHES",
    "TIE",
    "Candidate",
    "CandidateSource",
    "ExactSource",
    "Found",
    "GreedyRun",
    "IncrementalSearch",
    "LazySearch",
    "PooledSource",
    "Regime",
    "RowCheck",
    "Search",
    "StochasticSource",
    "best_candidate",
    "check_initial",
    "check_usable",
    "greedy_threads",
    "lowest_best",
    "progress_bar",
    "run_greedy",
    "select_from_features",
    "selection_from_run",
    "usable_rows",
]

#: Candidates re-scored exactly per pick when rows are tracked in float32 (see `best_candidate`).
_REFINE = 8
#: At most this many rows tied exactly at the screening cut are re-scored (the lowest positions).
_TIED = 64
#: The lazy search's first shortlist length; the picks under which a shortlist counts as short-lived (its length
#: then doubles); and the share of the rows it may grow to (1/8: past that, its per-pick update costs as much as
#: rescoring every row). Measured on bench/greedy.py's n = 14,000, d = 256, k = 1,400, raw and unit rows: 512, 8
#: and 8 (256-1,024, 4-32 and 8-16 within 15 %; no cap: unit rows 1.5x slower, the shortlist grew to 4,096).
_SHORTLIST = 512
_SHORTLIST_GROW = 8
_SHORTLIST_SHARE = 8

#: Scores within this relative distance of the best count as tied, and the lowest row wins: two evaluations of
#: the same row's score by different arithmetic (another batch, another kernel) differ by ~1e-16 relative, so
#: exact duplicates would otherwise be ordered by rounding.
TIE = 1e-12


def lowest_best(scores: torch.Tensor) -> int:
    """The first position whose score is within `TIE` of the maximum of ``scores: (m,)`` (rows in ascending order)."""
    top = float(scores.max())
    return int((scores >= top - TIE * abs(top)).nonzero()[0])


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


class Candidate(NamedTuple):
    """A source's best candidate: its global row and its numbers (float64, from the set state)."""

    row: int
    gain: float  # Δ
    conflict: float  # c
    score: float  # Δ − λc
    base: float  # b = log(1 + α‖g‖²)


class CandidateSource(Protocol):
    """A greedy regime as the loop sees it: the best candidate of the current block, accept it, next block.

    A *block* is what one run of exact greedy covers: the whole pool, or one pool of a stream. A stopping rule
    that fires ends the current block, and the run ends when there is no next block.
    """

    def propose(self) -> Candidate | None:
        """The best candidate of the current block; `None` when the block has none left (or its quota is met)."""
        ...

    def accept(self, candidate: Candidate) -> None:
        """Add the candidate (just proposed) to the selected set."""
        ...

    def next_block(self) -> bool:
        """Move to the next block; False when there is none."""
        ...

    def metadata(self) -> dict[str, Any]:
        """Facts about the run for `Selection.metadata` (regime details)."""
        ...


@dataclass
class GreedyRun:
    """What `run_greedy` did: the picks in order, their numbers, and why it stopped."""

    rows: list[int] = field(default_factory=list)
    history: PickHistory = field(default_factory=PickHistory)
    bases: list[float] = field(default_factory=list)
    stop_reason: StopReason = "budget"
    #: Times the stopping rule refused a candidate (pooled: pools ended early).
    rule_stops: int = 0


def run_greedy(
    source: CandidateSource,
    rule: StoppingRule,
    quota: int,
    *,
    reference_gain: float | None = None,
    progress: Any = None,
) -> GreedyRun:
    """The greedy loop: up to ``quota`` picks from ``source``, each first offered to ``rule``.

    Stop reasons (`spice_trainer.core.stopping.STOP_REASONS`): ``"budget"`` after ``quota`` picks;
    ``"exhausted"`` when the source has no candidate and no next block; ``"early_stop"`` when the rule refused
    a candidate and there was no next block, when a stream ran out after the rule ended some of its blocks, or
    when ``rule.cut`` kept fewer picks than were made.

    Args:
        source: the regime.
        rule: the stopping rule (a fresh one per run).
        quota: picks to make at most.
        reference_gain: `PickHistory.reference_gain` (the base of ratio rules; `None`: the run's first gain).
        progress: a tqdm-like bar updated once per pick, or `None`.
    """
    run = GreedyRun(history=PickHistory(reference_gain=reference_gain))
    history = run.history
    reason: StopReason | None = None
    while len(run.rows) < quota:
        candidate = source.propose()
        if candidate is None:
            if source.next_block():
                continue
            reason = "exhausted"
            break
        if rule.should_stop(candidate.gain, candidate.score, history):
            run.rule_stops += 1
            if source.next_block():
                continue
            reason = "early_stop"
            break
        source.accept(candidate)
        run.rows.append(candidate.row)
        history.append(candidate.gain, candidate.score, candidate.conflict)
        run.bases.append(candidate.base)
        if progress is not None:
            progress.update(1)
    if reason is None:
        reason = "budget"
    elif reason == "exhausted" and run.rule_stops:
        reason = "early_stop"  # a stream whose blocks the rule ended ran out before the budget
    keep = check_cut(rule.cut(list(history.gains), list(history.scores)), len(run.rows))
    if keep < len(run.rows):
        del run.rows[keep:], run.bases[keep:]
        history.truncate(keep)
        reason = "early_stop"
    run.stop_reason = reason
    return run


def selection_from_run(
    run: GreedyRun,
    config: SpiceConfig,
    *,
    n_candidates: int,
    initial: Sequence[int],
    skipped: Sequence[int],
    initial_objective: float,
    metadata: dict[str, Any],
) -> Selection:
    """The `Selection` of a run: ``ε = Δ − b``, ``score = Δ − λc`` and the cumulative objective
    ``log det(I + α F_S)`` (``initial_objective`` plus the gains) derived here, once for every regime.

    ``metadata`` gains ``reference_gain`` (the one the run used: given, or its first gain) and
    ``initial_objective``.
    """
    history = run.history
    objective = np.cumsum([initial_objective, *history.gains])[1:].tolist()
    metadata = {**metadata, "reference_gain": history.reference, "initial_objective": initial_objective}
    return Selection.from_picks(
        indices=list(run.rows),
        gains=list(history.gains),
        base_gains=list(run.bases),
        conflicts=list(history.conflicts),
        conflict_weight=config.conflict_weight,
        objective=objective,
        stop_reason=run.stop_reason,
        n_candidates=n_candidates,
        skipped=list(skipped),
        initial=list(initial),
        config=config.to_dict(),
        metadata=metadata,
    )


# ---------------------------------------------------------------------------------------------
# searches: the exact argmax over one block
# ---------------------------------------------------------------------------------------------


class Found(NamedTuple):
    """A search's winner: its position in the block and its numbers (float64, from the set state)."""

    position: int
    gain: float
    conflict: float
    score: float
    base: float


class Search(Protocol):
    """The exact argmax of ``Δ − λc`` over the rows of the objective's block that are still available."""

    def best(self) -> Found | None:
        """The best available row (ties: the lowest position), or `None` when none is left."""
        ...

    def remove(self, position: int) -> None:
        """Make ``position`` unavailable (it was picked)."""
        ...

    def metadata(self) -> dict[str, Any]:
        """Facts for `Selection.metadata`."""
        ...


def _found(objective: Objective, position: int) -> Found:
    """``position``'s numbers evaluated alone from the set state: the same bits whichever search (or rank)
    found it."""
    gain, conflict, score, base = objective.evaluate(position)
    return Found(position, gain, conflict, score, base)


class IncrementalSearch:
    """Every available row rescored at every pick (`SpiceObjective` with ``rows="incremental"``, ``O(m d)`` per
    pick); each pick is `best_candidate`. The reference the lazy search is tested against."""

    rows = "incremental"

    def __init__(self, objective: IncrementalObjective, mask: torch.Tensor) -> None:
        self.objective = objective
        self.blocked = ~mask.to(device=objective.device, dtype=torch.bool)
        self.remaining = int(mask.sum())

    def best(self) -> Found | None:
        if self.remaining == 0:
            return None
        at = best_candidate(self.objective, self.blocked, self.remaining)[0]
        return _found(self.objective, int(at))

    def remove(self, position: int) -> None:
        if not bool(self.blocked[position]):
            self.blocked[position] = True
            self.remaining -= 1

    def metadata(self) -> dict[str, Any]:
        return {}


class LazySearch:
    """Exact argmax of ``Δ − λc`` by lazy evaluation (Minoux 1978) over a certified shortlist.

    ``Δ_x(S)`` only shrinks as ``S`` grows, and ``c_x(S)`` is at least a floor (0 for the set's mean, the value
    itself for a fixed reference), so a score bound computed at an earlier set still bounds the score now.
    The rows with the ``K`` highest bounds form a shortlist whose scores the objective keeps exact and
    incremental (float64, ``O(K d)`` per pick); every other row's score is at most ``T``, the highest bound
    left out. While the shortlist's best score beats ``T`` it is the exact argmax over all rows; when it does
    not, the bounds of every row are refreshed with the picks so far (one ``(m, d) × (d, p)`` product,
    compute-bound where the incremental greedy's per-pick product is memory-bound) and the shortlist is
    rebuilt, at least as long as the number of rows whose bound reaches the current best (and twice as long
    when it lasted only a few picks). Rows whose scores agree to within rounding are re-scored together
    from the set state, so ties go to the lowest position as in the incremental greedy.

    Args:
        objective: tracks its rows with ``rows="bounds"``.
        mask: ``(m,)`` bool, the rows that may be picked.
        shortlist: the shortlist's first length ``K``.
    """

    rows = "bounds"

    def __init__(self, objective: BoundedObjective, mask: torch.Tensor, *, shortlist: int = _SHORTLIST) -> None:
        self.objective = objective
        mask = mask.to(device=objective.device, dtype=torch.bool)
        self.bound = objective.upper_bounds().clone().masked_fill_(~mask, -math.inf)
        self.remaining = int(mask.sum())
        self.size = max(1, shortlist)
        self.active: torch.Tensor | None = None  # shortlisted positions, ascending
        self.taken = torch.zeros(0, dtype=torch.bool, device=self.bound.device)
        self.threshold = math.inf  # the highest bound outside the shortlist
        self.picks = 0  # picks since the shortlist was built
        self.rebuilds = 0
        self._local = -1

    def _rebuild(self, reach: float) -> None:
        """Refresh every bound and shortlist the rows with the highest ones (all those reaching ``reach``)."""
        objective = self.objective
        bound = self.bound
        objective.refresh_bounds()
        blocked = bound == -math.inf
        torch.minimum(bound, objective.upper_bounds(), out=bound)
        if self.active is not None:
            # The shortlisted rows' scores are exact now: their bounds from them are tighter than the refresh's.
            live = ~self.taken
            rows = self.active[live]
            gains = objective.shortlist_scores().gains[live]
            bound[rows] = torch.minimum(bound[rows], objective.bound_after(rows, gains))
            if self.picks < _SHORTLIST_GROW and 2 * self.size <= max(_SHORTLIST, bound.shape[0] // _SHORTLIST_SHARE):
                self.size *= 2
        bound.masked_fill_(blocked, -math.inf)
        available = int((bound > -math.inf).sum())
        size = min(available, max(self.size, int((bound >= reach).sum())))
        values, order = torch.topk(bound, min(size + 1, bound.shape[0]))
        self.threshold = float(values[size]) if size < values.shape[0] else -math.inf
        self.active = order[:size].sort().values
        objective.shortlist(self.active)
        self.taken = torch.zeros(size, dtype=torch.bool, device=bound.device)
        self.picks = 0
        self.rebuilds += 1

    def best(self) -> Found | None:
        """The best available row (ties: the lowest position), or `None` when none is left; its numbers are
        evaluated from the set state alone, so that they do not depend on how the row was found."""
        if self.remaining == 0:
            return None
        objective = self.objective
        reach = math.inf
        while True:
            if self.active is None:
                self._rebuild(reach)
            assert self.active is not None
            scores = objective.shortlist_values().masked_fill_(self.taken, -math.inf)
            j = int(torch.argmax(scores)) if scores.numel() else 0
            value = float(scores[j]) if scores.numel() else -math.inf
            # Rows within TIE of the best count as tied (the lowest wins): certify against the tied range.
            reach = value - TIE * abs(value)
            if reach > self.threshold:
                break
            if value == -math.inf and self.threshold == -math.inf:
                raise RuntimeError("LazySearch lost track of its available rows")
            # Some row outside the shortlist may score as high: shortlist every row whose bound reaches this.
            self._rebuild(reach)
        # The shortlist's float64 values drift from the set state's by ~1e-13 (rows shortlisted at different
        # picks drift differently): every row within 1e-9 may be tied, and is re-scored with the others.
        close = (scores >= value - 1e3 * TIE * max(abs(value), 1.0)).nonzero().flatten()
        if close.numel() > 1:
            found = objective.scores_at(self.active[close])
            j = int(close[lowest_best(found.scores)])
        self._local = j
        return _found(objective, int(self.active[j]))

    def remove(self, position: int) -> None:
        if self.bound[position] == -math.inf:
            return
        self.bound[position] = -math.inf
        self.remaining -= 1
        active = self.active
        if active is not None:
            # The row is usually the one `best` just returned; otherwise look it up in the shortlist.
            local = self._local
            if not (0 <= local < active.shape[0] and int(active[local]) == position):
                hits = (active == position).nonzero().flatten()
                local = int(hits[0]) if hits.numel() else -1
            if local >= 0:
                self.taken[local] = True
        self.picks += 1

    def metadata(self) -> dict[str, Any]:
        return {"shortlist_rebuilds": self.rebuilds, "shortlist_length": self.size}


def best_candidate(
    objective: IncrementalObjective, blocked: torch.Tensor, remaining: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The argmax of ``Δ − λc`` over the tracked rows not ``blocked``, ties to the lowest position.

    When the objective tracks its rows in float32 (`SpiceObjective.screened`), the tracked scores only
    screen: the ``_REFINE`` best (with every row tied at the cut, up to ``_TIED``) are re-scored exactly
    (float64, from the set state) and the pick is their argmax, so float32 rounding can only matter between
    candidates that tie to within it. The returned
    numbers are the exact ones in both cases. Shared by the single-process and the distributed greedy.

    Args:
        objective: tracks its rows incrementally (``rows="incremental"``).
        blocked: ``(m,)`` bool, True for rows that may not be picked.
        remaining: the number of rows not blocked (``>= 1``).

    Returns:
        0-d tensors on the features' device: ``(position in the block, Δ, c, Δ − λc)``.
    """
    gains, conflicts, scores = objective.scores()
    scores = scores.masked_fill_(blocked, -math.inf)
    if objective.screened:
        # The candidates are defined by value, not by topk's order among ties: every row above the
        # _REFINE-th best screened score, and the rows equal to it (the lowest _TIED of them).
        cut = torch.topk(scores, min(_REFINE, remaining)).values[-1]
        top = (scores >= cut).nonzero().flatten()  # ascending: exact ties → lowest position
        if top.numel() > _REFINE + _TIED:
            above = (scores > cut).nonzero().flatten()
            tied = (scores == cut).nonzero().flatten()[:_TIED]
            top = torch.cat([above, tied]).sort().values
        gains, conflicts, scores = objective.scores_at(top)
        j = lowest_best(scores)
        return top[j], gains[j], conflicts[j], scores[j]
    j = lowest_best(scores)
    return torch.tensor(j, device=scores.device), gains[j], conflicts[j], scores[j]


#: How an exact source finds its argmax, by `SpiceConfig.exact_search`.
SEARCHES: dict[str, Callable[[Any, torch.Tensor], Search]] = {
    "lazy": LazySearch,
    "incremental": IncrementalSearch,
}
#: The objective's row state each search needs (`IncrementalObjective`, `BoundedObjective`).
_SEARCH_ROWS: dict[str, RowState] = {"lazy": "bounds", "incremental": "incremental"}


# ---------------------------------------------------------------------------------------------
# candidate sources (the regimes)
# ---------------------------------------------------------------------------------------------


class ExactSource:
    """One block: the exact argmax over all rows of ``features`` (the whole pool, or one rank's shard).

    Args:
        objective: the objective; its set already holds the initial rows. This source makes it track
            ``features``.
        features: ``(m, d)`` the rows (finite).
        mask: ``(m,)`` bool, the rows that may be picked.
        search: a key of `SEARCHES`.
        rows: the global row of each position (`None`: the positions themselves).
    """

    def __init__(
        self,
        objective: Objective,
        features: torch.Tensor,
        mask: torch.Tensor,
        *,
        search: str = "lazy",
        rows: Sequence[int] | None = None,
    ) -> None:
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {sorted(SEARCHES)}, got {search!r}")
        objective.track(features, _SEARCH_ROWS[search])
        self.objective = objective
        self.size = features.shape[0]
        self.search_name = search
        self.search = SEARCHES[search](objective, mask)
        self.rows = list(rows) if rows is not None else None
        self._positions = {row: i for i, row in enumerate(self.rows)} if self.rows is not None else None
        self._last = -1

    def propose(self) -> Candidate | None:
        found = self.search.best()
        if found is None:
            return None
        self._last = found.position
        row = self.rows[found.position] if self.rows is not None else found.position
        return Candidate(row, found.gain, found.conflict, found.score, found.base)

    def accept(self, candidate: Candidate) -> None:
        position = self.position_of(candidate.row)
        assert position is not None, "accept() takes a candidate this source proposed"
        self.insert(self.objective.vector(position), position)

    def insert(self, g: torch.Tensor, position: int | None) -> None:
        """Add ``g: (d,)`` to the set; ``position`` (one of this source's rows, or `None`) was picked."""
        self.objective.add(g)
        if position is not None:
            self.search.remove(position)

    def position_of(self, row: int) -> int | None:
        """The position of global ``row`` in this source, `None` when it is not one of its rows."""
        if self._positions is None:
            return row if 0 <= row < self.size else None
        return self._positions.get(row)

    def next_block(self) -> bool:
        return False

    def metadata(self) -> dict[str, Any]:
        return {"exact_search": self.search_name, **self.search.metadata()}


class StochasticSource:
    """Stochastic ("lazier than lazy") greedy (Mirzasoleiman et al. 2015): each pick is the exact best of a
    uniform random sample of ``⌈(n/k) ln(1/ε)⌉`` remaining eligible rows (``n`` eligible rows, ``k`` picks to
    make), evaluated from the set state (``O(d²)`` per row). Seeded by a local generator.

    Args:
        objective: the objective (primal Fisher state); this source makes it track ``features`` directly.
        features: ``(n, d)`` the rows.
        mask: ``(n,)`` bool, the rows that may be picked.
        quota: ``k``.
        epsilon: ``ε``.
        seed: the generator's seed.
    """

    def __init__(
        self,
        objective: Objective,
        features: torch.Tensor,
        mask: torch.Tensor,
        *,
        quota: int,
        epsilon: float,
        seed: int,
    ) -> None:
        objective.track(features, "direct")
        self.objective = objective
        # Remaining candidates with O(1) removal (swap with the last) so a pick never costs O(n) on the host.
        self.remaining = mask.nonzero().flatten().cpu().numpy().astype(np.int64)
        self.position = np.full(mask.shape[0], -1, dtype=np.int64)
        self.position[self.remaining] = np.arange(self.remaining.shape[0])
        self.size = self.remaining.shape[0]
        self.sample_size = max(1, math.ceil(self.size / quota * math.log(1.0 / epsilon))) if quota and self.size else 0
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def propose(self) -> Candidate | None:
        if self.size == 0:
            return None
        if self.sample_size >= self.size:
            chosen = np.sort(self.remaining[: self.size])
        else:
            chosen = np.sort(self.remaining[_sample_positions(self.size, self.sample_size, self.generator)])
        rows = torch.from_numpy(chosen).to(self.objective.device)
        row = int(chosen[lowest_best(self.objective.scores_at(rows).scores)])
        return Candidate(row, *self.objective.evaluate(row))

    def accept(self, candidate: Candidate) -> None:
        row = candidate.row
        self.objective.add(self.objective.vector(row))
        last = self.remaining[self.size - 1]
        at = self.position[row]
        self.remaining[at] = last
        self.position[last] = at
        self.position[row] = -1
        self.size -= 1

    def next_block(self) -> bool:
        return False

    def metadata(self) -> dict[str, Any]:
        return {"sample_size": self.sample_size}


#: ``pool_features(rows, quota) -> (features (m, d), eligible (m,) bool)`` for the rows of one pool (none of them
#: selected yet); ``quota`` is the pool's picks at most (a loss guard may need it).
PoolFeatures = Callable[[list[int], int], tuple[torch.Tensor, torch.Tensor]]
#: ``on_pool(index, picks)`` runs before pool ``index`` (0-based) is opened, with every pick so far in order.
PoolCallback = Callable[[int, list[int]], None]


class PooledSource:
    """The paper's stream: rows ``0 .. n − 1`` cut in order into pools of ``pool_size``; each pool is a block in
    which exact (incremental) greedy makes up to ``picks_per_pool`` picks, the selected set carried across pools.

    Each pool's rows are those not selected yet (``initial`` and earlier picks are left out before its features
    are asked for); ``pool_features`` gives their features and eligibility, computed when the pool opens (a
    fixed matrix, or a proxy model as it is at that moment), and ``on_pool`` runs first (the proxy's refresh
    steps). A stopping rule that fires ends the pool; the stream goes on.

    Args:
        objective: the objective (its set holds the initial rows); each pool is tracked in turn.
        n: rows in the stream.
        pool_size: rows per pool.
        picks_per_pool: picks per pool at most.
        quota: picks over the whole stream at most (the pool's quota is the smaller of the two left).
        pool_features: see `PoolFeatures`.
        selected: rows already selected (never offered).
        on_pool: see `PoolCallback`.
    """

    def __init__(
        self,
        objective: IncrementalObjective,
        *,
        n: int,
        pool_size: int,
        picks_per_pool: int,
        quota: int,
        pool_features: PoolFeatures,
        selected: Sequence[int] = (),
        on_pool: PoolCallback | None = None,
    ) -> None:
        self.objective = objective
        self.n = n
        self.pool_size = pool_size
        self.picks_per_pool = picks_per_pool
        self.quota = quota
        self.pool_features = pool_features
        self.on_pool = on_pool
        self.taken = set(int(r) for r in selected)
        self.picks: list[int] = []
        self.pools_visited = 0
        self._index = -1
        self._search: IncrementalSearch | None = None
        self._rows: list[int] = []
        self._pool_quota = 0
        self._in_pool = 0
        self._last = -1

    def _open(self, index: int) -> None:
        self._index = index
        if self.on_pool is not None:
            self.on_pool(index, list(self.picks))
        self.pools_visited += 1
        begin = index * self.pool_size
        rows = [r for r in range(begin, min(begin + self.pool_size, self.n)) if r not in self.taken]
        self._rows = rows
        self._in_pool = 0
        self._search = None
        self._pool_quota = min(self.picks_per_pool, self.quota - len(self.picks), len(rows))
        if not rows or self._pool_quota <= 0:
            return
        features, eligible = self.pool_features(rows, self._pool_quota)
        if not bool(eligible.any()):
            return
        self.objective.track(features, "incremental")
        self._search = IncrementalSearch(self.objective, eligible)

    def propose(self) -> Candidate | None:
        if self._index < 0:
            if self.n == 0:
                return None
            self._open(0)
        if self._search is None or self._in_pool >= self._pool_quota:
            return None
        found = self._search.best()
        if found is None:
            return None
        self._last = found.position
        return Candidate(self._rows[found.position], found.gain, found.conflict, found.score, found.base)

    def accept(self, candidate: Candidate) -> None:
        position = self._last
        assert self._search is not None and self._rows[position] == candidate.row
        self.objective.add(self.objective.vector(position))
        self._search.remove(position)
        self.taken.add(candidate.row)
        self.picks.append(candidate.row)
        self._in_pool += 1

    def next_block(self) -> bool:
        following = self._index + 1
        if following * self.pool_size >= self.n or len(self.picks) >= self.quota:
            return False
        self._open(following)
        return True

    def metadata(self) -> dict[str, Any]:
        return {"pools_visited": self.pools_visited}


@dataclass(frozen=True)
class Regime:
    """A greedy regime: how to build its candidate source, and the Fisher state it wants."""

    build: Callable[[SpiceObjective, torch.Tensor, torch.Tensor, SpiceConfig, int, list[int]], CandidateSource]
    method: FisherMethod = "auto"


def _build_exact(
    objective: SpiceObjective,
    features: torch.Tensor,
    mask: torch.Tensor,
    config: SpiceConfig,
    quota: int,
    initial: list[int],
) -> CandidateSource:
    return ExactSource(objective, features, mask, search=config.exact_search)


def _build_stochastic(
    objective: SpiceObjective,
    features: torch.Tensor,
    mask: torch.Tensor,
    config: SpiceConfig,
    quota: int,
    initial: list[int],
) -> CandidateSource:
    return StochasticSource(objective, features, mask, quota=quota, epsilon=config.stochastic_epsilon, seed=config.seed)


def _build_pooled(
    objective: SpiceObjective,
    features: torch.Tensor,
    mask: torch.Tensor,
    config: SpiceConfig,
    quota: int,
    initial: list[int],
) -> CandidateSource:
    def pool_features(rows: list[int], pool_quota: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(rows, device=features.device)
        return features[index], mask[index]

    return PooledSource(
        objective,
        n=features.shape[0],
        pool_size=config.pool_size,
        picks_per_pool=config.picks_per_pool,
        quota=quota,
        pool_features=pool_features,
        selected=initial,
    )


#: The greedy regimes, by `SpiceConfig.greedy`. Stochastic greedy evaluates rows from the ``d × d`` inverse.
REGIMES: dict[str, Regime] = {
    "exact": Regime(_build_exact),
    "stochastic": Regime(_build_stochastic, method="primal"),
    "pooled": Regime(_build_pooled),
}


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------


def select_from_features(
    features: torch.Tensor,
    config: SpiceConfig,
    *,
    initial: Sequence[int] | None = None,
    eligible: torch.Tensor | None = None,
    reference_gain: float | None = None,
    conflict_reference: torch.Tensor | None = None,
    stopping: StoppingRule | None = None,
    show_progress: bool = False,
) -> Selection:
    """Choose a subset of the rows of ``features`` with the SPICE greedy.

    Maximises ``score_x = Δ_x(S) − λ c_x(S)`` one pick at a time, with
    ``Δ_x(S) = log(1 + α g_xᵀ (I + α F_S)⁻¹ g_x)`` evaluated exactly (no ``n × n`` kernel) and
    ``c_x(S) = max(0, −cos(g_x, ḡ_S))``. ``α`` = ``config.fisher_scale``, ``λ`` = ``config.conflict_weight``,
    the stopping rule ``config.stop_rule`` (`spice_trainer.core.stopping.stopping_rule`). Feature normalisation,
    the guards and the trust weights are *not* applied here (the gradient stage and the pipeline do that).

    Regimes (``config.greedy``, `REGIMES`):

    - ``"exact"``: every pick is the exact argmax over all remaining eligible rows, found by the
      ``config.exact_search`` search: ``"lazy"`` (`LazySearch`, a certified shortlist) or ``"incremental"``
      (`IncrementalSearch`, ``O(n d)`` per pick). The same picks.
    - ``"stochastic"``: each pick scores a uniform random sample of ``⌈(n/k) ln(1/ε)⌉`` remaining eligible
      rows (Mirzasoleiman et al. 2015, ``ε`` = ``config.stochastic_epsilon``, ``n`` = eligible rows,
      ``k`` = picks to make) directly from the ``d × d`` state, seeded by ``config.seed``; ``O(s d²)`` per pick.
    - ``"pooled"``: rows are cut in order into pools of ``config.pool_size``; exact greedy makes up to
      ``config.picks_per_pool`` picks inside each pool, the selected set carried across pools (the
      paper's streaming regime). The stopping rule ends a *pool's* picks (the reference stays the very first
      pick's gain of the run, or ``reference_gain``) and the stream goes on to the next pool. The result
      equals running exact greedy on each pool in turn with ``initial`` = everything picked so far.

    Threads: on the CPU the loop runs under `greedy_threads` (the selection thread policy of
    `spice_trainer.core.threads`: ``config.threads``, else as many threads as idle cores; one thread for a
    small pool).

    Stopping (`spice_trainer.core.stopping`): ``stopping`` when given, else `stopping_rule(config)` (the paper's
    ``ω`` rule on ``config.stop_on``, or none). Stop reasons: `spice_trainer.core.stopping.STOP_REASONS`.

    Zero feature vectors have ``Δ = 0`` and ``c = 0`` (score 0): they are picked only when every other
    eligible row scores ``≤ 0``, and once one would be picked, the ``ω`` rule (any ``ω ≥ 0``) ends the run.

    Args:
        features: ``(n, d)`` float32/float64/bfloat16/float16 features, on CPU or CUDA; all the work stays
            on ``features.device`` (state in float64).
        config: uses ``budget``, ``fisher_scale``, ``conflict_weight``, ``stop_rule``, ``plateau_ratio``,
            ``stop_ratio``, ``stop_on``, ``greedy``,
            ``exact_search``, ``stochastic_epsilon``, ``pool_size``, ``picks_per_pool``, ``seed``.
        initial: rows already selected (mode ``"grow"``), inserted into ``S`` first in the given order; they
            are never re-picked, not recorded as picks, and count towards the budget (if they already fill
            it, nothing is picked and the stop reason is ``"budget"``).
        eligible: ``(n,)`` bool mask of rows that may be picked; rows with non-finite features, or norms beyond
            float64's range (`MAX_SQNORM`), are never eligible and are listed in ``Selection.skipped`` (a warning
            names the latter).
        reference_gain: base of the ``ω`` rule (`PickHistory.reference_gain`); `None` = the first pick's ``Δ``.
        conflict_reference: ``(d,)`` a fixed direction ``r``: the conflict becomes ``c_x = max(0, −cos(g_x, r))``
            (a trusted set's mean gradient, a robust consensus of the pool) instead of the selected set's mean.
        stopping: the stopping rule of this run (a fresh object); `None` = `stopping_rule(config)`.
        show_progress: show a tqdm bar over the picks.

    Returns:
        A `Selection`; ``metadata`` holds ``seconds``, ``greedy``, ``method`` (``"primal"``/``"dual"``),
        ``reference_gain`` (the value used), ``initial_objective``, ``n_eligible`` and regime details
        (``exact_search`` and ``shortlist_rebuilds``; ``sample_size``; ``pools_visited`` and
        ``pools_stopped_early``).

    Raises:
        TypeError: ``features`` is not a floating tensor, or ``eligible`` is not a bool tensor.
        ValueError: ``features`` is not 2-D or is empty, every row is non-finite (or beyond float64's range,
            `MAX_SQNORM`), every finite row is exactly zero (no information to select on), every row's ``α‖g‖²``
            underflows float64, the budget exceeds ``n``,
            ``initial`` has out-of-range, duplicated or non-finite rows, ``eligible`` has the wrong shape,
            ``conflict_reference`` is not a finite non-zero ``(d,)`` vector.
    """
    start = time.perf_counter()
    feats = _check_features(features)
    n = feats.shape[0]
    budget = config.budget_count(n)
    check = usable_rows(feats, config.fisher_scale)
    usable = check.usable
    skipped = check_usable(check, config.fisher_scale)
    # Zero the skipped rows so that no matmul propagates NaN or inf; they are never eligible.
    clean = feats if not skipped else torch.where(usable.unsqueeze(1), feats, torch.zeros((), dtype=feats.dtype))
    init = check_initial(initial, n, skipped)
    mask = usable.clone()
    if eligible is not None:
        mask &= _check_eligible(eligible, n, feats.device)
    if init:
        mask[torch.tensor(init, device=feats.device)] = False
    n_eligible = int(mask.sum())

    to_pick = max(0, budget - len(init))
    regime = REGIMES[config.greedy]
    objective = SpiceObjective(
        clean[:0],
        config.fisher_scale,
        capacity=len(init) + to_pick,
        conflict_weight=config.conflict_weight,
        conflict_reference=conflict_reference,
        method=regime.method,
        rows="direct",
    )
    for row in init:
        objective.add(clean[row])
    initial_objective = objective.logdet
    source = regime.build(objective, clean, mask, config, to_pick, init)
    rule = stopping if stopping is not None else stopping_rule(config)
    progress = progress_bar(to_pick, show_progress)
    try:
        with greedy_threads(config, feats.device, n * feats.shape[1] * to_pick):
            run = run_greedy(source, rule, to_pick, reference_gain=reference_gain, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    metadata: dict[str, Any] = {
        "greedy": config.greedy,
        "n_eligible": n_eligible,
        "budget": budget,
        "method": objective.method,
        **source.metadata(),
    }
    if config.greedy == "pooled":
        metadata["pools_stopped_early"] = run.rule_stops
    if conflict_reference is not None:
        metadata["conflict_reference"] = "fixed"
    metadata["seconds"] = time.perf_counter() - start
    selection = selection_from_run(
        run,
        config,
        n_candidates=n,
        initial=init,
        skipped=skipped,
        initial_objective=initial_objective,
        metadata=metadata,
    )
    # DEBUG: the callback and the command line write one line per round with these numbers (and the exclusions).
    logger.debug(
        "spice: picked %d (+%d initial) of %d in %.2fs, stop=%s",
        len(selection.indices),
        len(init),
        n,
        metadata["seconds"],
        selection.stop_reason,
    )
    return selection


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _sample_positions(size: int, count: int, generator: torch.Generator) -> np.ndarray:
    """``count`` distinct positions in ``[0, size)``, uniformly at random (rejection of repeats)."""
    seen: dict[int, None] = {}
    while len(seen) < count:
        draw = torch.randint(size, (2 * (count - len(seen)),), generator=generator).tolist()
        for value in draw:
            seen.setdefault(value)
            if len(seen) == count:
                break
    return np.fromiter(seen, dtype=np.int64, count=count)


def _check_features(features: Any) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(
            f"features must be a torch.Tensor of shape (n, d), got {type(features).__name__}; "
            "wrap arrays with torch.as_tensor(...)"
        )
    if not features.is_floating_point():
        raise TypeError(
            f"features must be a floating tensor (float32/float64/bfloat16), got dtype {features.dtype}; "
            "convert with features.float()"
        )
    if features.ndim != 2:
        raise ValueError(
            f"features must be 2-D (n, d), got shape {tuple(features.shape)}; "
            "use features.reshape(n, -1) or features.unsqueeze(0) for a single row"
        )
    n, d = features.shape
    if n == 0:
        raise ValueError(
            f"cannot select from an empty pool: features has 0 rows (shape {(n, d)}); the dataset is empty"
        )
    if d == 0:
        raise ValueError(f"features has 0 columns (shape {(n, d)}); proj_dim must be >= 1")
    return features


#: The largest ``‖g‖²`` and ``α‖g‖²`` a row may have: every product of two feature norms, and every sum of up to
#: 10⁷ such products (the conflict's ``g_xᵀ Σ_S g``), stays finite in float64 (max ≈ 1.8e308).
MAX_SQNORM = 1e300
#: Beyond this ``α‖g‖²`` the identity in ``I + αF`` is below float64's resolution of ``αF`` (2^-52) once the
#: picks span the feature space: later gains are rounding.
_RESOLVED_SQNORM = 2.0**50


class RowCheck(NamedTuple):
    """`usable_rows`' answer, each ``(n,)``: ``finite`` (no NaN/inf entry), ``usable`` (finite, and ``‖g‖²`` and
    ``α‖g‖²`` at most `MAX_SQNORM` in float64), ``nonzero`` (some entry is not 0) and ``sqnorms`` (``‖g‖²`` in
    float64)."""

    finite: torch.Tensor
    usable: torch.Tensor
    nonzero: torch.Tensor
    sqnorms: torch.Tensor


def usable_rows(features: torch.Tensor, fisher_scale: float, rows: int = 4096) -> RowCheck:
    """Which rows the greedy can use: two reductions per chunk of rows, no copy of the features (a float64 copy
    of each chunk, even freed at once, grew a 1M-row process by twice the features' size through the allocator)."""
    finite: list[torch.Tensor] = []
    nonzero: list[torch.Tensor] = []
    sqnorms: list[torch.Tensor] = []
    for i in range(0, features.shape[0], rows):
        chunk = features[i : i + rows]
        largest = torch.linalg.vector_norm(chunk, ord=math.inf, dim=1)  # NaN or inf when an entry is
        finite.append(torch.isfinite(largest))
        nonzero.append(largest > 0)
        sqnorms.append(torch.linalg.vector_norm(chunk, dim=1, dtype=torch.float64).square())
    ok, sq = torch.cat(finite), torch.cat(sqnorms)
    return RowCheck(ok, ok & (sq * max(1.0, fisher_scale) <= MAX_SQNORM), torch.cat(nonzero), sq)


def check_usable(check: RowCheck, fisher_scale: float, *, warn: bool = True) -> list[int]:
    """The rows to skip (not `usable`), after refusing pools that cannot be selected from.

    Logs a warning naming the rows whose norms overflow float64 (and counting the non-finite ones), and one
    when ``α‖g‖²`` is so large that float64 cannot resolve the identity in ``I + αF`` (``warn``).

    Raises:
        ValueError: no row is usable; every usable row is exactly zero; or every usable row's ``α‖g‖²`` is
            below float64's normal range (all gains would underflow to 0 and the picks follow row order).
    """
    usable, sqnorms = check.usable, check.sqnorms
    n = usable.shape[0]
    overflow = (check.finite & ~usable).nonzero().flatten().tolist()
    skipped = (~usable).nonzero().flatten().tolist()
    if not bool(usable.any()):
        raise ValueError(
            f"every row of features ({n} rows) has a NaN or inf entry or a norm beyond float64's range "
            f"(α‖g‖² > {MAX_SQNORM:g}); nothing can be selected. Check the gradient pass (e.g. a diverged model "
            "or a loss of inf)"
        )
    largest = float((fisher_scale * sqnorms[usable]).max())
    if not bool((check.nonzero & usable).any()):
        # Every gain would be 0: the "selection" would be the first rows by index, which looks like a
        # result but carries no information. Say so instead.
        raise ValueError(
            f"every finite row of features ({int(usable.sum())} of {n}) is exactly zero, so every gain is 0 and "
            "there is nothing to select on. The gradients carry no signal: check that the loss reaches the LoRA "
            "adapter (both lora_A and lora_B at zero, a disabled/merged adapter, or every label masked)"
        )
    if largest < torch.finfo(torch.float64).tiny:
        raise ValueError(
            f"the features are too small for float64: the largest α‖g‖² is {largest:.3g}, below its normal range "
            f"({torch.finfo(torch.float64).tiny:.3g}), so every gain would underflow to 0 and the picks would "
            "follow row order. Scale the features up (e.g. feature_norm='unit') or raise fisher_scale"
        )
    if warn and skipped:
        if overflow:
            logger.warning(
                "spice: rows %s have feature norms beyond float64's range (‖g‖² or α‖g‖² > %g); they are never "
                "picked. A diverged gradient? Normalise the features (feature_norm='unit')",
                overflow[:10] if len(overflow) <= 10 else f"{overflow[:10]} (and {len(overflow) - 10} more)",
                MAX_SQNORM,
            )
        if len(skipped) > len(overflow):
            logger.warning(
                "spice: %d of %d rows have non-finite features; they are never picked", len(skipped) - len(overflow), n
            )
    if warn and largest > _RESOLVED_SQNORM:
        logger.warning(
            "spice: α‖g‖² reaches %.3g: once the picks span the feature space, float64 cannot resolve the "
            "identity in I + αF and later gains are rounding. Normalise the features (feature_norm='unit') or "
            "lower fisher_scale",
            largest,
        )
    return skipped


#: Below this much work (``n · d · k`` multiply-adds per regime pass) the greedy runs on one thread without
#: measuring the idle cores (0.1 s): its small operations do not gain from more.
_SMALL_GREEDY = 10**9


def greedy_threads(config: SpiceConfig, device: torch.device, work: int) -> SelectionThreads:
    """The selection thread policy (`spice_trainer.core.threads.SelectionThreads`) for a greedy run on ``device``.

    ``config.threads`` when set; else one thread for less than `_SMALL_GREEDY` of ``work``, and otherwise as
    many threads as idle cores (capped by torch's count). The greedy's per-pick operations are small: with
    more threads than free cores each waits at a barrier for a descheduled thread, 12× slower with 2 threads
    than with 1 at n = 14,000 on a loaded 2-core machine (bench/greedy.py, bench/README.md). A GPU is left alone.
    """
    requested = config.threads if config.threads is not None else (1 if work < _SMALL_GREEDY else None)
    return SelectionThreads(requested, enabled=torch.device(device).type == "cpu")


def check_initial(initial: Sequence[int] | None, n: int, skipped: Sequence[int]) -> list[int]:
    """``initial`` as a list of row indices, checked against ``n`` rows of which ``skipped`` cannot be selected.

    Raises:
        TypeError: an entry is not an int.
        ValueError: an index is out of range, repeated, or one of ``skipped`` (unusable features).
    """
    if initial is None:
        return []
    if isinstance(initial, torch.Tensor):
        initial = initial.flatten().tolist()
    rows: list[int] = []
    for value in initial:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"initial must hold row indices (ints), got {value!r}")
        rows.append(int(value))
    bad = [r for r in rows if not 0 <= r < n]
    if bad:
        raise ValueError(f"initial has row indices outside [0, {n}): {bad[:10]}; pass indices into features")
    if len(set(rows)) != len(rows):
        dupes = sorted({r for r in rows if rows.count(r) > 1})
        raise ValueError(f"initial has duplicated rows {dupes[:10]}; each row can be selected once")
    bad_finite = sorted(set(rows) & set(skipped))
    if bad_finite:
        raise ValueError(
            f"initial rows {bad_finite[:10]} have non-finite features (or norms beyond float64's range); drop them "
            "from initial or recompute features"
        )
    return rows


def _check_eligible(eligible: Any, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(eligible, torch.Tensor) or eligible.dtype != torch.bool:
        got = f"a tensor of dtype {eligible.dtype}" if isinstance(eligible, torch.Tensor) else type(eligible).__name__
        raise TypeError(f"eligible must be a bool torch.Tensor of shape ({n},), got {got}; use mask.bool()")
    if tuple(eligible.shape) != (n,):
        raise ValueError(f"eligible must have shape ({n},) (one flag per feature row), got {tuple(eligible.shape)}")
    return eligible.to(device)


def progress_bar(total: int, show: bool, desc: str = "spice greedy", unit: str = "pick", *, leave: bool = True) -> Any:
    """A tqdm bar over ``total`` steps when ``show`` (and there is something to show), else `None`.

    The package's one progress-bar factory: the greedy picks, the gradient and loss batches
    (`spice_trainer.features.gradients`), the feature-store chunks (`spice_trainer.pipeline`), the proxy's pools.
    ``leave=False`` clears the bar when it closes.
    """
    if not show or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave)
