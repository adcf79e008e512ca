"""The SPICE objective: the Fisher log-det state, the conflict term and per-row state (the math, no selection loop).

Symbols (Chang et al., "SPICE", ICLR 2026; docs/concepts.md, section 2):

- ``g_i``: the feature (projected gradient) of candidate i, a row of ``G: (n, d)``.
- ``F_S = Σ_{i∈S} g_i g_iᵀ``; utility ``U(S) = log det(I + α F_S)``, ``α`` = ``fisher_scale``.
- Marginal gain (matrix determinant lemma): ``Δ_x(S) = log(1 + α s_x)`` with ``s_x = g_xᵀ M⁻¹ g_x``,
  ``M = I + α F_S``.
- Base term ``b_x = log(1 + α‖g_x‖²)`` and interaction ``ε_x(S) = Δ_x(S) − b_x ≤ 0``.
- Conflict ``c_x(S) = max(0, −cos(g_x, r_S))`` against a reference direction ``r_S``: by default the mean
  of the selected features ``ḡ_S`` (``c = 0`` for ``S = ∅``), or a fixed direction ``r`` given by the caller
  (a trusted set's mean gradient, a robust pool consensus); ``cos(a, b) = aᵀb / (‖a‖‖b‖ + η)``, ``η = 1e-8``.
- Score ``Δ − λ c``, ``λ`` = ``conflict_weight``.

The state is split in two on purpose, so that a distributed selection can shard the rows and a pooled one
can swap them:

- `FisherLogDet` and `ConflictTracker` hold the *set* state (``M⁻¹`` or the Cholesky factor of the set
  kernel; the running sum ``Σ_S g`` or the fixed reference). They are updated with the picked feature vector
  ``g_j`` itself, never with a row index, so every rank can apply the same broadcast vector.
- The *row* state of the block of rows being selected from (a whole pool, a shard or one pool of a stream):
  `RowScores` keeps every row's ``s_i`` and ``g_iᵀ Σ_S g`` exact and incremental (``O(m d)`` per pick), for
  the incremental greedy; `RowBounds` keeps only upper bounds of ``Δ_i``, tightened in blocks by one matrix
  product every few picks, for the lazy greedy.
- `SpiceObjective` ties them together behind the `Objective` protocols that the greedy regimes use
  (`Objective`, and the capabilities `IncrementalObjective` and `BoundedObjective` of the two searches).

Nothing here ever forms an ``n × n`` kernel. Set state and row state are float64 (the rank-1 downdates of
``M⁻¹`` and ``s_i`` run for thousands of steps); features are upcast once or a chunk at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

import torch

FisherMethod = Literal["auto", "primal", "dual"]
#: How the objective keeps the rows of its block: every score exact and incremental, upper bounds only
#: (lazy greedy), or nothing (each asked row is evaluated from the set state: stochastic greedy).
RowState = Literal["incremental", "bounds", "direct"]

#: η in the cosine denominator of the conflict term (docs/concepts.md, section 2).
CONFLICT_ETA = 1e-8

#: Relative slack (of ``‖g‖²``) added to every upper bound of ``s``: covers the float64 rounding of two
#: evaluations of the same ``s`` by different arithmetic (a bound refresh, a direct evaluation), which the
#: proof that ``s`` only decreases does not see. Float64 errors here are ~1e-13 after 10⁴ picks.
_BOUND_SLACK = 1e-9


class Scores(NamedTuple):
    """``(Δ, c, Δ − λc)`` for some rows, each ``(m,)`` float64."""

    gains: torch.Tensor
    conflicts: torch.Tensor
    scores: torch.Tensor


class Evaluation(NamedTuple):
    """One row's numbers as Python floats: ``Δ``, ``c``, ``Δ − λc`` and ``b = log(1 + α‖g‖²)``."""

    gain: float
    conflict: float
    score: float
    base: float


class Objective(Protocol):
    """What every greedy regime needs from an objective (apricot's split: the loop never sees the math).

    An objective has a *set* (grown with `add`) and a *block* of candidate rows (set with `track`); rows are
    addressed by their position in the block, ``0 .. m − 1``. The searches that find an exact argmax need one
    more capability each: `IncrementalObjective` or `BoundedObjective`.
    """

    @property
    def device(self) -> torch.device:
        """Where the state lives (the features' device)."""
        ...

    @property
    def method(self) -> str:
        """The representation of the set state (``"primal"`` or ``"dual"``)."""
        ...

    @property
    def logdet(self) -> float:
        """``U(S) = log det(I + α F_S)`` of the current set."""
        ...

    def track(self, block: torch.Tensor, rows: RowState) -> None:
        """Select from the rows of ``block: (m, d)`` from now on, keeping the set; ``rows`` is the row state a
        search needs (``"incremental"``, ``"bounds"``) or ``"direct"`` for none."""
        ...

    def scores_at(self, positions: torch.Tensor) -> Scores:
        """The given rows' scores, evaluated exactly (float64) from the set state."""
        ...

    def evaluate(self, position: int) -> Evaluation:
        """One row's numbers, evaluated alone from the set state with fixed arithmetic (the same bits whichever
        search, batch or rank asks)."""
        ...

    def vector(self, position: int) -> torch.Tensor:
        """The feature vector ``(d,)`` of one tracked row (what `add` takes when that row is picked)."""
        ...

    def add(self, g: torch.Tensor) -> torch.Tensor:
        """Insert the feature vector ``g: (d,)`` into the set; returns its gain Δ (0-d tensor)."""
        ...


class IncrementalObjective(Objective, Protocol):
    """An objective that keeps every tracked row's score (``rows="incremental"``)."""

    @property
    def screened(self) -> bool:
        """True when `scores` only ranks to within float32 rounding (`scores_at` is exact)."""
        ...

    def scores(self) -> Scores:
        """Every tracked row's scores."""
        ...


class BoundedObjective(Objective, Protocol):
    """An objective that keeps upper bounds of its rows' scores and a shortlist of exact ones
    (``rows="bounds"``), for the lazy search."""

    @property
    def bounds_version(self) -> int:
        """Changes whenever `upper_bounds` may have tightened."""
        ...

    def upper_bounds(self) -> torch.Tensor:
        """``(m,)`` float64 upper bounds of every tracked row's score, valid now and for every larger set."""
        ...

    def refresh_bounds(self) -> None:
        """Tighten `upper_bounds` with every pick so far."""
        ...

    def bound_after(self, positions: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        """Upper bounds of the given rows' scores for every set containing the current one, from their gains
        ``Δ`` now."""
        ...

    def shortlist(self, positions: torch.Tensor) -> None:
        """Keep the given rows' scores exact and incremental from now on."""
        ...

    def shortlist_scores(self) -> Scores:
        """The shortlisted rows' scores (exact), in shortlist order."""
        ...

    def shortlist_values(self) -> torch.Tensor:
        """The shortlisted rows' ``Δ − λc`` only."""
        ...


# ---------------------------------------------------------------------------------------------
# set state
# ---------------------------------------------------------------------------------------------


class FisherLogDet:
    """The set state of ``U(S) = log det(I + α F_S)``: answers ``M⁻¹ g`` and ``gᵀ M⁻¹ g``.

    Two exact representations of ``M⁻¹ = (I + α F_S)⁻¹``:

    - ``"primal"`` keeps the ``d × d`` inverse and downdates it after each pick (Sherman-Morrison):
      ``u = M⁻¹ g_j``, ``M⁻¹ ← M⁻¹ − α u uᵀ / (1 + α g_jᵀ u)``. Cost ``O(d²)`` per pick.
    - ``"dual"`` keeps the selected vectors ``V: (t, d)`` and the Cholesky factor ``L`` of the
      ``t × t`` set kernel ``K = I + α V Vᵀ`` (Chen et al. 2018, "fast greedy MAP inference for DPP"),
      extended by one row per pick, and applies Woodbury: ``M⁻¹ g = g − α Vᵀ K⁻¹ V g``. Cost
      ``O(t d + t²)`` per pick, cheaper while the set is smaller than ``d``.

    Both give ``s = gᵀ M⁻¹ g`` and the same gains up to rounding (tested). ``"auto"`` picks the dual
    when ``capacity < d``.

    Args:
        dim: ``d``, the feature dimension.
        fisher_scale: ``α > 0``.
        capacity: the largest set size this state will hold (the budget, initial rows included);
            the dual preallocates ``(capacity, d)`` and ``(capacity, capacity)``.
        method: ``"auto"``, ``"primal"`` or ``"dual"``.
        device: where the state lives (follow the features).
        dtype: the state's dtype; float64 by default.
    """

    def __init__(
        self,
        dim: int,
        fisher_scale: float,
        *,
        capacity: int,
        method: FisherMethod = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if method not in ("auto", "primal", "dual"):
            raise ValueError(f"method must be 'auto', 'primal' or 'dual', got {method!r}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.dim = dim
        self.fisher_scale = float(fisher_scale)
        self.capacity = capacity
        self.method: Literal["primal", "dual"] = (
            ("dual" if capacity < dim else "primal") if method == "auto" else method
        )
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.size = 0
        # log det(I + α F_S) as a 0-d tensor, so that a pick never forces a host sync.
        self._logdet = torch.zeros((), device=self.device, dtype=dtype)
        if self.method == "primal":
            self._minv: torch.Tensor | None = None  # identity until the first pick (saves a d×d pass)
        else:
            self._vectors = torch.zeros(capacity, dim, device=self.device, dtype=dtype)
            self._chol = torch.zeros(capacity, capacity, device=self.device, dtype=dtype)

    @property
    def logdet(self) -> float:
        """``log det(I + α F_S)`` of the current set (the sum of the inserted gains)."""
        return float(self._logdet)

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        """``M⁻¹ g`` for ``g: (d,)`` or ``(d, m)``."""
        if g.dtype != self.dtype or g.device != self.device:
            g = g.to(device=self.device, dtype=self.dtype)
        if self.size == 0:
            return g.clone()
        if self.method == "primal":
            assert self._minv is not None
            return self._minv @ g
        t = self.size
        v = self._vectors[:t]
        y = torch.linalg.solve_triangular(self._chol[:t, :t], (v @ g).reshape(t, -1), upper=False)
        z = torch.linalg.solve_triangular(self._chol[:t, :t].T, y, upper=True)
        return g - self.fisher_scale * (v.T @ z).reshape(g.shape)

    def quad(self, block: torch.Tensor) -> torch.Tensor:
        """``s_i = g_iᵀ M⁻¹ g_i`` for every row of ``block: (m, d)``; returns ``(m,)`` in the state dtype.

        Rows are upcast to the state dtype a chunk at a time (bounded temporary memory).
        """
        return _chunked(block.to(self.device), self.dtype, self._quad)

    def _quad(self, block: torch.Tensor) -> torch.Tensor:
        if self.method == "primal" and self.size:
            assert self._minv is not None
            return ((block @ self._minv) * block).sum(dim=1).clamp_min_(0.0)
        sq = (block * block).sum(dim=1)
        if self.size == 0:
            return sq
        t = self.size
        # s = ‖g‖² − α ‖L⁻¹ V g‖²
        w = torch.linalg.solve_triangular(self._chol[:t, :t], self._vectors[:t] @ block.T, upper=False)
        return (sq - self.fisher_scale * (w * w).sum(dim=0)).clamp_min_(0.0)

    def add(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Insert ``g: (d,)`` into the set.

        Returns:
            ``(Δ, u, denom)``: the gain ``Δ = log(1 + α gᵀM⁻¹g)`` of ``g`` before insertion (0-d tensor),
            ``u = M⁻¹ g`` (before insertion, ``(d,)``) and ``denom = 1 + α gᵀ u`` (a 0-d tensor), so that
            rows can downdate ``s_i ← s_i − α (g_iᵀ u)² / denom``.

        Raises:
            RuntimeError: if the set is already at ``capacity`` (dual only).
        """
        if g.dtype != self.dtype or g.device != self.device:
            g = g.to(device=self.device, dtype=self.dtype)
        g = g.reshape(self.dim)
        alpha = self.fisher_scale
        u = self.solve(g)
        s = torch.dot(g, u).clamp_min(0.0)
        denom = 1.0 + alpha * s
        if self.method == "primal":
            if self._minv is None:
                self._minv = torch.eye(self.dim, device=self.device, dtype=self.dtype)
            self._minv.addr_(u, u, alpha=-alpha / float(denom))
        else:
            t = self.size
            if t >= self.capacity:
                raise RuntimeError(f"dual Fisher state is full (capacity={self.capacity}); raise capacity")
            # New Cholesky row of K = I + α V Vᵀ: l = L⁻¹ (α V g), diagonal sqrt(1 + α‖g‖² − ‖l‖²) = sqrt(denom).
            if t > 0:
                ell = torch.linalg.solve_triangular(
                    self._chol[:t, :t], (alpha * (self._vectors[:t] @ g)).unsqueeze(1), upper=False
                ).squeeze(1)
                self._chol[t, :t] = ell
            self._chol[t, t] = torch.sqrt(denom)
            self._vectors[t] = g
        self.size += 1
        gain = torch.log1p(alpha * s)
        self._logdet += gain
        return gain, u, denom


class ConflictTracker:
    """The conflict reference ``r_S`` of ``c_x(S) = max(0, −cos(g_x, r_S))``.

    By default ``r_S = ḡ_S = Σ_S g / t``, the mean of the selected set (``c = 0`` for ``S = ∅``); with
    ``reference`` given, ``r_S = r`` is that fixed direction for every set, the empty one included.
    ``cos(a, b) = aᵀb / (‖a‖‖b‖ + η)``. Rows keep the dot products ``g_xᵀ v`` with `vector` themselves
    (`RowScores`, or computed on demand); this class turns them into ``c``.

    Args:
        dim: ``d``.
        reference: ``(d,)`` a fixed reference direction, or `None` for the selected set's mean.
        device, dtype: where and in what the sums live (float64 by default).
    """

    def __init__(
        self,
        dim: int,
        *,
        reference: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ):
        self.dim = dim
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.total = torch.zeros(dim, device=self.device, dtype=dtype)
        self.size = 0
        self.reference: torch.Tensor | None = None
        if reference is not None:
            self.reference = _check_reference(reference, dim).to(device=self.device, dtype=dtype)
            self._reference_norm = torch.linalg.vector_norm(self.reference)
            self._reference_norm_value = float(self._reference_norm)

    @property
    def fixed(self) -> bool:
        """True when the reference is a fixed direction: every row's ``c`` is then a constant."""
        return self.reference is not None

    @property
    def vector(self) -> torch.Tensor:
        """``v: (d,)`` such that ``c_x`` is a function of ``g_xᵀ v`` and ``‖g_x‖``: ``Σ_S g`` or ``r``."""
        return self.reference if self.reference is not None else self.total

    @property
    def active(self) -> bool:
        """False while every ``c`` is 0 (the set's mean of an empty set)."""
        return self.fixed or self.size > 0

    def add(self, g: torch.Tensor) -> None:
        """Insert ``g: (d,)`` into the sum."""
        self.total += g.to(device=self.device, dtype=self.dtype).reshape(self.dim) if g.dtype != self.dtype else g
        self.size += 1
        self._mean_norm = torch.linalg.vector_norm(self.total) / float(self.size)
        self._mean_norm_value = float(self._mean_norm)

    def conflict_of(self, dot: float, norm: float) -> float:
        """`conflicts` for one row, from ``dot = g_xᵀ v`` and ``norm = ‖g_x‖`` as floats."""
        if self.reference is not None:
            cos = dot / (norm * self._reference_norm_value + CONFLICT_ETA)
        elif self.size == 0:
            return 0.0
        else:
            cos = (dot / float(self.size)) / (norm * self._mean_norm_value + CONFLICT_ETA)
        return max(0.0, -cos)

    def conflicts(self, dots: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """``c`` from ``dots = G v: (m,)`` (``v`` = `vector`) and ``norms = ‖g_x‖: (m,)``."""
        if self.reference is not None:
            cos = dots / (norms * self._reference_norm + CONFLICT_ETA)
            return (-cos).clamp_min_(0.0)
        if self.size == 0:
            return torch.zeros_like(dots)
        cos = (dots / float(self.size)) / (norms * self._mean_norm + CONFLICT_ETA)
        return (-cos).clamp_min_(0.0)

    def floor(self, block: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """A lower bound of ``c`` for the rows of ``block: (m, d)`` valid for every later set: 0 for the
        set's mean (it moves), the value itself (less rounding) for a fixed reference."""
        if self.reference is None:
            return torch.zeros_like(norms)
        dots = _chunked(block, self.dtype, lambda chunk: chunk @ self.vector)
        # The same c is recomputed later by other arithmetic (other batches): keep the floor below it.
        return (self.conflicts(dots, norms) - 1e-12).clamp_min_(0.0)


def _check_reference(reference: torch.Tensor, dim: int) -> torch.Tensor:
    if not isinstance(reference, torch.Tensor) or not reference.is_floating_point():
        got = f"dtype {reference.dtype}" if isinstance(reference, torch.Tensor) else type(reference).__name__
        raise TypeError(f"conflict_reference must be a floating torch.Tensor of shape ({dim},), got {got}")
    if tuple(reference.shape) != (dim,):
        raise ValueError(
            f"conflict_reference must have shape ({dim},) (one entry per feature column), got {tuple(reference.shape)}"
        )
    ref = reference.double()
    if not bool(torch.isfinite(ref).all()):
        raise ValueError("conflict_reference has NaN or inf entries; pass a finite direction")
    if not bool(ref.any()):
        raise ValueError(
            "conflict_reference is the zero vector, which has no direction; pass a non-zero direction "
            "(or None for the selected set's mean)"
        )
    return ref


# ---------------------------------------------------------------------------------------------
# row state
# ---------------------------------------------------------------------------------------------


class RowScores:
    """Per-row state for one block of rows: ``s_i = g_iᵀ M⁻¹ g_i`` and ``g_iᵀ v``, kept exact.

    After a pick with ``u = M⁻¹ g_j`` and ``denom = 1 + α g_jᵀ u`` one product ``P = [u, g_j]ᵀ Gᵀ: (2, m)``
    updates both: ``s_i ← s_i − α P_{0i}² / denom`` and (set-mean reference) ``dot_i ← dot_i + P_{1i}``.
    ``O(m d)`` per pick.

    Precision: ``s``, ``dot`` and the norms are float64. The copy of the features that the per-pick product
    reads is float64 for float64 input and float32 otherwise (bfloat16/float16 are upcast once): the product is
    memory-bound, and float32 halves its traffic. Its rounding (relative ~1e-7 per product) is far below the
    float32 features' own precision; `bench/greedy.py` measures the effect on the picks. The copy is stored
    transposed, ``(d, m)``, which makes the two-column product about twice as fast on CPU.

    Args:
        block: ``(m, d)`` features of the rows (any float dtype).
        fisher: the set state, used once to initialise ``s`` (a pool that starts mid-stream).
        conflict: the conflict reference, used once to initialise the dot products.
        dtype: the dtype of ``s`` and the dot products (float64 by default).
        exact: read the features in float64 whatever their dtype (a small block: every score exact).
    """

    def __init__(
        self,
        block: torch.Tensor,
        fisher: FisherLogDet,
        conflict: ConflictTracker,
        *,
        dtype: torch.dtype = torch.float64,
        exact: bool = False,
    ) -> None:
        self.fisher_scale = fisher.fisher_scale
        self.dtype = dtype
        self.follow_set = not conflict.fixed
        block = block.to(device=fisher.device)
        feature_dtype = torch.float64 if exact or block.dtype == torch.float64 else torch.float32
        self.sqnorms = _row_sqnorms(block, dtype)
        self.norms = self.sqnorms.sqrt()
        copy, self._unscale = _screening_copy(block, feature_dtype, self.sqnorms)
        self.features_t = copy.T.contiguous()  # (d, m)
        self.s = fisher.quad(block).to(dtype) if fisher.size else self.sqnorms.clone()
        if conflict.active:
            vector = conflict.vector.to(dtype)
            self.dots = _chunked(block, dtype, lambda chunk: chunk @ vector)
        else:
            self.dots = torch.zeros_like(self.sqnorms)

    def update(self, u: torch.Tensor, scale: float, g: torch.Tensor) -> None:
        """Apply one pick: ``u = M⁻¹ g_j`` (before the pick), ``scale = α / (1 + α g_jᵀ u)``, ``g = g_j``.

        The product reads ``ũ = √scale · u`` (``‖ũ‖ < 1``) and ``g_j / ‖g_j‖``, so that its entries are at most the
        rows' norms: no float32 overflow, whatever the features' scale.
        """
        norm = float(torch.linalg.vector_norm(g))
        lhs = torch.stack([u * math.sqrt(scale), g / norm if norm > 0.0 else g])
        if lhs.dtype != self.features_t.dtype:
            lhs = lhs.to(self.features_t.dtype)
        proj = lhs @ self.features_t
        if proj.dtype != self.dtype:
            proj = proj.to(self.dtype)
        if self._unscale != 1.0:
            proj.mul_(self._unscale)
        self.s.sub_(proj[0].square_()).clamp_min_(0.0)
        if self.follow_set:
            self.dots.add_(proj[1], alpha=norm)

    def gains(self) -> torch.Tensor:
        """``Δ_i = log(1 + α s_i)``, ``(m,)``."""
        return torch.log1p(self.s * self.fisher_scale)

    def merged(self, where: torch.Tensor, fresh: RowScores) -> RowScores:
        """A state for new rows: row ``i`` is this state's row ``where[i]`` when ``where[i] >= 0``, else the next
        row of ``fresh`` (a state started at the same set)."""
        if fresh._unscale != self._unscale or fresh.features_t.dtype != self.features_t.dtype:
            raise ValueError("merged() needs two states read in the same precision and scale")
        out = RowScores.__new__(RowScores)
        out.fisher_scale, out.dtype, out.follow_set, out._unscale = (
            self.fisher_scale,
            self.dtype,
            self.follow_set,
            self._unscale,
        )
        kept = where >= 0
        index_new = (~kept).nonzero().flatten()
        index_old = kept.nonzero().flatten()
        source = where[kept]
        for name in ("s", "dots", "sqnorms", "norms"):
            mine, theirs = getattr(self, name), getattr(fresh, name)
            values = torch.empty(where.shape[0], dtype=mine.dtype, device=mine.device)
            values[index_old] = mine[source]
            values[index_new] = theirs
            setattr(out, name, values)
        features = torch.empty(
            self.features_t.shape[0], where.shape[0], dtype=self.features_t.dtype, device=self.features_t.device
        )
        features[:, index_old] = self.features_t[:, source]
        features[:, index_new] = fresh.features_t
        out.features_t = features
        return out


class RowBounds:
    """Per-row upper bounds of ``s_i = g_iᵀ M⁻¹ g_i`` for one block of rows, for the lazy greedy.

    ``s_i`` only decreases as the set grows (``M⁻¹`` shrinks in the Loewner order), so a value computed at an
    earlier set bounds it from above at every later one. This class keeps ``ŝ_i ≈ s_i`` as of the last
    refresh and the scaled directions ``ũ_τ = √(α / denom_τ) · M_τ⁻¹ g_{j_τ}`` of the picks since then, so that
    ``s_i(now) = ŝ_i − Σ_τ (g_iᵀ ũ_τ)²`` (Sherman-Morrison). `refresh` applies the pending directions to every
    row with one ``(m, d) × (d, p)`` product — compute-bound, where the incremental greedy's per-pick
    ``(2, d) × (d, m)`` product is memory-bound.

    Error: the product runs in float32 for float32/bfloat16/float16 features (float64 for float64 ones).
    With ``γ = (d + 4) u`` (``u`` the unit roundoff of that dtype), every computed ``g_iᵀ ũ_τ`` is within
    ``γ ‖g_i‖ ‖ũ_τ‖`` of the exact one, and summing over all refreshed picks (Cauchy-Schwarz, ``Σ e² ≤ ‖g‖²``)
    gives ``|ŝ_i − s_i| ≤ ‖g_i‖² (2γ√W + γ²W)`` with ``W = Σ_τ ‖ũ_τ‖²`` (``≤`` the number of picks, since
    ``‖ũ_τ‖² ≤ α s/(1 + α s) < 1``). `gain_bounds` adds that and `_BOUND_SLACK · ‖g_i‖²`, so the bounds hold for
    the exactly computed ``s`` whatever the rounding.

    Args:
        block: ``(m, d)`` features of the rows.
        fisher: the set state (initialises ``ŝ`` when the set is not empty; gives ``α``).
        history: the most directions kept pending before `update` refreshes on its own.
    """

    def __init__(self, block: torch.Tensor, fisher: FisherLogDet, *, history: int = 256) -> None:
        self.fisher_scale = fisher.fisher_scale
        self.device = fisher.device
        block = block.to(device=self.device)
        self.compute_dtype = torch.float64 if block.dtype == torch.float64 else torch.float32
        self.sqnorms = _row_sqnorms(block, torch.float64)
        self.features, self._unscale = _screening_copy(block, self.compute_dtype, self.sqnorms)
        self.s = fisher.quad(block) if fisher.size else self.sqnorms.clone()
        self._gamma = (block.shape[1] + 4) * torch.finfo(self.compute_dtype).eps / 2
        self._weight = 0.0  # W: Σ ‖ũ‖² over the refreshed picks
        self._pending = torch.zeros(max(1, history), block.shape[1], device=self.device, dtype=torch.float64)
        self.pending = 0
        #: Increases at each refresh (the regime re-reads `gain_bounds` when it changes).
        self.version = 0

    def update(self, u: torch.Tensor, scale: float) -> None:
        """Record one pick (``u = M⁻¹ g_j`` before it, ``scale = α / (1 + α g_jᵀ u)``); refreshes when the
        history is full."""
        if self.pending == self._pending.shape[0]:
            self.refresh()
        torch.mul(u, math.sqrt(scale), out=self._pending[self.pending])
        self.pending += 1

    def refresh(self) -> None:
        """Apply the pending picks to every row's ``ŝ`` (one matrix product, a chunk of rows at a time)."""
        if self.pending == 0:
            return
        directions = self._pending[: self.pending]
        rhs = directions.T.to(self.compute_dtype).contiguous()  # (d, p)
        rows = 16384
        for i in range(0, self.features.shape[0], rows):
            # Squares in the product's dtype, summed in float64: one more rounding u per term, at most
            # u Σ (gᵀũ)² ≤ u ‖g‖² over the whole run (in `_relative_error`).
            dots = self.features[i : i + rows] @ rhs
            sums = dots.square_().sum(dim=1, dtype=torch.float64)
            if self._unscale != 1.0:
                sums.mul_(self._unscale * self._unscale)
            self.s[i : i + rows].sub_(sums).clamp_min_(0.0)
        self._weight += float(directions.square().sum())
        self.pending = 0
        self.version += 1

    def gain_bounds(self) -> torch.Tensor:
        """``(m,)`` upper bounds of every row's ``Δ = log(1 + α s)``, now and for every later set."""
        slack = self._relative_error() * self.sqnorms
        if self._unscale != 1.0:
            # Entries the scaled copy flushed below float32's normal range: at most d (2^-126 · unscale)² each
            # way per product, over every refreshed pick.
            tiny = self.features.shape[1] * (2.0**-126 * self._unscale) ** 2
            slack = slack + 4.0 * tiny * (1.0 + self._weight)
        return torch.log1p(self.fisher_scale * (self.s + slack))

    def _relative_error(self) -> float:
        w = self._weight
        unit = self._gamma / (self.features.shape[1] + 4)
        return 2.0 * self._gamma * math.sqrt(w) + self._gamma * self._gamma * w + unit + _BOUND_SLACK


def _chunked(
    block: torch.Tensor, dtype: torch.dtype, fn: Callable[[torch.Tensor], torch.Tensor], rows: int = 16384
) -> torch.Tensor:
    """``fn`` applied to ``block`` upcast to ``dtype`` chunk by chunk of rows, results concatenated."""
    if block.shape[0] <= rows:
        return fn(block.to(dtype))
    return torch.cat([fn(block[i : i + rows].to(dtype)) for i in range(0, block.shape[0], rows)])


def _screening_copy(block: torch.Tensor, dtype: torch.dtype, sqnorms: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``block`` in ``dtype`` for the per-pick products, and the factor that undoes its scaling.

    Float32 copies of rows with norms beyond ``2^60`` are scaled by a power of two (exact) so that no product
    with a vector of norm at most 1 overflows float32 (max ``2^128``); the products are multiplied back in
    float64. Features of ordinary size are copied as they are (factor 1).
    """
    if dtype == torch.float64 or sqnorms.numel() == 0:
        return block.to(dtype), 1.0
    largest = math.sqrt(float(sqnorms.max()))
    if largest <= 2.0**60:
        return block.to(dtype), 1.0
    shift = math.ceil(math.log2(largest))
    return _chunked(block, torch.float64, lambda chunk: torch.ldexp(chunk, torch.tensor(-shift)).to(dtype)), 2.0**shift


def _row_sqnorms(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``‖g_i‖²`` of every row, ``(m,)``, accumulated in ``dtype`` (a reduction per chunk, no upcast copy)."""
    rows = 4096
    return (
        torch.cat(
            [
                torch.linalg.vector_norm(block[i : i + rows], dim=1, dtype=dtype).square()
                for i in range(0, block.shape[0], rows)
            ]
        )
        if block.shape[0]
        else torch.zeros(0, dtype=dtype, device=block.device)
    )


# ---------------------------------------------------------------------------------------------
# the SPICE objective
# ---------------------------------------------------------------------------------------------


class SpiceObjective:
    """``score_x = Δ_x(S) − λ c_x(S)`` over a block of rows, with the set state it shares (the `Objective`).

    Row state (``rows``): ``"incremental"`` maintains every row's ``Δ`` and ``c`` (`RowScores`, ``O(m d)`` per
    pick) for the incremental greedy; ``"bounds"`` keeps upper bounds (`RowBounds`) for the lazy greedy;
    ``"direct"`` keeps nothing and `scores_at` evaluates the asked rows from the set state (``O(d²)`` each),
    for stochastic greedy. `track` swaps the block (a pool, a shard) while keeping the selected set.

    Args:
        features: ``(m, d)`` the first block of candidate rows (rows must be finite; zero rows are fine).
        fisher_scale: ``α``.
        capacity: the largest set size (initial rows included).
        conflict_weight: ``λ``.
        conflict_reference: ``(d,)`` a fixed direction ``r`` for ``c_x = max(0, −cos(g_x, r))``; `None` for the
            selected set's mean (the paper).
        method: ``"auto"``, ``"primal"`` or ``"dual"`` (see `FisherLogDet`).
        rows: the row state, see above.
        dtype: dtype of the set state and of the per-row state; float64 by default.
    """

    def __init__(
        self,
        features: torch.Tensor,
        fisher_scale: float,
        *,
        capacity: int,
        conflict_weight: float = 0.0,
        conflict_reference: torch.Tensor | None = None,
        method: FisherMethod = "auto",
        rows: RowState = "incremental",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if features.ndim != 2:
            raise ValueError(f"features must be 2-D (n, d), got shape {tuple(features.shape)}")
        self.dtype = dtype
        self.conflict_weight = float(conflict_weight)
        self.fisher = FisherLogDet(
            features.shape[1], fisher_scale, capacity=capacity, method=method, device=features.device, dtype=dtype
        )
        self.conflict = ConflictTracker(
            features.shape[1], reference=conflict_reference, device=features.device, dtype=dtype
        )
        self.track(features, rows)

    @property
    def device(self) -> torch.device:
        """Where the state lives."""
        return self.fisher.device

    @property
    def method(self) -> str:
        """``"primal"`` or ``"dual"``."""
        return self.fisher.method

    @property
    def logdet(self) -> float:
        """``U(S) = log det(I + α F_S)`` of the current set."""
        return self.fisher.logdet

    @property
    def screened(self) -> bool:
        """True when the tracked rows are read in a lower precision than the state (float32 features):
        `scores` then ranks candidates to within rounding, and `scores_at` gives the exact values."""
        return isinstance(self.rows, RowScores) and self.rows.features_t.dtype != self.dtype

    @property
    def bounds_version(self) -> int:
        """Changes whenever `upper_bounds` may have tightened (a refresh of the row bounds)."""
        return self.rows.version if isinstance(self.rows, RowBounds) else 0

    def track(self, block: torch.Tensor, rows: RowState = "incremental") -> None:
        """Select from the rows of ``block: (m, d)`` from now on (positions ``0 .. m − 1``), keeping the set."""
        if rows not in ("incremental", "bounds", "direct"):
            raise ValueError(f"rows must be 'incremental', 'bounds' or 'direct', got {rows!r}")
        self.features = block
        self.short: RowScores | None = None
        self._short_positions: torch.Tensor | None = None
        self._floor: torch.Tensor | None = None
        self.rows: RowScores | RowBounds | None
        if rows == "incremental":
            self.rows = RowScores(block, self.fisher, self.conflict, dtype=self.dtype)
        elif rows == "bounds":
            self.rows = RowBounds(block, self.fisher)
        else:
            self.rows = None

    def scores(self) -> Scores:
        """``(Δ, c, Δ − λc)`` for every tracked row, each ``(m,)``."""
        if not isinstance(self.rows, RowScores):
            raise RuntimeError("scores() needs rows='incremental'; use scores_at(positions) instead")
        gains = self.rows.gains()
        conflicts = self.conflict.conflicts(self.rows.dots, self.rows.norms)
        return Scores(gains, conflicts, gains - self.conflict_weight * conflicts)

    def scores_at(self, positions: torch.Tensor) -> Scores:
        """``(Δ, c, Δ − λc)`` for the tracked rows at ``positions``, evaluated directly from the set state."""
        block = self.features[positions].to(self.fisher.device, self.dtype)
        gains = torch.log1p(self.fisher._quad(block).mul_(self.fisher.fisher_scale))
        if not self.conflict.active:
            conflicts = torch.zeros_like(gains)
        else:
            norms = torch.linalg.vector_norm(block, dim=1)
            conflicts = self.conflict.conflicts(block @ self.conflict.vector, norms)
        if not self.conflict_weight:
            return Scores(gains, conflicts, gains)
        return Scores(gains, conflicts, gains - self.conflict_weight * conflicts)

    def upper_bounds(self) -> torch.Tensor:
        """``(m,)`` upper bounds of every tracked row's score, now and for every larger set (``rows="bounds"``)."""
        if not isinstance(self.rows, RowBounds):
            raise RuntimeError("upper_bounds() needs rows='bounds'")
        bounds = self.rows.gain_bounds()
        if self.conflict_weight and self.conflict.fixed:
            bounds = bounds - self.conflict_weight * self._conflict_floor()
        return bounds

    def shortlist(self, positions: torch.Tensor) -> None:
        """Keep the rows at ``positions`` exact and incremental from now on (``rows="bounds"``): `shortlist_scores`
        gives their scores at every later set for ``O(len · d)`` per pick. Their state starts from the set state
        (``O(d²)`` per row)."""
        old, old_positions = self.short, self._short_positions
        self._short_positions = positions
        if old is None or old_positions is None:
            self.short = RowScores(self.features[positions], self.fisher, self.conflict, dtype=self.dtype, exact=True)
            return
        # Rows already shortlisted keep their exact state; only the others start from the set state.
        lookup = torch.full((self.features.shape[0],), -1, dtype=torch.long, device=positions.device)
        lookup[old_positions] = torch.arange(old_positions.shape[0], device=positions.device)
        where = lookup[positions]
        kept = where >= 0
        fresh = RowScores(self.features[positions[~kept]], self.fisher, self.conflict, dtype=self.dtype, exact=True)
        self.short = old.merged(where, fresh)

    def shortlist_values(self) -> torch.Tensor:
        """``Δ − λc`` of the shortlisted rows (what `shortlist_scores` gives as ``scores``, with ``c`` computed
        only when ``λ > 0``)."""
        short = self.short
        if short is None:
            raise RuntimeError("shortlist_values() needs shortlist(positions) first")
        gains = short.gains()
        if not self.conflict_weight or not self.conflict.active:
            return gains
        return gains.sub_(self.conflict.conflicts(short.dots, short.norms), alpha=self.conflict_weight)

    def shortlist_scores(self) -> Scores:
        """``(Δ, c, Δ − λc)`` of the shortlisted rows, in the order `shortlist` was given (float64, exact)."""
        short = self.short
        if short is None:
            raise RuntimeError("shortlist_scores() needs shortlist(positions) first")
        gains = short.gains()
        conflicts = self.conflict.conflicts(short.dots, short.norms)
        if not self.conflict_weight:
            return Scores(gains, conflicts, gains)
        return Scores(gains, conflicts, gains - self.conflict_weight * conflicts)

    def refresh_bounds(self) -> None:
        """Tighten `upper_bounds` with every pick so far (``rows="bounds"``; one matrix product)."""
        if isinstance(self.rows, RowBounds):
            self.rows.refresh()

    @property
    def pending_picks(self) -> int:
        """Picks not yet applied to `upper_bounds` (``rows="bounds"``)."""
        return self.rows.pending if isinstance(self.rows, RowBounds) else 0

    def bound_after(self, positions: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        """Score upper bounds of the rows at ``positions`` for every set containing the current one, from
        their gains ``Δ`` now: ``s = expm1(Δ)/α`` plus rounding slack, less ``λ`` times the conflict floor."""
        alpha = self.fisher.fisher_scale
        sq = self._sqnorms_at(positions)
        bounds = torch.log1p(torch.expm1(gains) + alpha * _BOUND_SLACK * sq)
        if self.conflict_weight and self.conflict.fixed:
            bounds = bounds - self.conflict_weight * self._conflict_floor()[positions]
        return bounds

    def vector(self, position: int) -> torch.Tensor:
        """The feature vector ``(d,)`` of the tracked row at ``position``."""
        return self.features[position]

    def evaluate(self, position: int) -> Evaluation:
        """``(Δ, c, Δ − λc, b)`` of the tracked row at ``position`` as floats: ``M⁻¹ g`` and three dot products
        in float64, the rest in Python, so that any caller (search, batch, rank) gets the same bits."""
        g = self.features[position].to(device=self.fisher.device, dtype=self.dtype)
        alpha = self.fisher.fisher_scale
        s = max(0.0, float(torch.dot(g, self.fisher.solve(g)))) if self.fisher.size else float(torch.dot(g, g))
        sq = float(torch.dot(g, g))
        gain = math.log1p(alpha * s)
        conflict = (
            self.conflict.conflict_of(float(torch.dot(g, self.conflict.vector)), math.sqrt(sq))
            if self.conflict.active
            else 0.0
        )
        return Evaluation(gain, conflict, gain - self.conflict_weight * conflict, math.log1p(alpha * sq))

    def base_gains_at(self, positions: torch.Tensor) -> torch.Tensor:
        """``b = log(1 + α‖g‖²)`` for the tracked rows at ``positions``."""
        block = self.features[positions].to(self.dtype)
        return torch.log1p(self.fisher.fisher_scale * (block * block).sum(dim=1))

    def add(self, g: torch.Tensor) -> torch.Tensor:
        """Insert ``g: (d,)`` (a broadcast feature vector, not an index); returns its gain Δ (0-d tensor)."""
        if g.dtype != self.dtype or g.device != self.fisher.device:
            g = g.to(device=self.fisher.device, dtype=self.dtype)
        g = g.reshape(-1)
        gain, u, denom = self.fisher.add(g)
        if self.rows is not None or self.short is not None:
            scale = self.fisher.fisher_scale / float(denom)
            if isinstance(self.rows, RowScores):
                self.rows.update(u, scale, g)
            elif isinstance(self.rows, RowBounds):
                self.rows.update(u, scale)
            if self.short is not None:
                self.short.update(u, scale, g)
        self.conflict.add(g)
        return gain

    def _sqnorms_at(self, positions: torch.Tensor) -> torch.Tensor:
        if isinstance(self.rows, RowScores | RowBounds):
            return self.rows.sqnorms[positions]
        block = self.features[positions].to(self.dtype)
        return (block * block).sum(dim=1)

    def _conflict_floor(self) -> torch.Tensor:
        if self._floor is None:
            block = self.features
            norms = _row_sqnorms(block, self.dtype).sqrt()
            self._floor = self.conflict.floor(block, norms)
        return self._floor
