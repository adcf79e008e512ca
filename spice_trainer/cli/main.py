"""The ``spice-trainer`` command: ``demo``, ``select`` and ``report``.

* ``spice-trainer demo`` — the whole story offline in a few minutes: build the small synthetic world
  (`spice_trainer.demo.world`), fine-tune with TRL's `SFTTrainer` + `SpiceDataCallback` on a SPICE-chosen 10 %,
  compare with a random 10 % and the full pool, print a table and write a report.
* ``spice-trainer select`` — offline selection: a local model directory (a PEFT adapter or a plain model)
  and a local dataset file; writes the chosen indices, the chosen rows, the `Selection` and plots.
* ``spice-trainer report`` — a markdown report (and plots) from saved selection rounds.

Command output goes to stdout (this is the one module where the user reads printed text); progress and
diagnostics go through `logging`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spice_trainer.config import SpiceConfig
from spice_trainer.demo.experiment import run_demo_experiment

logger = logging.getLogger(__name__)

DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}


class CliError(Exception):
    """A user error the command reports as one line (exit status 2) instead of a traceback."""


# --------------------------------------------------------------------------------------------------
# loading a local dataset
# --------------------------------------------------------------------------------------------------


def load_rows(path: str | Path) -> tuple[Any, str]:
    """Load a local dataset as a `datasets.Dataset`, and name its format.

    Accepts ``.jsonl`` / ``.json`` (JSON lines or a JSON list), ``.csv``, ``.parquet`` and a folder
    written by ``Dataset.save_to_disk`` (format ``"disk"``).

    Raises:
        CliError: the path does not exist, or its format is not one of the above.
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise CliError(f"--dataset: no such file or folder: {path}")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                split = "train" if "train" in loaded else next(iter(loaded))
                logger.info("%s holds splits %s; using %r", path, list(loaded), split)
                loaded = loaded[split]
            return loaded, "disk"
        raise CliError(
            f"--dataset: {path} is a folder but not a saved `datasets` dataset (no dataset_info.json / "
            "state.json); pass a .jsonl, .json, .csv or .parquet file, or a folder from Dataset.save_to_disk"
        )
    kind = DATASET_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise CliError(
            f"--dataset: unknown format {path.suffix!r} for {path}; supported: .jsonl, .json, .csv, .parquet "
            "or a folder from Dataset.save_to_disk"
        )
    if kind == "json":
        return datasets.Dataset.from_list(_read_json_rows(path)), path.suffix.lower().lstrip(".")
    if kind == "csv":
        return datasets.Dataset.from_csv(str(path), keep_in_memory=True), "csv"
    return datasets.Dataset.from_parquet(str(path), keep_in_memory=True), "parquet"


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            rows = json.loads(stripped)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise CliError(f"--dataset: {path} is not valid JSON / JSON lines: {err}") from err
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise CliError(f"--dataset: {path} must hold a non-empty list of JSON objects (one row each)")
    return rows


def dataset_format(columns: Sequence[str]) -> str:
    """``"prompt-completion"`` or ``"messages"``, from the column names.

    Raises:
        CliError: naming the columns found and the ones needed.
    """
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if "messages" in columns:
        return "messages"
    raise CliError(
        f"--dataset: found columns {sorted(columns)}, but selection needs either 'prompt' and 'completion' "
        "(text or conversational) or 'messages' (a conversation whose last turn is the assistant's answer)"
    )


def tokenize_for_selection(
    tokenizer: Any, dataset: Any, *, max_length: int | None = None
) -> list[dict[str, list[int]]]:
    """Tokenise rows as TRL's `SFTTrainer` does, with a mask over the tokens the loss is taken on.

    * ``prompt``/``completion`` text: ``tokenize(prompt + completion + eos)``; the mask covers the tokens
      after the tokenised prompt (the common prefix, as TRL computes it).
    * ``prompt``/``completion`` conversations: the chat template renders ``prompt`` with the generation
      prompt, then ``prompt + completion``; the mask covers what the completion adds.
    * ``messages``: the chat template renders the whole conversation; the mask covers the last turn
      (the answer), i.e. what the conversation adds to ``messages[:-1]`` rendered with the generation
      prompt.

    Returns:
        One ``{"input_ids", "completion_mask"}`` dict per row.
    """
    fmt = dataset_format(dataset.column_names)
    eos = tokenizer.eos_token or ""
    out: list[dict[str, list[int]]] = []
    for i, row in enumerate(dataset):
        if fmt == "messages":
            messages = row["messages"]
            if not isinstance(messages, list) or len(messages) < 2:
                raise CliError(f"--dataset row {i}: 'messages' must be a list of at least 2 turns, got {messages!r}")
            prompt_ids = _chat_ids(tokenizer, messages[:-1], generation_prompt=True)
            ids = _chat_ids(tokenizer, messages, generation_prompt=False)
        elif isinstance(row["prompt"], list):
            prompt_ids = _chat_ids(tokenizer, row["prompt"], generation_prompt=True)
            ids = _chat_ids(tokenizer, row["prompt"] + row["completion"], generation_prompt=False)
        else:
            if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
                raise CliError(
                    f"--dataset row {i}: 'prompt' and 'completion' must both be text or both conversations, "
                    f"got {type(row['prompt']).__name__} and {type(row['completion']).__name__}"
                )
            completion = row["completion"] if not eos or row["completion"].endswith(eos) else row["completion"] + eos
            prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            ids = tokenizer(row["prompt"] + completion, add_special_tokens=False)["input_ids"]
        start = 0
        while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
            start += 1
        mask = [0] * start + [1] * (len(ids) - start)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        out.append({"input_ids": list(ids), "completion_mask": mask})
    return out


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]], *, generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise CliError(
            "--dataset holds conversations, but the model's tokenizer has no chat template; "
            "save one with the tokenizer (tokenizer.chat_template = ...) or convert the data to prompt/completion text"
        )
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def save_rows(dataset: Any, fmt: str, out_dir: Path) -> Path:
    """Write ``dataset`` next to the other outputs in the input's format; returns the path written."""
    if fmt in ("jsonl", "json"):
        path = out_dir / f"selected.{fmt}"
        rows = dataset.to_list()
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        else:
            path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path
    if fmt == "csv":
        path = out_dir / "selected.csv"
        dataset.to_csv(str(path), index=False)
        return path
    if fmt == "parquet":
        path = out_dir / "selected.parquet"
        dataset.to_parquet(str(path))
        return path
    path = out_dir / "selected"
    dataset.save_to_disk(str(path))
    return path


# --------------------------------------------------------------------------------------------------
# loading a local model
# --------------------------------------------------------------------------------------------------


def load_model(path: str | Path, *, seed: int = 42) -> tuple[Any, Any, str]:
    """Load a local causal LM with a trainable LoRA adapter, and its tokenizer.

    A folder with ``adapter_config.json`` is a PEFT adapter: its base model is loaded from the path the
    adapter names (a local folder) and the adapter is made trainable. A plain model folder gets a
    default LoRA (``r=8``, ``alpha=16``, all linear layers, initialised from ``seed`` without moving the
    global RNG) and a note says so. The tokenizer comes
    from the given folder, else from the adapter's base model folder.

    Returns:
        ``(model, tokenizer, note)`` with ``note`` describing what was loaded.

    Raises:
        CliError: the folder does not exist or holds neither an adapter nor a model.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CliError(f"--model: no such folder: {path} (pass a folder written by save_pretrained)")
    adapter_config = path / "adapter_config.json"
    if adapter_config.exists():
        base_path = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base_path or not Path(base_path).is_dir():
            raise CliError(
                f"--model: {path} is a PEFT adapter whose base model {base_path!r} is not a local folder; "
                "nothing is downloaded: point base_model_name_or_path in adapter_config.json at a local copy"
            )
        base = AutoModelForCausalLM.from_pretrained(base_path)
        model = PeftModel.from_pretrained(base, str(path), is_trainable=True)
        tokenizer_dir = path if _has_tokenizer(path) else Path(base_path)
        note = f"loaded the PEFT adapter {path} on the base model {base_path}"
    elif (path / "config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(str(path))
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **DEFAULT_LORA))  # type: ignore[arg-type]
        tokenizer_dir = path
        note = (
            f"{path} has no adapter: added a default LoRA (r={DEFAULT_LORA['r']}, alpha={DEFAULT_LORA['lora_alpha']}, "
            "all linear layers); gradients are taken with respect to it"
        )
    else:
        raise CliError(f"--model: {path} holds neither a model (config.json) nor a PEFT adapter (adapter_config.json)")
    if not _has_tokenizer(tokenizer_dir):
        raise CliError(f"--model: no tokenizer found in {tokenizer_dir}; save it there with tokenizer.save_pretrained")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, note


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


# --------------------------------------------------------------------------------------------------
# select
# --------------------------------------------------------------------------------------------------


def _budget(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"budget must be a fraction such as 0.1 or a count such as 500, got {text!r}"
        ) from err
    if value >= 1 and value == int(value) and "." not in text:
        return int(value)
    return value


def config_from_args(args: argparse.Namespace) -> SpiceConfig:
    """The `SpiceConfig` the ``select`` flags describe (``--paper`` starts from the paper-exact preset)."""
    changes: dict[str, Any] = {"budget": args.budget}
    for flag, field in (
        ("proj_dim", "proj_dim"),
        ("conflict_weight", "conflict_weight"),
        ("fisher_scale", "fisher_scale"),
        ("feature_norm", "feature_norm"),
        ("max_loss_quantile", "max_loss_quantile"),
        ("greedy", "greedy"),
        ("seed", "seed"),
        ("batch_size", "batch_size"),
        ("max_length", "max_length"),
    ):
        value = getattr(args, flag)
        if value is not None:
            changes[field] = value
    if args.stop_ratio is not None:
        changes["stop_ratio"] = None if args.stop_ratio.lower() == "none" else float(args.stop_ratio)
    try:
        return SpiceConfig.paper(**changes) if args.paper else SpiceConfig(**changes)
    except (TypeError, ValueError) as err:
        raise CliError(str(err)) from err


def run_select(args: argparse.Namespace) -> int:
    """``spice-trainer select``: see `build_parser`."""
    from spice_trainer.pipeline import select

    config = config_from_args(args)
    dataset, fmt = load_rows(args.dataset)
    dataset_format(dataset.column_names)
    try:
        config.budget_count(len(dataset))
    except ValueError as err:
        raise CliError(f"--budget: {err}") from err
    model, tokenizer, note = load_model(args.model, seed=config.seed)
    print(note)
    rows = tokenize_for_selection(tokenizer, dataset, max_length=config.max_length)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    selection = select(model, rows, config, show_progress=not args.quiet)
    seconds = time.perf_counter() - start
    selection.metadata.setdefault("dataset", str(args.dataset))
    selection.metadata.setdefault("model", str(args.model))
    indices = selection.selected
    (out / "indices.json").write_text(json.dumps(indices) + "\n", encoding="utf-8")
    rows_path = save_rows(dataset.select(indices), fmt, out)
    selection.save(out / "selection.json")
    plotted = selection.plot(out / "selection.png", missing_ok=True)
    print(selection.summary())
    print(
        f"selected {len(indices)} of {len(dataset)} rows in {seconds:.1f}s -> {out / 'indices.json'}, {rows_path}, "
        f"{out / 'selection.json'}" + (f", {out / 'selection.png'}" if plotted else "")
    )
    return 0


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def find_selections(path: str | Path) -> list[Path]:
    """The selection files under ``path``: ``spice/round-*.json``, ``round-*.json`` or ``selection.json``.

    ``path`` may also be one selection file. Rounds are ordered by their number.

    Raises:
        CliError: nothing found.
    """
    path = Path(path)
    if not path.exists():
        raise CliError(f"report: no such file or folder: {path}")
    if path.is_file():
        return [path]
    for folder in (path / "spice", path):
        rounds = sorted(folder.glob("round-*.json"), key=_round_number)
        if rounds:
            return rounds
    if (path / "selection.json").exists():
        return [path / "selection.json"]
    raise CliError(
        f"report: found no selection in {path}; expected {path / 'spice'}/round-*.json (written by "
        "SpiceDataCallback), round-*.json or selection.json (written by `spice-trainer select`)"
    )


def _round_number(path: Path) -> tuple[int, str]:
    digits = "".join(ch for ch in path.stem.split("-")[-1] if ch.isdigit())
    return (int(digits) if digits else -1, path.name)


def render_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.md`` (and one gain/conflict plot per round) for the selections under ``path``.

    Returns:
        The path of the markdown report (``out``/report.md; ``out`` defaults to the folder of the rounds).
    """
    from spice_trainer.core.selection import Selection

    files = find_selections(path)
    out_dir = Path(out) if out is not None else files[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# SPICE selection report",
        "",
        f"Source: `{Path(path)}` ({len(files)} round{'s' if len(files) != 1 else ''})",
        "",
        "| round | file | picked | initial | candidates | stop | first Δ | last Δ | last/first | mean conflict "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for number, file in enumerate(files):
        try:
            selection = Selection.load(file)
        except (ValueError, TypeError, json.JSONDecodeError) as err:
            raise CliError(f"report: {file} is not a selection file: {err}") from err
        k = len(selection.indices)
        first = selection.gains[0] if k else math.nan
        last = selection.gains[-1] if k else math.nan
        mean_c = sum(selection.conflicts) / k if k else math.nan
        seconds = selection.metadata.get("seconds", math.nan)
        ratio = last / first if k and first else math.nan
        lines.append(
            f"| {number} | `{file.name}` | {k} | {len(selection.initial)} | {selection.n_candidates} | "
            f"{selection.stop_reason} | {first:.4g} | {last:.4g} | {ratio:.3g} | {mean_c:.3g} | {_fmt(seconds)} |"
        )
        png = out_dir / f"{file.stem}.png"
        plotted = k > 0 and selection.plot(png, missing_ok=True)
        details += ["", f"## {file.stem}", "", "```", selection.summary(), "```"]
        if plotted:
            details += ["", f"![gain decay and conflicts of {file.stem}]({png.name})"]
    report = out_dir / "report.md"
    report.write_text("\n".join([*lines, *details]) + "\n", encoding="utf-8")
    return report


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def run_report(args: argparse.Namespace) -> int:
    """``spice-trainer report``: see `build_parser`."""
    report = render_report(args.dir, args.out)
    print(report.read_text(encoding="utf-8").split("\n## ")[0].rstrip())
    print(f"\nreport written to {report}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``spice-trainer demo``: see `run_demo_experiment`."""
    import datasets
    import torch
    import transformers

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


# --------------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``spice-trainer`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="spice-trainer",
        description="SPICE data selection for instruction tuning: pick the most informative, least "
        "conflicting rows of a pool, offline or inside a Hugging Face Trainer.",
        epilog="Run `spice-trainer COMMAND --help` for the options of a command. Nothing is downloaded.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="SPICE vs random vs full data on a small generated pool (offline, a few minutes on CPU)",
        description="Build a small synthetic instruction world, fine-tune a tiny Llama with TRL's SFTTrainer "
        "on a SPICE-chosen 10%% (SpiceDataCallback), a random 10%% and the whole pool, and compare exact-match "
        "accuracy on a clean held-out set. Prints a table and writes a markdown report with plots.",
    )
    demo.add_argument("--out", default="spice_report", help="folder for the report (default: ./spice_report)")
    demo.add_argument("--quick", action="store_true", help="a smaller pool and fewer epochs (about a minute)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the world and the training runs (default 0)")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for tiny models)")
    demo.add_argument(
        "--scenario",
        choices=("curated", "noisy"),
        default="curated",
        help="which candidate pool: curated (8%% noise, the default) or noisy (half corrupted: the hard case)",
    )
    demo.set_defaults(func=run_demo)

    sel = commands.add_parser(
        "select",
        help="select a subset of a local dataset with a local model",
        description="Offline SPICE selection. Computes per-example LoRA gradients of --model on --dataset, "
        "runs the SPICE greedy and writes indices.json, the selected rows (same format as the input), "
        "selection.json and selection.png to --out.",
    )
    sel.add_argument("--model", required=True, help="a local folder: a PEFT adapter or a plain model (save_pretrained)")
    sel.add_argument(
        "--dataset",
        required=True,
        help="a local .jsonl/.json/.csv/.parquet file or a Dataset.save_to_disk folder, with prompt+completion "
        "(text or conversational) or messages columns",
    )
    sel.add_argument("--budget", type=_budget, default=0.1, help="fraction (0.1) or count (500) to select; default 0.1")
    sel.add_argument("--out", required=True, help="output folder")
    sel.add_argument("--paper", action="store_true", help="start from the paper-exact preset (SpiceConfig.paper)")
    sel.add_argument("--proj-dim", type=int, help="gradient projection dimension d")
    sel.add_argument("--conflict-weight", type=float, help="λ, the conflict penalty (0 = plain Fisher greedy)")
    sel.add_argument("--fisher-scale", type=float, help="α in log det(I + αF)")
    sel.add_argument("--stop-ratio", help="ω of early stopping: a number in [0, 1) or 'none' to always fill the budget")
    sel.add_argument("--feature-norm", choices=("none", "unit", "adam"), help="gradient normalisation")
    sel.add_argument("--max-loss-quantile", type=float, help="never pick rows whose loss is above this quantile")
    sel.add_argument("--greedy", choices=("exact", "stochastic", "pooled"), help="greedy regime")
    sel.add_argument("--seed", type=int, help="seed of the projection and of stochastic greedy")
    sel.add_argument("--batch-size", type=int, help="rows per batched gradient pass")
    sel.add_argument("--max-length", type=int, help="truncate rows to this many tokens")
    sel.add_argument("--quiet", action="store_true", help="no progress bars")
    sel.set_defaults(func=run_select)

    rep = commands.add_parser(
        "report",
        help="render a markdown report from saved selection rounds",
        description="Render report.md and per-round plots from DIR/spice/round-*.json (SpiceDataCallback), "
        "DIR/round-*.json, DIR/selection.json or one selection file.",
    )
    rep.add_argument("dir", help="a training output_dir, a folder of rounds, or a selection .json file")
    rep.add_argument("--out", help="where to write the report (default: the folder of the rounds)")
    rep.set_defaults(func=run_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spice-trainer`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return int(args.func(args))
    except CliError as err:
        print(f"spice-trainer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
