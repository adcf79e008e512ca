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


class Consumed:
    """Records the rows of every batch the model *trains* on: a forward pre-hook, training mode only.

    What the trainer consumed, not what the dataloader drew or the collator built (prefetched batches are built
    ahead, and a batch drawn before a subset switch is re-collated before training). SPICE's gradient pass runs the
    model in eval mode, so it is not recorded.
    """

    def __init__(self, model: Any) -> None:
        self.batches: list[list[tuple[int, ...]]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        self.batches.append([tuple(int(t) for t in row[m.bool()]) for row, m in zip(ids, mask, strict=True)])

    def rows(self, data: Any) -> list[int]:
        """The dataset rows trained on, in order."""
        index = {tuple(row["input_ids"]): i for i, row in enumerate(data)}
        return [index[ids] for batch in self.batches for ids in batch]


def losses(trainer: Any) -> dict[int, float]:
    """The training loss logged at each step."""
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
