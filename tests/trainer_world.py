"""Fixtures for the Trainer integration tests: tiny model, generated rows, and a recording collator."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from spice_trainer.demo.toy import add_lora, build_model, build_tokenizer
from spice_trainer.features.batches import is_selection_collation

TOK = build_tokenizer([f"w{i}" for i in range(60)])


def rows(n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """Distinct random token rows; the first two tokens are a prompt without loss."""
    g = torch.Generator().manual_seed(seed)
    out, seen = [], set()
    while len(out) < n:
        length = int(torch.randint(5, 12, (1,), generator=g))
        ids = torch.randint(7, len(TOK), (length,), generator=g).tolist()
        if tuple(ids) in seen:
            continue
        seen.add(tuple(ids))
        out.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    return out


def dataset(n: int = 32, seed: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows(n, seed))


def model(seed: int = 0, dropout: float = 0.0) -> Any:
    return add_lora(build_model(TOK, hidden_size=32, seed=seed), r=4, dropout=dropout, seed=seed)


def args(output_dir: Any, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "num_train_epochs": 2,
        "learning_rate": 1e-2,
        "report_to": "none",
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 1,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


class RecordingCollator:
    """Pads like the usual collator and records the ``input_ids`` of every batch the *dataloader* asks for.

    Calls made by SPICE's own gradient pass are not recorded: those are selection, not training.
    """

    def __init__(self) -> None:
        self.inner = DataCollatorForSeq2Seq(TOK, padding=True)
        self.batches: list[list[tuple[int, ...]]] = []

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        if not is_selection_collation():
            self.batches.append([tuple(int(t) for t in row["input_ids"]) for row in batch])
        return self.inner(batch)

    def drawn_rows(self, data: Any) -> list[int]:
        """The dataset rows drawn, in order."""
        index = {tuple(row["input_ids"]): i for i, row in enumerate(data)}
        return [index[ids] for batch in self.batches for ids in batch]
