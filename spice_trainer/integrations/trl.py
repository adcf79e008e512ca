"""TRL `SFTTrainer` specifics for `SpiceDataCallback`: which settings are refused, and row identity.

The only library module below the command line and the demo that imports TRL. `spice_trainer.integrations.trainer`
calls it only when the trainer is an `SFTTrainer` (`is_sft_trainer`), so a plain `transformers.Trainer` never needs
TRL installed.

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
