"""Benchmark the per-example gradient features against a plain backward and a LESS-style loop.

Run: ``.venv/bin/python bench/gradients.py`` (a Llama-style model of ~26M parameters, a few minutes on 2 cores)
or ``--quick`` (a small model, well under a minute).

The model is a randomly initialised Llama (``spice_trainer.demo.toy``) with a LoRA adapter (r = 8) on every linear
layer; rows are random token sequences with ``labels = input_ids``. Three methods, each in a fresh process so
that its peak memory is its own (peak RSS at the end minus the RSS after the model is built):

a. **baseline** — a plain batched forward + ``loss.backward()`` of the same batch in train mode, filling the LoRA
   parameters' ``.grad`` (what one training step costs before the optimizer).
b. **ours** — ``compute_gradient_features`` on the same rows (one batched forward, one ``torch.autograd.grad``
   w.r.t. the captured LoRA outputs, per-example ``einsum``s, blockwise seeded projection).
c. **LESS-style loop** — one example at a time: forward, ``loss.backward()``, flatten the LoRA ``.grad``s and
   multiply by a dense ``D × d`` projection matrix materialised once (the same matrix ours generates block by
   block, so the features must agree: the cosine of (b) and (c) on the first rows is printed).

Targets: ours ≥ 0.8 × the baseline's examples/s, ≥ 1.5 × the loop's, peak memory
O(batch) and never O(D × d). ``--profile`` adds a ``torch.profiler`` table of where ours spends its time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spice_trainer.config import SpiceConfig
from spice_trainer.core.projection import BLOCK_ROWS, BlockProjector
from spice_trainer.demo.toy import add_lora, build_model, build_tokenizer
from spice_trainer.features.gradients import _stable_key, compute_gradient_features, find_lora_weights

SIZES: dict[str, dict[str, int]] = {
    # ~26M parameters: 8.2M in the embedding and the LM head, 2.9M per decoder layer.
    "full": {
        "vocab": 8000,
        "hidden": 512,
        "layers": 6,
        "heads": 8,
        "intermediate": 1376,
        "seq": 256,
        "batch": 16,
        "batches": 2,
        "loop_examples": 8,
    },
    "quick": {
        "vocab": 2000,
        "hidden": 128,
        "layers": 2,
        "heads": 4,
        "intermediate": 344,
        "seq": 64,
        "batch": 8,
        "batches": 4,
        "loop_examples": 4,
    },
}
PROJ_DIM = 256
LORA_R = 8
COSINE_ROWS = 4


# --- memory -----------------------------------------------------------------------------------------------


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0), so the peak covers only what follows the model build."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident memory: ``VmHWM`` (reset after the build), else ``getrusage(RUSAGE_SELF).ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --- model and rows ---------------------------------------------------------------------------------------


def build(size: dict[str, int]) -> tuple[Any, list[dict[str, list[int]]], dict[str, int]]:
    """The LoRA-wrapped model and the rows: ``batches`` timed batches, then one warm-up batch."""
    words = [f"w{i}" for i in range(size["vocab"] - 7)]  # + 7 special tokens = vocab
    tok = build_tokenizer(words)
    base = build_model(
        tok,
        family="llama",
        hidden_size=size["hidden"],
        num_layers=size["layers"],
        num_heads=size["heads"],
        intermediate_size=size["intermediate"],
        max_positions=size["seq"],
        seed=0,
    )
    counts = {"params": sum(p.numel() for p in base.parameters())}
    model = add_lora(base, r=LORA_R, target_modules="all-linear", seed=0)
    counts["lora_params"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    n_rows = (size["batches"] + 1) * size["batch"]
    ids = torch.randint(7, size["vocab"], (n_rows, size["seq"]), generator=gen)
    rows = [{"input_ids": r.tolist()} for r in ids]
    return model, rows, counts


def dense_projection(model: Any) -> torch.Tensor:
    """The ``(D, d)`` matrix ours applies block by block, materialised whole (LESS keeps it in memory).

    Rows follow ``find_lora_weights``' order (A then B of every layer, weights flattened row-major as
    ``param.grad.flatten()``), so ``concat(grads) @ P`` equals the sum of ours' per-weight projections.
    """
    cfg = SpiceConfig()
    _, lora = find_lora_weights(model)
    blocks = [
        BlockProjector(m.weight.numel(), PROJ_DIM, cfg.projection, cfg.seed, _stable_key(name)).matrix()
        for name, m in lora
    ]
    return torch.cat(blocks, dim=0)


# --- the three methods (each runs in its own process) ----------------------------------------------------


def batch_tensors(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run_baseline(model: Any, rows: list[dict[str, list[int]]], size: dict[str, int]) -> dict[str, Any]:
    bs, nb = size["batch"], size["batches"]
    model.train()

    def step(batch_rows: list[dict[str, list[int]]]) -> None:
        loss = model(**batch_tensors(batch_rows), use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(rows[nb * bs :])  # warm-up
    start = time.perf_counter()
    for b in range(nb):
        step(rows[b * bs : (b + 1) * bs])
    seconds = time.perf_counter() - start
    return {"examples": nb * bs, "seconds": seconds}


def run_ours(
    model: Any, rows: list[dict[str, list[int]]], size: dict[str, int], profile: bool, feats_path: str | None
) -> dict[str, Any]:
    bs, nb = size["batch"], size["batches"]
    cfg = SpiceConfig(proj_dim=PROJ_DIM, batch_size=bs)
    warm = list(range(nb * bs, (nb + 1) * bs))
    timed = list(range(nb * bs))
    compute_gradient_features(model, rows, cfg, indices=warm, show_progress=False)
    start = time.perf_counter()
    out = compute_gradient_features(model, rows, cfg, indices=timed, show_progress=False)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"examples": nb * bs, "seconds": seconds}
    # What streaming P costs: every block of every LoRA weight generated once (per batch when P is not cached).
    _, lora = find_lora_weights(model)
    start = time.perf_counter()
    for name, m in lora:
        projector = BlockProjector(m.weight.numel(), PROJ_DIM, cfg.projection, cfg.seed, _stable_key(name))
        for index in range(math.ceil(projector.in_dim / BLOCK_ROWS)):
            projector.block(index)
    result["projection_generation_seconds"] = time.perf_counter() - start
    if feats_path:
        torch.save(out.features[:COSINE_ROWS].clone(), feats_path)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            compute_gradient_features(model, rows, cfg, indices=timed[:bs], show_progress=False)
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    return result


def run_loop(
    model: Any, rows: list[dict[str, list[int]]], size: dict[str, int], feats_path: str | None
) -> dict[str, Any]:
    start = time.perf_counter()
    proj = dense_projection(model)
    build_seconds = time.perf_counter() - start
    params = [m.weight for _, m in find_lora_weights(model)[1]]
    model.eval()  # the same mode as ours (no dropout in either)

    def one(row: dict[str, list[int]]) -> torch.Tensor:
        loss = model(**batch_tensors([row]), use_cache=False).loss
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        model.zero_grad(set_to_none=True)
        return flat @ proj

    one(rows[-1])  # warm-up
    k = size["loop_examples"]
    start = time.perf_counter()
    feats = torch.stack([one(rows[i]) for i in range(k)])
    seconds = time.perf_counter() - start
    if feats_path:
        torch.save(feats[:COSINE_ROWS].clone(), feats_path)
    return {
        "examples": k,
        "seconds": seconds,
        "projection_mib": proj.numel() * proj.element_size() / 2**20,
        "projection_shape": list(proj.shape),
        "projection_build_seconds": build_seconds,
    }


def child(method: str, size: dict[str, int], threads: int, profile: bool, feats_path: str | None) -> None:
    torch.set_num_threads(threads)
    model, rows, counts = build(size)
    rss_after_build = rss_mib()
    reset = reset_peak_rss()
    if method == "baseline":
        result = run_baseline(model, rows, size)
    elif method == "ours":
        result = run_ours(model, rows, size, profile, feats_path)
    else:
        result = run_loop(model, rows, size, feats_path)
    result.update(counts)
    result["rss_after_build_mib"] = rss_after_build
    result["peak_rss_mib"] = peak_rss_mib()
    result["peak_reset"] = reset
    result["peak_over_build_mib"] = result["peak_rss_mib"] - rss_after_build
    print("RESULT " + json.dumps(result))


# --- the parent: run each method in a fresh process, compare ------------------------------------------------


def run_child(method: str, args: argparse.Namespace, feats_path: str | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", method, "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    if args.profile:
        cmd.append("--profile")
    for flag, value in (("--seq", args.seq), ("--batch", args.batch)):
        if value is not None:
            cmd += [flag, str(value)]
    if feats_path:
        cmd += ["--feats", feats_path]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model for a smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per method (default 2)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table for ours")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three methods; best round counts")
    parser.add_argument("--seq", type=int, help="tokens per row (default 256; --quick 64)")
    parser.add_argument("--batch", type=int, help="rows per batch (default 16; --quick 8)")
    parser.add_argument("--child", choices=["baseline", "ours", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--feats", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = dict(SIZES["quick" if args.quick else "full"])
    size.update({k: v for k, v in (("seq", args.seq), ("batch", args.batch)) if v is not None})
    if args.child:
        child(args.child, size, args.threads, args.profile, args.feats)
        return

    print(
        f"model: Llama hidden {size['hidden']}, {size['layers']} layers, vocab {size['vocab']}; "
        f"LoRA r={LORA_R} on all linear layers; batches of {size['batch']} x {size['seq']} tokens; "
        f"proj_dim {PROJ_DIM}; {args.threads} threads; load average {os.getloadavg()[0]:.2f}"
    )
    wall = time.perf_counter()
    labels = {
        "baseline": "(a) batched forward+backward",
        "ours": "(b) ours: compute_gradient_features",
        "loop": "(c) LESS loop + dense projection",
    }
    # Rounds interleave the methods, so a burst of load on a shared machine hits all three alike; each method's
    # best round is its figure (timeit's rule: slower rounds measure the machine, not the method).
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in labels}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.repeats):
            for method in labels:
                feats = f"{tmp}/{method}.pt" if round_index == 0 and method != "baseline" else None
                runs[method].append(run_child(method, args, feats))
        ours_feats = torch.load(f"{tmp}/ours.pt")
        loop_feats = torch.load(f"{tmp}/loop.pt")
    results = {method: max(rs, key=lambda r: r["examples"] / r["seconds"]) for method, rs in runs.items()}
    loop = results["loop"]
    print(
        f"parameters: {results['ours']['params'] / 1e6:.1f}M (base), LoRA D = {results['ours']['lora_params']:,}; "
        f"LESS dense projection {tuple(loop['projection_shape'])} = {loop['projection_mib']:.0f} MiB "
        f"(built in {loop['projection_build_seconds']:.1f} s, not counted)"
    )
    print()
    rounds = f"ex/s, best of {args.repeats}" if args.repeats > 1 else "ex/s"
    print(f"{'method':<36} {'examples':>8} {'seconds':>8} {rounds:>16} {'all rounds':>18} {'peak RSS over build':>20}")
    rates = {}
    for method, r in results.items():
        rates[method] = r["examples"] / r["seconds"]
        every = ", ".join(f"{x['examples'] / x['seconds']:.2f}" for x in runs[method])
        peak = f"{max(x['peak_over_build_mib'] for x in runs[method]):.0f} MiB" + ("" if r["peak_reset"] else "*")
        print(
            f"{labels[method]:<36} {r['examples']:>8} {r['seconds']:>8.2f} {rates[method]:>16.2f} {every:>18} "
            f"{peak:>20}"
        )
    print("(peak RSS: the highest over rounds; * = ru_maxrss, VmHWM could not be reset)")
    print()
    to_base = rates["ours"] / rates["baseline"]
    to_loop = rates["ours"] / rates["loop"]
    ours = results["ours"]
    per_batch = ours["seconds"] / (ours["examples"] / size["batch"])
    print(
        f"ours: {per_batch:.2f} s per batch of {size['batch']}, of which generating all of P once takes "
        f"{ours['projection_generation_seconds']:.2f} s (paid per batch when P is over the projector cache)"
    )
    print(f"ours / (a) baseline: {to_base:.2f}x  (target >= 0.8: {'met' if to_base >= 0.8 else 'MISSED'})")
    print(f"ours / (c) LESS loop: {to_loop:.2f}x  (target >= 1.5: {'met' if to_loop >= 1.5 else 'MISSED'})")
    print(
        f"(a) / (c) = {rates['baseline'] / rates['loop']:.2f}x: what batching alone gains over one row at a time here, "
        "the most any method costing one batched forward+backward can gain over the loop"
    )
    if args.quick:
        print("(--quick is a smoke run: at this size per-call overheads dominate; the targets are for the full size)")
    cos = torch.nn.functional.cosine_similarity(ours_feats.double(), loop_feats.double(), dim=1)
    rel = (ours_feats - loop_feats).norm(dim=1) / loop_feats.norm(dim=1)
    print(
        f"features (b) vs (c), first {len(cos)} rows: cosine {', '.join(f'{c:.6f}' for c in cos.tolist())}; "
        f"max relative difference {rel.max().item():.1e}"
    )
    if not bool((cos > 0.999).all()) or not math.isfinite(float(rel.max())):
        print("WARNING: (b) and (c) disagree; the comparison is not of equal work")
    if args.profile:
        print("\nwhere ours spends its time (one batch, torch.profiler, self CPU time):")
        print(results["ours"]["profile"])
    print(f"\ntotal wall time {time.perf_counter() - wall:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
