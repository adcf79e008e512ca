"""The SPICE objective: the Fisher log-det state and the conflict tracker (the math, no selection loop).

Symbols (Chang et al., "SPICE", ICLR 2026; DESIGN.md section 1):

- ``g_i``: the feature (projected gradient) of candidate i, a row of ``G: (n, d)``.
- ``F_S = Σ_{i∈S} g_i g_iᵀ``; utility ``U(S) = log det(I + α F_S)``, ``α`` = ``fisher_scale``.
- Marginal gain (matrix determinant lemma): ``Δ_x(S) = log(1 + α s_x)`` with ``s_x = g_xᵀ M⁻¹ g_x``,
  ``M = I + α F_S``.
- Base term ``b_x = log(1 + α‖g_x‖²)`` and interaction ``ε_x(S) = Δ_x(S) − b_x ≤ 0``.
- Conflict ``c_x(S) = max(0, −cos(g_x, ḡ_S))``, ``ḡ_S`` the mean of the selected features,
  ``cos(a, b) = aᵀb / (‖a‖‖b‖ + η)`` with ``η = 1e-8``; ``c = 0`` for ``S = ∅``.
- Score ``Δ − λ c``, ``λ`` = ``conflict_weight``.

The state is split in two on purpose, so that a distributed selection can shard the rows:

- `FisherLogDet` and `ConflictTracker` hold the *set* state (``M⁻¹`` or the Cholesky factor of the
  set kernel; the running sum ``Σ_S g``). They are updated with the picked feature vector ``g_j``
  itself, never with a row index, so every rank can apply the same broadcast vector.
- `RowScores` holds the *per-row* state for one block of rows (a shard or a pool): ``s_i`` and
  ``g_iᵀ Σ_S g``, updated incrementally with one ``G [u, g_j]`` product per pick.
- `SpiceObjective` ties the three together behind the small `Objective` protocol the greedy loops use.

Nothing here ever forms an ``n × n`` kernel. Set state and row state are float64 (the rank-1
downdates of ``M⁻¹`` and ``s_i`` run for thousands of steps); features are upcast once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch

FisherMethod = Literal["auto", "primal", "dual"]

#: η in the cosine denominator of the conflict term (DESIGN.md section 1).
CONFLICT_ETA = 1e-8


class Objective(Protocol):
    """What a greedy loop needs from an objective (apricot's split: the loop never sees the math)."""

    def scores(self, conflict_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Δ, c, Δ − λc)`` for every tracked row, each ``(n,)``."""
        ...

    def scores_at(self, rows: torch.Tensor, conflict_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Δ, c, Δ − λc)`` for the given rows only, each ``(len(rows),)``, evaluated directly."""
        ...

    def add(self, g: torch.Tensor) -> torch.Tensor:
        """Insert the feature vector ``g: (d,)`` into the selected set; returns its gain Δ (0-d tensor)."""
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
        sq = (block * block).sum(dim=1)
        if self.size == 0:
            return sq
        if self.method == "primal":
            assert self._minv is not None
            return ((block @ self._minv) * block).sum(dim=1).clamp_min_(0.0)
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
        g = g.to(device=self.device, dtype=self.dtype).reshape(self.dim)
        alpha = self.fisher_scale
        u = self.solve(g)
        s = torch.dot(g, u).clamp_min(0.0)
        denom = 1.0 + alpha * s
        if self.method == "primal":
            if self._minv is None:
                self._minv = torch.eye(self.dim, device=self.device, dtype=self.dtype)
            self._minv.sub_(torch.outer(u, u).mul_(alpha / denom))
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
    """The running sum ``Σ_S g`` and size ``t`` of the selected set, for ``c_x(S)``.

    ``c_x(S) = max(0, −cos(g_x, ḡ_S))`` with ``ḡ_S = Σ_S g / t`` and ``cos(a, b) = aᵀb / (‖a‖‖b‖ + η)``.
    Rows keep ``g_xᵀ Σ_S g`` themselves (`RowScores`); this class turns such dot products into ``c``.
    """

    def __init__(self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64):
        self.dim = dim
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.total = torch.zeros(dim, device=self.device, dtype=dtype)
        self.size = 0

    def add(self, g: torch.Tensor) -> None:
        """Insert ``g: (d,)`` into the sum."""
        self.total += g.to(device=self.device, dtype=self.dtype).reshape(self.dim)
        self.size += 1

    def conflicts(self, dots: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """``c`` from ``dots = G Σ_S g: (m,)`` and ``norms = ‖g_x‖: (m,)``; zeros for an empty set."""
        if self.size == 0:
            return torch.zeros_like(dots)
        t = float(self.size)
        mean_norm = torch.linalg.vector_norm(self.total) / t
        cos = (dots / t) / (norms * mean_norm + CONFLICT_ETA)
        return (-cos).clamp_min_(0.0)


# ---------------------------------------------------------------------------------------------
# row state
# ---------------------------------------------------------------------------------------------


class RowScores:
    """Per-row state for one block of rows: ``s_i = g_iᵀ M⁻¹ g_i`` and ``g_iᵀ Σ_S g``, kept exact.

    After a pick with ``u = M⁻¹ g_j`` and ``denom = 1 + α g_jᵀ u`` one product ``P = [u, g_j]ᵀ Gᵀ: (2, m)``
    updates both: ``s_i ← s_i − α P_{0i}² / denom`` and ``dot_i ← dot_i + P_{1i}``. ``O(m d)`` per pick.

    Precision: ``s``, ``dot`` and the norms are float64. The copy of the features that the per-pick product
    reads is float64 for float64 input and float32 otherwise (bfloat16/float16 are upcast once): the product is
    memory-bound, and float32 halves its traffic. Its rounding (relative ~1e-7 per product) is far below the
    float32 features' own precision; `bench/greedy.py` measures the effect on the picks. The copy is stored
    transposed, ``(d, m)``, which makes the two-column product about twice as fast on CPU.

    Args:
        block: ``(m, d)`` features of the rows (any float dtype).
        fisher: the set state, used once to initialise ``s`` (a pool that starts mid-stream).
        conflict: the conflict sums, used once to initialise the dot products.
        dtype: the dtype of ``s`` and the dot products (float64 by default).
    """

    def __init__(
        self,
        block: torch.Tensor,
        fisher: FisherLogDet,
        conflict: ConflictTracker,
        *,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.fisher_scale = fisher.fisher_scale
        self.dtype = dtype
        block = block.to(device=fisher.device)
        feature_dtype = torch.float64 if block.dtype == torch.float64 else torch.float32
        self.features_t = block.T.to(feature_dtype).contiguous()  # (d, m)
        self.sqnorms = _row_sqnorms(block, dtype)
        self.norms = self.sqnorms.sqrt()
        self.s = fisher.quad(block).to(dtype) if fisher.size else self.sqnorms.clone()
        if conflict.size:
            self.dots = _chunked(block, dtype, lambda chunk: chunk @ conflict.total.to(dtype))
        else:
            self.dots = torch.zeros_like(self.sqnorms)

    def update(self, u: torch.Tensor, denom: torch.Tensor, g: torch.Tensor) -> None:
        """Apply one pick: ``u = M⁻¹ g_j`` (before the pick), ``denom = 1 + α g_jᵀ u``, ``g = g_j``."""
        lhs = torch.stack([u, g.to(device=u.device, dtype=u.dtype)]).to(self.features_t.dtype)
        proj = (lhs @ self.features_t).to(self.dtype)
        self.s.sub_(proj[0].square_().mul_(self.fisher_scale / denom.to(self.dtype))).clamp_min_(0.0)
        self.dots.add_(proj[1])

    def gains(self) -> torch.Tensor:
        """``Δ_i = log(1 + α s_i)``, ``(m,)``."""
        return torch.log1p(self.fisher_scale * self.s)

    def base_gains(self) -> torch.Tensor:
        """``b_i = log(1 + α‖g_i‖²)``, ``(m,)``."""
        return torch.log1p(self.fisher_scale * self.sqnorms)


def _chunked(
    block: torch.Tensor, dtype: torch.dtype, fn: Callable[[torch.Tensor], torch.Tensor], rows: int = 16384
) -> torch.Tensor:
    """``fn`` applied to ``block`` upcast to ``dtype`` chunk by chunk of rows, results concatenated."""
    if block.shape[0] <= rows:
        return fn(block.to(dtype))
    return torch.cat([fn(block[i : i + rows].to(dtype)) for i in range(0, block.shape[0], rows)])


def _row_sqnorms(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``‖g_i‖²`` of every row, ``(m,)``, accumulated in ``dtype``."""
    return _chunked(block, dtype, lambda chunk: (chunk * chunk).sum(dim=1))


# ---------------------------------------------------------------------------------------------
# the SPICE objective
# ---------------------------------------------------------------------------------------------


class SpiceObjective:
    """``score_x = Δ_x(S) − λ c_x(S)`` over a block of rows, with the set state it shares.

    With ``track_rows=True`` every row's ``Δ`` and ``c`` are maintained incrementally (`RowScores`,
    ``O(n d)`` per pick), for exact greedy. With ``track_rows=False`` only the set state is kept and
    `scores_at` evaluates the asked rows directly (``O(m d²)`` for ``m`` rows), for stochastic greedy.
    `restrict` starts tracking a new block (a pool) while keeping the selected set.

    Args:
        features: ``(n, d)`` candidate features (rows must be finite; zero rows are fine).
        fisher_scale: ``α``.
        capacity: the largest set size (initial rows included).
        method: ``"auto"``, ``"primal"`` or ``"dual"`` (see `FisherLogDet`).
        track_rows: keep every row's gain incrementally.
        dtype: dtype of the set state and of the per-row ``s`` and dot products; float64 by default.
    """

    def __init__(
        self,
        features: torch.Tensor,
        fisher_scale: float,
        *,
        capacity: int,
        method: FisherMethod = "auto",
        track_rows: bool = True,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if features.ndim != 2:
            raise ValueError(f"features must be 2-D (n, d), got shape {tuple(features.shape)}")
        self.features = features
        self.dtype = dtype
        self.fisher = FisherLogDet(
            features.shape[1], fisher_scale, capacity=capacity, method=method, device=features.device, dtype=dtype
        )
        self.conflict = ConflictTracker(features.shape[1], device=features.device, dtype=dtype)
        self.rows: RowScores | None = (
            RowScores(features, self.fisher, self.conflict, dtype=dtype) if track_rows else None
        )

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
        return self.rows is not None and self.rows.features_t.dtype != self.dtype

    def restrict(self, rows: torch.Tensor) -> None:
        """Track only ``features[rows]`` from now on (row positions become ``0..len(rows)-1``)."""
        self.rows = RowScores(self.features[rows], self.fisher, self.conflict, dtype=self.dtype)

    def scores(self, conflict_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Δ, c, Δ − λc)`` for every tracked row, each ``(m,)``."""
        if self.rows is None:
            raise RuntimeError("scores() needs track_rows=True; use scores_at(rows) instead")
        gains = self.rows.gains()
        conflicts = self.conflict.conflicts(self.rows.dots, self.rows.norms)
        return gains, conflicts, gains - conflict_weight * conflicts

    def scores_at(self, rows: torch.Tensor, conflict_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Δ, c, Δ − λc)`` for ``features[rows]``, evaluated directly from the set state."""
        block = self.features[rows].to(self.dtype)
        gains = torch.log1p(self.fisher.fisher_scale * self.fisher.quad(block))
        norms = torch.linalg.vector_norm(block, dim=1)
        conflicts = self.conflict.conflicts(block @ self.conflict.total, norms)
        return gains, conflicts, gains - conflict_weight * conflicts

    def base_gains_at(self, rows: torch.Tensor) -> torch.Tensor:
        """``b = log(1 + α‖g‖²)`` for ``features[rows]``."""
        block = self.features[rows].to(self.dtype)
        return torch.log1p(self.fisher.fisher_scale * (block * block).sum(dim=1))

    def add(self, g: torch.Tensor) -> torch.Tensor:
        """Insert ``g: (d,)`` (a broadcast feature vector, not an index); returns its gain Δ (0-d tensor)."""
        g = g.to(device=self.fisher.device, dtype=self.dtype).reshape(-1)
        gain, u, denom = self.fisher.add(g)
        if self.rows is not None:
            self.rows.update(u, denom, g)
        self.conflict.add(g)
        return gain
