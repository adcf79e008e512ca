"""Quality benchmark: does a SPICE-chosen 10 % train as well as the full pool, and better than random 10 %?

World: `spice_trainer.demo.world` — a tiny Llama pretrained on easy instruction rows (and a few hard ones), a
candidate pool with hidden row kinds (clean / redundant / mislabeled / conflicting / junk) in two
scenarios (``curated``: 8 % noise, ``noisy``: 50 %), and a clean held-out test set per task.

Methods (each trains a fresh LoRA on the rows it chose):

* ``full``          every row of the pool;
* ``random``        a uniformly random 10 %;
* ``fisher``        plain Fisher log-det greedy 10 %: ``SpiceConfig(conflict_weight=0, stop_ratio=None,
  feature_norm="none", min_loss=None, max_loss_quantile=None)``;
* ``paper``         the paper-exact preset ``SpiceConfig.paper(budget=0.1)`` (early stopping on);
* ``ours``          the library defaults ``SpiceConfig(budget=0.1)`` (raw gradients, λ = 0.1, the small-loss
  guard: rows above ``min_loss`` whose loss is in their lowest ``max_loss_quantile``, never fewer than the budget);
* any ``--variant NAME=field:value,...`` (a `SpiceConfig` with those fields changed from the defaults).

Training protocol: the same number of *epochs* for every method (``--epochs``, default 20) over its own
rows, with the same learning rate, batch size, schedule and seed. This is what `SpiceDataCallback`
does (``num_train_epochs`` are passes over the selected subset) and what the paper does; a 10 % subset
therefore takes ~10x fewer optimizer steps than the full pool. 20 epochs bring every 10 % subset to a
training loss near zero, so no subset loses for lack of steps (the full pool gets 10x the compute).

Reported per scenario and method, mean ± sample std over seeds: exact-match accuracy on the held-out
set, rows used, share of clean rows, share of corrupted rows, selection seconds (gradients + greedy),
training seconds. Writes ``results.json``, ``table.md`` and plots (``accuracy.png``, ``gains.png``,
``conflicts.png``) to ``--out``.

    python bench/quality.py                 # 3 seeds, pools of 2000 rows: ~10-15 min on 2 CPU cores
    python bench/quality.py --quick         # 2 seeds, pools of 1000 rows: ~3-4 min
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.demo import world
from spice_trainer.demo.toy import add_lora
from spice_trainer.pipeline import select

BASE_METHODS = ("full", "random", "fisher", "paper", "ours")
# Shared with the demo: the base model has seen a few hard rows (see spice_trainer.cli.WORLD_OPTIONS).
WORLD_OPTIONS: dict[str, Any] = {"pretrain_hard_share": 0.03}


def method_config(name: str, seed: int, variants: dict[str, dict[str, Any]]) -> SpiceConfig | None:
    """The `SpiceConfig` of a SPICE method (``None`` for ``full`` and ``random``)."""
    if name == "fisher":
        # Plain Fisher greedy: raw gradients, no conflict term, no early stopping, no loss guard.
        return SpiceConfig(
            budget=0.1,
            conflict_weight=0.0,
            stop_ratio=None,
            feature_norm="none",
            min_loss=None,
            max_loss_quantile=None,
            seed=seed,
        )
    if name == "paper":
        return SpiceConfig.paper(budget=0.1, seed=seed)
    if name == "ours":
        return SpiceConfig(budget=0.1, seed=seed)
    if name in variants:
        return SpiceConfig(budget=0.1, seed=seed, **variants[name])
    return None


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"q80=max_loss_quantile:0.8,feature_norm:none"`` -> ``("q80", {...})``."""
    name, _, spec = text.partition("=")
    fields: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, _, raw = item.partition(":")
        value: Any
        if raw.lower() == "none" and key not in ("feature_norm",):  # feature_norm="none" is a string value
            value = None
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        fields[key] = value
    SpiceConfig(**fields)  # validate now, not after ten minutes of training
    return name, fields


def run_one(
    base: Any,
    tokenizer: Any,
    pool: world.Pool,
    tests: dict[str, list[dict[str, str]]],
    method: str,
    *,
    seed: int,
    epochs: float,
    variants: dict[str, dict[str, Any]],
    out: Path,
    scenario: str,
) -> dict[str, Any]:
    """Select (if a SPICE method), fine-tune a fresh LoRA on the chosen rows, evaluate."""
    model = add_lora(copy.deepcopy(base), r=8, alpha=16, init_b_random=False, seed=seed)
    n = len(pool)
    config = method_config(method, seed, variants)
    record: dict[str, Any] = {"scenario": scenario, "method": method, "seed": seed}
    select_seconds = 0.0
    if method == "full":
        indices = list(range(n))
    elif method == "random":
        budget = SpiceConfig(budget=0.1).budget_count(n)
        gen = torch.Generator(device="cpu").manual_seed(10_000 + seed)
        indices = torch.randperm(n, generator=gen)[:budget].tolist()
    else:
        rows = world.tokenize_rows(tokenizer, pool.rows)
        start = time.perf_counter()
        assert config is not None, f"unknown method {method!r}"
        selection = select(model, rows, config, show_progress=False)
        select_seconds = time.perf_counter() - start
        indices = selection.selected
        selection.metadata["kinds"] = [pool.kinds[i] for i in selection.indices]
        selection.save(out / "selections" / f"{scenario}-{method}-seed{seed}.json")
        record.update(
            stop_reason=selection.stop_reason,
            gains=selection.gains,
            conflicts=selection.conflicts,
            excluded_by_loss_guard=selection.metadata.get("loss_guard_excluded"),
        )
    result = world.finetune(model, tokenizer, [pool.rows[i] for i in indices], epochs=epochs, seed=seed, **TRAIN)
    scores = world.evaluate(model, tokenizer, tests)
    shares = pool.kind_shares(indices)
    record.update(
        rows=len(indices),
        accuracy=scores["mean"],
        per_task={k: v for k, v in scores.items() if k != "mean"},
        clean_share=shares["clean"],
        corrupted_share=sum(shares[k] for k in world.CORRUPTED_KINDS),
        kind_shares=shares,
        select_seconds=select_seconds,
        train_seconds=result.seconds,
        steps=result.steps,
        final_loss=result.final_loss,
    )
    return record


TRAIN: dict[str, Any] = {"learning_rate": 5e-3, "batch_size": 16}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, sd


def summarise(records: list[dict[str, Any]], methods: list[str], scenarios: list[str]) -> list[dict[str, Any]]:
    """One row per (scenario, method): mean and sample std over seeds."""
    rows = []
    for scenario in scenarios:
        random_acc = [r["accuracy"] for r in records if r["scenario"] == scenario and r["method"] == "random"]
        for method in methods:
            rs = [r for r in records if r["scenario"] == scenario and r["method"] == method]
            if not rs:
                continue
            row: dict[str, Any] = {"scenario": scenario, "method": method, "seeds": len(rs)}
            for key in ("accuracy", "rows", "clean_share", "corrupted_share", "select_seconds", "train_seconds"):
                row[key], row[key + "_sd"] = _mean_sd([float(r[key]) for r in rs])
            if random_acc and len(random_acc) == len(rs):
                # Paired by seed: the same world, pool and test set.
                diffs = [r["accuracy"] - a for r, a in zip(rs, random_acc, strict=True)]
                row["vs_random"], row["vs_random_sd"] = _mean_sd(diffs)
            rows.append(row)
    return rows


def markdown_table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | method | rows | clean share | corrupted share | accuracy | vs random (paired) "
        "| select s | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        vs = f"{r['vs_random']:+.3f} ± {r['vs_random_sd']:.3f}" if "vs_random" in r else "n/a"
        lines.append(
            f"| {r['scenario']} | {r['method']} | {r['rows']:.0f} | {r['clean_share']:.1%} | "
            f"{r['corrupted_share']:.1%} | **{r['accuracy']:.3f}** ± {r['accuracy_sd']:.3f} | {vs} | "
            f"{r['select_seconds']:.1f} | {r['train_seconds']:.1f} |"
        )
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], summary: list[dict[str, Any]], out: Path, scenarios: list[str]) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib missing: no plots")
        return
    fig = Figure(figsize=(6 * len(scenarios), 4))
    axes = fig.subplots(1, len(scenarios), squeeze=False)[0]
    for ax, scenario in zip(axes, scenarios, strict=True):
        rows = [r for r in summary if r["scenario"] == scenario]
        names = [r["method"] for r in rows]
        ax.bar(names, [r["accuracy"] for r in rows], yerr=[r["accuracy_sd"] for r in rows], capsize=4)
        ax.set_ylim(0, 1)
        ax.set_title(f"{scenario}: exact match (mean ± sd over seeds)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)

    for key, title, name in (
        ("gains", "gain Δ per pick", "gains.png"),
        ("conflicts", "conflict c per pick", "conflicts.png"),
    ):
        fig = Figure(figsize=(6 * len(scenarios), 4))
        axes = fig.subplots(1, len(scenarios), squeeze=False)[0]
        for ax, scenario in zip(axes, scenarios, strict=True):
            seed0 = min(r["seed"] for r in records)
            for r in records:
                if r["scenario"] == scenario and r["seed"] == seed0 and key in r:
                    ax.plot(range(1, len(r[key]) + 1), r[key], label=r["method"])
            ax.set_xlabel("pick")
            ax.set_title(f"{scenario}: {title} (seed {seed0})")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/quality", help="output folder")
    parser.add_argument("--quick", action="store_true", help="2 seeds, pools of 1000 rows, 50 test rows per task")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3; --quick: 2)")
    parser.add_argument("--pool-size", type=int, help="rows per candidate pool (default 2000; --quick: 1000)")
    parser.add_argument("--epochs", type=float, default=20.0, help="epochs over each method's rows (default 20)")
    parser.add_argument("--scenarios", default="curated,noisy", help="comma-separated scenarios")
    parser.add_argument("--methods", default=",".join(BASE_METHODS), help="comma-separated methods")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra SPICE method NAME=field:value,... changed from the defaults (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    pool_size = args.pool_size or (1000 if args.quick else 2000)
    test_rows = 50 if args.quick else 100
    scenarios = [s for s in args.scenarios.split(",") if s]
    variants = dict(parse_variant(v) for v in args.variant)
    methods = [m for m in args.methods.split(",") if m] + list(variants)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for seed in seeds:
        t0 = time.perf_counter()
        tokenizer, base = world.build_world(seed, **WORLD_OPTIONS)
        tests = world.heldout_set(test_rows, seed=seed)
        base_acc = world.evaluate(base, tokenizer, tests)["mean"]
        print(f"seed {seed}: world built in {time.perf_counter() - t0:.1f}s, base accuracy {base_acc:.3f}", flush=True)
        for scenario in scenarios:
            pool = world.candidate_pool(pool_size, scenario, seed=seed)
            for method in methods:
                rec = run_one(
                    base,
                    tokenizer,
                    pool,
                    tests,
                    method,
                    seed=seed,
                    epochs=args.epochs,
                    variants=variants,
                    out=out,
                    scenario=scenario,
                )
                rec["base_accuracy"] = base_acc
                records.append(rec)
                print(
                    f"  {scenario:8s} {method:10s} rows={rec['rows']:5d} clean={rec['clean_share']:.2f} "
                    f"corrupted={rec['corrupted_share']:.2f} acc={rec['accuracy']:.3f} "
                    f"select={rec['select_seconds']:.1f}s train={rec['train_seconds']:.1f}s",
                    flush=True,
                )
    total = time.perf_counter() - start
    summary = summarise(records, methods, scenarios)
    table = markdown_table(summary)
    header = (
        f"{len(seeds)} seeds, pools of {pool_size} rows, budget 10%, {args.epochs:g} epochs over each method's rows, "
        f"{test_rows} test rows per task; total {total / 60:.1f} min"
    )
    (out / "table.md").write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps({"settings": vars(args), "records": records, "summary": summary}, indent=1, default=_json) + "\n",
        encoding="utf-8",
    )
    plot(records, summary, out, scenarios)
    print()
    print(header)
    print(table)
    return 0


def _json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
