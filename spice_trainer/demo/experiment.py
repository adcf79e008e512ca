"""The demo experiment: SPICE vs a random subset vs the full pool on the synthetic world, offline.

Builds the world (`spice_trainer.demo.world`), fine-tunes one LoRA adapter per method with TRL's
`SFTTrainer` (SPICE through `SpiceDataCallback`), evaluates exact match on clean held-out rows and writes a
report. `spice-trainer demo` runs it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spice_trainer.config import SpiceConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run. ``quick`` halves the pool and the held-out set (so every method trains and is
    scored on half as many rows) and keeps the base world: the same pretrained model in both."""

    pool_size: int
    epochs: float
    pretrain_rows: int
    test_rows_per_task: int


DEMO_FULL = DemoSettings(pool_size=1000, epochs=20.0, pretrain_rows=3000, test_rows_per_task=100)
DEMO_QUICK = DemoSettings(pool_size=500, epochs=20.0, pretrain_rows=3000, test_rows_per_task=50)
DEMO_LEARNING_RATE = 5e-3
DEMO_BATCH_SIZE = 16


@dataclass
class DemoResult:
    """What `run_demo_experiment` measured: one dict per method, the printed table, the report path."""

    rows: list[dict[str, Any]]
    table: str
    report_path: Path


def run_demo_experiment(
    out_dir: str | Path, *, quick: bool = False, seed: int = 0, scenario: str = "curated"
) -> DemoResult:
    """SPICE 10 % vs random 10 % vs the full pool on the synthetic world, with TRL's `SFTTrainer`.

    Builds the world (`spice_trainer.demo.world.build_world`, a tiny Llama pretrained on the easy corpus),
    draws a candidate pool of ``scenario``, and fine-tunes a fresh LoRA three times with identical
    `SFTConfig` (same epochs, learning rate, batch size, seed):

    * ``spice``: the whole pool with ``callbacks=[SpiceDataCallback(SpiceConfig(budget=0.1))]`` — the
      callback selects before training, so the epochs are passes over the selected rows;
    * ``random``: a uniformly random 10 % of the pool (the same row count as SPICE's budget);
    * ``full``: every row.

    Then scores exact match on the clean held-out set and writes ``report.md`` with plots to ``out_dir``.
    """
    import copy

    import datasets
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from spice_trainer.demo import world
    from spice_trainer.demo.toy import add_lora

    settings = DEMO_QUICK if quick else DEMO_FULL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer, base = world.build_world(seed, pretrain_rows=settings.pretrain_rows, **WORLD_OPTIONS)
    build_seconds = time.perf_counter() - start
    pool = world.candidate_pool(settings.pool_size, scenario, seed=seed)
    tests = world.heldout_set(settings.test_rows_per_task, seed=seed)
    train_ds = datasets.Dataset.from_list(pool.rows)
    config = SpiceConfig(budget=0.1, seed=seed)
    budget = config.budget_count(len(pool))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    random_rows = sorted(torch.randperm(len(pool), generator=gen)[:budget].tolist())
    base_scores = world.evaluate(base, tokenizer, tests)

    results: list[dict[str, Any]] = []
    selection = None
    for method in ("spice", "random", "full"):
        model = add_lora(copy.deepcopy(base), init_b_random=False, seed=seed)
        run_dir = out / "runs" / method
        callbacks: list[Any] = []
        dataset = train_ds
        offline_selection = None
        callback: Any = None
        if method == "spice":
            callback = _spice_callback(config)
            if callback is not None:
                callbacks.append(callback)
            else:
                offline_selection = _offline_select(model, tokenizer, pool.rows, config)
                dataset = train_ds.select(offline_selection.selected)
        elif method == "random":
            dataset = train_ds.select(random_rows)
        trainer = SFTTrainer(
            model=model,
            args=_sft_config(run_dir, settings.epochs, seed),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)  # the demo prints its own table
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        if method == "spice":
            if offline_selection is not None:
                selection, used = offline_selection, offline_selection.selected
            else:
                # The rows of *our* dataset the callback trained on (through TRL's filtering/shuffling).
                selection, used = callback.selection, callback.selected_rows
        elif method == "random":
            used = random_rows
        else:
            used = list(range(len(pool)))
        scores = world.evaluate(model, tokenizer, tests)
        results.append(
            {
                "method": method,
                "rows": len(used),
                "clean_share": pool.clean_share(used),
                "noise_share": sum(pool.kind_shares(used)[k] for k in world.CORRUPTED_KINDS),
                "accuracy": scores["mean"],
                "per_task": {k: v for k, v in scores.items() if k != "mean"},
                "steps": int(trainer.state.global_step),
                "seconds": seconds,
            }
        )
        logger.info("demo: %s done (%d rows, accuracy %.3f, %.1fs)", method, len(used), scores["mean"], seconds)

    table = _demo_table(results)
    report = _write_demo_report(out, results, table, pool, selection, base_scores, scenario, settings, build_seconds)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return DemoResult(rows=results, table=table, report_path=report)


# The world the demo and the quality benchmark share: a base model that has seen a few hard rows, so a
# wrong label costs more loss than a right one (as with a real pretrained model).
WORLD_OPTIONS: dict[str, Any] = {"pretrain_hard_share": 0.03}


def _spice_callback(config: SpiceConfig) -> Any:
    try:
        from spice_trainer.integrations.trainer import SpiceDataCallback
    except ImportError as err:
        logger.warning("SpiceDataCallback is not available (%s); selecting offline with spice_trainer.select", err)
        return None
    return SpiceDataCallback(config)


def _offline_select(model: Any, tokenizer: Any, rows: list[dict[str, str]], config: SpiceConfig) -> Any:
    from spice_trainer.demo import world
    from spice_trainer.pipeline import select

    return select(model, world.tokenize_rows(tokenizer, rows), config, show_progress=False)


def _sft_config(output_dir: Path, epochs: float, seed: int) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=DEMO_BATCH_SIZE,
        learning_rate=DEMO_LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        weight_decay=0.0,
        max_length=64,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
    )


def _demo_table(results: list[dict[str, Any]]) -> str:
    header = f"{'method':<8} {'rows':>6} {'clean share':>12} {'noise share':>12} {'accuracy':>9} {'train s':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r['method']:<8} {r['rows']:>6} {r['clean_share']:>12.1%} {r['noise_share']:>12.1%} "
            f"{r['accuracy']:>9.3f} {r['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def _write_demo_report(
    out: Path,
    results: list[dict[str, Any]],
    table: str,
    pool: Any,
    selection: Any,
    base_scores: dict[str, float],
    scenario: str,
    settings: DemoSettings,
    build_seconds: float,
) -> Path:
    counts = pool.counts()
    lines = [
        "# spice-trainer demo",
        "",
        f"A tiny Llama (pretrained for {build_seconds:.0f}s on easy rows) fine-tuned with LoRA and TRL's `SFTTrainer` "
        f"for {settings.epochs:g} epochs over its training rows, on a `{scenario}` pool of {len(pool)} rows "
        f"({', '.join(f'{k}: {v}' for k, v in counts.items())}). Accuracy is exact match on a clean held-out set "
        f"({settings.test_rows_per_task} rows per task); the base model scores {base_scores['mean']:.3f}.",
        "",
        "| method | rows | clean share | noise share | accuracy | "
        + " | ".join(results[0]["per_task"])
        + " | steps | train s |",
        "|---|---|---|---|---|" + "---|" * len(results[0]["per_task"]) + "---|---|",
    ]
    for r in results:
        per_task = " | ".join(f"{v:.2f}" for v in r["per_task"].values())
        lines.append(
            f"| {r['method']} | {r['rows']} | {r['clean_share']:.1%} | {r['noise_share']:.1%} | "
            f"**{r['accuracy']:.3f}** | {per_task} | {r['steps']} | {r['seconds']:.1f} |"
        )
    lines += ["", "```", table, "```"]
    if _plot_demo(out / "accuracy.png", results):
        lines += ["", "![accuracy by method](accuracy.png)"]
    if selection is not None:
        lines += ["", "## The SPICE selection", "", "```", selection.summary(), "```"]
        if len(selection.indices) and selection.plot(out / "selection.png", missing_ok=True):
            lines += ["", "![gain decay and conflicts](selection.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _plot_demo(path: Path, results: list[dict[str, Any]]) -> bool:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is missing; the demo report has no plots (pip install 'spice-trainer[plot]')")
        return False
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    names = [r["method"] for r in results]
    left.bar(names, [r["accuracy"] for r in results], color=["tab:green", "tab:gray", "tab:blue"][: len(names)])
    left.set_ylim(0, 1)
    left.set_title("exact match on the clean held-out set")
    right.bar(names, [r["clean_share"] for r in results], label="clean", color="tab:green")
    right.bar(
        names,
        [r["noise_share"] for r in results],
        bottom=[r["clean_share"] for r in results],
        label="corrupted",
        color="tab:red",
    )
    right.set_ylim(0, 1)
    right.set_title("share of the training rows")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return True
