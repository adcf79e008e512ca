"""What a selection round costs, in epochs of training on the same pool (issue 14).

Run: ``.venv/bin/python bench/overhead.py`` (~10-15 minutes on 2 busy cores) or ``--quick`` (~3 minutes).
Sections (``--sections``, default all):

- ``cost``: for short (≈16 tokens), medium (≈128) and long (≈512) rows, one epoch of a real
  ``transformers.Trainer`` (same model, rows, collator, batch size and LoRA; AdamW; the epoch's own time,
  from ``on_epoch_begin`` to ``on_epoch_end``) against one live selection round (`spice_trainer.select`:
  the gradient pass and the greedy) with each ``--projections`` family, with the default loss guard (a
  forward pass over the pool, gradients of the eligible rows) and with no guard (every row through the
  gradient pass), and against a proxy round (`ProxyModel.select` with a model of half the width). Target: a
  live round ≤ 1.0 epoch.
- ``profile``: where the gradient pass's time goes on short rows: the pass with its projection switched off,
  with the per-example products switched off too, row sorting, fetching and collation, a forward pass alone.
- ``threads``: the gradient pass with 1 thread, with every core, and with the default policy
  (``SpiceConfig.threads=None``, `spice_trainer.core.threads`), interleaved.
- ``agreement``: on the synthetic instruction world (a pretrained tiny Llama, a noisy pool), the selection
  with the Kronecker projection against the default dense Rademacher one: overlap of the picks and the
  ratio of their log-det utilities in a high-dimensional reference projection (``d = 4096``); the same
  figures for the dense projection with another seed, the yardstick (what re-drawing ``P`` alone changes);
  with the default loss guard and with none.
- ``reselect``: the world's pool, an adapter trained on the first round's picks, then a full reselection
  round against the cheap one (``SpiceConfig.reselect_shortlist``): seconds as epochs, overlap, and the
  objective ratio on fresh features; with the default loss guard and with none.

The model is a randomly initialised Llama (hidden ``--hidden``, 2 layers, intermediate 4× hidden, a
48-token vocabulary: the issue's "tiny Llama") with LoRA r = 8 on every linear layer; rows are random tokens,
the first third of each row a prompt without loss. Timings are wall-clock seconds and this process's CPU
seconds (``time.process_time``: on a shared machine the CPU figure is the steadier one at 1 thread); each
figure is the best of ``--repeats`` interleaved runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spice_trainer.config import SpiceConfig
from spice_trainer.demo.toy import add_lora, build_model, build_tokenizer

LENGTHS: dict[str, dict[str, int]] = {
    # rows × tokens ≈ 64k tokens each: the same work per epoch at every length.
    "short": {"tokens": 16, "rows": 4000},
    "medium": {"tokens": 128, "rows": 500},
    "long": {"tokens": 512, "rows": 128},
}
BATCH = 16
LORA_R = 8


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result, wall seconds, CPU seconds of this process)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def load() -> float:
    return os.getloadavg()[0]


# --- models and rows ------------------------------------------------------------------------------------


def tokenizer() -> Any:
    return build_tokenizer([f"w{i}" for i in range(41)])  # + 7 special tokens = 48


def llama(tok: Any, hidden: int, seed: int, max_positions: int) -> Any:
    return build_model(
        tok,
        family="llama",
        hidden_size=hidden,
        num_layers=2,
        num_heads=4,
        intermediate_size=4 * hidden,
        max_positions=max_positions,
        seed=seed,
    )


def random_rows(tok: Any, rows: int, tokens: int, seed: int = 0) -> Any:
    """A `datasets.Dataset` of ``rows`` rows of ``0.75-1.25 × tokens`` random tokens; the first third has no loss."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    lo, hi = max(2, tokens * 3 // 4), tokens * 5 // 4
    data: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(rows):
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        ids = torch.randint(7, len(tok), (length,), generator=gen).tolist()
        data["input_ids"].append(ids)
        data["attention_mask"].append([1] * length)
        data["labels"].append([-100] * (length // 3) + ids[length // 3 :])
    return Dataset.from_dict(data)


def collator(tok: Any) -> Any:
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)


# --- one epoch of a real Trainer ------------------------------------------------------------------------


def trainer_epoch(model: Any, dataset: Any, data_collator: Any, out_dir: str) -> tuple[float, float]:
    """Wall and CPU seconds of one epoch of `transformers.Trainer` (setup excluded), on a copy of ``model``."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    class EpochClock(TrainerCallback):
        wall = cpu = 0.0

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.wall, self.cpu = time.perf_counter(), time.process_time()

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    clock = EpochClock()
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=1e-4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=dataset,
        data_collator=data_collator,
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics
    trainer.train()
    return clock.wall, clock.cpu


# --- sections -------------------------------------------------------------------------------------------


def section_cost(args: argparse.Namespace) -> None:
    from spice_trainer import select
    from spice_trainer.proxy.model import ProxyModel

    print("## cost: one selection round against one Trainer epoch on the same pool\n")
    print(
        f"target Llama hidden {args.hidden}, proxy hidden {args.hidden // 2} (2 layers each), LoRA r={LORA_R} "
        f"all-linear, batch {BATCH}, proj_dim 256, budget 10 %, {torch.get_num_threads()} thread(s)\n"
    )
    header = (
        f"{'rows':<8} {'n x tokens':>12} {'what':<30} {'features s':>10} {'greedy s':>9} {'total s':>8} "
        f"{'cpu s':>7} {'epochs (wall)':>13} {'epochs (cpu)':>12}"
    )
    tok = tokenizer()
    for name in args.lengths:
        spec = LENGTHS[name]
        rows = max(BATCH * 4, spec["rows"] // (4 if args.quick else 1))
        positions = max(64, 2 * spec["tokens"])
        model = add_lora(llama(tok, args.hidden, 0, positions), r=LORA_R, seed=0)
        proxy_base = llama(tok, args.hidden // 2, 1, positions)
        dataset = random_rows(tok, rows, spec["tokens"])
        data_collator = collator(tok)
        config = SpiceConfig(batch_size=BATCH, threads=torch.get_num_threads())
        proxy = ProxyModel(proxy_base, config, target=model, tokenizer=tok, proxy_tokenizer=tok)
        epochs: list[tuple[float, float]] = []
        # Each projection with the default loss guard (losses first, gradients of the eligible rows only) and
        # without any guard (every row through the gradient pass: the full "one pass over the pool").
        variants = {
            f"live, {p}{suffix}": config.with_changes(projection=p, **guards)
            for suffix, guards in (("", {}), (", no guard", {"min_loss": None, "max_loss_quantile": None}))
            for p in args.projections
        }
        live: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label in variants}
        proxied: list[tuple[float, float, float, float]] = []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                epochs.append(trainer_epoch(model, dataset, data_collator, tmp))
                for label, cfg in variants.items():
                    sel, wall, cpu = timed(partial(select, model, dataset, cfg, data_collator, show_progress=False))
                    live[label].append((sel.metadata["feature_seconds"], wall, cpu, 0.0))
                cfg = config.with_changes(projection=args.projections[0])
                sel, wall, cpu = timed(partial(proxy.select, dataset, cfg, data_collator))
                proxied.append((sel.metadata["feature_seconds"], wall, cpu, 0.0))
        epoch_wall = min(e[0] for e in epochs)
        epoch_cpu = min(e[1] for e in epochs)
        print(header if name == args.lengths[0] else "", end="\n" if name == args.lengths[0] else "")
        tokens = f"{rows} x {spec['tokens']}"
        print(f"{name:<8} {tokens:>12} {'Trainer epoch':<30} {'':>10} {'':>9} {epoch_wall:>8.2f} {epoch_cpu:>7.2f}")
        runs = [*live.items(), (f"proxy, {args.projections[0]}", proxied)]
        for label, measured in runs:
            best = min(measured, key=lambda r: r[2])  # the run with the least CPU time
            features, wall, cpu = best[0], best[1], best[2]
            print(
                f"{'':<8} {'':>12} {label:<30} {features:>10.2f} {wall - features:>9.2f} {wall:>8.2f} {cpu:>7.2f} "
                f"{wall / epoch_wall:>13.2f} {cpu / epoch_cpu:>12.2f}"
            )
        print(f"{'':<8} (load average {load():.1f})")
    print()


def section_threads(args: argparse.Namespace) -> None:
    from spice_trainer.core.threads import choose_threads
    from spice_trainer.features.gradients import compute_gradient_features

    cores = os.cpu_count() or 1
    print(f"## threads: the gradient pass at 1 thread, at {cores} (every core) and with the policy\n")
    tok = tokenizer()
    model = add_lora(llama(tok, args.hidden, 0, 64), r=LORA_R, seed=0)
    dataset = random_rows(tok, 128 if args.quick else 512, 16)
    runs: dict[str, list[tuple[float, float]]] = {"1 thread": [], f"{cores} threads": [], "policy (threads=None)": []}
    chosen: list[int] = []
    saved = torch.get_num_threads()
    torch.set_num_threads(cores)  # the policy's ceiling: what torch would use by default
    try:
        for _ in range(args.repeats):
            for label, threads in zip(runs, (1, cores, None), strict=True):
                if threads is None:
                    chosen.append(choose_threads(None))
                cfg = SpiceConfig(batch_size=BATCH, threads=threads)
                _, wall, cpu = timed(
                    lambda cfg=cfg: compute_gradient_features(model, dataset, cfg, show_progress=False)
                )
                runs[label].append((wall, cpu))
    finally:
        torch.set_num_threads(saved)
    base = min(w for w, _ in runs["1 thread"])
    print(f"{'setting':<24} {'wall s (best)':>13} {'all runs':>24} {'vs 1 thread':>11}")
    for label, measured in runs.items():
        best = min(w for w, _ in measured)
        every = ", ".join(f"{w:.2f}" for w, _ in measured)
        print(f"{label:<24} {best:>13.2f} {every:>24} {best / base:>10.2f}x")
    print(f"policy chose {chosen} thread(s); load average {load():.1f} on {cores} cores\n")


def section_profile(args: argparse.Namespace) -> None:
    """Where a gradient pass's time goes, by switching its parts off one at a time (CPU seconds, best of runs)."""
    import spice_trainer.features.gradients as gradients
    from spice_trainer.core.projection import BlockProjector, KroneckerProjector
    from spice_trainer.features.batches import collate, longest_first, prepare_row

    print("## profile: the gradient pass on short rows, part by part (CPU seconds, best of --repeats)\n")
    tok = tokenizer()
    spec = LENGTHS["short"]
    rows = spec["rows"] // (4 if args.quick else 1)
    model = add_lora(llama(tok, args.hidden, 0, 64), r=LORA_R, seed=0)
    dataset = random_rows(tok, rows, spec["tokens"])
    data_collator = collator(tok)

    def best(fn: Callable[[], Any]) -> float:
        return min(timed(fn)[2] for _ in range(args.repeats))

    def features(projection: str) -> float:
        cfg = SpiceConfig(batch_size=BATCH, projection=projection, threads=torch.get_num_threads())
        return best(
            partial(gradients.compute_gradient_features, model, dataset, cfg, data_collator, show_progress=False)
        )

    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        figures["Trainer epoch"] = min(
            trainer_epoch(model, dataset, data_collator, tmp)[1] for _ in range(args.repeats)
        )
    for projection in args.projections:
        figures[f"gradient pass, {projection}"] = features(projection)
    project_call = gradients._project_call
    original = {}
    try:
        # The projection only: the per-example products stay, their projection is skipped.
        for cls in (BlockProjector, KroneckerProjector):
            original[cls] = cls.project_matrices
            cls.project_matrices = lambda self, grads, out, transposed=False: None  # type: ignore[method-assign]
        figures["  without the projection"] = features(args.projections[0])
        # The per-example products and the projection: the hooks still capture, nothing is multiplied.
        gradients._project_call = lambda *a: None
        figures["  without per-example products and projection"] = features(args.projections[0])
    finally:
        gradients._project_call = project_call
        for cls, fn in original.items():
            cls.project_matrices = fn  # type: ignore[method-assign]
    order = list(range(len(dataset)))
    figures["  sorting rows by length"] = best(lambda: longest_first(dataset, order, None))
    figures["  fetching and collating the rows"] = best(
        lambda: [
            collate(data_collator, [prepare_row(r, None) for r in dataset.__getitems__(order[i : i + BATCH])])
            for i in range(0, len(order), BATCH)
        ]
    )

    def forward_only() -> None:
        model.eval()
        with torch.no_grad():
            for i in range(0, len(order), BATCH):
                batch = data_collator([dict(r) for r in dataset.__getitems__(order[i : i + BATCH])])
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    figures["  a forward pass alone (no grad)"] = best(forward_only)
    epoch = figures["Trainer epoch"]
    print(f"{rows} rows x ~{spec['tokens']} tokens, batch {BATCH}, {torch.get_num_threads()} thread(s)\n")
    print(f"{'part':<48} {'cpu s':>7} {'epochs':>7}")
    for label, value in figures.items():
        print(f"{label:<48} {value:>7.2f} {value / epoch:>7.2f}")
    print()


def log_det(features: torch.Tensor, rows: list[int], alpha: float = 1.0) -> float:
    """``log det(I + α Σ_{i∈S} g_i g_iᵀ)`` in float64."""
    g = features[rows].double()
    return float(torch.logdet(torch.eye(g.shape[1], dtype=torch.float64) + alpha * g.T @ g))


GUARDS = {
    "default guards": {},
    "no guard": {"min_loss": None, "max_loss_quantile": None},
}


def world_setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """The instruction world: tokenizer, a LoRA model on the pretrained base, the pool rows (tokenised).

    The ``noisy`` scenario: with the default loss guard more rows are eligible than the budget (in the curated
    one the guard leaves exactly the budget, so every method picks the same rows and agreement says nothing).
    """
    from spice_trainer.demo.world import build_world, candidate_pool, tokenize_rows

    tok, base = build_world(seed=0, pretrain_rows=1500 if args.quick else 3000)
    model = add_lora(base, r=LORA_R, seed=0)
    pool = candidate_pool(1000 if args.quick else 2000, scenario="noisy", seed=0)
    rows = tokenize_rows(tok, pool.rows)
    return tok, model, pool, rows


def section_agreement(args: argparse.Namespace) -> None:
    from spice_trainer import select
    from spice_trainer.features.gradients import compute_gradient_features

    print("## agreement: the Kronecker projection against the dense default, on the instruction world\n")
    _, model, _, rows = world_setup(args)
    for guard, guards in GUARDS.items():
        base = SpiceConfig(batch_size=BATCH, **guards)
        variants = {
            "rademacher (default)": base,
            "rademacher, seed 43": base.with_changes(seed=43),
            "kronecker": base.with_changes(projection="kronecker"),
            "kronecker, seed 43": base.with_changes(projection="kronecker", seed=43),
        }
        selections = {label: select(model, rows, cfg, show_progress=False) for label, cfg in variants.items()}
        union = sorted({i for s in selections.values() for i in s.indices})
        reference = compute_gradient_features(
            model, rows, base.with_changes(proj_dim=4096, seed=7), indices=union, show_progress=False
        ).features
        ref = torch.full((len(rows), 4096), float("nan"))
        ref[union] = reference
        picks = selections["rademacher (default)"].indices
        k = len(picks)
        u_default = log_det(ref, picks)
        eligible = len(rows) - selections["rademacher (default)"].metadata.get("loss_guard_excluded", 0)
        print(f"{guard}: pool {len(rows)} rows (about {eligible} eligible), {k} picks; log det in a d = 4096 ")
        print("reference projection (seed 7); the seed-43 rows show what re-drawing the projection alone changes\n")
        print(f"{'projection':<24} {'overlap with default':>20} {'utility ratio':>14} {'features s':>10}")
        for label, sel in selections.items():
            overlap = len(set(sel.indices) & set(picks)) / max(1, k)
            ratio = log_det(ref, sel.indices) / u_default
            print(f"{label:<24} {overlap:>20.3f} {ratio:>14.4f} {sel.metadata['feature_seconds']:>10.2f}")
        print()


def section_reselect(args: argparse.Namespace) -> None:
    from spice_trainer import select
    from spice_trainer.features.gradients import compute_gradient_features
    from spice_trainer.features.reselect import FeatureCache

    print("## reselect: a cheap reselection round against a full one, after training on the first picks\n")
    tok, world_model, _, rows = world_setup(args)
    data_collator = collator(tok)
    dataset = _with_labels(rows)
    shortlist = args.shortlist
    for guard, guards in GUARDS.items():
        model = copy.deepcopy(world_model)
        config = SpiceConfig(
            batch_size=BATCH, threads=torch.get_num_threads(), projection=args.reselect_projection, **guards
        )
        cheap = config.with_changes(reselect_shortlist=shortlist)
        cache = FeatureCache()
        first = select(model, dataset, cheap, data_collator, show_progress=False, feature_cache=cache)
        with tempfile.TemporaryDirectory() as tmp:
            _train_steps(model, dataset, first.indices, data_collator, tmp, args.train_epochs)
            epoch_wall, epoch_cpu = trainer_epoch(model, dataset, data_collator, tmp)
        full_runs, cheap_runs = [], []
        for _ in range(args.repeats):
            full_runs.append(timed(partial(select, model, dataset, config, data_collator, show_progress=False)))
            probe = copy.deepcopy(cache)  # every cheap run starts from the memory of round 0
            cheap_runs.append(
                timed(partial(select, model, dataset, cheap, data_collator, show_progress=False, feature_cache=probe))
            )
        full, full_wall, full_cpu = min(full_runs, key=lambda r: r[2])
        fast, fast_wall, fast_cpu = min(cheap_runs, key=lambda r: r[2])
        fresh = compute_gradient_features(model, dataset, config, data_collator, show_progress=False).features
        k = len(full.indices)
        overlap = len(set(full.indices) & set(fast.indices)) / max(1, k)
        ratio = log_det(fresh, fast.indices) / log_det(fresh, full.indices)
        stale_overlap = len(set(first.indices) & set(full.indices)) / max(1, k)
        stale_ratio = log_det(fresh, first.indices) / log_det(fresh, full.indices)
        print(
            f"{guard}, {args.reselect_projection}: pool {len(rows)} rows, budget {k}; adapter trained "
            f"{args.train_epochs:g} epoch(s) on the first {len(first.indices)} picks; Trainer epoch on the pool "
            f"{epoch_wall:.2f} s wall, {epoch_cpu:.2f} s CPU\n"
        )
        print(f"{'round':<34} {'seconds':>8} {'cpu s':>7} {'epochs (wall)':>13} {'epochs (cpu)':>12}")
        for label, wall, cpu in (
            ("full", full_wall, full_cpu),
            (f"shortlist {shortlist:g} ({fast.metadata['reselect']['shortlist']} rows)", fast_wall, fast_cpu),
        ):
            print(f"{label:<34} {wall:>8.2f} {cpu:>7.2f} {wall / epoch_wall:>13.2f} {cpu / epoch_cpu:>12.2f}")
        print(
            f"\nagreement with the full round: overlap {overlap:.3f}, objective ratio (log det on fresh features) "
            f"{ratio:.4f}\nwithout reselection (the first round's picks kept): overlap {stale_overlap:.3f}, "
            f"objective ratio {stale_ratio:.4f}\n"
        )


def _with_labels(rows: list[dict[str, list[int]]]) -> Any:
    from datasets import Dataset

    data: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        ids, mask = r["input_ids"], r["completion_mask"]
        data["input_ids"].append(ids)
        data["attention_mask"].append([1] * len(ids))
        data["labels"].append([t if m else -100 for t, m in zip(ids, mask, strict=True)])
    return Dataset.from_dict(data)


def _train_steps(model: Any, dataset: Any, picks: list[int], data_collator: Any, out_dir: str, epochs: float) -> None:
    """Train ``model`` itself (not a copy) on ``picks`` for ``epochs``, as the trainer would after round 0."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=BATCH,
        num_train_epochs=epochs,
        learning_rate=3e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset.select(picks), data_collator=data_collator)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a quarter of the rows, smaller world")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the cost sections (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs; the best counts (default 2)")
    parser.add_argument("--hidden", type=int, default=64, help="the target model's width (default 64)")
    parser.add_argument("--lengths", default="short,medium,long", help="comma-separated: short, medium, long")
    parser.add_argument("--projections", default="rademacher,kronecker", help="projection families of the live rounds")
    parser.add_argument("--sections", default="cost,profile,threads,agreement,reselect")
    parser.add_argument("--shortlist", type=float, default=0.25, help="reselect_shortlist of the cheap round")
    parser.add_argument("--train-epochs", type=float, default=2.0, help="training on the picks before reselecting")
    parser.add_argument("--reselect-projection", default="rademacher", help="projection of the reselect section")
    args = parser.parse_args()
    args.lengths = [x for x in args.lengths.split(",") if x]
    args.projections = [x for x in args.projections.split(",") if x]
    for name in args.lengths:
        if name not in LENGTHS:
            parser.error(f"--lengths: unknown {name!r}; use short, medium, long")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; load average {load():.1f}\n")
    sections = {
        "cost": section_cost,
        "profile": section_profile,
        "threads": section_threads,
        "agreement": section_agreement,
        "reselect": section_reselect,
    }
    for name in args.sections.split(","):
        if name not in sections:
            parser.error(f"--sections: unknown {name!r}; use {', '.join(sections)}")
        sections[name](args)
    print(f"total {time.perf_counter() - start:.0f} s; load average {load():.1f}")


if __name__ == "__main__":
    main()
