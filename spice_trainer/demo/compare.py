"""Compare data-selection methods on one candidate pool, every method trained by the same loop.

The loop is a plain `transformers.Trainer` with one set of hyperparameters (`TrainSettings`) and a fresh LoRA
adapter per method. SPICE methods select through ``callbacks=[SpiceDataCallback(config)]`` — exactly what a user
writes, so ``num_train_epochs`` are passes over the selected rows — and the other methods hand their rows to the
same `Trainer` as a subset dataset. Methods (`METHODS`):

================  ==============================================================================================
method            rows
================  ==============================================================================================
``full``          every candidate
``random``        a uniformly random budget
``random-clean``  a random draw of the pool's clean rows of the same size (an oracle; needs hidden labels)
``fisher``        plain Fisher log-det greedy: `SpiceConfig.paper` with ``conflict_weight=0`` and no early stop
``paper``         the paper preset `SpiceConfig.paper` (early stopping ω = 0.5)
``paper-nostop``  the paper objective without early stopping
``defaults``      ``SpiceConfig(budget=...)``: whatever the library's defaults are at the time of the run
``small-loss``    the lowest-loss rows above a 0.1 nats/token solved floor (`spice_trainer.core.baselines`)
``grad-norm``     the largest gradient norms
``less``          LESS-style: the largest cosine to the mean gradient of a trusted reference set
================  ==============================================================================================

plus any ``NAME=field:value,...`` variant (a `SpiceConfig` with those fields changed from the defaults).
The baselines rank the same gradient features SPICE computes (one pass per pool, shared between them).

`spice-trainer compare` and ``bench/quality.py --dataset`` run this on a user's own data (`compare_on_dataset`);
``bench/quality.py`` runs it on the benchmark worlds (`spice_trainer.demo.worlds`).
Imports transformers, datasets, peft and torch on use (through the modules it calls).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spice_trainer.config import SpiceConfig
from spice_trainer.core import baselines
from spice_trainer.core.selection import Selection

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = (
    "full",
    "random",
    "random-clean",
    "fisher",
    "paper",
    "paper-nostop",
    "defaults",
    "small-loss",
    "grad-norm",
    "less",
)
SPICE_METHODS: tuple[str, ...] = ("fisher", "paper", "paper-nostop", "defaults")
FEATURE_METHODS: tuple[str, ...] = ("small-loss", "grad-norm", "less")
# The solved floor of the small-loss baseline (nats per supervised token): the library's min_loss at the time
# the baseline was written, fixed here so that the baseline does not move when the defaults do.
SMALL_LOSS_FLOOR = 0.1


@dataclass(frozen=True)
class TrainSettings:
    """The one set of training hyperparameters every method shares.

    Attributes:
        epochs: passes over each method's own rows (``num_train_epochs``).
        learning_rate: AdamW peak learning rate (linear warm-up over ``warmup_ratio`` of the steps, then linear
            decay to 0, weight decay 0).
        batch_size: rows per optimizer step.
        warmup_ratio: share of the steps spent warming up.
        lora_r: LoRA rank of the fresh adapter (all linear layers).
        lora_alpha: LoRA alpha.
    """

    epochs: float = 20.0
    learning_rate: float = 5e-3
    batch_size: int = 16
    warmup_ratio: float = 0.1
    lora_r: int = 8
    lora_alpha: int = 16


def method_config(method: str, budget: float | int, variants: Mapping[str, Mapping[str, Any]]) -> SpiceConfig | None:
    """The `SpiceConfig` of a SPICE method or variant (`None` for the other methods)."""
    if method == "defaults":
        return SpiceConfig(budget=budget)
    if method == "fisher":
        return SpiceConfig.paper(budget=budget, conflict_weight=0.0, stop_ratio=None)
    if method == "paper":
        return SpiceConfig.paper(budget=budget)
    if method == "paper-nostop":
        return SpiceConfig.paper(budget=budget, stop_ratio=None)
    if method in variants:
        return SpiceConfig(budget=budget, **variants[method])
    return None


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"q80=max_loss_quantile:0.8,stop_ratio:none"`` -> ``("q80", {"max_loss_quantile": 0.8, "stop_ratio": None})``.

    Values are read as int, float, ``true``/``false``, ``none`` (except for string fields such as
    ``feature_norm="none"``), else kept as strings. The fields are validated at once.

    Raises:
        ValueError: for a missing name, or fields `SpiceConfig` rejects.
    """
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise ValueError(f"a variant is NAME=field:value,..., got {text!r}")
    if name in METHODS:
        raise ValueError(f"variant name {name!r} is a built-in method; pick another name")
    fields_: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, colon, raw = item.partition(":")
        if not colon:
            raise ValueError(f"variant {name!r}: {item!r} is not field:value")
        value: Any
        if raw.lower() == "none" and key not in ("feature_norm",):
            value = None
        elif raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        fields_[key] = value
    try:
        SpiceConfig(**fields_)
    except TypeError as err:
        raise ValueError(f"variant {name!r}: {err}") from err
    return name, fields_


# --- the candidate pool ---------------------------------------------------------------------------


@dataclass
class Candidates:
    """A tokenised candidate pool and what the methods may know about it.

    Attributes:
        dataset: a `datasets.Dataset` with ``input_ids`` and ``labels`` (-100 where there is no loss).
        collator: the data collator the `Trainer` (and SPICE's gradient pass) uses.
        clean_rows: rows known to be clean (hidden labels; only ``random-clean`` uses them), or `None`.
        reference: a tokenised trusted reference set (same columns) for ``less``, or `None`.
    """

    dataset: Any
    collator: Any
    clean_rows: list[int] | None = None
    reference: Any = None
    _features: Any = field(default=None, repr=False)


@dataclass
class MethodRun:
    """One method on one pool: the rows it trained on, how, and the trained model."""

    method: str
    rows: list[int]
    model: Any
    selection: Selection | None
    select_seconds: float
    train_seconds: float
    steps: int
    train_loss: float


def tokenize_prompt_completion(tokenizer: Any, rows: Sequence[Mapping[str, str]]) -> list[dict[str, list[int]]]:
    """``{"input_ids", "labels"}`` per prompt-completion row: ``tokenize(prompt + completion + eos)``, with the
    loss on the completion and the end-of-sequence token only (TRL's completion-only layout)."""
    out = []
    eos = tokenizer.eos_token or ""
    for row in rows:
        completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        ids = tokenizer(row["prompt"] + completion, add_special_tokens=False)["input_ids"]
        start = 0
        while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
            start += 1
        out.append({"input_ids": list(ids), "labels": [-100] * start + list(ids[start:])})
    return out


def fresh_adapter(base_model: Any, settings: TrainSettings, seed: int) -> Any:
    """A copy of ``base_model`` with a new LoRA adapter (all linear layers; ``lora_B = 0`` as PEFT initialises)."""
    from spice_trainer.demo.toy import add_lora

    return add_lora(
        copy.deepcopy(base_model), r=settings.lora_r, alpha=settings.lora_alpha, init_b_random=False, seed=seed
    )


def _training_arguments(output_dir: str, settings: TrainSettings, seed: int) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=settings.batch_size,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=settings.warmup_ratio,
        weight_decay=0.0,
        seed=seed,
        data_seed=seed,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def train(
    model: Any,
    dataset: Any,
    collator: Any,
    settings: TrainSettings,
    seed: int,
    *,
    callback: Any = None,
) -> tuple[float, int, float]:
    """Train ``model`` on ``dataset`` with a plain `Trainer` (and ``callback``, a `SpiceDataCallback`, if given).

    Returns:
        ``(seconds, optimizer steps, mean training loss)``.
    """
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    with tempfile.TemporaryDirectory(prefix="spice-compare-") as output_dir:
        trainer = Trainer(
            model=model,
            args=_training_arguments(output_dir, settings, seed),
            train_dataset=dataset,
            data_collator=collator,
            callbacks=[callback] if callback is not None else None,
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    model.eval()
    return seconds, int(trainer.state.global_step), float(output.training_loss)


def _pool_features(base_model: Any, candidates: Candidates, settings: TrainSettings, seed: int) -> dict[str, Any]:
    """Gradient features and losses of the pool (and of the reference set) under a fresh adapter, computed once."""
    if candidates._features is not None:
        return candidates._features
    from spice_trainer.features.gradients import compute_gradient_features

    model = fresh_adapter(base_model, settings, seed)
    config = SpiceConfig()  # the default projection: the features SPICE sees
    start = time.perf_counter()
    grads = compute_gradient_features(model, candidates.dataset, config, candidates.collator, show_progress=False)
    reference = None
    if candidates.reference is not None:
        reference = compute_gradient_features(
            model, candidates.reference, config, candidates.collator, show_progress=False
        ).features
    candidates._features = {"grads": grads, "reference": reference, "seconds": time.perf_counter() - start}
    return candidates._features


def available_methods(candidates: Candidates, methods: Sequence[str]) -> list[str]:
    """``methods`` without those this pool cannot run (``random-clean`` without labels, ``less`` without a
    reference set)."""
    out = []
    for method in methods:
        if method == "random-clean" and candidates.clean_rows is None:
            logger.warning("compare: skipping random-clean (the pool has no clean-row labels)")
        elif method == "less" and candidates.reference is None:
            logger.warning("compare: skipping less (no reference set)")
        else:
            out.append(method)
    return out


def run_method(
    base_model: Any,
    candidates: Candidates,
    method: str,
    *,
    budget: float | int = 0.1,
    seed: int = 0,
    settings: TrainSettings | None = None,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
) -> MethodRun:
    """Select with ``method``, then fine-tune a fresh adapter on its rows with the shared loop.

    Raises:
        ValueError: for an unknown method, or one the pool cannot run (see `available_methods`).
    """
    from spice_trainer.integrations.trainer import SpiceDataCallback

    settings = settings or TrainSettings()
    variants = variants or {}
    dataset = candidates.dataset
    n = len(dataset)
    k = SpiceConfig(budget=budget).budget_count(n)
    model = fresh_adapter(base_model, settings, seed)
    config = method_config(method, budget, variants)
    selection = None
    select_seconds = 0.0
    if config is not None:
        callback = SpiceDataCallback(config)
        seconds, steps, loss = train(model, dataset, candidates.collator, settings, seed, callback=callback)
        selection = callback.selection
        rows = list(callback.selected_rows)
        select_seconds = float(selection.metadata.get("seconds", 0.0)) if selection is not None else 0.0
        seconds -= select_seconds  # the callback selects inside trainer.train()
        return MethodRun(method, rows, model, selection, select_seconds, seconds, steps, loss)
    if method == "full":
        rows = list(range(n))
    elif method == "random":
        rows = baselines.random_rows(n, k, seed=10_000 + seed)
    elif method == "random-clean":
        if candidates.clean_rows is None:
            raise ValueError("random-clean needs the pool's clean rows (hidden labels)")
        clean = candidates.clean_rows
        rows = [clean[i] for i in baselines.random_rows(len(clean), k, seed=20_000 + seed)] if clean else []
    elif method in FEATURE_METHODS:
        feats = _pool_features(base_model, candidates, settings, seed)
        grads = feats["grads"]
        start = time.perf_counter()
        if method == "small-loss":
            rows = baselines.small_loss_rows(grads.losses, k, min_loss=SMALL_LOSS_FLOOR)
        elif method == "grad-norm":
            rows = baselines.gradient_norm_rows(grads.features, k)
        else:
            if feats["reference"] is None:
                raise ValueError("less needs a reference set (Candidates.reference)")
            rows = baselines.reference_similarity_rows(grads.features, feats["reference"], k)
        select_seconds = feats["seconds"] + time.perf_counter() - start
    else:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)} or a --variant name")
    if not rows:
        raise ValueError(f"{method}: selected no rows")
    seconds, steps, loss = train(model, dataset.select(rows), candidates.collator, settings, seed)
    return MethodRun(method, rows, model, None, select_seconds, seconds, steps, loss)


# --- summaries ------------------------------------------------------------------------------------


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_difference(
    records: Sequence[Mapping[str, Any]], method: str, key: str = "accuracy", baseline: str = "random"
) -> tuple[float, float] | None:
    """Mean ± sd over seeds of ``record[key]`` of ``method`` minus that of ``baseline`` on the same seed."""
    by_seed = {r["seed"]: r[key] for r in records if r["method"] == baseline}
    diffs = [r[key] - by_seed[r["seed"]] for r in records if r["method"] == method and r["seed"] in by_seed]
    if not diffs:
        return None
    return mean_sd(diffs)


def format_pm(value: tuple[float, float] | None, *, signed: bool = False, digits: int = 3) -> str:
    """``0.512 ± 0.031`` (``+0.050 ± 0.020`` when ``signed``); ``n/a`` for `None`."""
    if value is None:
        return "n/a"
    mean, sd = value
    if math.isnan(mean):
        return "n/a"
    return f"{mean:+.{digits}f} ± {sd:.{digits}f}" if signed else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


EvaluateFn = Callable[[Any], dict[str, float]]
