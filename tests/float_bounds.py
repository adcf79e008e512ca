"""Float32 error bounds for the gradient features, derived from the computation (never a constant that passed).

The gradient pass computes, per example and LoRA weight ``w``, ``G_w = Σ_t δ_t x_tᵀ`` (a float32 ``bmm`` of the
activations rounded to float32), then ``f = Σ_w P_wᵀ vec(G_w)`` (float32 matmuls, in whatever association the
projector uses: blocks of rows, or a Kronecker factorisation), summed over the weights.
On a float64 model the activations ``x`` and the gradients ``δ`` reach that step exact to float64 rounding, so
the classic forward error bound of a floating-point sum, ``|fl(Σ a_i) − Σ a_i| ≤ γ_n Σ |a_i|`` with
``γ_n = n·u / (1 − n·u)`` and ``u = 2⁻²⁴`` (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1),
applied to the whole chain gives, for feature ``j``:

    |f̂_j − f_j| ≤ γ_N · Σ_w Σ_k |P_w[k, j]| · A_w[k],      A_w = Σ_t |δ_t| |x_t|ᵀ  (flattened like the weight),
    N = T + D + W + 4 + s

(``T`` products summed per entry of ``G``; ``D`` = the most product terms any feature sums for one weight (its
entries; any association — blocks, a Kronecker factorisation, folded coordinates — sums at most that many);
``W`` weights accumulated; 4 = the two input roundings to float32, the rounding of each product and of each
entry of ``G``; ``s`` = 5 when each entry is divided by Adam's denominator ``√(v/(1−β₂ᵗ)) + ε``, computed in
float32 from the float64 state: 4 roundings, and 1 for the division). The bound holds for any order of
evaluation of the same sum of products, because ``Σ_k |P_kj| A_k`` is the sum of the products' magnitudes).
`float64_reference` returns ``f`` computed in float64 (a per-example ``backward()`` of the float64 model,
projected in float64) and this bound. The float64 rounding of the reference and of the model's own forward and
backward is ``2⁻²⁹`` times smaller than these terms and is not modelled.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch

from spice_trainer.core.projection import make_projector
from spice_trainer.features.gradients import find_lora_weights

U32 = 2.0**-24


def gamma(n: int, u: float = U32) -> float:
    """``γ_n = n·u / (1 − n·u)``: the relative forward error bound of a sum of ``n`` floating-point terms."""
    return n * u / (1 - n * u)


class Reference(NamedTuple):
    features: torch.Tensor  # (n, d) float64
    bound: torch.Tensor  # (n, d) float64: the float32 forward error bound of each computed feature


def float64_reference(
    model: Any, rows: list[dict[str, Any]], config: Any, *, denominators: dict[str, torch.Tensor] | None = None
) -> Reference:
    """Per-example features of ``rows`` by ``loss.backward()`` on a float64 copy of ``model``, and their bound.

    Args:
        denominators: weight name -> tensor each gradient entry is divided by (``feature_norm="adam"``).
    """
    model64 = copy.deepcopy(model).double().eval()
    _, lora = find_lora_weights(model64)
    mats, abs_mats = [], []
    for name, module in lora:
        key = name.split("base_model.model.")[-1]
        shape = (module.out_features, module.in_features)
        mat = make_projector(shape, config.proj_dim, config.projection, config.seed, key).matrix().double()
        mats.append(mat)
        abs_mats.append(mat.abs())
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {id(m): [] for _, m in lora}

    def record(module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if output.requires_grad:
            output.retain_grad()
            calls[id(module)].append((inputs[0].detach(), output))

    handles = [m.register_forward_hook(record) for _, m in lora]
    largest = max(m.weight.numel() for _, m in lora)
    features, bounds = [], []
    try:
        for row in rows:
            for entries in calls.values():
                entries.clear()
            model64.zero_grad(set_to_none=True)
            loss = model64(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
            loss.backward()
            f = torch.zeros(config.proj_dim, dtype=torch.float64)
            a = torch.zeros(config.proj_dim, dtype=torch.float64)
            for (name, module), mat, abs_mat in zip(lora, mats, abs_mats, strict=True):
                grad = module.weight.grad
                grad = torch.zeros_like(module.weight) if grad is None else grad
                size = torch.zeros_like(module.weight)  # A_w = Σ_calls Σ_t |δ_t| |x_t|ᵀ
                for x, out in calls[id(module)]:
                    if out.grad is not None:
                        size += torch.einsum("...o,...i->oi", out.grad.abs(), x.abs())
                if denominators is not None:
                    grad, size = grad / denominators[name], size / denominators[name]
                f += grad.reshape(-1) @ mat
                a += size.reshape(-1) @ abs_mat
            n = len(row["input_ids"]) + largest + len(lora) + 4 + (5 if denominators is not None else 0)
            features.append(f)
            bounds.append(gamma(n) * a)
    finally:
        for h in handles:
            h.remove()
    return Reference(torch.stack(features), torch.stack(bounds))


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    """Every entry of ``got`` lies within ``bound`` of ``ref`` (entries where ``ref`` is NaN must be NaN)."""
    got, ref = got.double(), ref.double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = (got - ref).abs()
    worst = float((err / bound.clamp_min(1e-300)).max())
    assert bool((err <= bound).all()), f"error exceeds the float32 bound: max error/bound = {worst:.3g}"
