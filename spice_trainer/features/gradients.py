"""Per-example adapter gradients from one batched forward and backward, projected module by module.

For a LoRA layer ``y = W x + s · B A dropout(x)`` the gradient of one example's loss ``ℓ_i`` is

    ∂ℓ_i/∂A = Σ_t δ^A_{i,t} x_{i,t}ᵀ        (r × in),   δ^A = ∂L/∂(A x)
    ∂ℓ_i/∂B = Σ_t δ^B_{i,t} h_{i,t}ᵀ        (out × r),  δ^B = ∂L/∂(B h),  h = A x

where ``L = Σ_i ℓ_i`` is the sum of the examples' own losses (each the mean over its supervised tokens),
so that the gradient of ``L`` restricted to example ``i``'s activations is the gradient of ``ℓ_i``.
Forward hooks capture ``x``, ``h`` and the outputs of every ``lora_A``/``lora_B``; one
``torch.autograd.grad`` call w.r.t. the (small, ``n × T × r``) ``lora_A`` outputs returns every ``δ^A``, and
tensor hooks on the ``lora_B`` outputs consume each ``δ^B`` as the backward passes it (so the large ones are
freed as in a plain backward). One ``bmm`` per call gives every example's gradient, which is projected with a
seeded projector per weight (`spice_trainer.core.projection.make_projector`: dense blockwise, or Kronecker-
structured) and summed (the projection of the concatenated gradient). No weight gradient is formed:
``param.grad``, optimizer state, RNG streams and DDP reducer state are never touched. Cost: one batched
forward + backward, plus ``O(n·T·D)`` for the per-example gradients and ``O(n·D·d)`` for the projection
(``O(n·D·d/r)`` for ``projection="kronecker"``; ``D`` = LoRA parameters); memory as a plain training step,
plus ``O(n·D)`` transient.

What is measured, and what not:

- The ``lora_A``/``lora_B`` weights of one adapter in ``nn.Linear`` LoRA layers (transformers' GPT-2
  ``Conv1D`` targets get ``nn.Linear`` LoRA factors too). LoRA on embeddings or convolutions is left out
  with a warning; DoRA and other LoRA variants are refused. Other trainable parameters (``modules_to_save``,
  a trainable head or embedding, LoRA biases) are not part of the features; a warning says so once.
- Each example is its own padded row: padding-free/packing collators are refused, and so are layers that see
  token-routed (not batch-major) activations, such as MoE experts.
- The pass runs in eval mode (no dropout) without gradient checkpointing, on the module inside a
  ``DistributedDataParallel`` wrapper; every mode and flag is restored afterwards.
- A bf16/fp16 model runs in its own dtype; per-example gradients and features are accumulated in float32.

Only torch (and tqdm, for the progress bar) is imported: LoRA layers are recognised structurally (PEFT's
``lora_A`` / ``lora_B`` ``ModuleDict``s keyed by adapter name, with a ``scaling`` dict).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from spice_trainer.config import SpiceConfig
from spice_trainer.core.greedy import progress_bar
from spice_trainer.core.projection import Projector, make_projector
from spice_trainer.core.threads import SelectionThreads
from spice_trainer.features.batches import (
    Collator,
    PadCollator,
    accepts_logits_to_keep,
    batch_labels,
    check_batch_rows,
    check_labels,
    collate,
    input_device,
    longest_first,
    model_inputs,
    output_vocab_size,
    pad_token_id,
    per_example_loss,
    prepare_row,
    row_limits,
    unwrap_model,
)

logger = logging.getLogger(__name__)

# Projection blocks are cached across batches while all of them together stay under this size.
_PROJECTOR_CACHE_BYTES = 256 * 2**20
_ADAM_EPS = 1e-8


@dataclass
class GradientFeatures:
    """What the gradient pass returns.

    Attributes:
        features: ``(n, proj_dim)`` float32 on CPU, after ``config.feature_norm``. Rows whose loss is not
            finite or that have no supervised token are NaN, so the greedy never picks them.
        losses: ``(n,)`` float32, each example's own loss (mean over its supervised tokens; NaN if none).
        num_tokens: ``(n,)`` int64, supervised tokens per example.
        max_token_losses: ``(n,)`` float32, the surprisal ``−log p`` of each example's least likely supervised
            token (NaN if none); what `spice_trainer.core.guards` weighs labels by. `None` when not measured.
        vocab_size: how many tokens the model's output scores (the logits' last dimension); `None` if unknown.
    """

    features: torch.Tensor
    losses: torch.Tensor
    num_tokens: torch.Tensor
    max_token_losses: torch.Tensor | None = None
    vocab_size: int | None = None


@dataclass
class _LoraWeight:
    """One LoRA weight of the chosen adapter and what the hooks saw in the current batch."""

    name: str  # e.g. "base_model.model.layers.0.self_attn.q_proj.lora_A"
    module: nn.Linear  # the lora_A[adapter] or lora_B[adapter] Linear
    projector: Projector
    adam_denom: torch.Tensor | None = None  # (out, in) on the weight's device, feature_norm="adam" only
    # lora_A only: (input, output) of every call in the current forward (usually one; a module called several
    # times gets the sum of its calls' gradients). lora_B calls are consumed during the backward instead.
    calls: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def is_b(self) -> bool:
        return self.name.endswith("lora_B")


@dataclass
class _Pass:
    """The batch being measured: its size and the ``(n, d)`` float32 accumulator of projected gradients."""

    batch_size: int = 0
    acc: torch.Tensor | None = None


@dataclass(frozen=True)
class Lockstep:
    """How the ranks of a sharded model (FSDP2 ``fully_shard``, DeepSpeed ZeRO-3) keep their passes in step.

    Such a model gathers each layer's weights with a collective in every forward and backward, so every rank
    must run the same number of them, and an error on one rank must stop all of them before the next one.

    Attributes:
        batches: forward+backward passes every rank runs. A rank with fewer batches repeats its last one (a
            rank without rows measures row ``filler_row``); those results are dropped.
        any_failed: a collective: takes whether this rank failed and returns whether any rank did. Called
            before each forward and before each backward.
        filler_row: the dataset row a rank without rows measures.
    """

    batches: int
    any_failed: Callable[[bool], bool]
    filler_row: int = 0


def is_sharded_model(model: nn.Module) -> bool:
    """Whether ``model``'s weights are sharded across ranks: FSDP2 (``DTensor`` parameters) or ZeRO-3."""
    for p in unwrap_model(model).parameters():
        if hasattr(p, "ds_id") or type(p).__name__ == "DTensor" or hasattr(p, "_local_tensor"):
            return True
    return False


def find_lora_weights(model: nn.Module, adapter_name: str | None = None) -> tuple[str, list[tuple[str, nn.Linear]]]:
    """The LoRA ``A``/``B`` linear modules of one adapter, in module order.

    Returns:
        ``(adapter, [(name, module), ...])`` with names ending in ``.lora_A`` / ``.lora_B``.

    Raises:
        ValueError: no LoRA layer, several active adapters and no ``adapter_name``, an unknown adapter, or
            an unsupported LoRA variant (DoRA).
    """
    layers = [(name, m) for name, m in model.named_modules() if _is_lora_layer(m)]
    if not layers:
        raise ValueError(
            "the model has no LoRA adapter: SPICE measures per-example gradients through the adapter's "
            "lora_A/lora_B weights. Wrap it first, e.g. `model = peft.get_peft_model(model, "
            "LoraConfig(r=8, target_modules='all-linear'))`, or select with a smaller adapter-equipped "
            "model via SpiceConfig(proxy_model=...)"
        )
    if adapter_name is None:
        active = _active_adapters(layers[0][1])
        if len(active) != 1:
            raise ValueError(
                f"the model has {len(active)} active LoRA adapters {active!r}; SPICE measures the gradients of one "
                "adapter: activate the one to train and select with before selecting (PEFT: "
                "model.set_adapter(name)), or, calling compute_gradient_features or find_lora_weights directly, "
                "pass adapter_name=..."
            )
        adapter_name = active[0]
    weights: list[tuple[str, nn.Linear]] = []
    skipped: list[str] = []
    for name, layer in layers:
        lora_a = layer.lora_A
        if adapter_name not in lora_a:
            # LoRA on an embedding keeps its factors in `lora_embedding_A/B` parameter dicts instead.
            if adapter_name in getattr(layer, "lora_embedding_A", {}):
                skipped.append(name)
            continue
        variant = getattr(layer, "lora_variant", {})
        use_dora = getattr(layer, "use_dora", {})
        if adapter_name in variant or use_dora.get(adapter_name, False):
            raise ValueError(
                f"LoRA variant {type(variant.get(adapter_name)).__name__} (e.g. DoRA) on {name!r} is not "
                "supported by the gradient pass; use a plain LoRA adapter"
            )
        a_module, b_module = lora_a[adapter_name], layer.lora_B[adapter_name]
        if not (isinstance(a_module, nn.Linear) and isinstance(b_module, nn.Linear)):
            skipped.append(name)
            continue
        weights.append((f"{name}.lora_A", a_module))
        weights.append((f"{name}.lora_B", b_module))
    if skipped:
        logger.warning(
            "spice: %d LoRA layers that are not Linear (embeddings or convolutions) are left out of the gradient "
            "features (only Linear and GPT-2 Conv1D layers are measured): %s",
            len(skipped),
            ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
        )
    if not weights:
        names = sorted({k for _, layer in layers for k in layer.lora_A})
        raise ValueError(f"adapter_name={adapter_name!r} has no Linear LoRA weights; the model's adapters are {names}")
    return adapter_name, weights


def compute_gradient_features(
    model: nn.Module,
    dataset: Any,
    config: SpiceConfig,
    data_collator: Collator | None = None,
    *,
    indices: Sequence[int] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    adapter_name: str | None = None,
    show_progress: bool = True,
    lockstep: Lockstep | None = None,
) -> GradientFeatures:
    """Per-example projected LoRA gradients, ``config.batch_size`` examples per forward+backward.

    Row ``i`` of the features is ``P ᵀ vec(∂ℓ_i/∂θ)``, ``θ`` the adapter's LoRA weights and ``ℓ_i`` the row's
    mean next-token cross-entropy over its supervised tokens (exactly transformers' loss for a batch of one;
    left or right padding give the same result), ``P`` the seeded ``(D, proj_dim)`` projection (the same for
    any batch size, row order or machine). ``feature_norm="unit"`` divides each row by its norm; ``"adam"``
    divides each gradient entry by ``√v̂ + ε`` of the optimizer before projecting (LESS).

    Args:
        model: a causal LM with a PEFT LoRA adapter (any transformers architecture).
        dataset: indexable rows holding ``input_ids`` and optionally ``attention_mask``, ``labels``,
            ``completion_mask`` / ``assistant_masks`` (0 marks tokens without loss).
        config: uses ``proj_dim``, ``projection``, ``feature_norm``, ``seed``, ``batch_size``, ``max_length``,
            ``threads``.
        data_collator: turns rows into a padded batch with ``labels`` (-100 = no loss), e.g. TRL's or the
            Trainer's collator; without ``labels`` in its batch every non-padding token is a target. `None`:
            pad right with the model's ``pad_token_id``, -100 on padding and where ``completion_mask`` /
            ``assistant_masks`` is 0. Columns that are not numbers (text, messages) are dropped first.
        indices: compute only these rows, in this order (sharding, probes). `None` = every row.
        optimizer: the live Adam/AdamW optimizer, required by ``feature_norm="adam"``.
        adapter_name: the LoRA adapter to measure; `None` = the single active one.
        show_progress: show a tqdm bar when there is more than one batch.
        lockstep: for a model sharded across ranks (FSDP2, ZeRO-3): how many passes every rank runs and how
            ranks agree on errors (`Lockstep`; `spice_trainer.pipeline` sets it). `None`: this rank's batches.

    Returns:
        `GradientFeatures` with rows in ``indices`` order.

    Raises:
        ValueError: no LoRA adapter, several active adapters without ``adapter_name``, a row without
            ``input_ids``, a bad row (`spice_trainer.features.batches.prepare_row`: ids outside the vocabulary,
            -100 in input_ids, token columns of another length, more tokens than the model's positions; each
            error names the row), a label outside the vocabulary (other than -100), ``feature_norm="adam"`` without
            an Adam optimizer, a padding-free collator, token-routed LoRA layers.
    """
    rows = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    model = unwrap_model(model)
    adapter, lora = find_lora_weights(model, adapter_name)
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "the model has weights on the meta device (e.g. FSDP's cpu_ram_efficient_loading before the trainer "
            "wrapped the model), so SPICE cannot run it: load the weights on every rank, or select with a proxy "
            "model (SpiceConfig(proxy_model=...))"
        )
    _warn_other_trainables(model, {id(m.weight) for _, m in lora})
    adam_denoms = _adam_denominators(optimizer, lora) if config.feature_norm == "adam" else None
    total_bytes = sum(_weight_shape(m)[0] * _weight_shape(m)[1] for _, m in lora) * config.proj_dim * 4
    cache = total_bytes <= _PROJECTOR_CACHE_BYTES
    weights = [
        _LoraWeight(
            name,
            module,
            make_projector(
                _weight_shape(module), config.proj_dim, config.projection, config.seed, _stable_key(name), cache=cache
            ),
        )
        for name, module in lora
    ]

    n = len(rows)
    features = torch.full((n, config.proj_dim), float("nan"), dtype=torch.float32)
    losses = torch.full((n,), float("nan"), dtype=torch.float32)
    num_tokens = torch.zeros(n, dtype=torch.int64)
    max_token_losses = torch.full((n,), float("nan"), dtype=torch.float32)
    collator = data_collator or PadCollator(pad_token_id(model))
    device = input_device(model)
    # Batches of similar lengths waste little on padding. A row's features do not depend on which rows share
    # its batch, so the order is free: longest first (a batch that does not fit in memory fails at once).
    order = longest_first(dataset, rows, config.max_length)
    if len(order) < n:  # rows with an empty input_ids: nothing to measure, kept as rows without a supervised token
        empty = sorted(set(range(n)) - set(order))
        logger.warning(
            "spice: %d rows have an empty input_ids (e.g. rows %s); they are never picked",
            len(empty),
            [rows[j] for j in empty[:5]],
        )
    limits = row_limits(model)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    passes = len(batches) if lockstep is None else max(lockstep.batches, len(batches))
    bar = progress_bar(passes, show_progress and passes > 1, "spice: gradient features", "batch", leave=False)
    if adam_denoms is not None:
        for w in weights:
            w.adam_denom = adam_denoms[id(w.module.weight)].to(w.module.weight.device).reshape(_weight_shape(w.module))
    state = _Pass()
    # CPU threads: the policy of spice_trainer.core.threads (a model on a GPU keeps the caller's setting).
    threads = SelectionThreads(config.threads, enabled=device.type == "cpu")
    try:
        with threads, _measuring(model, weights, state):
            for b in range(passes):
                threads.recheck()
                positions = batches[min(b, len(batches) - 1)] if batches else []
                batch_rows = [rows[j] for j in positions] if positions else [lockstep.filler_row if lockstep else 0]
                batch: Mapping[str, Any] | None = None
                failure: Exception | None = None
                try:
                    prepared = [
                        prepare_row(row, config.max_length, index=i, limits=limits)
                        for i, row in zip(batch_rows, _fetch(dataset, batch_rows), strict=True)
                    ]
                    batch = collate(collator, prepared)
                    check_batch_rows(batch, len(batch_rows))
                except Exception as exc:
                    if lockstep is None:
                        raise
                    failure = exc
                _agree(lockstep, failure, "preparing its batch")
                assert batch is not None
                out = _batch_features(model, weights, state, batch, device, batch_rows, lockstep)
                if b < len(batches):  # repeats that keep a sharded model's ranks in step are dropped
                    features[positions] = out[0]
                    losses[positions] = out[1]
                    num_tokens[positions] = out[2]
                    max_token_losses[positions] = out[3]
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if config.feature_norm == "unit":
        features = unit_rows(features)
    logger.debug("spice: gradient features for %d rows through %d LoRA weights (%s)", n, len(weights), adapter)
    return GradientFeatures(
        features=features,
        losses=losses,
        num_tokens=num_tokens,
        max_token_losses=max_token_losses,
        vocab_size=output_vocab_size(model),
    )


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """``features: (n, d)`` with every non-zero row scaled to norm 1 (``feature_norm="unit"``); zero and NaN rows
    stay as they are."""
    norms = features.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, features / norms.clamp_min(1e-30), features)


def compute_losses(
    model: nn.Module,
    dataset: Any,
    config: SpiceConfig,
    data_collator: Collator | None = None,
    *,
    indices: Sequence[int] | None = None,
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's loss and supervised token count from a forward pass alone (no backward, no hooks).

    The same loss as `compute_gradient_features` reports (each row's mean next-token cross-entropy over its
    supervised tokens, eval mode, batches of ``config.batch_size`` rows of similar length, only positions with a
    target through the LM head), for about a third of its cost: what the loss guards need to decide which rows
    can be picked before any gradient is taken (`spice_trainer.pipeline.select`).

    Returns:
        ``(losses (n,) float32, num_tokens (n,) int64, max_token_losses (n,) float32)`` in ``indices`` order
        (see `GradientFeatures`); NaN losses for a row without a supervised token.
    """
    rows = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    model = unwrap_model(model)
    n = len(rows)
    losses = torch.full((n,), float("nan"), dtype=torch.float32)
    num_tokens = torch.zeros(n, dtype=torch.int64)
    max_token_losses = torch.full((n,), float("nan"), dtype=torch.float32)
    collator = data_collator or PadCollator(pad_token_id(model))
    device = input_device(model)
    order = longest_first(dataset, rows, config.max_length)  # rows with an empty input_ids are left out (no loss)
    limits = row_limits(model)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    bar = progress_bar(len(batches), show_progress and len(batches) > 1, "spice: losses", "batch", leave=False)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with SelectionThreads(config.threads, enabled=device.type == "cpu") as threads, torch.no_grad():
            for positions in batches:
                threads.recheck()
                batch_rows = [rows[j] for j in positions]
                prepared = [
                    prepare_row(row, config.max_length, index=i, limits=limits)
                    for i, row in zip(batch_rows, _fetch(dataset, batch_rows), strict=True)
                ]
                batch = collate(collator, prepared)
                check_batch_rows(batch, len(batch_rows))
                kwargs = model_inputs(batch, device)
                targets = nn.functional.pad(batch_labels(batch).to(device), (0, 1), value=-100)[:, 1:]
                keep = (targets != -100).any(dim=0).nonzero().flatten()
                if 0 < keep.numel() < targets.shape[1] and accepts_logits_to_keep(model):
                    kwargs["logits_to_keep"] = keep
                logits = model(**kwargs).logits
                check_labels(targets, logits.shape[-1], batch_rows)
                if "logits_to_keep" in kwargs:
                    targets = targets[:, keep]
                per_example, counts, largest = per_example_loss(logits, targets)
                losses[positions] = per_example.float().cpu()
                num_tokens[positions] = counts.cpu()
                max_token_losses[positions] = largest.float().cpu()
                if bar is not None:
                    bar.update(1)
    finally:
        for m, mode in modes.items():
            m.train(mode)
        if bar is not None:
            bar.close()
    return losses, num_tokens, max_token_losses


def gradient_features(
    model: nn.Module, dataset: Any, config: SpiceConfig, data_collator: Collator | None = None
) -> torch.Tensor:
    """``(n, proj_dim)`` projected per-example LoRA gradients; see `compute_gradient_features`."""
    return compute_gradient_features(model, dataset, config, data_collator).features


# --- the batched pass ----------------------------------------------------------------------------------


def _batch_features(
    model: nn.Module,
    weights: list[_LoraWeight],
    state: _Pass,
    batch: Mapping[str, Any],
    device: torch.device,
    rows: Sequence[int],
    lockstep: Lockstep | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch: forward, per-example losses, one ``autograd.grad``, per-example gradients, projection.

    ``autograd.grad`` is asked for ``δ^A = ∂L/∂(A x)`` only: these are small (``n × T × r``). On its way there
    the backward passes every ``lora_B`` output, whose tensor hook turns ``δ^B`` into the projected
    per-example ``∂ℓ_i/∂B`` at once (`_project_call`), so the large ``n × T × out`` gradients are freed as
    the backward goes, as in an ordinary backward, and never held together.

    Returns:
        ``(features (n, d) float32 CPU, losses (n,) float32 CPU, counts (n,) int64 CPU, max_token_losses (n,)
        float32 CPU)``; rows without a finite loss or a supervised token have NaN features.
    """
    kwargs = model_inputs(batch, device)
    input_ids = kwargs["input_ids"]
    labels = batch_labels(batch).to(device)
    bsz = input_ids.shape[0]
    proj_dim = weights[0].projector.proj_dim

    state.batch_size = bsz
    # targets[:, t] is what the logits at position t predict: the labels shifted left by one, -100 appended.
    targets = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().flatten()
    if 0 < keep.numel() < targets.shape[1] and accepts_logits_to_keep(model):
        # Only positions with a target in some row go through the LM head (prompt and padding positions carry
        # no loss): exact, and it saves the head's share of the compute on completion-only data.
        kwargs["logits_to_keep"] = keep
    state.acc = torch.zeros(bsz, proj_dim, dtype=torch.float32, device=device)
    try:
        with torch.enable_grad():
            logits = model(**kwargs).logits
            failure: Exception | None = None
            try:
                check_labels(targets, logits.shape[-1], rows)
            except ValueError as exc:
                if lockstep is None:
                    raise
                failure = exc
            _agree(lockstep, failure, "checking its labels")
            if "logits_to_keep" in kwargs:
                targets = targets[:, keep]
            per_example, counts, largest = per_example_loss(logits, targets)
            del logits
            valid = torch.isfinite(per_example) & (counts > 0)
            losses_cpu, counts_cpu = per_example.detach().float().cpu(), counts.cpu()
            largest_cpu = largest.float().cpu()
            if not bool(valid.any()) and lockstep is None:
                return torch.full((bsz, proj_dim), float("nan")), losses_cpu, counts_cpu, largest_cpu
            # L = Σ_i ℓ_i over the rows with a finite loss: ∂L/∂(row i's activations) = ∂ℓ_i/∂(...).
            total = per_example[valid].sum()
            called = [(w, call) for w in weights for call in w.calls]
            if not called:
                raise RuntimeError(
                    "no LoRA weight was called in the forward pass: is the adapter disabled (disable_adapter()) "
                    "or merged (merge_and_unload())? Measure with the adapter active and unmerged"
                )
            deltas = torch.autograd.grad(total, [out for _, (_, out) in called], allow_unused=True)
        for (w, (x, _)), delta in zip(called, deltas, strict=True):
            if delta is not None:  # None: this call does not reach the loss (a zero gradient)
                _project_call(w, x, delta, state)
        feats = state.acc.cpu()
    finally:
        state.acc = None
        for w in weights:
            w.calls.clear()
    feats[~valid.cpu()] = float("nan")
    return feats, losses_cpu, counts_cpu, largest_cpu


def _project_call(w: _LoraWeight, x: torch.Tensor, delta: torch.Tensor, state: _Pass) -> None:
    """Add one call's projected per-example gradient to ``state.acc``.

    ``∂ℓ_i/∂W = Σ_t δ_{i,t} x_{i,t}ᵀ`` for every example ``i`` at once, one ``bmm`` in float32 (a bf16 model's
    activations go in as they are on CUDA, with a float32 result; elsewhere they are upcast: the sum over
    tokens and the projection's sum over ``out × in`` entries keep float32 precision). The product is formed
    with the LoRA rank as its *rows*, ``(n, r, in)`` for ``A`` and ``(n, r, out)`` (the transpose) for ``B``: a
    batched product with a short, wide result runs 3-4× faster on CPU than its transpose. Materialising it
    (``n·T·out·in`` multiply-adds, then ``n·out·in·d`` for a dense projection, ``n·out·in·d/r`` for the
    Kronecker one) is ~``d``× cheaper than projecting each token's outer product on the fly.

    Args:
        x: ``(n, ..., in)`` the call's input (detached). delta: ``(n, ..., out)``, ``∂L/∂(output)``.
    """
    acc = state.acc
    if acc is None:  # pragma: no cover - hooks only fire inside _batch_features
        return
    bsz = state.batch_size
    x3 = x.reshape(bsz, -1, x.shape[-1])
    g3 = delta.reshape(bsz, -1, delta.shape[-1])
    transposed = g3.shape[-1] > x3.shape[-1]  # out > in: LoRA B, whose rank is its input
    # (n, in, out) = per-example (∂ℓ/∂W)ᵀ for B; (n, out, in) for A.
    grad = _bmm_float32(x3.transpose(1, 2), g3) if transposed else _bmm_float32(g3.transpose(1, 2), x3)
    if w.adam_denom is not None:
        grad = grad / (w.adam_denom.transpose(0, 1) if transposed else w.adam_denom)
    if grad.device == acc.device:
        w.projector.project_matrices(grad, acc, transposed=transposed)
        return
    part = torch.zeros(acc.shape, dtype=acc.dtype, device=grad.device)  # a model split across devices
    w.projector.project_matrices(grad, part, transposed=transposed)
    acc += part.to(acc.device)


_BMM_OUT_DTYPE = {"cuda": True}  # whether bmm(..., out_dtype=float32) works; learnt on first use


def _bmm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched) as float32. Half-precision inputs on CUDA multiply as they are with a float32
    result (no float32 copies of the activations, the tensor cores' rate); elsewhere they are upcast first."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.bmm(a, b)
    half = a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)
    if half and a.device.type == "cuda" and _BMM_OUT_DTYPE["cuda"]:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # an older torch without the dtype overload
            _BMM_OUT_DTYPE["cuda"] = False
    return torch.bmm(a.float(), b.float())


@contextmanager
def _measuring(model: nn.Module, weights: list[_LoraWeight], state: _Pass) -> Iterator[None]:
    """Eval mode, no gradient checkpointing, hooks on the LoRA weights, their ``requires_grad`` on.

    Everything is restored on exit, also on error: each module's ``training`` flag, each module's
    ``gradient_checkpointing`` flag, the LoRA weights' ``requires_grad``. Eval mode turns dropout (also
    ``lora_dropout``) off; transformers only checkpoints in training mode, and the flags are cleared too for
    modules that check them alone (a checkpointed forward would call the hooks twice).
    """
    modes = {m: m.training for m in model.modules()}
    checkpointing = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    flags = {w.name: w.module.weight.requires_grad for w in weights}
    handles = []

    def hook_for(w: _LoraWeight) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if state.acc is None or not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0].detach()
            if x.shape[0] != state.batch_size or output.shape[0] != state.batch_size:
                raise ValueError(
                    f"LoRA weight {w.name!r} was called on a tensor of shape {tuple(x.shape)} whose first "
                    f"dimension is not the batch ({state.batch_size}); per-example gradients need batch-major "
                    "activations (token-routed layers such as MoE experts are not supported)"
                )
            if w.is_b:
                output.register_hook(partial(_b_hook, w, x, state))
            else:
                w.calls.append((x, output))

        return hook

    try:
        model.eval()
        for m in checkpointing:
            setattr(m, "gradient_checkpointing", False)  # noqa: B010 - an attribute of transformers' layers
        for w in weights:
            # The LoRA outputs must be in the autograd graph; only ∂L/∂(outputs) is asked for, so no weight
            # (LoRA or base) ever receives a .grad.
            w.module.weight.requires_grad_(True)
            handles.append(w.module.register_forward_hook(hook_for(w)))
        yield
    finally:
        for h in handles:
            h.remove()
        for w in weights:
            w.module.weight.requires_grad_(flags[w.name])
            w.calls.clear()
        for m in checkpointing:
            setattr(m, "gradient_checkpointing", True)  # noqa: B010
        for m, mode in modes.items():
            m.train(mode)


def _b_hook(w: _LoraWeight, x: torch.Tensor, state: _Pass, delta: torch.Tensor) -> None:
    """Tensor hook on a ``lora_B`` output: project ``δ^B`` (leaves the gradient flowing back unchanged)."""
    _project_call(w, x, delta, state)


# --- rows, collation, helpers -------------------------------------------------------------------------


def _fetch(dataset: Any, rows: Sequence[int]) -> list[Any]:
    """``[dataset[i] for i in rows]``, in one call where the dataset reads rows in batches (``__getitems__``:
    `datasets.Dataset`, torch's ``Subset``), which is several times faster than one row at a time."""
    getitems = getattr(dataset, "__getitems__", None)
    if callable(getitems):
        out = getitems(list(rows))
        if isinstance(out, list) and len(out) == len(rows):
            return out
    return [dataset[i] for i in rows]


def _agree(lockstep: Lockstep | None, failure: Exception | None, what: str) -> None:
    """Under `Lockstep`, every rank learns whether any rank failed and all raise together."""
    if lockstep is None or not lockstep.any_failed(failure is not None):
        return
    if failure is not None:
        raise failure
    raise RuntimeError(f"spice: another rank failed {what} in the gradient pass (see its error); every rank stops")


def _weight_shape(module: nn.Linear) -> tuple[int, int]:
    """``(out, in)`` of a LoRA factor, from the layer's sizes (its weight may be a shard under FSDP/ZeRO-3)."""
    return int(module.out_features), int(module.in_features)


def _is_lora_layer(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
        and isinstance(getattr(module, "scaling", None), dict)
    )


def _active_adapters(layer: nn.Module) -> list[str]:
    active = getattr(layer, "active_adapters", None)
    if active is None:
        active = getattr(layer, "active_adapter", None)
    if isinstance(active, str):
        return [active]
    return list(active or [])


def _stable_key(name: str) -> str:
    """The module path without wrapper prefixes, so the same weight projects the same with or without them."""
    for prefix in ("module.", "base_model.model.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


_warned_other_trainables = False


def _warn_other_trainables(model: nn.Module, lora_ids: set[int]) -> None:
    global _warned_other_trainables
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids]
    if others and not _warned_other_trainables:
        _warned_other_trainables = True
        logger.warning(
            "spice: %d trainable parameters outside the LoRA adapter (e.g. %s; modules_to_save or trainable "
            "embeddings) are not part of the gradient features",
            len(others),
            others[0],
        )


def has_adam_moments(optimizer: torch.optim.Optimizer | None, params: Sequence[torch.Tensor] | None = None) -> bool:
    """Whether ``optimizer`` holds Adam's second moments (``exp_avg_sq``) for any of ``params`` (default: any
    of its own parameters): false for `None` and before the first optimizer step."""
    if optimizer is None:
        return False
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    return any("exp_avg_sq" in optimizer.state.get(p, {}) for p in params)


def adam_or_unit(
    config: SpiceConfig, optimizer: torch.optim.Optimizer | None, params: Sequence[torch.Tensor] | None = None
) -> SpiceConfig:
    """``config`` as a gradient pass with ``optimizer`` can run it: ``feature_norm="adam"`` falls back to
    ``"unit"`` while the optimizer has no second moments yet (see `has_adam_moments`); anything else is returned
    as it is.

    The one home of this rule: the callback's first round (before any step), a proxy before its first
    refresh step (`spice_trainer.proxy.model.ProxyModel.feature_config`) and the agreement probe use it.
    """
    if config.feature_norm != "adam" or has_adam_moments(optimizer, params):
        return config
    logger.info(
        "spice: feature_norm='adam' falls back to 'unit' for this pass: %s",
        "no optimizer was given" if optimizer is None else "the optimizer has not stepped yet (no second moments)",
    )
    return config.with_changes(feature_norm="unit")


def _adam_denominators(
    optimizer: torch.optim.Optimizer | None, lora: list[tuple[str, nn.Linear]]
) -> dict[int, torch.Tensor]:
    """``√v̂ + ε`` per LoRA weight from Adam's second moments, ``v̂ = v / (1 − β₂^step)`` (LESS)."""
    if any(hasattr(m.weight, "ds_id") for _, m in lora):
        raise ValueError(
            "feature_norm='adam' is not supported under DeepSpeed ZeRO-3 (its optimizer keeps the second moments "
            "in flat partitions); use feature_norm='unit' or 'none', or a proxy model (SpiceConfig(proxy_model=...))"
        )
    if optimizer is None:
        raise ValueError(
            "feature_norm='adam' needs the live optimizer's second moments: pass optimizer=... (the callback "
            "does this once training has taken a step), or use feature_norm='unit'"
        )
    denoms: dict[int, torch.Tensor] = {}
    for group in optimizer.param_groups:
        beta2 = group.get("betas", (None, None))[1]
        eps = group.get("eps", _ADAM_EPS)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state or beta2 is None:
                continue
            step = float(torch.as_tensor(state.get("step", 1)).item())
            exp_avg_sq = state["exp_avg_sq"]
            if callable(getattr(exp_avg_sq, "full_tensor", None)):  # FSDP2: a sharded DTensor, gathered (collective)
                exp_avg_sq = exp_avg_sq.full_tensor()
            v_hat = exp_avg_sq.float() / (1.0 - beta2 ** max(step, 1.0))
            denoms[id(p)] = v_hat.sqrt() + eps
    missing = [name for name, m in lora if id(m.weight) not in denoms]
    if missing:
        raise ValueError(
            f"feature_norm='adam' needs Adam second moments for every LoRA weight; {len(missing)} have none "
            f"(e.g. {missing[0]}): the optimizer is not Adam/AdamW or has not stepped yet. Use "
            "feature_norm='unit' before the first optimizer step"
        )
    return denoms
