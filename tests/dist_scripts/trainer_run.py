"""Launched by tests/test_distributed.py under torchrun: a full `Trainer` run with `SpiceDataCallback`.

Usage: ``trainer_run.py OUT_DIR SETTINGS_JSON [EPOCHS] [SHARDING] [SAVE_STEPS] [RESUME_FROM]``. SETTINGS_JSON holds
`SpiceConfig` overrides (tuples as lists); EPOCHS defaults to 1. SHARDING is ``fsdp2`` (accelerate's FSDP2 over each
decoder layer), ``zero3`` (DeepSpeed ZeRO-3; both need accelerators, tests/test_fsdp.py) or ``none``. SAVE_STEPS > 0
saves a checkpoint every that many steps; RESUME_FROM is a checkpoint folder to resume from. The Trainer initialises
the gloo process group itself (``use_cpu=True`` under torchrun is accelerate's MULTI_CPU mode). Each rank writes
``OUT_DIR/rank<r>.json``: every round's `Selection` as this rank saw it (read from the callback right after the
round), the dataset rows this rank's dataloader yielded (recovered from the batches the collator received), the
rows of every batch this rank trained on (recorded at the model's forward, in training mode), the logged losses and
the sampler's subset history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tiny import build, hf_dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from spice_trainer import SpiceConfig, SpiceDataCallback
from spice_trainer.features.batches import is_selection_collation


class RecordingCollator:
    """`default_data_collator` that remembers the input_ids of every row the *dataloader* batches.

    Calls from SPICE's own gradient pass (selection, not training) are not recorded.
    """

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not is_selection_collation():
            self.seen.extend(list(f["input_ids"]) for f in features)
        return default_data_collator(features)


class RoundRecorder(TrainerCallback):
    """Copies the SPICE callback's selection whenever a new one appears (after the round, every rank)."""

    def __init__(self, spice: SpiceDataCallback) -> None:
        self.spice = spice
        self.rounds: list[dict[str, Any]] = []

    def _check(self) -> None:
        if self.spice.selection is None:  # a resumed run: its restored rounds were recorded by the original run
            self.skipped = len(self.spice.rounds)
        elif len(self.spice.rounds) > getattr(self, "skipped", 0) + len(self.rounds):
            self.rounds.append(self.spice.selection.to_dict())

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check()


def main() -> None:
    out = Path(sys.argv[1])
    save_steps = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[2]).items()}
    tok, model = build()
    data = hf_dataset(tok, n=48)
    config = SpiceConfig(**{"budget": 12, "proj_dim": 16, "batch_size": 4, **settings})
    spice = SpiceDataCallback(config)
    recorder = RoundRecorder(spice)
    collator = RecordingCollator()
    settings_args: dict[str, Any] = dict(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=2,
        num_train_epochs=int(sys.argv[3]) if len(sys.argv) > 3 else 1,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=max(save_steps, 1),
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    settings_args.update(_sharding(sys.argv[4] if len(sys.argv) > 4 else None))
    args = TrainingArguments(**settings_args)
    trained: list[list[int]] = []
    row_of = {tuple(ids): i for i, ids in enumerate(data["input_ids"])}

    def record_training_batch(module: Any, inputs: Any, kwargs: dict[str, Any]) -> None:
        if module.training and torch.is_grad_enabled():
            trained.append([row_of[tuple(int(t) for t in ids)] for ids in kwargs["input_ids"]])

    model.register_forward_pre_hook(record_training_batch, with_kwargs=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[spice, recorder])
    trainer.train(resume_from_checkpoint=sys.argv[6] if len(sys.argv) > 6 else None)
    recorder._check()
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = {
        "rank": rank,
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "rounds": recorder.rounds,
        "yielded": [row_of[tuple(ids)] for ids in collator.seen],
        "trained": trained,
        "losses": {str(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e},
        "history": [[s.round, s.epoch, s.position, s.rows] for s in spice.sampler.history],
        "reports": sorted(p.name for p in (out / "trainer" / "_spice").glob("*")) if rank == 0 else None,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        # Tear gloo down before the interpreter exits: its threads alive at exit abort the process
        # ("terminate called without an active exception"), which fails the run after it succeeded.
        dist.barrier()
        dist.destroy_process_group()


def _sharding(kind: str | None) -> dict[str, Any]:
    """TrainingArguments for the sharded runs (accelerators only: accelerate's CPU mode is DDP)."""
    if kind is None or kind == "none":
        return {}
    if kind == "fsdp2":
        config = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "reshard_after_forward": True}
        return {"use_cpu": False, "fsdp": "full_shard", "fsdp_config": config}
    if kind == "zero3":
        zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
        return {"use_cpu": False, "deepspeed": {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto"}}
    raise ValueError(f"unknown sharding {kind!r}")


if __name__ == "__main__":
    main()
