"""``spice-trainer compare``: the quality benchmark's methods on your own dataset and model.

Every method (`spice_trainer.demo.compare.METHODS`: full, random, fisher, paper, paper-nostop, defaults,
small-loss, grad-norm, and ``less`` when a reference set is given, plus ``--variant`` configs) trains a fresh
LoRA adapter on a copy of the model with one `transformers.Trainer` loop and one set of hyperparameters, for the
same number of epochs over its own rows; SPICE methods select through `SpiceDataCallback`. Reported: held-out
loss (lower is better) and, for prompt/completion or messages rows, exact match of the completions (greedy
decoding reproduces them), each with the paired difference to ``random``. ``bench/quality.py --dataset`` is the
same command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from spice_trainer.cli.errors import CliError

DEFAULT_METHODS = ("full", "random", "fisher", "paper", "paper-nostop", "defaults", "small-loss", "grad-norm")


def _budget(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected a fraction such as 0.1 or a count such as 500, got {text!r}"
        ) from err
    return int(value) if value >= 1 and value.is_integer() else value


def add_data_arguments(group: Any) -> None:
    """The data, model and training options of ``compare`` (shared with ``bench/quality.py --dataset``)."""
    group.add_argument(
        "--dataset", help="rows: a .jsonl/.json/.csv/.parquet file, a folder, a save_to_disk folder or a Hub id"
    )
    group.add_argument("--model", help="a plain causal LM (local folder or Hub id); each method adds a fresh LoRA")
    group.add_argument("--eval-dataset", help="held-out rows (default: --eval-fraction of --dataset, seed 0)")
    group.add_argument("--eval-fraction", type=float, default=0.1, help="held out when there is no --eval-dataset")
    group.add_argument("--reference-dataset", help="a small trusted set: enables the LESS-style 'less' baseline")
    group.add_argument("--split", default="train", help="split of --dataset (and --reference-dataset)")
    group.add_argument("--eval-split", default="train", help="split of --eval-dataset")
    group.add_argument("--budget", type=_budget, default=0.1, help="selection budget: a fraction or a count")
    group.add_argument("--max-rows", type=int, help="use at most this many rows of --dataset (seeded shuffle)")
    group.add_argument("--max-length", type=int, help="cut rows to this many tokens")
    group.add_argument("--learning-rate", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    group.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step (default 8)")
    group.add_argument("--lora-r", type=int, default=8, help="LoRA rank of the fresh adapters, alpha = 2r (8)")


def add_compare_arguments(parser: Any) -> None:
    """Every option of ``spice-trainer compare``."""
    add_data_arguments(parser.add_argument_group("model, data and training"))
    run = parser.add_argument_group("methods and output")
    run.add_argument(
        "--methods", help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)}, less with a reference)"
    )
    run.add_argument(
        "--variant", action="append", default=[], help="extra SPICE method NAME=field:value,... (repeatable)"
    )
    run.add_argument("--seeds", type=int, default=1, help="runs per method (fresh adapter and data order per seed)")
    run.add_argument("--epochs", type=float, default=3.0, help="epochs over each method's own rows (default 3)")
    run.add_argument("--out", default="spice_compare", help="output folder (default spice_compare)")
    run.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def run_compare(args: argparse.Namespace) -> int:
    """Load the rows and the model, run the methods, print the table; writes ``dataset.md``/``dataset.json``.

    Raises:
        CliError: missing ``--dataset``/``--model``, unloadable data or model, a PEFT adapter as ``--model``, an
            unknown method or variant, rows in no known format.
    """
    import torch

    from spice_trainer.cli.select import load_rows
    from spice_trainer.demo import compare
    from spice_trainer.integrations.hub import adapter_base, load_causal_lm

    if not args.dataset or not args.model:
        raise CliError("compare needs --dataset and --model")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(args.dataset, split=args.split)
    eval_rows = load_rows(args.eval_dataset, split=args.eval_split) if args.eval_dataset else None
    reference = load_rows(args.reference_dataset, split=args.split) if args.reference_dataset else None
    if eval_rows is None:
        if not 0 < args.eval_fraction < 1:
            raise CliError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction!r}")
        split = rows.train_test_split(test_size=args.eval_fraction, seed=0)
        rows, eval_rows = split["train"], split["test"]
        print(f"held out {len(eval_rows)} rows of {args.dataset} ({args.eval_fraction:.0%}, seed 0) for evaluation")
    if args.max_rows and len(rows) > args.max_rows:
        rows = rows.shuffle(seed=0).select(range(args.max_rows))
    if adapter_base(args.model) is not None:
        raise CliError(f"--model {args.model} is a PEFT adapter: pass its base model (each method adds a fresh LoRA)")
    try:
        model, tokenizer = load_causal_lm(args.model)
        variants = dict(compare.parse_variant(v) for v in args.variant)
    except ValueError as err:
        raise CliError(str(err)) from err
    if tokenizer is None:
        raise CliError(f"--model: no tokenizer found with {args.model}; save one there with tokenizer.save_pretrained")
    default = [*DEFAULT_METHODS, "less"] if reference is not None else list(DEFAULT_METHODS)
    methods = [m for m in (args.methods.split(",") if args.methods else default) if m]
    methods += [v for v in variants if v not in methods]
    settings = compare.TrainSettings(
        epochs=args.epochs or 3.0,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
    )
    records_path = out / "dataset-records.jsonl"
    records_path.unlink(missing_ok=True)

    def show(record: dict[str, Any]) -> None:
        print(
            f"  {record['method']:13s} seed {record['seed']} rows={record['rows']:6d} loss={record['loss']:.4f} "
            f"exact={record['exact_match']:.3f} select={record['select_seconds']:.1f}s "
            f"train={record['train_seconds']:.1f}s",
            flush=True,
        )
        with records_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    seeds = list(range(args.seeds or 1))
    try:
        records, table = compare.compare_on_dataset(
            model,
            tokenizer,
            rows,
            eval_rows,
            methods=methods,
            reference_rows=reference,
            variants=variants,
            budget=args.budget,
            seeds=seeds,
            settings=settings,
            max_length=args.max_length,
            on_record=show,
        )
    except ValueError as err:
        raise CliError(str(err)) from err
    header = (
        f"{args.dataset} with {args.model}: budget {args.budget:g}, {settings.epochs:g} epochs over each method's "
        f"rows, lr {settings.learning_rate:g}, batch {settings.batch_size}, LoRA r {settings.lora_r}; "
        f"{len(seeds)} seed(s)"
    )
    report = header + "\n\n" + table
    (out / "dataset.md").write_text(report + "\n", encoding="utf-8")
    (out / "dataset.json").write_text(
        json.dumps({"settings": vars(args), "records": records}, default=str) + "\n", encoding="utf-8"
    )
    print()
    print(report)
    print(f"\nwritten to {out / 'dataset.md'}")
    return 0
