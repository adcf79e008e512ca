"""TRL `SFTTrainer` specifics for `SpiceDataCallback`: which settings are refused, and row identity.

The only module of the package that imports TRL. `spice_trainer.integrations.trainer` calls it only when the
trainer is an `SFTTrainer` (`is_sft_trainer`), so a plain `transformers.Trainer` never needs TRL installed.

Row identity. SPICE selects rows of the dataset the trainer trains on; users want them as rows of the dataset
they passed. TRL 1.16's ``SFTTrainer._prepare_dataset`` turns one into the other by

1. zero or more ``Dataset.map`` calls (formatting, ChatML conversion, EOS, tokenisation, labels, truncation):
   one row out per row in, same order. ``map`` writes a fresh table, so it also drops any index mapping the
   user's dataset carried (``ds.shuffle()`` / ``ds.select(...)``): row ``i`` of the new table is user row ``i``;
2. ``filter`` (only with ``max_length``: rows left without a supervised token are dropped) and ``shuffle``
   (``shuffle_dataset=True``): both only compose an index mapping over that table.

So with ``max_length`` set (the default, 1024) the truncation ``map`` certainly ran, and the processed
dataset's index mapping — if any — gives the user row directly. With ``max_length=None`` there is no filter,
and a ``map`` may or may not have run (an already-tokenised dataset with labels is passed through): either way
processed row ``j`` is user row ``perm[j]``, where ``perm`` is the permutation ``Dataset.shuffle(seed)``
draws (identity without ``shuffle_dataset``) — computed here by ``datasets`` itself, not re-derived. With
``skip_prepare_dataset`` the rows are the user's rows. Packing merges rows, so it is refused (`check_sft_args`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import datasets
from trl import SFTConfig, SFTTrainer


def is_sft_trainer(trainer: Any) -> bool:
    """Whether ``trainer`` is a TRL `SFTTrainer` (or a subclass)."""
    return isinstance(trainer, SFTTrainer)


def check_sft_args(trainer: SFTTrainer) -> None:
    """Refuse the `SFTConfig` settings SPICE cannot honour exactly.

    Raises:
        ValueError: ``packing=True`` — a packed sequence mixes several rows, so neither a row's gradient nor
            the row itself can be drawn on its own.
    """
    if getattr(trainer.args, "packing", False):
        raise ValueError(
            "SpiceDataCallback does not support packing=True: packed sequences mix several rows, so a row's "
            "gradient cannot be measured or drawn on its own. Set packing=False in SFTConfig (padding_free "
            "without packing is fine), or select offline with spice_trainer.select and pack the subset"
        )


def sft_source_rows(trainer: SFTTrainer, dataset: Any, rows: Sequence[int]) -> list[int]:
    """Map rows of the `SFTTrainer`'s prepared training dataset to rows of the dataset the user passed.

    Args:
        trainer: the trainer (its ``args`` say which preparation steps ran; see the module docstring).
        dataset: the prepared training dataset (``trainer.train_dataset``, columns possibly removed: removing
            columns keeps the index mapping).
        rows: row indices of ``dataset``.

    Returns:
        The user-dataset row of each entry of ``rows``, in the same order.
    """
    rows = [int(r) for r in rows]
    if getattr(trainer, "_skip_prepare_dataset", False):
        return rows
    args = cast(SFTConfig, trainer.args)  # SFTTrainer converts a plain TrainingArguments in __init__
    if args.max_length is not None:
        # The truncation map flattened the table to user order; filter/shuffle left a mapping over it.
        mapping = getattr(dataset, "_indices", None)
        if mapping is None:
            return rows
        column = mapping.column(0)
        return [int(column[r].as_py()) for r in rows]
    if not args.shuffle_dataset:
        return rows
    # No filter ran; the only reordering is TRL's `dataset.shuffle(seed=args.seed)`: replay it on row ids.
    perm = datasets.Dataset.from_dict({"row": list(range(len(dataset)))}).shuffle(seed=args.seed)["row"]
    return [int(perm[r]) for r in rows]


def select_as_sft_trainer(
    model: Any,
    tokenizer: Any,
    dataset: datasets.Dataset,
    config: Any,
    *,
    output_dir: str,
    max_length: int | None = 1024,
    show_progress: bool = True,
) -> Any:
    """Run SPICE's first round exactly as `SpiceDataCallback` runs it at the start of ``SFTTrainer.train()``.

    The offline path (``spice-trainer select``) and the training path share everything from the rows on: an
    `SFTTrainer` with default settings (and ``max_length``) tokenises the rows — ``text``, ``messages``,
    ``prompt``/``completion`` (text or conversational) or already tokenised — with TRL's own
    ``_prepare_dataset`` and collator, and the callback selects when the train dataloader is built, as in
    training. Nothing is trained. So the same model, adapter, data, ``max_length`` and `SpiceConfig` pick the
    same rows here and in a training run with default `SFTConfig` data settings.

    Args:
        model: a PEFT LoRA causal LM (`spice_trainer.proxy.adapter.with_lora_adapter` adds one).
        tokenizer: its tokenizer (the chat template is used for conversational rows).
        dataset: the rows as the user has them.
        config: the `SpiceConfig`.
        output_dir: the trainer's ``output_dir`` (round reports go to ``output_dir/spice/`` when
            ``config.write_reports``).
        max_length: `SFTConfig.max_length` (TRL's default 1024; ``None`` keeps rows whole).
        show_progress: progress bars over the gradient pass and the greedy.

    Returns:
        The `SpiceDataCallback` after its round: ``.selection`` and ``.selected_rows`` (rows of ``dataset``).
    """
    import torch

    from spice_trainer.integrations.trainer import SpiceDataCallback

    callback = SpiceDataCallback(config)
    args = SFTConfig(
        output_dir=output_dir,
        max_length=max_length,
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,  # selection measures gradients in the model's own dtype; bf16 only changes training steps
        disable_tqdm=not show_progress,
        log_level="warning",  # the command prints the round line itself
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback]
    )
    trainer.get_train_dataloader()  # the first round, as `train()` runs it before its first step
    return callback
