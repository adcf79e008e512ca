"""Benchmark the SPICE greedy: against submodlib's LogDeterminant LazyGreedy, and at scale.

Run: ``.venv/bin/python bench/greedy.py`` (full sizes, a few minutes) or ``--quick`` (small sizes).

1. **Versus submodlib** (n = 14,000, d = 256, k = 1,400, λ = 0, no early stopping). Both maximise the same
   function: ours ``log det(I + α F_S)`` with ``F_S = Σ_S g gᵀ``; submodlib's ``LogDeterminantFunction``
   ``log det(L_S + lambdaVal · I)`` on a dense kernel ``L = α G Gᵀ`` with ``lambdaVal = 1`` — equal by
   Sylvester's identity ``det(I_d + α G_Sᵀ G_S) = det(I_k + α G_S G_Sᵀ)``. Reported: pick overlap, whether the
   order matches, both objectives (recomputed from scratch), and time including submodlib's kernel construction.
   ``pip install submodlib-py`` (or ``.[bench]``) is needed for this part; it is skipped with the reason otherwise.
2. **Scale** (n = 100,000, d = 512, k = 10,000): stochastic and pooled greedy, wall time and peak memory
   (each in its own process, ``ru_maxrss``), on ``--threads`` CPU threads (default 2).
3. **Quality at a smaller n** (n = 20,000, k = 2,000, d = 512): objective of stochastic / pooled over exact.

Features are rows of a Gaussian mixture (clusters of similar gradients, as real pools have): raw in part 1
(unit rows would tie on the first gain, and ties break by rounding), unit-normalised in parts 2-3.

On a machine shared with other jobs, use ``--threads 1``: with more OpenMP/MKL threads than free cores, every
small parallel BLAS/VML call waits for a descheduled thread (milliseconds per call, measured below).
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


def make_features(n: int, d: int, seed: int, *, unit: bool, clusters: int = 64) -> torch.Tensor:
    """``(n, d)`` float32 rows ``center[c] + 0.7 · noise``: unit-normalised (``feature_norm="unit"``), or raw
    and scaled by ``1/√d`` so that norms vary (``α‖g‖² ≈ 1.5``) and no two rows tie on their first gain."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centers = torch.randn(clusters, d, generator=gen)
    labels = torch.randint(clusters, (n,), generator=gen)
    feats = centers[labels] + 0.7 * torch.randn(n, d, generator=gen)
    if unit:
        return feats / feats.norm(dim=1, keepdim=True)
    return feats / math.sqrt(d)


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


def run_ours(feats: torch.Tensor, k: int, greedy: str, alpha: float, **extra: Any) -> dict[str, Any]:
    cfg = SpiceConfig(
        budget=k, fisher_scale=alpha, conflict_weight=extra.pop("lam", 0.0), stop_ratio=None, greedy=greedy, **extra
    )  # type: ignore[arg-type]
    start = time.perf_counter()
    sel = select_from_features(feats, cfg)
    seconds = time.perf_counter() - start
    return {
        "indices": sel.indices,
        "seconds": seconds,
        "objective": sel.objective[-1],
        "method": sel.metadata["method"],
    }


# --- part 1: submodlib ------------------------------------------------------------------------------


def versus_submodlib(n: int, d: int, k: int, alpha: float, seed: int) -> None:
    print(f"\n== 1. exact greedy vs submodlib LogDeterminantFunction LazyGreedy: n={n}, d={d}, k={k}, λ=0 ==")
    feats = make_features(n, d, seed, unit=False)
    ours = run_ours(feats, k, "exact", alpha)
    ours_obj = logdet_from_scratch(feats, ours["indices"], alpha)
    print(f"ours (exact, {ours['method']}): {ours['seconds']:.2f} s, log det = {ours_obj:.6f}")
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
    overlap = len(set(theirs) & set(ours["indices"])) / k
    first_diff = next((t for t, (a, b) in enumerate(zip(theirs, ours["indices"], strict=True)) if a != b), None)
    print(
        f"submodlib: kernel+setup {built - start:.2f} s, LazyGreedy {done - built:.2f} s, total {total:.2f} s, "
        f"log det = {theirs_obj:.6f}"
    )
    print(
        f"same picks: overlap {overlap:.4f}, order identical: {first_diff is None}"
        + ("" if first_diff is None else f" (first difference at pick {first_diff})")
    )
    print(f"objective ours/submodlib: {ours_obj / theirs_obj:.8f}")
    print(
        f"speed-up (submodlib total / ours): {total / ours['seconds']:.1f}x "
        f"(vs LazyGreedy alone: {(done - built) / ours['seconds']:.1f}x)"
    )
    del np


# --- part 2 and 3: scale ----------------------------------------------------------------------------


def scale_child(n: int, d: int, k: int, greedy: str, alpha: float, seed: int, check: bool) -> None:
    """One scale run in this process: prints one JSON line."""
    feats = make_features(n, d, seed, unit=True)
    out = {"rss_before_mib": rss_mib(), "peak_reset": reset_peak_rss()}
    out.update(run_ours(feats, k, greedy, alpha, lam=0.1))
    out["peak_rss_mib"] = peak_rss_mib()
    out["features_mib"] = feats.numel() * feats.element_size() / 2**20
    out["picks"] = len(out["indices"])
    if check:
        out["objective_from_scratch"] = logdet_from_scratch(feats, out["indices"], alpha)
    del out["indices"]
    print(json.dumps(out))


def spawn(n: int, d: int, k: int, greedy: str, args: argparse.Namespace, check: bool = True) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        greedy,
        "--child-size",
        f"{n},{d},{k}",
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--alpha",
        str(args.alpha),
    ]
    if check:
        cmd.append("--check")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scale(n: int, d: int, k: int, n_small: int, k_small: int, args: argparse.Namespace) -> None:
    print(f"\n== 2. scale: n={n}, d={d}, k={k}, λ=0.1, {args.threads} threads (one process per run) ==")
    print(
        f"{'greedy':<11} {'seconds':>8} {'RSS before':>11} {'peak RSS':>9} {'features':>9} {'picks':>6} "
        f"{'log det':>12} {'|drift|':>9}   (MiB; peak is during the selection only)"
    )
    starred = False
    for greedy in ("stochastic", "pooled", *(("exact",) if args.scale_exact else ())):
        r = spawn(n, d, k, greedy, args)
        starred |= not r["peak_reset"]
        drift = abs(r["objective"] - r["objective_from_scratch"])
        peak = f"{r['peak_rss_mib']:.0f}" + ("" if r["peak_reset"] else "*")
        print(
            f"{greedy:<11} {r['seconds']:>8.1f} {r['rss_before_mib']:>11.0f} {peak:>9} {r['features_mib']:>9.0f} "
            f"{r['picks']:>6} {r['objective']:>12.4f} {drift:>9.2e}"
        )
    if starred:
        print("(* = the peak could not be reset and includes generating the features)")
    print(f"\n== 3. objective ratio to exact greedy: n={n_small}, d={d}, k={k_small}, λ=0.1 ==")
    exact = spawn(n_small, d, k_small, "exact", args)
    print(f"exact      {exact['seconds']:>7.1f} s  log det {exact['objective_from_scratch']:.4f}  ({exact['method']})")
    for greedy in ("stochastic", "pooled"):
        r = spawn(n_small, d, k_small, greedy, args)
        ratio = r["objective_from_scratch"] / exact["objective_from_scratch"]
        print(f"{greedy:<10} {r['seconds']:>7.1f} s  log det {r['objective_from_scratch']:.4f}  ratio {ratio:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds instead of minutes)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=1.0, help="fisher_scale α")
    parser.add_argument("--skip-submodlib", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--scale-exact", action="store_true", help="also time exact greedy at the scale size")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-size", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        n, d, k = (int(x) for x in args.child_size.split(","))
        scale_child(n, d, k, args.child, args.alpha, args.seed, args.check)
        return
    if args.quick:
        sizes = {"vs": (3000, 128, 300), "scale": (20000, 256, 2000), "small": (5000, 256, 500)}
    else:
        sizes = {"vs": (14000, 256, 1400), "scale": (100000, 512, 10000), "small": (20000, 512, 2000)}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, α = {args.alpha}, "
        f"{os.cpu_count()} CPUs, load average {load}"
    )
    if not args.skip_submodlib:
        versus_submodlib(*sizes["vs"], alpha=args.alpha, seed=args.seed)
    if not args.skip_scale:
        n, d, k = sizes["scale"]
        n_small, _, k_small = sizes["small"]
        scale(n, d, k, n_small, k_small, args)
    print(
        f"\n(the stochastic sample per pick is ⌈(n/k) ln(1/ε)⌉ = {math.ceil(10 * math.log(100))} at n/k = 10, ε = 0.01)"
    )


if __name__ == "__main__":
    main()
