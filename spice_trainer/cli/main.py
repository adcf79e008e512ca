"""The ``spice-trainer`` command: ``demo``, ``select``, ``report`` and ``compare``.

* ``spice-trainer demo`` — the whole story offline in a few minutes: build the small synthetic world
  (`spice_trainer.demo.world`), fine-tune with TRL's `SFTTrainer` + `SpiceDataCallback` on a SPICE-chosen 10 %,
  compare with a random 10 % and the full pool, print a table and write a report.
* ``spice-trainer select`` — selection outside a training run (`spice_trainer.cli.select`): a model (local or
  Hub, plain or a PEFT adapter) and a dataset (local or Hub, any format TRL's SFTTrainer takes); the rows are
  prepared and selected exactly as `SpiceDataCallback` does inside `SFTTrainer`; writes the chosen rows with
  their scores as a `datasets` dataset, the `Selection` and a plot, and can push the rows to the Hub.
* ``spice-trainer report`` — a markdown report (and plots) from saved selection rounds (`spice_trainer.cli.report`).
* ``spice-trainer compare`` — the quality benchmark's methods on your own data and model (`spice_trainer.cli.compare`).

Command output goes to stdout (this is the one package where the user reads printed text); progress and
diagnostics go through `logging`. Hub ids are downloaded unless ``HF_HUB_OFFLINE=1``; only ``demo``, which
builds everything in-process, sets that variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from spice_trainer.cli.compare import add_compare_arguments, run_compare
from spice_trainer.cli.errors import CliError
from spice_trainer.cli.report import find_selections, render_report, run_report
from spice_trainer.cli.select import SAVE_FORMATS, run_select
from spice_trainer.config import SpiceConfig
from spice_trainer.demo.experiment import run_demo_experiment
from spice_trainer.integrations.arguments import PREFIX, SpiceArguments
from spice_trainer.proxy.adapter import DEFAULT_LORA

__all__ = ["CliError", "build_parser", "config_from_args", "find_selections", "main", "render_report"]

# SpiceArguments fields that mean nothing to `select` (it always selects; it writes its own files).
_HIDDEN_SPICE_FLAGS = ("use_spice", "spice_write_reports")


def run_demo(args: argparse.Namespace) -> int:
    """``spice-trainer demo``: see `run_demo_experiment`."""
    import datasets
    import torch
    import transformers

    # Everything the demo uses is built in-process: it never needs the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print("building the world and training three adapters (spice, random, full); this takes a few minutes...")
    # The demo's models are tiny: one thread is faster than several fighting over a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # transformers 5 deprecation notices about arguments the demo never sets.
            warnings.simplefilter("ignore", FutureWarning)
            result = run_demo_experiment(Path(args.out), quick=args.quick, seed=args.seed, scenario=args.scenario)
    finally:
        torch.set_num_threads(threads)
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
    print(result.table)
    print(f"\nreport written to {result.report_path}")
    return 0


def config_from_args(args: argparse.Namespace, argv: Sequence[str]) -> SpiceConfig:
    """The `SpiceConfig` the ``--spice-*`` flags describe; ``--paper`` starts from `SpiceConfig.paper` and applies
    only the flags given on the command line.

    Raises:
        CliError: a value `SpiceArguments` / `SpiceConfig` refuses (naming the flag).
    """
    names = [f.name for f in dataclasses_fields(SpiceArguments)]
    try:
        spice_args = SpiceArguments(**{name: getattr(args, name) for name in names})
        config = spice_args.to_config()
    except (TypeError, ValueError) as err:
        raise CliError(str(err)) from err
    if not args.paper:
        return config
    given = sorted({*_given_spice_fields(argv), *getattr(args, "config_spice_fields", [])})
    try:
        return SpiceConfig.paper(**{name: getattr(config, name) for name in given})
    except (TypeError, ValueError) as err:
        raise CliError(str(err)) from err


def dataclasses_fields(cls: type) -> tuple[Any, ...]:
    import dataclasses

    return dataclasses.fields(cls)


def _given_spice_fields(argv: Sequence[str]) -> list[str]:
    """The `SpiceConfig` fields whose ``--spice_x`` / ``--spice-x`` flag appears in ``argv``."""
    given = []
    for f in dataclasses_fields(SpiceArguments):
        if not f.name.startswith(PREFIX) or f.name in _HIDDEN_SPICE_FLAGS:
            continue
        flags = {f"--{f.name}", f"--{f.name.replace('_', '-')}"}
        if any(token.split("=", 1)[0] in flags for token in argv):
            given.append(f.name[len(PREFIX) :])
    return given


# --------------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------------


def build_parser(select_config: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The ``spice-trainer`` argument parser (subcommands are `HfArgumentParser`s, as in TRL's own CLI).

    Args:
        select_config: the keys of a training YAML (``select --config FILE``) that become ``select``'s defaults:
            see `config_defaults`.
    """
    parser = argparse.ArgumentParser(
        prog="spice-trainer",
        description="SPICE data selection for instruction tuning: pick the most informative, least "
        "conflicting rows of a pool, offline or inside a Hugging Face Trainer.",
        epilog="Run `spice-trainer COMMAND --help` for the options of a command. Models and datasets may be local "
        "paths or Hub ids (downloaded into the Hugging Face cache unless HF_HUB_OFFLINE=1).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=HfArgumentParser)

    demo = commands.add_parser(
        "demo",
        help="SPICE vs random vs full data on a small generated pool (offline, a few minutes on CPU)",
        description="Build a small synthetic instruction world, fine-tune a tiny Llama with TRL's SFTTrainer "
        "on a SPICE-chosen 10% (SpiceDataCallback), a random 10% and the whole pool, and compare exact-match "
        "accuracy on a clean held-out set. Prints a table and writes a markdown report with plots. Offline: "
        "everything is built in-process.",
    )
    demo.add_argument("--out", default="spice_report", help="folder for the report")
    demo.add_argument("--quick", action="store_true", help="a smaller pool and fewer epochs (about a minute)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the world and the training runs")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for the tiny models)")
    demo.add_argument(
        "--scenario",
        choices=("curated", "noisy"),
        default="curated",
        help="which candidate pool: curated (8%% noise) or noisy (half corrupted: the hard case)",
    )
    demo.set_defaults(func=lambda args, argv: run_demo(args))

    sel = commands.add_parser(
        "select",
        dataclass_types=[SpiceArguments],
        allow_abbrev=False,
        help="select a subset of a dataset with a model, as SpiceDataCallback would at the start of training",
        description="SPICE selection outside a training run. The rows are prepared by TRL's SFTTrainer and "
        "selected by SpiceDataCallback's first round, exactly as at the start of training with the same model, "
        "adapter, data, --max-length and --spice-* settings (the flags and YAML keys of spice_trainer."
        "SpiceArguments). Writes indices.json (rows of the dataset), the chosen rows with their scores "
        "(selected/train.jsonl, selected/train.parquet or a save_to_disk folder selected/), selection.json and "
        "selection.png to --out.",
    )
    for action in sel._actions:  # argparse keeps a parser's actions there; hide the flags select ignores
        if action.dest in _HIDDEN_SPICE_FLAGS:
            action.help = argparse.SUPPRESS
    data = sel.add_argument_group("model and data")
    data.add_argument(
        "--model",
        required=True,
        help="a local folder or a Hub id: a causal LM (a LoRA adapter is added, see --lora-*) or a PEFT adapter",
    )
    data.add_argument(
        "--dataset",
        required=True,
        help="a local .jsonl/.json/.csv/.parquet file, a folder of such files, a Dataset.save_to_disk folder or a "
        "Hub dataset id, with 'text', 'messages', 'prompt'+'completion' or tokenised 'input_ids' columns",
    )
    data.add_argument("--dataset-config", default=None, help="the dataset's configuration name (Hub datasets)")
    data.add_argument("--split", default="train", help="the split to select from")
    data.add_argument(
        "--max-length",
        type=_optional_int,
        default=1024,
        help="TRL's SFTConfig.max_length: rows are truncated to it as in training (none keeps them whole)",
    )
    lora = sel.add_argument_group("the LoRA adapter added to a plain model (spice_trainer.proxy.adapter.DEFAULT_LORA)")
    lora.add_argument("--lora-r", type=int, default=None, help=f"rank (default {DEFAULT_LORA['r']})")
    lora.add_argument("--lora-alpha", type=float, default=None, help=f"alpha (default {DEFAULT_LORA['lora_alpha']})")
    lora.add_argument(
        "--lora-dropout", type=float, default=None, help=f"dropout (default {DEFAULT_LORA['lora_dropout']})"
    )
    lora.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=None,
        help=f"module names, or all-linear (default {DEFAULT_LORA['target_modules']})",
    )
    output = sel.add_argument_group("output")
    output.add_argument("--out", required=True, help="output folder")
    output.add_argument(
        "--format", choices=SAVE_FORMATS, default="jsonl", help="how the chosen rows are written (through datasets)"
    )
    output.add_argument("--push-to-hub", metavar="REPO_ID", help="also push the chosen rows as a Hub dataset")
    output.add_argument("--private", action="store_true", help="make the pushed dataset private")
    run = sel.add_argument_group("run")
    run.add_argument(
        "--paper", action="store_true", help="start from the paper-exact preset (SpiceConfig.paper); flags override it"
    )
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the run (default: torch's); 1 is fastest on a shared or small CPU",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--config",
        metavar="YAML",
        help="the YAML of your TRL training run (TrlParser's --config): model_name_or_path, dataset_name, "
        "dataset_config, dataset_train_split, max_length, lora_* and spice_* keys become the defaults of the "
        "flags above (flags given here override them); the training keys are ignored",
    )
    sel.set_defaults(func=lambda args, argv: run_select(args, config_from_args(args, argv)))
    if select_config:
        defaults = config_defaults(select_config)
        for action in sel._actions:
            if action.dest in defaults:
                action.required = False  # given by the YAML (TrlParser does the same)
        sel.set_defaults(**defaults, config_spice_fields=[k[len(PREFIX) :] for k in defaults if k.startswith(PREFIX)])

    rep = commands.add_parser(
        "report",
        help="render a markdown report from saved selection rounds",
        description="Render report.md and per-round plots from DIR/_spice/round-*.json (SpiceDataCallback), "
        "DIR/round-*.json, DIR/selection.json or one selection file.",
    )
    rep.add_argument("dir", help="a training output_dir, a folder of rounds, or a selection .json file")
    rep.add_argument("--out", help="where to write the report (default: the folder of the rounds)")
    rep.set_defaults(func=lambda args, argv: run_report(args))

    cmp = commands.add_parser(
        "compare",
        help="compare SPICE, its presets and baselines (random, small-loss, gradient norm, ...) on your data",
        description="Train a fresh LoRA adapter per method (full, random, fisher, paper, paper-nostop, defaults, "
        "small-loss, grad-norm, and less with --reference-dataset) on your rows with one Trainer loop and one set "
        "of hyperparameters, then report held-out loss and exact match of completions, paired to random "
        "(spice_trainer.cli.compare).",
    )
    add_compare_arguments(cmp)
    cmp.set_defaults(func=lambda args, argv: run_compare(args))
    return parser


#: Keys of a TRL training YAML and the ``select`` option each one sets.
YAML_KEYS = {
    "model_name_or_path": "model",
    "dataset_name": "dataset",
    "dataset_config": "dataset_config",
    "dataset_train_split": "split",
    "max_length": "max_length",
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "lora_target_modules",
}


def config_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``select``'s defaults from a training YAML: `YAML_KEYS` and every ``spice_*`` key of `SpiceArguments`.

    Raises:
        CliError: a ``spice_*`` key that `SpiceArguments` does not have (a typo would otherwise be ignored).
    """
    spice_fields = {f.name for f in dataclasses_fields(SpiceArguments)}
    defaults: dict[str, Any] = {}
    for key, value in config.items():
        if key in YAML_KEYS:
            if key == "lora_target_modules" and isinstance(value, str):
                value = [value]
            defaults[YAML_KEYS[key]] = value
        elif key.startswith(PREFIX) or key == "use_spice":
            if key not in spice_fields:
                raise CliError(f"--config: unknown SPICE key {key!r}; the keys are the SpiceArguments fields")
            if key not in _HIDDEN_SPICE_FLAGS:
                defaults[key] = value
    return defaults


def _read_config(argv: list[str]) -> tuple[list[str], dict[str, Any] | None]:
    """``argv`` without ``--config FILE`` (of ``select``), and the YAML mapping it names."""
    if "select" not in argv or "--config" not in argv:
        return argv, None
    import yaml

    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise CliError("--config needs a YAML file")
    path = Path(argv[index + 1])
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise CliError(f"--config: could not read {path}: {err}") from err
    if not isinstance(loaded, dict):
        raise CliError(f"--config: {path} must hold a YAML mapping (key: value lines)")
    return argv[:index] + argv[index + 2 :], loaded


def _optional_int(text: str) -> int | None:
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a whole number or none, got {text!r}") from err


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spice-trainer`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, select_config = _read_config(argv)
        parser = build_parser(select_config)
    except CliError as err:
        print(f"spice-trainer select: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args, argv))
    except CliError as err:
        print(f"spice-trainer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
