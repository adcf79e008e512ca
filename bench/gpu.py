"""The GPU figures of issue 14 (item 6), in one command: ``.venv/bin/python bench/gpu.py``.

Three parts, on the first CUDA device (``--device``), each timed after a warm-up with the device synchronised,
the best of ``--repeats``:

1. **Gradient features vs a plain backward** in bf16 at 256 and 1,024 tokens per row: a randomly initialised
   Llama of ~134M parameters (hidden 768, 12 layers, vocab 32,000) with LoRA r = 8 on every linear layer.
   (a) a plain batched forward + ``loss.backward()`` in train mode; (b) `compute_gradient_features` on the same
   rows with the dense Rademacher and (c) the Kronecker projection. Examples/s, ratios, peak memory.
2. **The greedy at n = 100,000** (d = 256, k = 10,000, λ = 0.1): exact and stochastic greedy on features that
   live on the device (a 64-cluster Gaussian mixture, unit rows).
3. **A Trainer run with the callback** on the same 134M model: one epoch of `transformers.Trainer` on the
   whole pool (bf16) against the first selection round of `SpiceDataCallback` (live model) and a cheap
   reselection round (``reselect_shortlist=0.25``): seconds and the selection/epoch ratios.

``--tiny`` shrinks everything (hidden 64, 2 layers, 64/128 tokens, n = 2,000, a pool of 256 rows) so that the
script runs on a CPU in about a minute: it is how this file is known to work where no GPU is at hand. Writes
the figures as JSON to ``--out`` (default ``bench/results/gpu.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spice_trainer.config import SpiceConfig
from spice_trainer.demo.toy import add_lora, build_model, build_tokenizer

FULL = {
    "hidden": 768,
    "layers": 12,
    "heads": 12,
    "intermediate": 2048,
    "vocab": 32000,
    "lengths": [(256, 16), (1024, 8)],  # (tokens per row, rows per batch)
    "batches": 4,
    "greedy_n": 100_000,
    "greedy_d": 256,
    "greedy_k": 10_000,
    "pool": 4096,
    "pool_tokens": 256,
    "batch": 16,
}
TINY = {
    "hidden": 64,
    "layers": 2,
    "heads": 4,
    "intermediate": 256,
    "vocab": 512,
    "lengths": [(64, 8), (128, 4)],
    "batches": 2,
    "greedy_n": 2_000,
    "greedy_d": 64,
    "greedy_k": 200,
    "pool": 256,
    "pool_tokens": 32,
    "batch": 16,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Best of ``repeats`` timed calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def peak_mib(device: torch.device, fn: Callable[[], Any]) -> float | None:
    """Peak device memory during ``fn`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def build(size: dict[str, Any], device: torch.device, dtype: torch.dtype, max_positions: int) -> tuple[Any, Any]:
    tok = build_tokenizer([f"w{i}" for i in range(size["vocab"] - 7)])
    base = build_model(
        tok,
        family="llama",
        hidden_size=size["hidden"],
        num_layers=size["layers"],
        num_heads=size["heads"],
        intermediate_size=size["intermediate"],
        max_positions=max_positions,
        seed=0,
    )
    model = add_lora(base, r=8, seed=0).to(device=device, dtype=dtype)
    return tok, model


def random_rows(vocab: int, rows: int, tokens: int, seed: int = 0) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, vocab, (rows, tokens), generator=gen)
    return [{"input_ids": r.tolist(), "attention_mask": [1] * tokens, "labels": r.tolist()} for r in ids]


# --- part 1 ----------------------------------------------------------------------------------------------


def part_features(size: dict[str, Any], device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    from spice_trainer.features.gradients import compute_gradient_features

    longest = max(t for t, _ in size["lengths"])
    tok, model = build(size, device, dtype, longest)
    params = sum(p.numel() for p in model.parameters())
    results = []
    for tokens, batch in size["lengths"]:
        n = batch * size["batches"]
        rows = random_rows(len(tok), n, tokens)
        tensors = [
            {k: torch.tensor([r[k] for r in rows[i : i + batch]], device=device) for k in rows[0]}
            for i in range(0, n, batch)
        ]

        def plain(tensors: list[dict[str, torch.Tensor]] = tensors) -> None:
            model.train()
            for b in tensors:
                model(**b, use_cache=False).loss.backward()
                model.zero_grad(set_to_none=True)
            model.eval()

        row = {"tokens": tokens, "batch": batch, "rows": n, "parameters": params}
        row["plain_s"] = best_seconds(plain, device, repeats)
        row["plain_peak_mib"] = peak_mib(device, plain)
        for projection in ("rademacher", "kronecker"):
            cfg = SpiceConfig(batch_size=batch, projection=projection)

            def ours(cfg: SpiceConfig = cfg, rows: list[dict[str, list[int]]] = rows) -> None:
                compute_gradient_features(model, rows, cfg, show_progress=False)

            row[f"{projection}_s"] = best_seconds(ours, device, repeats)
            row[f"{projection}_peak_mib"] = peak_mib(device, ours)
            row[f"{projection}_vs_plain"] = row["plain_s"] / row[f"{projection}_s"]  # ≥ 0.8 is the target
        results.append(row)
        print(
            f"  {tokens:>5} tokens x {batch:>2}: plain {n / row['plain_s']:8.1f} ex/s | "
            f"rademacher {n / row['rademacher_s']:8.1f} ex/s ({row['rademacher_vs_plain']:.2f}x) | "
            f"kronecker {n / row['kronecker_s']:8.1f} ex/s ({row['kronecker_vs_plain']:.2f}x) | peak MiB "
            f"plain {row['plain_peak_mib']}, rademacher {row['rademacher_peak_mib']}, "
            f"kronecker {row['kronecker_peak_mib']}"
        )
    return results


# --- part 2 ----------------------------------------------------------------------------------------------


def part_greedy(size: dict[str, Any], device: torch.device) -> list[dict]:
    from spice_trainer.core.greedy import select_from_features

    n, d, k = size["greedy_n"], size["greedy_d"], size["greedy_k"]
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(64, d, generator=gen)
    feats = centers[torch.randint(64, (n,), generator=gen)] + 0.5 * torch.randn(n, d, generator=gen)
    feats = (feats / feats.norm(dim=1, keepdim=True)).to(device)
    results = []
    for greedy in ("exact", "stochastic"):
        cfg = SpiceConfig(budget=k, conflict_weight=0.1, greedy=greedy)
        sync(device)
        start = time.perf_counter()
        sel = select_from_features(feats, cfg)
        sync(device)
        seconds = time.perf_counter() - start
        objective = sel.objective[-1] if sel.objective else float("nan")
        results.append({"greedy": greedy, "n": n, "d": d, "k": k, "seconds": seconds, "log_det": objective})
        print(f"  {greedy:<10} n={n:,} d={d} k={k:,}: {seconds:.2f} s, log det {objective:.1f}")
    return results


# --- part 3 ----------------------------------------------------------------------------------------------


def part_trainer(size: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from spice_trainer import SpiceDataCallback

    tok, model = build(size, device, dtype, size["pool_tokens"])
    rows = random_rows(len(tok), size["pool"], size["pool_tokens"], seed=1)
    data = Dataset.from_list(rows)
    bf16 = dtype == torch.bfloat16

    class EpochClock(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.epochs: list[float] = []

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync(device)
            self.start = time.perf_counter()

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync(device)
            self.epochs.append(time.perf_counter() - self.start)

    def run(callbacks: list[Any], out: str, epochs: int) -> Trainer:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=size["batch"],
            num_train_epochs=epochs,
            learning_rate=1e-4,
            bf16=bf16,
            use_cpu=device.type == "cpu",
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=data, data_collator=default_data_collator, callbacks=callbacks
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        return trainer

    with tempfile.TemporaryDirectory() as tmp:
        clock = EpochClock()
        run([clock], f"{tmp}/full", 1)  # the full pool, one epoch
        epoch = clock.epochs[0]
        steps_per_epoch = math.ceil(size["pool"] / size["batch"])
        # Selection of 10 %; a reselection after a quarter of the subset's epoch (a shortlist of 25 % of the pool).
        config = SpiceConfig(
            budget=0.1,
            batch_size=size["batch"],
            reselect_every_steps=max(1, steps_per_epoch // 40),
            reselect_shortlist=0.25,
        )
        spice = SpiceDataCallback(config)
        run([spice], f"{tmp}/spice", 1)
    rounds = [r.seconds for r in spice.rounds]
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "pool": size["pool"],
        "tokens": size["pool_tokens"],
        "epoch_s": epoch,
        "first_round_s": rounds[0],
        "first_round_epochs": rounds[0] / epoch,
        "reselect_rounds_s": rounds[1:],
        "reselect_round_epochs": [r / epoch for r in rounds[1:]],
    }
    print(
        f"  {result['parameters'] / 1e6:.0f}M parameters, pool {size['pool']} x {size['pool_tokens']} tokens: "
        f"epoch {epoch:.1f} s; first round {rounds[0]:.1f} s = {rounds[0] / epoch:.2f} epochs (target <= 1.0); "
        f"reselection rounds {', '.join(f'{r / epoch:.2f}' for r in rounds[1:]) or '-'} epochs (target <= 0.3)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes that run on a CPU in about a minute")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="features,greedy,trainer")
    parser.add_argument("--out", default="bench/results/gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = TINY if args.tiny else FULL
    # bf16 where the device multiplies it natively; a CPU run (--tiny) keeps float32.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {dtype}, torch {torch.__version__}, sizes {'tiny' if args.tiny else 'full'}")
    report: dict[str, Any] = {"device": name, "dtype": str(dtype), "tiny": args.tiny}
    start = time.perf_counter()
    parts = args.parts.split(",")
    if "features" in parts:
        print("1. gradient features vs a plain backward")
        report["features"] = part_features(size, device, dtype, args.repeats)
    if "greedy" in parts:
        print("2. greedy")
        report["greedy"] = part_greedy(size, device)
    if "trainer" in parts:
        print("3. Trainer run with SpiceDataCallback")
        report["trainer"] = part_trainer(size, device, dtype)
    report["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"total {report['seconds']:.0f} s; figures in {out}")


if __name__ == "__main__":
    main()
