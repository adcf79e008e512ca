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
        return SpiceConfig.paper(budget=budget, conflict_weight=0.0, stop_rule="none", stop_ratio=None)
    if method == "paper":
        return SpiceConfig.paper(budget=budget)
    if method == "paper-nostop":
        return SpiceConfig.paper(budget=budget, stop_rule="none", stop_ratio=None)
    if method in variants:
        return SpiceConfig(budget=budget, **variants[method])
    return None


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"q80=max_loss_quantile:0.8,stop_rule:none"`` -> ``("q80", {"max_loss_quantile": 0.8, "stop_rule": "none"})``.

    Values are read as int, float, ``true``/``false``, ``none`` as `None` (except for the fields whose value
    ``"none"`` is a string: ``feature_norm`` and ``stop_rule``), else kept as strings. The fields are validated
    at once.

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
        if raw.lower() == "none" and key not in ("feature_norm", "stop_rule"):
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
    from spice_trainer.demo import world

    out = []
    for row in rows:
        ids, start = world.prompt_completion_ids(tokenizer, row)
        out.append({"input_ids": ids, "labels": [-100] * start + ids[start:]})
    return out


def fresh_adapter(base_model: Any, settings: TrainSettings, seed: int) -> Any:
    """A copy of ``base_model`` with a new LoRA adapter (all linear layers; ``lora_B = 0`` as PEFT initialises)."""
    from spice_trainer.demo.toy import add_lora

    return add_lora(
        copy.deepcopy(base_model), r=settings.lora_r, alpha=settings.lora_alpha, init_b_random=False, seed=seed
    )


def _training_arguments(output_dir: str, settings: TrainSettings, seed: int) -> Any:
    import torch
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
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning only helps a copy to an accelerator
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
    # The default projection on raw gradients: grad-norm ranks by the norm that unit features would erase.
    config = SpiceConfig(feature_norm="none")
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
    config: SpiceConfig | None = None,
) -> MethodRun:
    """Select with ``method``, then fine-tune a fresh adapter on its rows with the shared loop.

    ``config`` runs SPICE with that exact `SpiceConfig` under the label ``method`` (size curves, sweeps).

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
    config = config if config is not None else method_config(method, budget, variants)
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


# --- a user's own data ----------------------------------------------------------------------------


def row_format(columns: Sequence[str]) -> str:
    """``"prompt-completion"``, ``"messages"``, ``"text"`` or ``"tokenized"``, from a dataset's columns.

    Raises:
        ValueError: naming the columns found and the ones accepted.
    """
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if "messages" in columns:
        return "messages"
    if "text" in columns:
        return "text"
    if "input_ids" in columns:
        return "tokenized"
    raise ValueError(
        f"found columns {sorted(columns)}; compare needs 'prompt' and 'completion', 'messages', 'text' or 'input_ids'"
    )


def tokenize_rows(
    tokenizer: Any, rows: Any, *, max_length: int | None = None
) -> tuple[list[dict[str, list[int]]], str]:
    """``{"input_ids", "labels"}`` per row of a `datasets.Dataset` (or list of dicts), and the rows' format.

    * prompt-completion (text, or lists of messages rendered with the chat template): loss on the completion
      and the end-of-sequence token;
    * messages: the conversation without its last turn is the prompt (chat template with the generation
      prompt), the last turn's content the completion;
    * text: loss on every token (and end-of-sequence);
    * tokenized: ``labels`` if present, else every token.

    Rows longer than ``max_length`` tokens are cut (the labels with them).
    """
    columns = list(rows.column_names) if hasattr(rows, "column_names") else list(rows[0])
    fmt = row_format(columns)
    out: list[dict[str, list[int]]] = []
    eos = tokenizer.eos_token or ""
    for row in rows:
        if fmt == "tokenized":
            ids = list(row["input_ids"])
            labels = list(row["labels"]) if row.get("labels") is not None else list(ids)
            item = {"input_ids": ids, "labels": labels}
        elif fmt == "text":
            ids = tokenizer(row["text"] + eos, add_special_tokens=False)["input_ids"]
            item = {"input_ids": list(ids), "labels": list(ids)}
        else:
            if fmt == "messages":
                messages = list(row["messages"])
                prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
                completion = messages[-1]["content"]
            else:
                prompt, completion = row["prompt"], row["completion"]
                if not isinstance(prompt, str):  # conversational prompt-completion
                    prompt = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
                    completion = "".join(m["content"] for m in completion)
            (item,) = tokenize_prompt_completion(tokenizer, [{"prompt": prompt, "completion": completion}])
        if max_length is not None:
            item = {k: v[:max_length] for k, v in item.items()}
        out.append(item)
    return out, fmt


def heldout_metrics(model: Any, dataset: Any, collator: Any, *, batch_size: int = 16) -> dict[str, float]:
    """Mean loss per supervised token over ``dataset`` (tokenised, with ``labels``), and exact match: the share of
    rows whose every supervised token is the model's argmax given the true prefix (greedy decoding reproduces
    the completion exactly iff this holds)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens, exact, n = 0.0, 0, 0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                batch = collator([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
                inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                logits = model(**inputs).logits[:, :-1].float()
                target = batch["labels"][:, 1:].to(device)
                supervised = target != -100
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
                )
                total_loss += float(loss)
                total_tokens += int(supervised.sum())
                ok = ((logits.argmax(-1) == target) | ~supervised).all(dim=1) & supervised.any(dim=1)
                exact += int(ok.sum())
                n += target.shape[0]
    finally:
        model.train(was_training)
    return {"loss": total_loss / max(1, total_tokens), "exact_match": exact / max(1, n)}


def compare_on_dataset(
    model: Any,
    tokenizer: Any,
    train_rows: Any,
    eval_rows: Any,
    *,
    methods: Sequence[str] = (
        "full",
        "random",
        "fisher",
        "paper",
        "paper-nostop",
        "defaults",
        "small-loss",
        "grad-norm",
    ),
    reference_rows: Any = None,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    budget: float | int = 0.1,
    seeds: Sequence[int] = (0,),
    settings: TrainSettings | None = None,
    max_length: int | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Run the methods on a user's rows and model; held-out loss (and exact match for prompt/completion rows).

    Args:
        model: a plain causal LM (each method trains a fresh LoRA adapter on a copy).
        tokenizer: its tokenizer (a pad token is set to end-of-sequence when missing).
        train_rows: the candidate pool (`datasets.Dataset` or list of dicts: prompt/completion, messages, text or
            input_ids rows).
        eval_rows: held-out rows of the same format.
        methods: methods of `METHODS` (``random-clean`` needs hidden labels and is skipped; ``less`` needs
            ``reference_rows``) and names of ``variants``.
        reference_rows: a small trusted set for ``less``.
        variants: ``name -> SpiceConfig fields``.
        budget: the selection budget (fraction or count).
        seeds: one run per seed (fresh adapter, data order).
        settings: the shared training hyperparameters.
        max_length: cut rows to this many tokens.
        on_record: called with each record as it is measured.

    Returns:
        ``(records, markdown table)``.

    Raises:
        ValueError: a PEFT model (pass its base model), an unknown method, an unusable row format.
    """
    import datasets
    from transformers import DataCollatorForSeq2Seq

    if hasattr(model, "peft_config"):
        raise ValueError("compare trains a fresh LoRA adapter per method: pass the plain base model, not a PEFT model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_tok, fmt = tokenize_rows(tokenizer, train_rows, max_length=max_length)
    eval_tok, eval_fmt = tokenize_rows(tokenizer, eval_rows, max_length=max_length)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    reference = None
    if reference_rows is not None:
        reference = datasets.Dataset.from_list(tokenize_rows(tokenizer, reference_rows, max_length=max_length)[0])
    candidates = Candidates(dataset=datasets.Dataset.from_list(train_tok), collator=collator, reference=reference)
    eval_dataset = datasets.Dataset.from_list(eval_tok)
    variants = dict(variants or {})
    runnable = available_methods(candidates, [m for m in methods if m in METHODS or m in variants])
    unknown = [m for m in methods if m not in METHODS and m not in variants]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)} or a variant name")
    settings = settings or TrainSettings()
    base = heldout_metrics(model, eval_dataset, collator)
    records: list[dict[str, Any]] = []
    for seed in seeds:
        candidates._features = None  # a fresh adapter per seed: features again
        for method in runnable:
            run = run_method(model, candidates, method, budget=budget, seed=seed, settings=settings, variants=variants)
            metrics = heldout_metrics(run.model, eval_dataset, collator)
            record = {
                "method": method,
                "seed": seed,
                "rows": len(run.rows),
                "loss": metrics["loss"],
                "exact_match": metrics["exact_match"],
                "select_seconds": run.select_seconds,
                "train_seconds": run.train_seconds,
                "stop_reason": run.selection.stop_reason if run.selection is not None else None,
                "selected": run.rows,
            }
            records.append(record)
            if on_record is not None:
                on_record(record)
            del run
    table = dataset_table(records, runnable, base, exact=eval_fmt in ("prompt-completion", "messages"))
    return records, f"{len(train_tok)} candidate rows ({fmt}), {len(eval_tok)} held-out rows\n\n" + table


def dataset_table(
    records: Sequence[Mapping[str, Any]], methods: Sequence[str], base: Mapping[str, float], *, exact: bool
) -> str:
    """Held-out loss (lower is better) and exact match per method, mean ± sd over seeds, paired to ``random``."""
    header = ["method", "rows", "held-out loss", "vs random (paired)"]
    if exact:
        header += ["exact match", "vs random (paired)"]
    header += ["select s", "train s", "stop"]
    rows = [["base model", "0", f"{base['loss']:.4f}", "—"] + ([f"{base['exact_match']:.3f}", "—"] if exact else [])]
    rows[0] += ["—", "—", "—"]
    for method in methods:
        rs = [r for r in records if r["method"] == method]
        if not rs:
            continue
        row = [
            method,
            f"{mean_sd([r['rows'] for r in rs])[0]:.0f}",
            format_pm(mean_sd([r["loss"] for r in rs]), digits=4),
            "—" if method == "random" else format_pm(paired_difference(records, method, "loss"), signed=True, digits=4),
        ]
        if exact:
            row += [
                format_pm(mean_sd([r["exact_match"] for r in rs])),
                "—"
                if method == "random"
                else format_pm(paired_difference(records, method, "exact_match"), signed=True),
            ]
        row += [
            f"{mean_sd([r['select_seconds'] for r in rs])[0]:.1f}",
            f"{mean_sd([r['train_seconds'] for r in rs])[0]:.1f}",
            ", ".join(sorted({str(r["stop_reason"]) for r in rs if r["stop_reason"]})) or "—",
        ]
        rows.append(row)
    return markdown_table(header, rows)
