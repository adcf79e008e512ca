"""``spice-trainer select``: SPICE selection outside a training run, through the same path as the callback.

The rows are loaded with `datasets.load_dataset` (a Hub dataset, a local file or a folder of files) or
`datasets.load_from_disk`; the model is a local folder or a Hub id, a plain causal LM (a LoRA adapter is added
and the command says which) or a PEFT adapter; then `select_as_sft_trainer`
runs `SpiceDataCallback`'s first round inside an untrained `SFTTrainer`, so the data is prepared by TRL
exactly as in training. The chosen rows are written as a `datasets` dataset with their scores
(`Selection.to_dataset`), and pushed to the Hub on request.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from spice_trainer.cli.errors import CliError
from spice_trainer.config import SpiceConfig
from spice_trainer.proxy.adapter import DEFAULT_LORA

#: Column sets TRL's SFTTrainer accepts (one of them must be present).
ACCEPTED_COLUMNS = (("text",), ("messages",), ("prompt", "completion"), ("input_ids",))
SUFFIX_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
SAVE_FORMATS = ("jsonl", "parquet", "disk")


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def load_rows(source: str, *, split: str = "train", name: str | None = None) -> Any:
    """The rows to select from, as a `datasets.Dataset`, via `datasets.load_dataset` or `load_from_disk`.

    ``source`` is a local file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, ``.arrow``), a folder of such files,
    a folder written by ``save_to_disk``, or a Hub dataset id (downloaded into the Hugging Face cache unless
    ``HF_HUB_OFFLINE=1``).

    Raises:
        CliError: nothing loadable at ``source``, or ``split`` is not one of its splits.
    """
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = _split(loaded, split, source)
            return loaded
        if path.is_file():
            builder = SUFFIX_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise CliError(
                    f"--dataset: unknown format {path.suffix!r} for {path}; supported: "
                    f"{', '.join(SUFFIX_BUILDERS)}, a folder of such files, a save_to_disk folder or a Hub dataset id"
                )
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        loaded = datasets.load_dataset(source, name=name)
    except CliError:
        raise
    except FileNotFoundError as err:
        raise CliError(f"--dataset: no such file, folder or Hub dataset: {source} ({err})") from err
    except (ValueError, OSError) as err:
        raise CliError(f"--dataset: could not load {source}: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _split(loaded, split, source)
    return loaded


def _split(loaded: Any, split: str, source: str) -> Any:
    if split not in loaded:
        raise CliError(f"--dataset: {source} has the splits {sorted(loaded)}, not {split!r}; pass --split NAME")
    return loaded[split]


def check_columns(columns: list[str]) -> tuple[str, ...]:
    """The columns of the format TRL's SFTTrainer will read (one of `ACCEPTED_COLUMNS`).

    Raises:
        CliError: naming the columns found and the ones TRL's SFTTrainer accepts.
    """
    for needed in ACCEPTED_COLUMNS:
        if all(c in columns for c in needed):
            return needed
    raise CliError(
        f"--dataset: found columns {sorted(columns)}, but TRL's SFTTrainer (which prepares the rows) needs 'text', "
        "'messages' (a conversation), 'prompt' and 'completion' (text or conversational), or tokenised 'input_ids'"
    )


def check_rows(dataset: Any, columns: tuple[str, ...]) -> None:
    """Every row has a value in each of ``columns`` (TRL's preparation fails on a missing one without naming it).

    An empty value is a value: an empty prompt is legitimate, and a row with nothing to learn is skipped and
    counted by the selection itself.

    Raises:
        CliError: naming the column, the first rows without a value (a missing key or ``null``) and the fix.
    """
    for column in columns:
        bad = [i for i, value in enumerate(dataset[column]) if value is None]
        if bad:
            shown = ", ".join(str(i) for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise CliError(
                f"--dataset: {len(bad)} row(s) have no {column!r} (missing or null): row(s) {shown} (0-based, in "
                f"file order); fill them in or drop them before selecting (e.g. "
                f"dataset.filter(lambda row: row[{column!r}] is not None))"
            )


def save_selection_dataset(dataset: Any, out: Path, fmt: str) -> Path:
    """Write the selection dataset through `datasets` into ``out/selected/``: ``train.jsonl``, ``train.parquet``
    or a ``save_to_disk`` folder. A folder of its own, so that ``load_dataset("out/selected")`` (and TRL's
    ``--dataset_name out/selected``) reads it back."""
    folder = out / "selected"
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path = folder / "train.jsonl"
        # pandas writes 10 decimals by default; 15 is its most (exact in selection.json, which keeps every digit).
        dataset.to_json(str(path), lines=True, force_ascii=False, double_precision=15)
    elif fmt == "parquet":
        path = folder / "train.parquet"
        dataset.to_parquet(str(path))
    else:
        path = folder
        dataset.save_to_disk(str(path))
    return path


def push_selection(dataset: Any, repo_id: str, *, private: bool) -> str:
    """Push the selection dataset to the Hub (``Dataset.push_to_hub``); refused under ``HF_HUB_OFFLINE=1``.

    Raises:
        CliError: offline mode is on (nothing is sent), or the push failed.
    """
    from spice_trainer.integrations.hub import is_offline

    if is_offline():
        raise CliError(
            f"--push-to-hub {repo_id}: HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; the selection is saved "
            "locally (see above). Unset HF_HUB_OFFLINE and push again, or upload the saved files with `hf upload`"
        )
    try:
        dataset.push_to_hub(repo_id, private=private)
    except Exception as err:
        raise CliError(f"--push-to-hub {repo_id}: the upload failed: {err}") from err
    return f"https://huggingface.co/datasets/{repo_id}"


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------


def lora_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The LoRA the command adds to a plain model: `DEFAULT_LORA` with the ``--lora-*`` flags applied."""
    settings = dict(DEFAULT_LORA)
    for key in ("r", "lora_alpha", "lora_dropout"):
        value = getattr(args, f"lora_{key}" if key == "r" else key, None)
        if value is not None:
            settings[key] = value
    if args.lora_target_modules:
        modules = list(args.lora_target_modules)
        settings["target_modules"] = modules[0] if modules == ["all-linear"] else modules
    return settings


def load_model(name_or_path: str, *, lora: dict[str, Any], seed: int) -> tuple[Any, Any, str]:
    """A causal LM with a trainable LoRA adapter, its tokenizer, and a note saying what was loaded or added.

    ``name_or_path`` (a local folder or a Hub id) is either a PEFT adapter, loaded trainable on its base model
    (local or Hub), or a plain model, which gets the LoRA ``lora`` (`with_lora_adapter`, ``lora_A`` drawn from
    ``seed`` without moving the global RNG).

    Raises:
        CliError: the model, its base or its tokenizer cannot be loaded.
    """
    from peft import LoraConfig, PeftModel

    from spice_trainer.integrations.hub import adapter_base, load_causal_lm, load_tokenizer
    from spice_trainer.proxy.adapter import with_lora_adapter

    base_name = adapter_base(name_or_path)
    model: Any
    try:
        if base_name is not None:
            base, base_tokenizer = load_causal_lm(base_name)
            model = PeftModel.from_pretrained(base, name_or_path, is_trainable=True)
            tokenizer = load_tokenizer(name_or_path) or base_tokenizer
            note = f"loaded the PEFT adapter {name_or_path} on its base model {base_name}"
        else:
            plain, tokenizer = load_causal_lm(name_or_path)
            if hasattr(plain, "peft_config"):
                model, note = plain, f"loaded {name_or_path} with its own adapter"
            else:
                model = with_lora_adapter(plain, lora_config=LoraConfig(task_type="CAUSAL_LM", **lora), seed=seed)
                shown = ", ".join(f"{k}={v}" for k, v in lora.items())
                note = (
                    f"{name_or_path} has no adapter: added a LoRA adapter ({shown}; set with --lora-r, --lora-alpha, "
                    f"--lora-dropout, --lora-target-modules), lora_A drawn from seed {seed}; gradients are taken "
                    "with respect to it"
                )
    except ValueError as err:
        raise CliError(f"--model: {err}") from err
    if tokenizer is None:
        raise CliError(
            f"--model: no tokenizer found with {name_or_path}; save one there with tokenizer.save_pretrained"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, note


def _quiet() -> None:
    """No progress bars from datasets, transformers or huggingface_hub, and no deprecation notices."""
    import warnings

    import datasets
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()
    warnings.simplefilter("ignore", FutureWarning)


def select_as_sft_trainer(
    model: Any,
    tokenizer: Any,
    dataset: Any,
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
        output_dir: the trainer's ``output_dir`` (round reports go to ``output_dir/_spice/`` when
            ``config.write_reports``).
        max_length: `SFTConfig.max_length` (TRL's default 1024; ``None`` keeps rows whole).
        show_progress: progress bars over the gradient pass and the greedy.

    Returns:
        The `SpiceDataCallback` after its round: ``.selection`` and ``.selected_rows`` (rows of ``dataset``).
    """
    import torch
    from trl import SFTConfig, SFTTrainer

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


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def run_select(args: argparse.Namespace, config: SpiceConfig) -> int:
    """``spice-trainer select``: see `spice_trainer.cli.main.build_parser`."""
    import torch

    try:
        import trl  # noqa: F401
    except ImportError as err:
        raise CliError(
            "spice-trainer select prepares the rows exactly as TRL's SFTTrainer does, and TRL is not installed: "
            "pip install 'spice-trainer[trl]'"
        ) from err
    from spice_trainer.integrations.reporting import round_line

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quiet:
        _quiet()
    try:
        dataset = load_rows(args.dataset, split=args.split, name=args.dataset_config)
        check_rows(dataset, check_columns(dataset.column_names))
        try:
            config.budget_count(len(dataset))
        except ValueError as err:
            raise CliError(f"--spice-budget: {err}") from err
        model, tokenizer, note = load_model(args.model, lora=lora_settings(args), seed=config.seed)
        print(note)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        callback = select_as_sft_trainer(
            model,
            tokenizer,
            dataset,
            config.with_changes(write_reports=False),
            output_dir=str(out),
            max_length=args.max_length,
            show_progress=not args.quiet,
        )
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    selection = callback.selection
    assert selection is not None
    rows = callback.selected_rows
    selection.metadata.update({"dataset": str(args.dataset), "model": str(args.model), "total_seconds": seconds})
    dropped = len(dataset) - selection.n_candidates
    print(round_line(selection, round_index=0, step=0))
    if dropped:
        print(
            f"TRL dropped {dropped} of {len(dataset)} rows that kept no supervised token after --max-length truncation"
        )
    (out / "indices.json").write_text(json.dumps(rows) + "\n", encoding="utf-8")
    selection.save(out / "selection.json")
    plotted = selection.plot(out / "selection.png", missing_ok=True)
    chosen = selection.to_dataset(dataset, rows=rows)
    saved = save_selection_dataset(chosen, out, args.format)
    print(selection.summary())
    written = [out / "indices.json", saved, out / "selection.json"] + ([out / "selection.png"] if plotted else [])
    print(f"wrote {', '.join(str(p) for p in written)}")
    if args.push_to_hub:
        url = push_selection(chosen, args.push_to_hub, private=args.private)
        print(f"pushed the selection dataset to {url}")
    return 0
