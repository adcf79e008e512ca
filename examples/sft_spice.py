"""A usual TRL SFT + LoRA script, plus one line: ``callbacks=[SpiceDataCallback(SpiceConfig(budget=0.1))]``.

Offline by default: a tiny randomly initialised Llama and a generated prompt-completion pool
(`spice_trainer.demo.toy`, `spice_trainer.demo.world`), about a minute on a laptop CPU:

    python examples/sft_spice.py

On your own model and data (local paths or Hub ids; Hub ids are downloaded unless HF_HUB_OFFLINE=1):

    python examples/sft_spice.py --model path/to/model --dataset pool.jsonl --budget 0.1 --output-dir out

``--model`` is a folder written by ``save_pretrained`` or a Hub id: a causal LM (a LoRA adapter is added with
PEFT, as usual with ``SFTTrainer(peft_config=...)``) or a PEFT adapter (that adapter is trained and measured).
``--dataset`` is a .jsonl/.json/.csv/.parquet file, a folder of such files, a ``save_to_disk`` folder or a Hub
dataset id, with rows ``{"prompt", "completion"}`` (loss on the completion), ``{"messages"}`` (chat) or
``{"text"}``.

Afterwards ``callback.selected_rows`` are the rows of your dataset that were trained on;
``OUTPUT_DIR/_spice/round-N.json`` (and ``.png`` with matplotlib) hold each selection round
(``spice-trainer report OUTPUT_DIR`` renders them), and the ``spice/...`` metrics are in the trainer's logs
(TensorBoard / W&B with ``--report-to``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset, load_from_disk
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from spice_trainer import SpiceConfig, SpiceDataCallback


def load_rows(source: str) -> Dataset:
    """A training dataset from a local file, a folder of files, a ``save_to_disk`` folder or a Hub dataset id."""
    path = Path(source)
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
        loaded = load_from_disk(source)
        return loaded["train"] if hasattr(loaded, "keys") else loaded
    if path.is_file():
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(path.suffix.lstrip("."))
        if builder is None:
            raise SystemExit(f"--dataset {source!r}: expected a .jsonl/.json/.csv/.parquet file")
        return load_dataset(builder, data_files=source, split="train")
    return load_dataset(source, split="train")  # a folder of data files or a Hub dataset id


def load_model(name: str) -> tuple[Any, Any, bool]:
    """``(model, tokenizer, has_adapter)`` from a local folder or a Hub id: a causal LM or a PEFT adapter."""
    from peft import AutoPeftModelForCausalLM, PeftConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        base = PeftConfig.from_pretrained(name).base_model_name_or_path
    except (OSError, ValueError):
        base = None  # not an adapter
    if base is None:
        return AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name), False
    model = AutoPeftModelForCausalLM.from_pretrained(name, is_trainable=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(base)
    return model, tokenizer, True


def toy_model_and_data(rows: int, seed: int) -> tuple[Any, Any, Dataset]:
    """A tiny Llama, its word-level tokenizer and a generated prompt-completion pool (all in-process)."""
    from spice_trainer.demo.toy import build_model, build_tokenizer
    from spice_trainer.demo.world import candidate_pool, vocabulary

    tokenizer = build_tokenizer(vocabulary())
    model = build_model(tokenizer, hidden_size=64, num_layers=2, max_positions=64, seed=seed)
    pool = candidate_pool(rows, scenario="noisy", seed=seed)
    return model, tokenizer, Dataset.from_list(pool.rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model or PEFT adapter: folder or Hub id (default: a tiny in-process toy)")
    parser.add_argument("--dataset", help="training data: file, folder or Hub id (default: a generated pool)")
    parser.add_argument("--output-dir", default="sft_spice_output")
    parser.add_argument("--budget", type=float, default=0.1, help="fraction of the pool (<= 1) or a row count")
    parser.add_argument("--reselect-every-steps", type=int, default=None, help="select again every N steps")
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the selected subset")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lora-r", type=int, default=16, help="rank of the LoRA adapter added to a plain model")
    parser.add_argument("--toy-rows", type=int, default=400, help="size of the generated pool (toy mode)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is available")
    parser.add_argument("--report-to", default="none")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)

    if (opts.model is None) != (opts.dataset is None):
        parser.error("pass both --model and --dataset, or neither (the offline toy run)")
    has_adapter = False
    if opts.model is None:
        model, tokenizer, dataset = toy_model_and_data(opts.toy_rows, opts.seed)
        learning_rate, max_length, use_cpu = 5e-3, 64, True
    else:
        model, tokenizer, has_adapter = load_model(opts.model)
        dataset = load_rows(opts.dataset)
        learning_rate, max_length = opts.learning_rate, opts.max_length
        use_cpu = opts.cpu or not torch.cuda.is_available()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

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
            max_length=max_length,
            logging_steps=5,
            save_strategy="no",
            report_to=opts.report_to,
            use_cpu=use_cpu,
            seed=opts.seed,
        ),
        # A model that already carries an adapter trains that one; otherwise PEFT adds LoRA on every linear layer.
        peft_config=None
        if has_adapter
        else LoraConfig(r=opts.lora_r, lora_alpha=2 * opts.lora_r, target_modules="all-linear", task_type="CAUSAL_LM"),
        # The one line SPICE adds: train on the subset it selects (and re-selects on schedule).
        callbacks=[SpiceDataCallback(SpiceConfig(budget=budget, reselect_every_steps=opts.reselect_every_steps))],
    )
    trainer.train()

    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SpiceDataCallback))
    if callback.selection is not None:
        print(callback.selection.summary())
    rows = callback.selected_rows  # rows of `dataset` as passed, whatever TRL filtered or shuffled
    print(f"trained on {len(rows)} of {len(dataset)} rows; first ids: {rows[:10]}")
    for row in rows[:2]:
        example = dataset[row]
        shown = {k: example[k] for k in ("prompt", "completion", "messages") if k in example}
        print(f"  row {row}: {json.dumps(shown, ensure_ascii=False)[:200]}")
    reports = Path(opts.output_dir) / "_spice"
    files = sorted(p.name for p in reports.glob("round-*")) if reports.is_dir() else []
    print(f"reports in {reports}: {', '.join(files) or 'none'} (render with `spice-trainer report {opts.output_dir}`)")


if __name__ == "__main__":
    main()
