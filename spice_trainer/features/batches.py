"""Rows, collation, model inputs and token losses: how spice-trainer turns dataset rows into a measured batch.

One home for what the gradient pass, the proxy's refresh steps and the feature store share:

- `prepare_row` checks a row (`RowLimits`: token ids inside the vocabulary, no ``-100`` in ``input_ids``, token
  columns as long as ``input_ids``, no more tokens than the model has positions) and keeps its numeric columns
  (truncated to ``max_length``); every error names the dataset row and the fix. `PadCollator` is the padding
  collator used when the caller gives none; `collate` calls a collator *as the library* (see
  `is_selection_collation`), so a user's collator can tell selection batches from training batches.
- `model_inputs` and `batch_labels` build the forward's keyword arguments and the labels as the gradient
  pass does (positions counted from each row's first real token, so left and right padding agree).
- `per_example_loss` and `token_loss_sum` are transformers' causal-LM loss per row and summed.

Only torch (and numpy, for array columns) is imported.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

Collator = Callable[[list[dict[str, Any]]], dict[str, Any]]

_SELECTION_COLLATION: contextvars.ContextVar[bool] = contextvars.ContextVar("spice_selection_collation", default=False)


def upcast_logits(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 (as transformers' loss does); float32 and float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def is_selection_collation() -> bool:
    """True while spice-trainer itself calls a data collator (a gradient pass or a proxy refresh step).

    A collator that records or counts training batches can skip these calls: they are selection, not training.
    """
    return _SELECTION_COLLATION.get()


@contextmanager
def _selection_collation() -> Iterator[None]:
    token = _SELECTION_COLLATION.set(True)
    try:
        yield
    finally:
        _SELECTION_COLLATION.reset(token)


def collate(collator: Collator, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``collator(rows)``, marked as the library's own call (`is_selection_collation` is True inside it)."""
    with _selection_collation():
        return collator(rows)


def per_example_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's mean next-token cross-entropy over its supervised tokens (targets ≠ -100), and its largest.

    Matches transformers' ``ForCausalLMLoss`` on a batch of one: logits upcast to float32; the caller shifts
    the labels (not the logits, which would copy the ``(n, T, V)`` tensor).

    Args:
        logits: ``(n, K, V)``.
        targets: ``(n, K)``, the token each position predicts, -100 where there is no loss.

    Returns:
        ``(losses (n,), counts (n,), max_token_losses (n,))``: the mean loss, the number of supervised tokens
        and the surprisal ``−log p`` of the row's least likely supervised token (what the candidate guards read,
        `spice_trainer.core.guards`); a row without a supervised token has NaN losses and count 0.
    """
    logits = upcast_logits(logits)
    targets = targets.to(logits.device)
    token_loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(targets.shape)
    counts = (targets != -100).sum(dim=1)
    summed = token_loss.sum(dim=1)  # ignored targets contribute exactly 0
    nan = torch.full_like(summed, float("nan"))
    losses = torch.where(counts > 0, summed / counts.clamp_min(1), nan)
    # Losses are >= 0 and ignored targets are exactly 0, so the row's max is its largest supervised token loss.
    largest = torch.where(counts > 0, token_loss.detach().amax(dim=1), nan)
    return losses, counts, largest


def output_vocab_size(model: nn.Module) -> int | None:
    """How many tokens the model's output layer scores (the logits' last dimension), or `None` if unknown.

    The output embedding's rows when the model exposes it (``get_output_embeddings``, transformers' API; padded
    vocabularies included, as in the logits), else ``config.vocab_size``.
    """
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        head = None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[0] > 0:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def check_batch_rows(batch: Any, expected: int) -> None:
    """The collated batch has one row per example (padding-free/packing collators concatenate them)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            f"data_collator must return a dict with 'input_ids' (a Mapping of tensors), got {type(batch).__name__}"
        )
    rows = torch.as_tensor(batch["input_ids"]).shape[0]
    if rows != expected:
        raise ValueError(
            f"data_collator returned {rows} rows for {expected} examples; per-example gradients need one padded "
            "row per example, so padding-free or packing collators (e.g. TRL's padding_free=True) are not "
            "supported: pass a padding collator, or data_collator=None"
        )


def check_labels(targets: torch.Tensor, vocab_size: int, rows: Sequence[int]) -> None:
    """Every target (the labels shifted left by one) is -100 or a token id in ``[0, vocab_size)``.

    An out-of-range target makes cross-entropy fail (CPU) or assert on the device (CUDA), and a negative
    one other than -100 (e.g. -1 used as "ignore") would otherwise be read as token 0: name the rows.
    """
    bad = (targets != -100) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        where = bad.any(dim=1).nonzero().flatten().tolist()
        value = int(targets[bad][0])
        raise ValueError(
            f"dataset rows {[rows[i] for i in where][:10]} have labels outside [0, {vocab_size}) (e.g. {value}); "
            "labels must be token ids of the model's vocabulary, with -100 marking tokens without loss. Check "
            "the tokenizer matches the model, and use -100 (not -1) to mask tokens"
        )


# Columns that hold one entry per token of ``input_ids`` (transformers' and TRL's names).
TOKEN_COLUMNS = ("labels", "attention_mask", "completion_mask", "assistant_masks", "token_type_ids")


@dataclass(frozen=True)
class RowLimits:
    """What a model accepts in a row: token ids in ``[0, vocab_size)``, at most ``max_positions`` tokens.

    `None` means unknown (not checked). Build with `row_limits`.
    """

    vocab_size: int | None = None
    max_positions: int | None = None
    positions_field: str = "max_position_embeddings"


def row_limits(model: nn.Module) -> RowLimits:
    """The model's vocabulary (rows of its input embedding) and position limit (its config's
    ``max_position_embeddings`` / ``n_positions``), for `prepare_row`'s checks."""
    vocab: int | None = None
    get_embeddings = getattr(model, "get_input_embeddings", None)
    try:
        weight = getattr(get_embeddings(), "weight", None) if callable(get_embeddings) else None
    except (NotImplementedError, AttributeError):
        weight = None
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        vocab = int(weight.shape[0])
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return RowLimits(vocab_size=vocab, max_positions=value, positions_field=name)
    return RowLimits(vocab_size=vocab)


def prepare_row(
    row: Any, max_length: int | None, *, index: int | None = None, limits: RowLimits | None = None
) -> dict[str, Any]:
    """Check a row, then keep its numeric columns, sequences truncated to ``max_length`` tokens.

    Strings, ``None`` and lists of non-numbers (e.g. TRL's ``messages`` or ``prompt`` columns) are dropped:
    collators only pad numbers.

    Args:
        row: one dataset row.
        max_length: truncate every sequence column to this many tokens (`None`: no truncation).
        index: the row's index in the dataset, named in errors.
        limits: the model's `RowLimits`; `None` skips the vocabulary and position checks.

    Raises:
        ValueError: the row is not a mapping with ``input_ids``; a token column (``labels``, ``attention_mask``,
            ...) has another length than ``input_ids``; ``input_ids`` holds ``-100`` or ids outside the
            vocabulary; the (truncated) row has more tokens than the model has positions. Each names the row.
    """
    where = "a dataset row" if index is None else f"dataset row {index}"
    if not isinstance(row, Mapping) or "input_ids" not in row:
        found = sorted(row) if isinstance(row, Mapping) else type(row).__name__
        raise ValueError(
            f"each dataset row must be a dict with 'input_ids' (tokenised text), got {found} in {where}; tokenise "
            "the dataset first (TRL's SFTTrainer does it for you)"
        )
    length = sequence_length(row["input_ids"])
    for key in TOKEN_COLUMNS:
        value = row.get(key)
        if value is not None and is_numeric(value) and sequence_length(value) != length:
            raise ValueError(
                f"{where}: {key!r} has {sequence_length(value)} entries but 'input_ids' has {length}; token columns "
                "must align with input_ids one entry per token (labels use -100 for tokens without loss). Fix the "
                "tokenisation of that row, or drop it"
            )
    out: dict[str, Any] = {}
    for key, value in row.items():
        if not is_numeric(value):
            continue
        if max_length is not None and sequence_length(value) > max_length:
            value = value[:max_length]
        out[key] = value
    if limits is not None:
        _check_input_ids(out["input_ids"], where, limits, max_length)
    return out


def _check_input_ids(input_ids: Any, where: str, limits: RowLimits, max_length: int | None) -> None:
    ids = torch.as_tensor(input_ids).reshape(-1)
    if ids.numel() == 0:
        return
    if bool((ids == -100).any()):
        position = int((ids == -100).nonzero()[0])
        raise ValueError(
            f"{where}: 'input_ids' holds -100 (at token {position}); -100 marks tokens without loss in 'labels' "
            "only, input_ids must be token ids. Was 'labels' copied into 'input_ids'? Rebuild that row's input_ids "
            "from the tokenizer"
        )
    vocab = limits.vocab_size
    bad = (ids < 0) if vocab is None else ((ids < 0) | (ids >= vocab))
    if bool(bad.any()):
        position = int(bad.nonzero()[0])
        bound = "" if vocab is None else f" [0, {vocab})"
        raise ValueError(
            f"{where}: 'input_ids' holds token id {int(ids[position])} (at token {position}), outside the model's "
            f"vocabulary{bound}. Check that the tokenizer matches the model (after adding tokens, call "
            "model.resize_token_embeddings(len(tokenizer)))"
        )
    if limits.max_positions is not None and ids.numel() > limits.max_positions:
        now = "" if max_length is None else f" after truncation to max_length={max_length}"
        raise ValueError(
            f"{where} has {ids.numel()} tokens{now}, more than the model's {limits.max_positions} positions "
            f"(config.{limits.positions_field}); set SpiceConfig(max_length={limits.max_positions}) (or lower) to "
            "truncate rows for selection, and the trainer's max_length to the same for training"
        )


def longest_first(dataset: Any, rows: Sequence[int], max_length: int | None) -> list[int]:
    """Positions ``0..len(rows)-1`` ordered by their row's token count, longest first (stable).

    Rows with an empty ``input_ids`` are left out: they have no token to measure (the caller keeps them as rows
    without a supervised token). Rows that are not mappings with ``input_ids`` stay in, so that `prepare_row`
    names them.
    """
    lengths: list[int | None] = []
    for i in rows:
        row = dataset[i]
        length = sequence_length(row["input_ids"]) if isinstance(row, Mapping) and "input_ids" in row else None
        lengths.append(length if length is None or max_length is None else min(length, max_length))
    keep = [j for j in range(len(rows)) if lengths[j] != 0]
    return sorted(keep, key=lambda j: -(lengths[j] or 0))


def is_numeric(value: Any) -> bool:
    """A tensor, a numpy array, a number, or a (nested) list/tuple whose first leaf is one of those."""
    while isinstance(value, list | tuple):
        if not value:
            return True
        value = value[0]
    if isinstance(value, np.ndarray | np.generic):
        return value.dtype.kind in "biuf"
    return isinstance(value, torch.Tensor | int | float)


def sequence_length(value: Any) -> int:
    """The length of a list or a ≥ 1-dimensional tensor/array; 0 for scalars."""
    if isinstance(value, list | tuple):
        return len(value)
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim > 0:
        return int(value.shape[0])
    return 0


class PadCollator:
    """Right-pads ``input_ids``; labels are the row's ``labels`` or ``input_ids`` with masked tokens -100."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        for i, row in enumerate(rows):
            length = sequence_length(row["input_ids"])
            for key in TOKEN_COLUMNS:
                if key in row and sequence_length(row[key]) != length:
                    raise ValueError(
                        f"row {i} of the batch: {key!r} has {sequence_length(row[key])} entries but 'input_ids' has "
                        f"{length}; token columns must align with input_ids one entry per token"
                    )
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            row_ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            length = row_ids.shape[0]
            ids[i, :length] = row_ids
            row_attention = torch.as_tensor(row.get("attention_mask", [1] * length), dtype=torch.long)[:length]
            row_labels = torch.as_tensor(row.get("labels", row_ids), dtype=torch.long)[:length].clone()
            if "labels" not in row:
                row_labels[row_attention == 0] = -100
            for mask_key in ("completion_mask", "assistant_masks"):
                if mask_key in row:
                    row_labels[torch.as_tensor(row[mask_key])[:length] == 0] = -100
            labels[i, :length] = row_labels
            attention[i, :length] = row_attention
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def pad_token_id(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    return int(pad) if pad is not None else 0


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM (inside PEFT's wrappers) takes ``logits_to_keep`` (transformers >= 4.50)."""
    inner: Any = model
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the input embedding's device (the first stage of a split model)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    try:
        weight = getattr(get_embeddings(), "weight", None) if callable(get_embeddings) else None
    except (NotImplementedError, AttributeError):  # models without the transformers API
        weight = None
    return weight.device if isinstance(weight, torch.Tensor) else next(model.parameters()).device


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a `DistributedDataParallel` wrapper: its forward would arm the reducer for a backward
    that never comes (we call ``autograd.grad``), and the next training step would fail."""
    while type(model).__name__ == "DistributedDataParallel" and isinstance(getattr(model, "module", None), nn.Module):
        model = cast(nn.Module, model.module)
    return model


def batch_labels(batch: Mapping[str, Any]) -> torch.Tensor:
    """The batch's labels; without any (e.g. ``DataCollatorWithPadding``) every real token is a target."""
    if batch.get("labels") is not None:
        return torch.as_tensor(batch["labels"])
    input_ids = torch.as_tensor(batch["input_ids"])
    mask = batch.get("attention_mask")
    return input_ids if mask is None else input_ids.masked_fill(torch.as_tensor(mask) == 0, -100)


def model_inputs(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Model kwargs as `compute_gradient_features` builds them (positions counted from each row's start)."""
    inputs: dict[str, Any] = {"input_ids": torch.as_tensor(batch["input_ids"]).to(device), "use_cache": False}
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = torch.as_tensor(mask).to(device)
        inputs["attention_mask"] = mask
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    if batch.get("position_ids") is not None:
        inputs["position_ids"] = torch.as_tensor(batch["position_ids"]).to(device)
    return inputs


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``Σ_{i,t} ℓ_{i,t}`` over supervised next-token targets (labels shifted left by one, -100 ignored)."""
    shift_logits = upcast_logits(logits[:, :-1, :])
    shift_labels = labels[:, 1:]
    return nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
