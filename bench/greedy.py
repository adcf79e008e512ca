"""Benchmark the SPICE greedy: against submodlib's LogDeterminant LazyGreedy, threads, scale, and 1M rows.

Run: ``.venv/bin/python bench/greedy.py`` (full sizes, ~10 minutes on one core, most of it submodlib and the
1M-row run) or ``--quick`` (small sizes). Every timed run is the same process's work on the same features, so
the ratios hold on a loaded machine even when the seconds do not.

1. **Versus submodlib** (n = 14,000, d = 256, k = 1,400, λ = 0, no early stopping). Ours: exact greedy with the
   lazy search (the default) and with the incremental one (every row rescored at every pick). submodlib's
   ``LogDeterminantFunction`` maximises ``log det(L_S + lambdaVal · I)`` on a dense kernel ``L = α G Gᵀ`` with
   ``lambdaVal = 1``, equal to our ``log det(I + α F_S)`` by Sylvester's identity, so the picks must coincide.
   Reported: whether the three pick lists are identical, both objectives (recomputed from scratch), and the
   speed-ups against submodlib's total (kernel construction included) and its LazyGreedy alone.
   ``pip install submodlib-py`` is needed for this part (a benchmark-only dependency); skipped otherwise.
2. **Threads**: the part-1 runs of ours with 1 and with 2 torch threads, each in its own process (the thread
   policy's evidence: on a busy machine more threads than free cores make every small operation wait).
3. **Scale** (n = 100,000, d = 512, k = 10,000, λ = 0.1): exact (lazy), stochastic and pooled greedy, wall time
   and peak memory (each in its own process, ``VmHWM``); ``--scale-incremental`` adds the incremental search.
4. **1,000,000 rows** (d = 256, k = 10,000, λ = 0.1): stochastic greedy (``--million-exact`` adds exact lazy
   greedy), time and peak memory, and the objective ratio of stochastic to exact greedy on a 20,000-row
   subsample with the same rows per pick (k = 200).
5. **Quality at a smaller n** (n = 20,000, k = 2,000, d = 512): objective of stochastic / pooled over exact.

Features are rows of a Gaussian mixture (clusters of similar gradients, as real pools have): raw in parts 1-2
(unit rows would tie on the first gain, and ties break by rounding), unit-normalised in parts 3-5.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spice_trainer.config import SpiceConfig
from spice_trainer.core.greedy import select_from_features


def make_features(n: int, d: int, seed: int, *, unit: bool, clusters: int = 64, chunk: int = 65536) -> torch.Tensor:
    """``(n, d)`` float32 rows ``center[c] + 0.7 · noise``: unit-normalised (``feature_norm="unit"``), or raw
    and scaled by ``1/√d`` so that norms vary (``α‖g‖² ≈ 1.5``) and no two rows tie on their first gain.
    Generated a chunk of rows at a time (a 1M-row matrix is its own size in memory, not three times it)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centers = torch.randn(clusters, d, generator=gen)
    out = torch.empty(n, d)
    for begin in range(0, n, chunk):
        end = min(begin + chunk, n)
        labels = torch.randint(clusters, (end - begin,), generator=gen)
        block = centers[labels] + 0.7 * torch.randn(end - begin, d, generator=gen)
        out[begin:end] = block / block.norm(dim=1, keepdim=True) if unit else block / math.sqrt(d)
    return out


def logdet_from_scratch(feats: torch.Tensor, rows: list[int], alpha: float) -> float:
    g = feats[rows].double()
    d = feats.shape[1]
    return float(torch.logdet(torch.eye(d, dtype=torch.float64) + alpha * g.T @ g))


def peak_rss_mib() -> float:
    """This process's peak resident memory. ``VmHWM`` belongs to this image (``ru_maxrss`` would also count
    the parent's pages shared before ``exec``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0), so the peak covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_ours(feats: torch.Tensor, k: int, regime: str, alpha: float, threads: int, **extra: Any) -> dict[str, Any]:
    """One selection; ``regime`` is ``"lazy"`` or ``"incremental"`` (exact greedy's search), or a `greedy` name."""
    search = {"exact_search": regime} if regime in ("lazy", "incremental") else {"greedy": regime}
    cfg = SpiceConfig(
        budget=k,
        fisher_scale=alpha,
        conflict_weight=extra.pop("lam", 0.0),
        stop_rule="none",
        stop_ratio=None,
        threads=threads,
        **search,
        **extra,
    )  # type: ignore[arg-type]
    start = time.perf_counter()
    cpu = time.process_time()
    sel = select_from_features(feats, cfg)
    return {
        "indices": sel.indices,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "objective": sel.objective[-1],
        "method": sel.metadata["method"],
    }


# --- part 1: submodlib ------------------------------------------------------------------------------


def versus_submodlib(n: int, d: int, k: int, args: argparse.Namespace) -> None:
    alpha = args.alpha
    print(f"\n== 1. exact greedy vs submodlib LogDeterminantFunction LazyGreedy: n={n}, d={d}, k={k}, λ=0 ==")
    feats = make_features(n, d, args.seed, unit=False)
    lazy = run_ours(feats, k, "lazy", alpha, args.threads)
    incremental = run_ours(feats, k, "incremental", alpha, args.threads)
    lazy_obj = logdet_from_scratch(feats, lazy["indices"], alpha)
    for name, r in (("lazy", lazy), ("incremental", incremental)):
        print(f"ours ({name}, {r['method']}): {r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU")
    print(f"lazy picks == incremental picks: {lazy['indices'] == incremental['indices']}; log det = {lazy_obj:.6f}")
    print(f"incremental / lazy: {incremental['seconds'] / lazy['seconds']:.1f}x wall")
    try:
        import numpy as np
        from submodlib import LogDeterminantFunction
    except ImportError as err:
        print(f"submodlib: skipped ({err}); install with `.venv/bin/pip install submodlib-py`")
        return
    start = time.perf_counter()
    g = feats.double().numpy()
    kernel = alpha * (g @ g.T)  # the dense n × n kernel submodlib needs
    function = LogDeterminantFunction(n=n, mode="dense", lambdaVal=1.0, sijs=kernel)
    del kernel
    built = time.perf_counter()
    result = function.maximize(budget=k, optimizer="LazyGreedy", show_progress=False)
    done = time.perf_counter()
    theirs = [int(i) for i, _ in result]
    theirs_obj = logdet_from_scratch(feats, theirs, alpha)
    total = done - start
    first_diff = next((t for t, (a, b) in enumerate(zip(theirs, lazy["indices"], strict=True)) if a != b), None)
    print(
        f"submodlib: kernel+setup {built - start:.2f} s, LazyGreedy {done - built:.2f} s, total {total:.2f} s, "
        f"log det = {theirs_obj:.6f}"
    )
    print(
        f"same picks as submodlib: overlap {len(set(theirs) & set(lazy['indices'])) / k:.4f}, order identical: "
        f"{first_diff is None}" + ("" if first_diff is None else f" (first difference at pick {first_diff})")
    )
    print(f"objective ours/submodlib: {lazy_obj / theirs_obj:.8f}")
    for name, r in (("lazy", lazy), ("incremental", incremental)):
        print(
            f"speed-up of {name}: {total / r['seconds']:.1f}x submodlib's total, "
            f"{(done - built) / r['seconds']:.1f}x its LazyGreedy alone"
        )
    del np


# --- part 2: threads --------------------------------------------------------------------------------


def threads_child(n: int, d: int, k: int, args: argparse.Namespace) -> None:
    feats = make_features(n, d, args.seed, unit=False)
    out = {r: run_ours(feats, k, r, args.alpha, args.threads) for r in ("lazy", "incremental")}
    print(json.dumps({r: {"seconds": v["seconds"], "cpu_seconds": v["cpu_seconds"]} for r, v in out.items()}))


def threads_check(n: int, d: int, k: int, args: argparse.Namespace) -> None:
    print(f"\n== 2. threads: n={n}, d={d}, k={k}, each count in its own process (load {_load()}) ==")
    rows = {}
    for threads in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "threads",
            "--child-size",
            f"{n},{d},{k}",
            "--threads",
            str(threads),
        ]
        cmd += ["--seed", str(args.seed), "--alpha", str(args.alpha)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows[threads] = json.loads(proc.stdout.strip().splitlines()[-1])
    for search in ("lazy", "incremental"):
        one, two = rows[1][search], rows[2][search]
        print(
            f"{search:<12} 1 thread {one['seconds']:7.2f} s, 2 threads {two['seconds']:7.2f} s wall "
            f"({two['seconds'] / one['seconds']:.1f}x; CPU {one['cpu_seconds']:.2f} vs {two['cpu_seconds']:.2f} s)"
        )


# --- parts 3-5: scale -------------------------------------------------------------------------------


def scale_child(n: int, d: int, k: int, regime: str, args: argparse.Namespace) -> None:
    """One scale run in this process: prints one JSON line."""
    feats = make_features(n, d, args.seed, unit=True)
    # A tiny selection first: torch's kernels are paged in (file-backed RSS, hundreds of MiB) before the peak
    # is reset, so that the peak counts the selection's own memory.
    run_ours(make_features(500, d, args.seed + 1, unit=True), 20, regime, args.alpha, args.threads, lam=0.1)
    out = {"rss_before_mib": rss_mib(), "peak_reset": reset_peak_rss()}
    extra: dict[str, Any] = {"lam": 0.1}
    if regime == "stochastic":
        extra["seed"] = args.seed
    out.update(run_ours(feats, k, regime, args.alpha, args.threads, **extra))
    out["peak_rss_mib"] = peak_rss_mib()
    out["features_mib"] = feats.numel() * feats.element_size() / 2**20
    out["picks"] = len(out["indices"])
    if args.check:
        out["objective_from_scratch"] = logdet_from_scratch(feats, out["indices"], args.alpha)
    del out["indices"]
    print(json.dumps(out))


def spawn(n: int, d: int, k: int, regime: str, args: argparse.Namespace, check: bool = True) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", regime, "--child-size", f"{n},{d},{k}", "--threads", str(args.threads)]
    cmd += ["--seed", str(args.seed), "--alpha", str(args.alpha)] + (["--check"] if check else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_scale_row(name: str, r: dict[str, Any]) -> None:
    peak = f"{r['peak_rss_mib']:.0f}" + ("" if r["peak_reset"] else "*")
    drift = abs(r["objective"] - r["objective_from_scratch"]) if "objective_from_scratch" in r else float("nan")
    print(
        f"{name:<18} {r['seconds']:>8.1f} {r['rss_before_mib']:>11.0f} {peak:>9} {r['features_mib']:>9.0f} "
        f"{r['picks']:>6} {r['objective']:>12.4f} {drift:>9.2e}"
    )


HEADER = (
    f"{'greedy':<18} {'seconds':>8} {'RSS before':>11} {'peak RSS':>9} {'features':>9} {'picks':>6} "
    f"{'log det':>12} {'|drift|':>9}   (MiB; peak is during the selection only)"
)


def scale(n: int, d: int, k: int, args: argparse.Namespace) -> None:
    print(f"\n== 3. scale: n={n}, d={d}, k={k}, λ=0.1, {args.threads} thread(s), one process per run ==")
    print(HEADER)
    regimes = ("lazy", "stochastic", "pooled", *(("incremental",) if args.scale_incremental else ()))
    for regime in regimes:
        print_scale_row(
            "exact (" + regime + ")" if regime in ("lazy", "incremental") else regime, spawn(n, d, k, regime, args)
        )


def million(n: int, d: int, k: int, n_sub: int, args: argparse.Namespace) -> None:
    print(f"\n== 4. {n:,} rows: d={d}, k={k}, λ=0.1, {args.threads} thread(s) ==")
    print(HEADER)
    # The objective from scratch needs k×d rows of a 1M-row matrix only: cheap; keep it as the drift check.
    for regime in ("stochastic", *(("lazy",) if args.million_exact else ())):
        print_scale_row("exact (lazy)" if regime == "lazy" else regime, spawn(n, d, k, regime, args))
    k_sub = max(1, round(k * n_sub / n))
    exact = spawn(n_sub, d, k_sub, "lazy", args)
    stoch = spawn(n_sub, d, k_sub, "stochastic", args)
    ratio = stoch["objective_from_scratch"] / exact["objective_from_scratch"]
    print(
        f"subsample n={n_sub}, k={k_sub} (same rows per pick): stochastic log det {stoch['objective_from_scratch']:.4f}"
        f" / exact {exact['objective_from_scratch']:.4f} = {ratio:.4f} (exact {exact['seconds']:.1f} s, "
        f"stochastic {stoch['seconds']:.1f} s)"
    )


def quality(n: int, d: int, k: int, args: argparse.Namespace) -> None:
    print(f"\n== 5. objective ratio to exact greedy: n={n}, d={d}, k={k}, λ=0.1 ==")
    exact = spawn(n, d, k, "lazy", args)
    print(f"exact      {exact['seconds']:>7.1f} s  log det {exact['objective_from_scratch']:.4f}  ({exact['method']})")
    for regime in ("stochastic", "pooled"):
        r = spawn(n, d, k, regime, args)
        ratio = r["objective_from_scratch"] / exact["objective_from_scratch"]
        print(f"{regime:<10} {r['seconds']:>7.1f} s  log det {r['objective_from_scratch']:.4f}  ratio {ratio:.4f}")


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds instead of minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; see part 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=1.0, help="fisher_scale α")
    parser.add_argument("--skip-submodlib", action="store_true")
    parser.add_argument("--skip-threads", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-million", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--scale-incremental", action="store_true", help="also time the incremental search at scale")
    parser.add_argument("--million-exact", action="store_true", help="also time exact (lazy) greedy on 1M rows")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-size", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        n, d, k = (int(x) for x in args.child_size.split(","))
        if args.child == "threads":
            threads_child(n, d, k, args)
        else:
            scale_child(n, d, k, args.child, args)
        return
    if args.quick:
        sizes = {"vs": (3000, 128, 300), "scale": (20000, 256, 2000), "million": (100000, 64, 1000, 10000)}
        sizes["small"] = (5000, 256, 500)
    else:
        sizes = {"vs": (14000, 256, 1400), "scale": (100000, 512, 10000), "million": (1000000, 256, 10000, 20000)}
        sizes["small"] = (20000, 512, 2000)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), α = {args.alpha}, "
        f"{os.cpu_count()} CPUs, load average {_load()}"
    )
    if not args.skip_submodlib:
        versus_submodlib(*sizes["vs"], args)
    if not args.skip_threads:
        threads_check(*sizes["vs"], args)
    if not args.skip_scale:
        scale(*sizes["scale"], args)
    if not args.skip_million:
        million(*sizes["million"], args)
    if not args.skip_quality:
        quality(*sizes["small"], args)
    print(f"\n(load average at the end: {_load()})")


if __name__ == "__main__":
    main()
