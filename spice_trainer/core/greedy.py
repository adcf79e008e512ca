"""The SPICE selection loops: exact, stochastic and pooled greedy, with early stopping.

The loops only compare numbers; every gain, conflict and score comes from `spice_trainer.core.objective`
(apricot's split between optimizers and functions). The public entry point is `select_from_features`.

Greedy rule (DESIGN.md section 1): pick ``argmax_x Δ_x(S) − λ c_x(S)`` over eligible, unpicked rows;
ties go to the lowest row index (``torch.argmax`` returns the first maximum).

Early stopping (SPICE+, ``ω`` = ``stop_ratio``): the pick at step ``t`` is evaluated, and if its watched
quantity (``stop_on="gain"``: ``Δ``, the paper; ``"score"``: ``Δ − λc``) is ``≤ ω · reference`` the run
stops *without* adding that pick (the paper's "stop at the first step where the gain is ≤ ω · first").
``reference`` is ``reference_gain`` when given (then the rule applies from the first pick on), else the
first pick's ``Δ`` of this call (then the rule applies from the second pick on; the first pick is kept).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.core.objective import FisherMethod, RowState, SpiceObjective
from spice_trainer.core.selection import Selection, StopReason

logger = logging.getLogger(__name__)

#: Candidates re-scored exactly per pick when rows are tracked in float32 (see `_greedy_block`).
_REFINE = 8
#: At most this many rows tied exactly at the screening cut are re-scored (the lowest positions).
_TIED = 64
#: Rows the lazy greedy re-scores in a pick's first batch, at least (it follows the last pick's count).
#: The lazy greedy's first shortlist length, and the picks under which a shortlist counts as short-lived (it
#: then doubles). Measured on bench/greedy.py's n = 14,000, d = 256, k = 1,400: 512 and 8 (256-1,024, 4-32 within 25 %).
_SHORTLIST = 512
_SHORTLIST_GROW = 8

__all__ = ["select_from_features"]


def select_from_features(
    features: torch.Tensor,
    config: SpiceConfig,
    *,
    initial: Sequence[int] | None = None,
    eligible: torch.Tensor | None = None,
    reference_gain: float | None = None,
    show_progress: bool = False,
) -> Selection:
    """Choose a subset of the rows of ``features`` with the SPICE greedy.

    Maximises ``score_x = Δ_x(S) − λ c_x(S)`` one pick at a time, with
    ``Δ_x(S) = log(1 + α g_xᵀ (I + α F_S)⁻¹ g_x)`` maintained exactly and incrementally (no ``n × n``
    kernel) and ``c_x(S) = max(0, −cos(g_x, ḡ_S))``. ``α`` = ``config.fisher_scale``,
    ``λ`` = ``config.conflict_weight``, ``ω`` = ``config.stop_ratio``. Feature normalisation and loss
    guards are *not* applied here (the gradient stage and the pipeline do that).

    Regimes (``config.greedy``):

    - ``"exact"``: every pick is the exact argmax over all remaining eligible rows; ``O(n d)`` per pick.
    - ``"stochastic"``: each pick scores a uniform random sample of ``⌈(n/k) ln(1/ε)⌉`` remaining eligible
      rows (Mirzasoleiman et al. 2015, ``ε`` = ``config.stochastic_epsilon``, ``n`` = eligible rows,
      ``k`` = picks to make) directly from the ``d × d`` state, seeded by ``config.seed``; ``O(s d²)`` per pick.
    - ``"pooled"``: rows are cut in order into pools of ``config.pool_size``; exact greedy makes up to
      ``config.picks_per_pool`` picks inside each pool, the selected set carried across pools (the
      paper's streaming regime). Early stopping ends a *pool's* picks (the reference stays the very first
      pick's gain of the run, or ``reference_gain``) and the stream goes on to the next pool. The result
      equals running exact greedy on each pool in turn with ``initial`` = everything picked so far.

    Stop reasons: ``"budget"`` (``len(initial) + picks == config.budget_count(n)``), ``"early_stop"``
    (the rule above fired; for pooled: at least one pool stopped early and the budget was not reached),
    ``"exhausted"`` (no eligible candidate left, or the stream of pools ran out).

    Zero feature vectors have ``Δ = 0`` and ``c = 0`` (score 0): they are picked only when every other
    eligible row scores ``≤ 0``, and once one would be picked, early stopping (any ``ω ≥ 0``) ends the run.

    Args:
        features: ``(n, d)`` float32/float64/bfloat16/float16 features, on CPU or CUDA; all the work stays
            on ``features.device`` (state in float64).
        config: uses ``budget``, ``fisher_scale``, ``conflict_weight``, ``stop_ratio``, ``stop_on``, ``greedy``,
            ``stochastic_epsilon``, ``pool_size``, ``picks_per_pool``, ``seed``.
        initial: rows already selected (mode ``"grow"``), inserted into ``S`` first in the given order; they
            are never re-picked, not recorded as picks, and count towards the budget (if they already fill
            it, nothing is picked and the stop reason is ``"budget"``).
        eligible: ``(n,)`` bool mask of rows that may be picked; rows with non-finite features are never
            eligible.
        reference_gain: base of early stopping; ``None`` = the first pick's ``Δ`` of this call.
        show_progress: show a tqdm bar over the picks.

    Returns:
        A `Selection`; ``metadata`` holds ``seconds``, ``greedy``, ``method`` (``"primal"``/``"dual"``),
        ``reference_gain`` (the value used), ``n_eligible`` and regime details.

    Raises:
        TypeError: ``features`` is not a floating tensor, or ``eligible`` is not a bool tensor.
        ValueError: ``features`` is not 2-D or is empty, every row is non-finite, every finite row is exactly
            zero (no information to select on), the budget exceeds ``n``,
            ``initial`` has out-of-range, duplicated or non-finite rows, ``eligible`` has the wrong shape.
    """
    start = time.perf_counter()
    feats = _check_features(features)
    n = feats.shape[0]
    budget = config.budget_count(n)
    finite = _finite_rows(feats)
    n_finite = int(finite.sum())
    if n_finite == 0:
        raise ValueError(
            f"every row of features ({n} rows) has a NaN or inf entry; nothing can be selected. "
            "Check the gradient pass (e.g. a diverged model or a loss of inf)"
        )
    skipped = (~finite).nonzero().flatten().tolist() if n_finite < n else []
    # Zero the non-finite rows so that no matmul propagates NaN; they are never eligible.
    clean = feats if not skipped else torch.where(finite.unsqueeze(1), feats, torch.zeros((), dtype=feats.dtype))
    if not bool(clean.any()):
        # Every gain would be 0: the "selection" would be the first rows by index, which looks like a
        # result but carries no information. Say so instead.
        raise ValueError(
            f"every finite row of features ({n_finite} of {n}) is exactly zero, so every gain is 0 and there is "
            "nothing to select on. The gradients carry no signal: check that the loss reaches the LoRA adapter "
            "(both lora_A and lora_B at zero, a disabled/merged adapter, or every label masked)"
        )
    init = _check_initial(initial, n, skipped)
    mask = finite.clone()
    if eligible is not None:
        mask &= _check_eligible(eligible, n, feats.device)
    if init:
        mask[torch.tensor(init, device=feats.device)] = False
    n_eligible = int(mask.sum())
    if skipped:
        logger.warning("spice: %d of %d rows have non-finite features; they are never picked", len(skipped), n)

    to_pick = max(0, budget - len(init))
    capacity = len(init) + to_pick
    run = _Run(conflict_weight=config.conflict_weight, stop_ratio=config.stop_ratio, stop_on=config.stop_on)
    run.reference = reference_gain
    run.reference_given = reference_gain is not None
    metadata: dict[str, Any] = {"greedy": config.greedy, "n_eligible": n_eligible, "budget": budget}

    # Incremental greedy keeps every row's gain; exact (lazy) greedy keeps upper bounds; stochastic evaluates
    # samples from the d × d state (primal); pooled tracks one pool at a time.
    method: FisherMethod = "primal" if config.greedy == "stochastic" else "auto"
    objective = SpiceObjective(
        clean[:0],
        config.fisher_scale,
        capacity=capacity,
        method=method,
        conflict_weight=config.conflict_weight,
        rows="direct",
    )
    for row in init:
        objective.add(clean[row])
    rows: RowState = "direct"
    if config.greedy == "exact":
        rows = "bounds" if config.exact_search == "lazy" else "incremental"
    objective.track(clean, rows)
    run.initial_logdet = objective.logdet
    progress = _progress(to_pick, show_progress)
    reason: StopReason
    try:
        if config.greedy == "exact" and config.exact_search == "lazy":
            reason, lazy = _lazy_block(objective, mask, to_pick, n_eligible, run, progress=progress)
            metadata["shortlist_rebuilds"] = lazy.rebuilds
        elif config.greedy == "exact":
            reason = _greedy_block(objective, mask, to_pick, n_eligible, run, offset=0, progress=progress)
        elif config.greedy == "stochastic":
            reason, sample_size = _stochastic(objective, mask, to_pick, n_eligible, run, config, progress)
            metadata["sample_size"] = sample_size
        else:
            reason, pools, stopped = _pooled(objective, clean, mask, to_pick, run, config, progress)
            metadata["pools_visited"] = pools
            metadata["pools_stopped_early"] = stopped
    finally:
        if progress is not None:
            progress.close()
    if to_pick == 0:
        reason = "budget"

    indices = run.indices
    recorded = run.values.tolist()
    gains = [pair[0] for pair in recorded]
    conflicts = [pair[1] for pair in recorded]
    picked_rows = torch.tensor(indices, device=feats.device, dtype=torch.long)
    picked = clean[picked_rows].to(torch.float64)
    base = torch.log1p(config.fisher_scale * (picked * picked).sum(dim=1)).tolist() if indices else []
    lam = config.conflict_weight
    cumulative = np.cumsum([run.initial_logdet, *gains])[1:].tolist()
    metadata["method"] = objective.method
    metadata["reference_gain"] = run.reference
    metadata["initial_objective"] = run.initial_logdet
    metadata["seconds"] = time.perf_counter() - start
    selection = Selection.from_picks(
        indices=list(indices),
        gains=gains,
        base_gains=base,
        conflicts=conflicts,
        conflict_weight=lam,
        objective=cumulative,
        stop_reason=reason,
        n_candidates=n,
        skipped=skipped,
        initial=init,
        config=config.to_dict(),
        metadata=metadata,
    )
    # DEBUG: the callback and the command line write one line per round with these numbers (and the exclusions).
    logger.debug(
        "spice: picked %d (+%d initial) of %d in %.2fs, stop=%s",
        len(indices),
        len(init),
        n,
        metadata["seconds"],
        reason,
    )
    return selection


# ---------------------------------------------------------------------------------------------
# loops
# ---------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """The picks recorded so far and the early-stopping state, shared by the loops."""

    conflict_weight: float
    stop_ratio: float | None
    stop_on: str
    reference: float | None = None
    reference_given: bool = False
    initial_logdet: float = 0.0
    indices: list[int] = field(default_factory=list)
    # (Δ, c) per pick in one growing (capacity, 2) buffer on the features' device: no per-pick tensor outlives
    # its pick (thousands of tiny long-lived tensors fragment the allocator's heap, measured in bench/greedy.py).
    _buffer: torch.Tensor | None = None

    def should_stop(self, gain: float, score: float) -> bool:
        """The SPICE+ rule for a candidate pick (see the module docstring); sets the reference on first use."""
        if self.reference is None:
            self.reference = gain  # the first pick defines the reference and is kept
            return False
        if self.stop_ratio is None:
            return False
        watched = gain if self.stop_on == "gain" else score
        return watched <= self.stop_ratio * self.reference

    @property
    def values(self) -> torch.Tensor:
        """``(picks, 2)``: ``(Δ, c)`` per pick."""
        if self._buffer is None:
            return torch.zeros(0, 2, dtype=torch.float64)
        return self._buffer[: len(self.indices)]

    @property
    def gains(self) -> list[torch.Tensor]:
        """``Δ`` per pick (0-d tensors)."""
        return list(self.values[:, 0])

    @property
    def conflicts(self) -> list[torch.Tensor]:
        """``c`` per pick (0-d tensors)."""
        return list(self.values[:, 1])

    def record(self, row: int, gain: torch.Tensor, conflict: torch.Tensor) -> None:
        """Append a pick; ``gain`` and ``conflict`` are 0-d tensors (copied, never kept)."""
        t = len(self.indices)
        if self._buffer is None or t == self._buffer.shape[0]:
            grown = torch.zeros(max(64, 2 * t), 2, dtype=torch.float64, device=gain.device)
            if self._buffer is not None:
                grown[:t] = self._buffer
            self._buffer = grown
        self._buffer[t, 0] = gain
        self._buffer[t, 1] = conflict
        self.indices.append(row)


def _greedy_block(
    objective: SpiceObjective,
    mask: torch.Tensor,
    quota: int,
    remaining: int,
    run: _Run,
    *,
    offset: int,
    progress: Any,
) -> StopReason:
    """Exact greedy over the rows the objective tracks (all rows, or a pool starting at row ``offset``).

    ``mask: (m,)`` marks the tracked rows available at the start; ``remaining`` is its count. Each pick is
    `best_candidate`.
    """
    blocked = ~mask
    for _ in range(quota):
        if remaining == 0:
            return "exhausted"
        at, gain_t, conflict_t, score_t = best_candidate(objective, blocked, remaining)
        pos, gain, score = torch.stack([at.to(score_t.dtype), gain_t, score_t]).tolist()  # one sync per pick
        local = int(pos)
        if run.should_stop(gain, score):
            return "early_stop"
        row = offset + local
        objective.add(objective.vector(local))
        blocked[local] = True
        remaining -= 1
        run.record(row, gain_t, conflict_t)
        if progress is not None:
            progress.update(1)
    return "budget"


def _lazy_block(
    objective: SpiceObjective, mask: torch.Tensor, quota: int, remaining: int, run: _Run, *, progress: Any
) -> tuple[StopReason, LazyArgmax]:
    """Exact greedy by lazy evaluation over the rows the objective bounds (``rows="bounds"``)."""
    lazy = LazyArgmax(objective, mask)
    for _ in range(quota):
        if remaining == 0:
            return "exhausted", lazy
        at, gain, score, (gain_t, conflict_t, _) = lazy.best()
        if run.should_stop(gain, score):
            return "early_stop", lazy
        objective.add(objective.vector(at))
        lazy.block(at)
        remaining -= 1
        run.record(at, gain_t, conflict_t)
        if progress is not None:
            progress.update(1)
    return "budget", lazy


#: Scores within this relative distance of the best count as tied, and the lowest row wins: two evaluations of
#: the same row's score by different arithmetic (another batch, another kernel) differ by ~1e-16 relative, so
#: exact duplicates would otherwise be ordered by rounding.
TIE = 1e-12


def lowest_best(scores: torch.Tensor) -> int:
    """The first position whose score is within `TIE` of the maximum of ``scores: (m,)`` (rows in ascending order)."""
    top = float(scores.max())
    return int((scores >= top - TIE * abs(top)).nonzero()[0])


class LazyArgmax:
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

    def __init__(self, objective: SpiceObjective, mask: torch.Tensor, *, shortlist: int = _SHORTLIST) -> None:
        self.objective = objective
        self.bound = objective.upper_bounds().clone().masked_fill_(~mask.to(torch.bool), -math.inf)
        self.size = max(1, shortlist)
        self.active: torch.Tensor | None = None  # shortlisted positions, ascending
        self.taken = torch.zeros(0, dtype=torch.bool)
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
            if self.picks < _SHORTLIST_GROW:
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

    def best(self) -> tuple[int, float, float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The best row that is not blocked (the caller knows one exists).

        Returns:
            ``(position, Δ, Δ − λc, (Δ, c, Δ − λc))``: the winner, its gain and score as floats, and the three
            numbers as 0-d float64 tensors (evaluated from the set state alone, so that they do not depend on
            how the row was found).
        """
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
                raise RuntimeError("LazyArgmax.best() called with no row left to pick")
            # Some row outside the shortlist may score as high: shortlist every row whose bound reaches this.
            self._rebuild(reach)
        # The shortlist's float64 values drift from the set state's by ~1e-14: every row that may be tied.
        close = (scores >= value - 1e3 * TIE * abs(value)).nonzero().flatten()
        if close.numel() > 1:
            found = objective.scores_at(self.active[close])
            j = int(close[lowest_best(found.scores)])
        self._local = j
        position = int(self.active[j])
        gains, conflicts, scores_at = objective.scores_at(self.active[j : j + 1])
        return position, float(gains[0]), float(scores_at[0]), (gains[0], conflicts[0], scores_at[0])

    def block(self, position: int) -> None:
        """Take ``position`` out for good (it was just returned by `best` and picked)."""
        self.bound[position] = -math.inf
        active = self.active
        if active is not None and 0 <= self._local < active.shape[0] and int(active[self._local]) == position:
            self.taken[self._local] = True
        self.picks += 1


def best_candidate(
    objective: SpiceObjective, blocked: torch.Tensor, remaining: int
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


def _stochastic(
    objective: SpiceObjective,
    mask: torch.Tensor,
    to_pick: int,
    n_eligible: int,
    run: _Run,
    config: SpiceConfig,
    progress: Any,
) -> tuple[StopReason, int]:
    """Stochastic ("lazier than lazy") greedy: each pick is the best of a random sample of candidates."""
    if to_pick == 0 or n_eligible == 0:
        return ("budget" if to_pick == 0 else "exhausted"), 0
    sample_size = max(1, math.ceil(n_eligible / to_pick * math.log(1.0 / config.stochastic_epsilon)))
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    # Remaining candidates with O(1) removal (swap with the last) so a pick never costs O(n) on the host.
    remaining = mask.nonzero().flatten().cpu().numpy().astype(np.int64)
    position = np.full(mask.shape[0], -1, dtype=np.int64)
    position[remaining] = np.arange(remaining.shape[0])
    size = remaining.shape[0]
    device = objective.features.device
    for _ in range(to_pick):
        if size == 0:
            return "exhausted", sample_size
        if sample_size >= size:
            chosen = np.sort(remaining[:size])
        else:
            chosen = np.sort(remaining[_sample_positions(size, sample_size, generator)])
        rows = torch.from_numpy(chosen).to(device)
        gains, conflicts, scores = objective.scores_at(rows)
        j = lowest_best(scores)
        gain, score = torch.stack([gains[j], scores[j]]).tolist()
        row = int(chosen[j])
        if run.should_stop(gain, score):
            return "early_stop", sample_size
        objective.add(objective.vector(row))
        last = remaining[size - 1]
        at = position[row]
        remaining[at] = last
        position[last] = at
        position[row] = -1
        size -= 1
        run.record(row, gains[j], conflicts[j])
        if progress is not None:
            progress.update(1)
    return "budget", sample_size


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


def _pooled(
    objective: SpiceObjective,
    features: torch.Tensor,
    mask: torch.Tensor,
    to_pick: int,
    run: _Run,
    config: SpiceConfig,
    progress: Any,
) -> tuple[StopReason, int, int]:
    """The paper's stream: exact greedy inside consecutive pools, the selected set carried along."""
    n = mask.shape[0]
    device = mask.device
    picked = 0
    pools = 0
    stopped = 0
    for begin in range(0, n, config.pool_size):
        if picked >= to_pick:
            break
        rows = torch.arange(begin, min(begin + config.pool_size, n), device=device)
        pool_mask = mask[rows].clone()
        available = int(pool_mask.sum())
        pools += 1
        if available == 0:
            continue
        objective.track(features[rows], "incremental")
        quota = min(config.picks_per_pool, to_pick - picked)
        before = len(run.indices)
        reason = _greedy_block(objective, pool_mask, quota, available, run, offset=begin, progress=progress)
        picked += len(run.indices) - before
        stopped += reason == "early_stop"
    if picked >= to_pick:
        return "budget", pools, stopped
    return ("early_stop" if stopped else "exhausted"), pools, stopped


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


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


def _finite_rows(features: torch.Tensor, rows: int = 16384) -> torch.Tensor:
    """``(n,)`` bool: rows without NaN/inf, checked a chunk at a time (``isfinite`` makes several
    ``(n, d)`` temporaries)."""
    return torch.cat([torch.isfinite(features[i : i + rows]).all(dim=1) for i in range(0, features.shape[0], rows)])


def _check_initial(initial: Sequence[int] | None, n: int, skipped: list[int]) -> list[int]:
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
            f"initial rows {bad_finite[:10]} have non-finite features; drop them from initial or recompute features"
        )
    return rows


def _check_eligible(eligible: Any, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(eligible, torch.Tensor) or eligible.dtype != torch.bool:
        got = f"a tensor of dtype {eligible.dtype}" if isinstance(eligible, torch.Tensor) else type(eligible).__name__
        raise TypeError(f"eligible must be a bool torch.Tensor of shape ({n},), got {got}; use mask.bool()")
    if tuple(eligible.shape) != (n,):
        raise ValueError(f"eligible must have shape ({n},) (one flag per feature row), got {tuple(eligible.shape)}")
    return eligible.to(device)


def _progress(total: int, show: bool) -> Any:
    if not show or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="spice greedy", unit="pick")
