"""Seeded random projections, generated blockwise, for per-example gradients.

A gradient ``g ∈ R^D`` (one LoRA weight, flattened) is projected to ``R^d`` by ``g @ P`` with
``P ∈ R^{D × d}`` a Johnson-Lindenstrauss matrix. ``P`` is never held whole: it is generated in blocks of
rows, each block from its own local generator seeded by ``(seed, key, block)``, so the result is the same
for any batch size, on any machine, and independent of every other weight's projection. Projecting the
concatenation of several weights equals the sum of their projections with independent blocks.

Families (``E[‖g P‖²] = ‖g‖²`` for all three):

- ``"rademacher"``: entries ``±1/√d`` with equal probability (Achlioptas 2003). The signs are the bits of
  64-bit words from the block's generator (56 bits each, least significant first, unpacked through a
  256-entry table): ~20× faster than one ``randint`` per entry, so streaming ``P`` block by block costs a few
  percent of a forward+backward even when it is not cached.
- ``"gaussian"``: entries ``N(0, 1/d)``.
- ``"sparse"``: very sparse JL (Li, Hastie & Church 2006) with ``s = √D``: entries ``±√(s/d)`` with
  probability ``1/(2s)`` each, ``0`` otherwise.
- ``"kronecker"``: for a weight of shape ``(rows, cols)`` whose gradient is kept as a matrix (LoRA's ``A`` is
  ``r × in``, ``B`` is ``out × r``), a Kronecker-structured matrix (LoGra, Choe et al. 2024: project the two
  sides separately, ``Pᵀvec(δxᵀ) = vec((P_outᵀδ)(P_inᵀx)ᵀ)``). The small side (the rank ``r``) keeps every
  coordinate up to a random sign, the large side is projected by a dense Rademacher ``R`` with
  ``c = ⌈d / r⌉`` columns, and the ``r · c`` results are folded onto ``d`` coordinates. Projecting costs
  ``r``× fewer multiply-adds than a dense ``P`` (``n·D·d / r``) and ``R`` holds ``d / r`` columns per weight;
  `KroneckerProjector`.

Every family is unbiased, ``E[‖g P‖²] = ‖g‖²``, and concentrates like a JL matrix of ``d`` columns on gradients
whose energy spreads over many directions. The Kronecker family concentrates less on a gradient of rank one
(one token through a LoRA factor): there it is a JL matrix of ``c = d / r`` columns on that weight's share
(tests/test_projection.py checks both bounds). Summed over the many LoRA weights of a model the per-weight
errors average out.
"""

from __future__ import annotations

import math
import zlib
from typing import Protocol

import torch

from spice_trainer.config import ProjectionKind

# Rows of P generated at once; bounds the projector's memory to BLOCK_ROWS × d floats.
BLOCK_ROWS = 8192
# Bits taken from each generated int64 word: 7 whole bytes (``random_`` draws from [0, 2^63)).
_BYTES_PER_WORD = 7
# Row b of the table holds the 8 bits of byte value b, least significant first, as ±1.
_SIGN_TABLE = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).to(torch.float32) * 2.0 - 1.0
_BYTE_SHIFTS = torch.arange(0, 8 * _BYTES_PER_WORD, 8)


class Projector(Protocol):
    """What the gradient pass needs from a projection: ``(n, D) -> (n, d)`` and its dense matrix for tests."""

    in_dim: int
    proj_dim: int

    def project(self, grads: torch.Tensor) -> torch.Tensor: ...

    def project_matrices(self, grads: torch.Tensor, out: torch.Tensor, *, transposed: bool = False) -> None: ...

    def matrix(self) -> torch.Tensor: ...


def make_projector(
    shape: tuple[int, int], proj_dim: int, kind: ProjectionKind, seed: int, key: str, *, cache: bool = False
) -> Projector:
    """The projector of one weight of shape ``(rows, cols)`` (flattened row-major, as ``weight.reshape(-1)``).

    ``"kronecker"`` gives a `KroneckerProjector` (always cached: its matrices are small); the other kinds a
    `BlockProjector` over the ``rows · cols`` flattened entries.
    """
    if kind == "kronecker":
        return KroneckerProjector(shape, proj_dim, seed, key)
    return BlockProjector(shape[0] * shape[1], proj_dim, kind, seed, key, cache=cache)


class BlockProjector:
    """Projects ``(n, D)`` matrices to ``(n, d)`` with a seeded JL matrix generated block by block.

    Args:
        in_dim: ``D``, the flattened size of the weight this projector serves.
        proj_dim: ``d``.
        kind: the projection family.
        seed: the global seed (``SpiceConfig.seed``).
        key: a stable name of the weight (e.g. its module path); hashed with CRC-32 so the stream is the
            same across processes and Python hash seeds.
        cache: keep generated blocks for reuse across batches (memory ``D × d`` floats for this weight).
    """

    def __init__(
        self, in_dim: int, proj_dim: int, kind: ProjectionKind, seed: int, key: str, *, cache: bool = False
    ) -> None:
        if in_dim < 1 or proj_dim < 1:
            raise ValueError(f"projection sizes must be positive, got in_dim={in_dim}, proj_dim={proj_dim}")
        self.in_dim = in_dim
        self.proj_dim = proj_dim
        self.kind = kind
        self._base_seed = (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**62)
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def block(self, index: int) -> torch.Tensor:
        """Rows ``[index·BLOCK_ROWS, (index+1)·BLOCK_ROWS)`` of ``P`` as a float32 CPU tensor."""
        if self._cache is not None and index in self._cache:
            return self._cache[index].cpu()
        rows = min(BLOCK_ROWS, self.in_dim - index * BLOCK_ROWS)
        gen = torch.Generator(device="cpu").manual_seed(self._base_seed + 7919 * index)
        d = self.proj_dim
        if self.kind == "rademacher":
            out = _rademacher_signs(rows * d, gen, 1.0 / math.sqrt(d)).reshape(rows, d)
        elif self.kind == "gaussian":
            out = torch.randn(rows, d, generator=gen, dtype=torch.float32) / math.sqrt(d)
        elif self.kind == "sparse":
            s = max(1.0, math.sqrt(self.in_dim))
            u = torch.rand(rows, d, generator=gen, dtype=torch.float32)
            scale = math.sqrt(s / d)
            out = torch.where(u < 0.5 / s, scale, torch.where(u > 1.0 - 0.5 / s, -scale, 0.0))
        else:  # pragma: no cover - SpiceConfig validates the kind
            raise ValueError(f"BlockProjector kind must be 'rademacher', 'gaussian' or 'sparse', got {self.kind!r}")
        if self._cache is not None:
            self._cache[index] = out
        return out

    def _device_block(self, index: int, device: torch.device) -> torch.Tensor:
        """`block` on ``device``; a cached block is moved there once and kept there."""
        cached = self._cache.get(index) if self._cache is not None else None
        block = cached if cached is not None else self.block(index)
        if block.device == device:
            return block
        block = block.to(device)
        if self._cache is not None:
            self._cache[index] = block
        return block

    def matrix(self) -> torch.Tensor:
        """The whole ``(D, d)`` matrix (tests and small weights only)."""
        blocks = math.ceil(self.in_dim / BLOCK_ROWS)
        return torch.cat([self.block(i) for i in range(blocks)], dim=0)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """``grads @ P``.

        Args:
            grads: ``(n, D)``, any float dtype and device.

        Returns:
            ``(n, d)`` float32 on ``grads.device``.
        """
        if grads.ndim != 2 or grads.shape[1] != self.in_dim:
            raise ValueError(f"expected grads of shape (n, {self.in_dim}), got {tuple(grads.shape)}")
        grads = grads.to(torch.float32)
        out = torch.zeros(grads.shape[0], self.proj_dim, dtype=torch.float32, device=grads.device)
        for index in range(math.ceil(self.in_dim / BLOCK_ROWS)):
            lo = index * BLOCK_ROWS
            block = self._device_block(index, grads.device)
            out.addmm_(grads[:, lo : lo + block.shape[0]], block)
        return out

    def project_matrices(self, grads: torch.Tensor, out: torch.Tensor, *, transposed: bool = False) -> None:
        """``out += vec(grads) @ P`` for per-example weight gradients.

        Args:
            grads: ``(n, rows, cols)`` float32, or ``(n, cols, rows)`` when ``transposed`` (then copied to the
                row-major order ``P``'s rows follow).
            out: ``(n, d)`` float32 on ``grads.device``, accumulated into.
        """
        if transposed:
            grads = grads.transpose(1, 2)
        flat = grads.reshape(grads.shape[0], -1)
        if flat.shape[1] != self.in_dim:
            raise ValueError(f"expected gradients with {self.in_dim} entries, got {tuple(grads.shape)}")
        for index in range(math.ceil(self.in_dim / BLOCK_ROWS)):
            lo = index * BLOCK_ROWS
            block = self._device_block(index, flat.device)
            out.addmm_(flat[:, lo : lo + block.shape[0]], block)


class KroneckerProjector:
    """Projects ``(n, rows · cols)`` gradients of a ``(rows, cols)`` weight with a Kronecker-structured JL matrix.

    Let ``a = min(rows, cols)`` be the small side (a LoRA factor's rank ``r``), ``b`` the large one, and
    ``c = ⌈d / a⌉``. With ``s ∈ {±1}^a`` random signs and ``R ∈ {±1/√c}^{b × c}`` a seeded Rademacher matrix, a
    gradient ``G`` (``a × b`` after a transpose when the small side is ``cols``) maps to

        Y = diag(s) G R            (a × c),     feature[(j · c + k) mod d] += Y[j, k],

    i.e. ``P = F (diag(s) ⊗ R)`` with ``F`` the fold of the ``a · c`` coordinates onto ``d`` (a sum when
    ``a · c > d``; the signs make colliding rows uncorrelated). ``E[PPᵀ] = I``, so ``E‖Pᵀg‖² = ‖g‖²`` and
    inner products are unbiased. Cost: one ``(n·a × b) @ (b × c)`` product, ``n·D·c`` multiply-adds (a dense
    projection costs ``n·D·d``). The stream is fixed by ``(seed, key)``, like `BlockProjector`'s.

    Args:
        shape: ``(rows, cols)`` of the weight.
        proj_dim: ``d``.
        seed: the global seed (``SpiceConfig.seed``).
        key: a stable name of the weight.
    """

    def __init__(self, shape: tuple[int, int], proj_dim: int, seed: int, key: str) -> None:
        rows, cols = int(shape[0]), int(shape[1])
        if rows < 1 or cols < 1 or proj_dim < 1:
            raise ValueError(f"projection sizes must be positive, got shape={shape}, proj_dim={proj_dim}")
        self.shape = (rows, cols)
        self.in_dim = rows * cols
        self.proj_dim = proj_dim
        self.small_rows = rows <= cols  # LoRA A (r × in): the rows are the rank; B (out × r): the columns
        small, large = (rows, cols) if self.small_rows else (cols, rows)
        self.small, self.large = small, large
        self.cols = -(-proj_dim // small)
        self._right = BlockProjector(large, self.cols, "rademacher", seed, f"{key}#kronecker", cache=True)
        gen = torch.Generator(device="cpu").manual_seed(self._right._base_seed + 104_729)
        self._signs = _rademacher_signs(small, gen).reshape(small, 1)
        self._right_matrix: dict[torch.device, torch.Tensor] = {}
        self._signs_on: dict[torch.device, torch.Tensor] = {}

    def _factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._right_matrix:
            self._right_matrix[device] = self._right.matrix().to(device)
            self._signs_on[device] = self._signs.to(device)
        return self._right_matrix[device], self._signs_on[device]

    def matrix(self) -> torch.Tensor:
        """The equivalent dense ``(D, d)`` matrix (tests): column ``k`` of the identity through `project`."""
        return self.project(torch.eye(self.in_dim))

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """``grads @ P``.

        Args:
            grads: ``(n, D)`` (row-major flattened ``(rows, cols)`` weights), any float dtype and device.

        Returns:
            ``(n, d)`` float32 on ``grads.device``.
        """
        if grads.ndim != 2 or grads.shape[1] != self.in_dim:
            raise ValueError(f"expected grads of shape (n, {self.in_dim}), got {tuple(grads.shape)}")
        out = torch.zeros(grads.shape[0], self.proj_dim, dtype=torch.float32, device=grads.device)
        self.project_matrices(grads.to(torch.float32).reshape(-1, *self.shape), out)
        return out

    def project_matrices(self, grads: torch.Tensor, out: torch.Tensor, *, transposed: bool = False) -> None:
        """``out += vec(grads) @ P`` for per-example weight gradients, without copying them.

        Args:
            grads: ``(n, rows, cols)`` float32, or ``(n, cols, rows)`` when ``transposed``.
            out: ``(n, d)`` float32 on ``grads.device``, accumulated into.
        """
        n = grads.shape[0]
        shape = (self.shape[1], self.shape[0]) if transposed else self.shape
        if tuple(grads.shape[1:]) != shape:
            raise ValueError(f"expected gradients of shape (n, {shape[0]}, {shape[1]}), got {tuple(grads.shape)}")
        if self.small_rows == transposed:
            grads = grads.transpose(1, 2)  # (n, small, large): a view, the product reads it strided
        right, signs = self._factors(grads.device)
        y = torch.matmul(grads, right).mul_(signs)  # (n, small, c): the signs broadcast over the rows
        width = self.small * self.cols
        d = self.proj_dim
        if width == d:
            out += y.reshape(n, d)
            return
        folds = -(-width // d)
        y = y.reshape(n, width)
        if folds * d != width:
            y = torch.nn.functional.pad(y, (0, folds * d - width))
        out += y.reshape(n, folds, d).sum(dim=1)


def _rademacher_signs(count: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """``count`` independent signs ``±scale`` (float32) from the bits of ``gen``'s 64-bit words.

    Each word from ``random_`` is uniform on ``[0, 2^63)``, so its low 56 bits are independent fair bits;
    they are split into 7 bytes by shifts (not a memory view, so the result does not depend on the
    machine's byte order) and each byte becomes 8 signs through `_SIGN_TABLE`.
    """
    words = torch.empty(-(-count // (8 * _BYTES_PER_WORD)), dtype=torch.int64).random_(generator=gen)
    byte_values = ((words.unsqueeze(-1) >> _BYTE_SHIFTS) & 255).reshape(-1)
    table = _SIGN_TABLE if scale == 1.0 else _SIGN_TABLE * scale
    return torch.index_select(table, 0, byte_values).reshape(-1)[:count]  # < 56 spare entries: keep the view
