"""A usual TRL SFT + LoRA script, plus one line: ``callbacks=[SpiceDataCallback(...)]``.

Offline by default (a tiny randomly initialised Llama and the synthetic instruction pool of
`spice_trainer.world`, ~20 s on a laptop CPU):

    python examples/sft_spice.py

On your own model and data (a local folder or hub id; a .json/.jsonl/.csv/.parquet file or a dataset saved
with ``save_to_disk``; rows ``{"prompt", "completion"}`` or ``{"messages"}``):

    python examples/sft_spice.py --model Qwen/Qwen2.5-0.5B --dataset pool.jsonl --budget 0.1 --output-dir out

Afterwards ``out/spice/round-N.json`` / ``.png`` hold each selection round (``spice-trainer report out``), and
the ``spice/...`` metrics are in the trainer's logs (TensorBoard/W&B with ``--report-to``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset, load_from_disk
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from spice_trainer import SpiceConfig, SpiceDataCallback


def load_rows(path: str) -> Dataset:
    """A training dataset from a file or a ``save_to_disk`` folder."""
    if Path(path).is_dir():
        loaded = load_from_disk(path)
        return loaded["train"] if isinstance(loaded, dict) or hasattr(loaded, "keys") else loaded
    suffix = Path(path).suffix.lstrip(".")
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(suffix)
    if builder is None:
        raise ValueError(f"--dataset {path!r}: expected a .json/.jsonl/.csv/.parquet file or a save_to_disk folder")
    return load_dataset(builder, data_files=path, split="train")


def toy_model_and_data(rows: int, seed: int) -> tuple[Any, Any, Dataset]:
    """A tiny Llama, its word-level tokenizer and a noisy synthetic prompt-completion pool (all in-process)."""
    from spice_trainer.toy import build_model, build_tokenizer
    from spice_trainer.world import candidate_pool, vocabulary

    tokenizer = build_tokenizer(vocabulary())
    model = build_model(tokenizer, hidden_size=64, num_layers=2, max_positions=64, seed=seed)
    pool = candidate_pool(rows, scenario="noisy", seed=seed)
    return model, tokenizer, Dataset.from_list(pool.rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or hub id (default: a tiny in-process toy model)")
    parser.add_argument("--dataset", help="training data file or folder (default: the synthetic pool)")
    parser.add_argument("--output-dir", default="sft_spice_output")
    parser.add_argument("--budget", type=float, default=0.1, help="fraction of the pool (<= 1) or a row count")
    parser.add_argument("--reselect-every-steps", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--toy-rows", type=int, default=400, help="size of the synthetic pool (toy mode)")
    parser.add_argument("--report-to", default="none")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)

    if (opts.model is None) != (opts.dataset is None):
        parser.error("pass both --model and --dataset, or neither (the offline toy run)")
    if opts.model is None:
        model, tokenizer, dataset = toy_model_and_data(opts.toy_rows, opts.seed)
        learning_rate, use_cpu = 5e-3, True
    else:
        model, tokenizer, dataset = opts.model, None, load_rows(opts.dataset)
        learning_rate, use_cpu = opts.learning_rate, False

    budget: float | int = int(opts.budget) if opts.budget > 1 else opts.budget
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=dataset,
        args=SFTConfig(
            output_dir=opts.output_dir,
            num_train_epochs=opts.epochs,
            per_device_train_batch_size=opts.batch_size,
            learning_rate=learning_rate,
            max_length=opts.max_length,
            logging_steps=5,
            save_strategy="no",
            report_to=opts.report_to,
            use_cpu=use_cpu,
            seed=opts.seed,
        ),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        # The one line SPICE adds: train on the subset it selects (and re-selects on schedule).
        callbacks=[SpiceDataCallback(SpiceConfig(budget=budget, reselect_every_steps=opts.reselect_every_steps))],
    )
    trainer.train()

    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SpiceDataCallback))
    if callback.selection is not None:
        print(callback.selection.summary())
    print(f"trained on {len(callback.selected_rows)} of {len(dataset)} rows; first ids: {callback.selected_rows[:10]}")
    print(f"reports in {Path(opts.output_dir) / 'spice'}")


if __name__ == "__main__":
    main()
