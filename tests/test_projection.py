"""Seeded blockwise projectors: determinism, block independence, and the Johnson-Lindenstrauss norm bound."""

import math

import pytest
import torch

from spice_trainer.core.projection import BLOCK_ROWS, BlockProjector


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sparse"])
def test_norms_are_preserved_within_the_jl_bound(kind):
    # TRAK's tests/test_jl.py idea: for a JL matrix, | ‖xP‖²/‖x‖² − 1 | ≲ c · sqrt(log(1/δ) / d) for all but a
    # δ fraction of vectors. With d = 512 and δ = 0.01 the bound is 0.095; the constant c = 4 is the textbook
    # two-sided tail constant and every family here satisfies it with a wide margin.
    d, dim, delta = 512, 3000, 0.01
    x = torch.randn(200, dim, generator=torch.Generator().manual_seed(1))
    ratio = BlockProjector(dim, d, kind, seed=0, key="w").project(x).norm(dim=1) ** 2 / x.norm(dim=1) ** 2
    bound = 4 * math.sqrt(math.log(1 / delta) / d)
    share_outside = ((ratio - 1).abs() > bound).float().mean().item()
    assert share_outside <= delta
    assert abs(ratio.mean().item() - 1) < 0.05  # unbiased: E ‖xP‖² = ‖x‖²


def test_same_seed_and_key_give_the_same_matrix_across_instances_and_blocks():
    a = BlockProjector(BLOCK_ROWS + 100, 16, "rademacher", seed=3, key="layer.0.q")
    b = BlockProjector(BLOCK_ROWS + 100, 16, "rademacher", seed=3, key="layer.0.q", cache=True)
    assert torch.equal(a.matrix(), b.matrix())
    assert a.matrix().shape == (BLOCK_ROWS + 100, 16)
    assert set(a.matrix().unique().tolist()) == {-0.25, 0.25}  # ±1/sqrt(16)
    assert not torch.equal(a.matrix(), BlockProjector(BLOCK_ROWS + 100, 16, "rademacher", 4, "layer.0.q").matrix())
    assert not torch.equal(a.matrix(), BlockProjector(BLOCK_ROWS + 100, 16, "rademacher", 3, "layer.1.q").matrix())


def test_project_equals_a_dense_product_in_any_row_chunking():
    proj = BlockProjector(BLOCK_ROWS * 2 + 5, 8, "gaussian", seed=0, key="k")
    x = torch.randn(5, BLOCK_ROWS * 2 + 5, dtype=torch.float64)
    dense = (x @ proj.matrix().double()).float()
    torch.testing.assert_close(proj.project(x), dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        torch.cat([proj.project(x[:2]), proj.project(x[2:])]), proj.project(x), rtol=1e-5, atol=1e-4
    )


def test_sparse_projection_is_sparse():
    m = BlockProjector(10_000, 64, "sparse", seed=0, key="k").matrix()
    # s = sqrt(D) = 100: a share 1/s = 1% of the entries is non-zero.
    assert 0.005 < (m != 0).float().mean().item() < 0.02


def test_shape_errors():
    with pytest.raises(ValueError, match=r"expected grads of shape \(n, 10\)"):
        BlockProjector(10, 4, "rademacher", 0, "k").project(torch.zeros(2, 11))
    with pytest.raises(ValueError, match="projection sizes must be positive"):
        BlockProjector(0, 4, "rademacher", 0, "k")


def test_streams_are_pinned():
    # Features stored on disk (the feature store) or compared across machines rely on these exact streams:
    # torch's CPU Mersenne Twister is platform-independent and the sign bits are unpacked with shifts, not a
    # byte-order-dependent view. Values printed once from this implementation (torch 2.13, x86-64).
    rad = BlockProjector(64, 4, "rademacher", 0, "layers.0.q_proj.lora_A").matrix()
    assert rad[:3].mul(2).tolist() == [[-1, -1, -1, -1], [1, 1, 1, -1], [-1, 1, -1, -1]]
    assert rad.sum().item() == -15.0
    gauss = BlockProjector(64, 4, "gaussian", 0, "layers.0.q_proj.lora_A").matrix()
    assert gauss[0].tolist() == pytest.approx([0.049451, 0.751551, -0.182262, -0.081549], abs=1e-6)
    sparse = BlockProjector(64, 4, "sparse", 0, "layers.0.q_proj.lora_A").matrix()
    assert (sparse != 0).nonzero()[:4].tolist() == [[1, 2], [2, 1], [5, 2], [6, 2]]


def test_rademacher_signs_are_balanced_and_uncorrelated():
    m = BlockProjector(BLOCK_ROWS, 64, "rademacher", seed=0, key="k").matrix() * 8  # ±1
    n = m.shape[0]
    # Each column and each bit position in the packed words: mean within 5 standard errors (1/sqrt(n)) of 0.
    assert m.mean(dim=0).abs().max().item() < 5 / math.sqrt(n)
    words = m.reshape(-1)[: m.numel() // 56 * 56].reshape(-1, 56)
    assert words.mean(dim=0).abs().max().item() < 5 / math.sqrt(words.shape[0])
    corr = (m.T @ m) / n - torch.eye(64)
    assert corr.abs().max().item() < 5 / math.sqrt(n)
