"""Proxy benchmark: selecting with a ~4x smaller model of the same family vs the live model, on one pool.

World: `spice_trainer.demo.world` — a target Llama (``--target-hidden``, default 128) and a proxy Llama
(``--proxy-hidden``, default 64; same depth, so about 4x fewer weights) each pretrained on the same easy
corpus with the same tokenizer, and one candidate pool (``--scenario``, default ``curated``) whose rows carry
a hidden kind. Both get a fresh LoRA (r = 8; the proxy's is shaped like the target's by `ProxyModel`).

Measured on the same pool and config (`SpiceConfig(budget=0.1)`, the defaults); every time is the minimum
over ``--repeats`` runs taken in alternation (live, proxy, live, proxy, ...), since the machine is shared:

1. **exact greedy**: `spice_trainer.pipeline.select` on the target (the baseline) vs `ProxyModel.select` —
   selection seconds (gradient pass + greedy) and their ratio; the overlap of the two selections
   (``|S_proxy ∩ S_target| / k``); Spearman's ρ of the base gains ``log(1 + α‖g‖²)`` over the whole pool;
   the per-round agreement report (`proxy_agreement`, the 64-row probe the callback logs);
2. **the paper's online regime** (``greedy="pooled"``, 120 → 12, ``T = 10``): the target's pooled greedy vs
   `ProxyModel.select_online` (the proxy's adapter takes AdamW steps on its picks every 10 pools);
3. **compute-bound timing**: the world's rows are ~10 tokens and its models tiny, so per-batch overheads
   (hooks, per-module products, projection) dominate the gradient pass. The same comparison on
   randomly initialised Llamas of hidden 256 vs 128 (4 layers, ~4x fewer weights) and 256 rows of 128
   tokens shows the ratio where the forward/backward dominates, as it does for real LLMs;
4. unless ``--no-train``: each selection's rows fine-tune a fresh target LoRA (20 epochs, as in
   `bench/quality.py`) and are scored by exact match on the held-out set, with random 10 % for reference;
   and the share of clean rows in each selection.

    python bench/proxy.py               # pool of 2000 rows: ~10 min on 2 shared CPU cores
    python bench/proxy.py --quick       # pool of 1000 rows, smaller pretraining, 1 repeat: ~3 min
    python bench/proxy.py --no-train    # selection figures only
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.core.selection import Selection
from spice_trainer.demo import world
from spice_trainer.demo.toy import add_lora, build_model
from spice_trainer.features.gradients import compute_gradient_features
from spice_trainer.pipeline import select
from spice_trainer.proxy.agreement import proxy_agreement, spearman
from spice_trainer.proxy.model import ProxyModel

TRAIN: dict[str, Any] = {"learning_rate": 5e-3, "batch_size": 16}


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _overlap(a: Selection, b: Selection) -> float:
    k = max(len(a.selected), 1)
    return len(set(a.selected) & set(b.selected)) / k


def _base_gains(model: Any, rows: list[dict[str, Any]], config: SpiceConfig) -> torch.Tensor:
    feats = compute_gradient_features(model, rows, config, show_progress=False).features
    return torch.log1p(config.fisher_scale * feats.double().square().sum(dim=1))


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _alternating(fns: dict[str, Any], repeats: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Run each function ``repeats`` times, interleaved; return the last results and the minimum seconds."""
    results: dict[str, Any] = {}
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            results[name], seconds = _timed(fn)
            best[name] = min(best[name], seconds)
    return results, best


def compute_bound_timing(tokenizer: Any, config: SpiceConfig, repeats: int, seed: int) -> dict[str, float]:
    """Selection seconds of hidden-256 vs hidden-128 Llamas (4 layers) on 256 random rows of 128 tokens."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = [{"input_ids": torch.randint(7, len(tokenizer), (128,), generator=gen).tolist()} for _ in range(256)]
    cfg = config.with_changes(min_loss=None, max_loss_quantile=None)  # random weights: no loss structure

    def llama(hidden: int) -> Any:
        return build_model(
            tokenizer, hidden_size=hidden, num_layers=4, num_heads=8, intermediate_size=4 * hidden, max_positions=256
        )

    target = add_lora(llama(256), r=8, alpha=16, init_b_random=False, seed=seed)
    proxy = ProxyModel(llama(128), cfg, target=target, tokenizer=tokenizer)
    _, best = _alternating(
        {"target": lambda: select(target, rows, cfg, show_progress=False), "proxy": lambda: proxy.select(rows, cfg)},
        repeats,
    )
    return {
        "target_weights": float(_params(target)),
        "proxy_weights": float(_params(proxy.model)),
        "target_seconds": best["target"],
        "proxy_seconds": best["proxy"],
        "speedup": best["target"] / best["proxy"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pool of 1000 rows, 1500 pretraining rows")
    parser.add_argument("--pool-rows", type=int, help="candidate rows (default 2000; --quick 1000)")
    parser.add_argument("--scenario", default="curated", choices=["curated", "noisy"])
    parser.add_argument("--target-hidden", type=int, default=128)
    parser.add_argument("--proxy-hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=20.0, help="fine-tuning epochs per selection")
    parser.add_argument("--no-train", action="store_true", help="skip the fine-tuning and accuracy step")
    parser.add_argument("--repeats", type=int, help="timed runs per method, interleaved (default 3; --quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models)")
    parser.add_argument("--out", default="bench/results/proxy", help="folder for results.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.pool_rows or (1000 if args.quick else 2000)
    pretrain_rows = 1500 if args.quick else 3000
    seed = args.seed
    repeats = args.repeats or (1 if args.quick else 3)

    print(f"pretraining target (hidden {args.target_hidden}) and proxy (hidden {args.proxy_hidden}) ...", flush=True)
    (tokenizer, target_base), t_target_pre = _timed(
        lambda: world.build_world(
            seed,
            hidden_size=args.target_hidden,
            num_layers=args.layers,
            pretrain_rows=pretrain_rows,
            pretrain_hard_share=0.03,
        )
    )
    (proxy_tokenizer, proxy_base), t_proxy_pre = _timed(
        lambda: world.build_world(
            seed + 1,
            hidden_size=args.proxy_hidden,
            num_layers=args.layers,
            pretrain_rows=pretrain_rows,
            pretrain_hard_share=0.03,
        )
    )
    assert proxy_tokenizer.get_vocab() == tokenizer.get_vocab()
    ratio_params = _params(target_base) / _params(proxy_base)
    print(
        f"  target {_params(target_base) / 1e6:.3f}M weights ({t_target_pre:.0f} s), proxy "
        f"{_params(proxy_base) / 1e6:.3f}M ({t_proxy_pre:.0f} s): {ratio_params:.2f}x smaller"
    )
    pool = world.candidate_pool(n, args.scenario, seed=seed)
    rows = world.tokenize_rows(tokenizer, pool.rows)
    config = SpiceConfig(budget=0.1, seed=seed)
    pooled = config.with_changes(greedy="pooled")

    def fresh_target() -> Any:
        return add_lora(copy.deepcopy(target_base), r=8, alpha=16, init_b_random=False, seed=seed)

    target = fresh_target()
    results: dict[str, Any] = {
        "pool_rows": n,
        "scenario": args.scenario,
        "target_weights": _params(target_base),
        "proxy_weights": _params(proxy_base),
        "threads": args.threads,
    }
    selections: dict[str, Selection] = {}

    # 1. exact greedy: live model vs proxy.
    print("exact greedy ...", flush=True)
    proxy, t_build = _timed(lambda: ProxyModel(copy.deepcopy(proxy_base), config, target=target, tokenizer=tokenizer))
    exact, best = _alternating(
        {
            "target exact": lambda: select(target, rows, config, show_progress=False),
            "proxy exact": lambda: proxy.select(rows, config),
        },
        repeats,
    )
    selections.update(exact)
    rho_pool = spearman(_base_gains(proxy.model, rows, config), _base_gains(target, rows, config))
    agreement = proxy_agreement(proxy, target, rows, config)
    results["exact"] = {
        "target_seconds": best["target exact"],
        "proxy_seconds": best["proxy exact"],
        "proxy_build_seconds": t_build,
        "speedup": best["target exact"] / best["proxy exact"],
        "overlap": _overlap(selections["proxy exact"], selections["target exact"]),
        "rank_corr_pool": rho_pool,
        "probe_rank_corr": agreement.rank_corr,
        "probe_overlap": agreement.overlap,
        "probe_seconds": agreement.seconds,
    }

    # 2. the paper's online regime: pools of 120, 12 picks each, the proxy steps every T = 10 pools.
    print("pooled / online ...", flush=True)
    online_proxies: list[ProxyModel] = []

    def online() -> Selection:
        online_proxies.append(ProxyModel(copy.deepcopy(proxy_base), pooled, target=target, tokenizer=tokenizer))
        return online_proxies[-1].select_online(rows, pooled)

    streamed, best = _alternating(
        {"target pooled": lambda: select(target, rows, pooled, show_progress=False), "proxy online": online},
        repeats,
    )
    selections.update(streamed)
    online_meta = selections["proxy online"].metadata
    results["pooled"] = {
        "target_seconds": best["target pooled"],
        "proxy_seconds": best["proxy online"],
        "speedup": best["target pooled"] / best["proxy online"],
        "refresh_steps": online_meta["refresh_steps"],
        "refresh_seconds": online_meta["refresh_seconds"],
        "pools_visited": online_meta["pools_visited"],
        "overlap": _overlap(selections["proxy online"], selections["target pooled"]),
        "overlap_with_target_exact": _overlap(selections["proxy online"], selections["target exact"]),
    }

    # 3. the same comparison where the forward/backward dominates.
    print("compute-bound timing ...", flush=True)
    results["compute_bound"] = compute_bound_timing(tokenizer, config, repeats, seed)

    # 4. what each selection is worth to the target.
    budget = config.budget_count(n)
    gen = torch.Generator(device="cpu").manual_seed(10_000 + seed)
    chosen: dict[str, list[int]] = {name: sel.selected for name, sel in selections.items()}
    chosen["random 10 %"] = torch.randperm(n, generator=gen)[:budget].tolist()
    quality: dict[str, dict[str, float]] = {}
    tests = world.heldout_set(50 if args.quick else 100, seed=seed + 7)
    for name, indices in chosen.items():
        entry = {"rows": float(len(indices)), "clean_share": pool.kind_shares(indices)["clean"]}
        if not args.no_train:
            print(f"fine-tuning on {name} ...", flush=True)
            model = fresh_target()
            world.finetune(model, tokenizer, [pool.rows[i] for i in indices], epochs=args.epochs, seed=seed, **TRAIN)
            entry["accuracy"] = world.evaluate(model, tokenizer, tests)["mean"]
        quality[name] = entry
    results["quality"] = quality

    ex, po, cb = results["exact"], results["pooled"], results["compute_bound"]
    print()
    print(f"pool {n} rows ({args.scenario}), budget {budget}, target/proxy weights {ratio_params:.2f}x")
    print("| regime | live model | proxy | speed-up | overlap of selections |")
    print("|---|---|---|---|---|")
    print(
        f"| exact greedy | {ex['target_seconds']:.1f} s | {ex['proxy_seconds']:.1f} s | {ex['speedup']:.2f}x "
        f"| {ex['overlap']:.2f} |"
    )
    print(
        f"| pooled 120→12 (proxy online, {po['refresh_steps']} refresh steps) | {po['target_seconds']:.1f} s "
        f"| {po['proxy_seconds']:.1f} s | {po['speedup']:.2f}x | {po['overlap']:.2f} |"
    )
    print(
        f"| compute-bound (hidden 256 vs 128, 4 layers, 256 rows x 128 tokens; "
        f"{cb['target_weights'] / cb['proxy_weights']:.2f}x weights) | {cb['target_seconds']:.1f} s "
        f"| {cb['proxy_seconds']:.1f} s | {cb['speedup']:.2f}x | (random weights) |"
    )
    print(
        f"agreement: Spearman ρ of base gains over the pool {ex['rank_corr_pool']:.3f}; probe of 64 rows: "
        f"ρ {ex['probe_rank_corr']:.3f}, overlap {ex['probe_overlap']:.2f} ({ex['probe_seconds']:.1f} s)"
    )
    print()
    print("| selection | rows | clean share |" + ("" if args.no_train else " accuracy |"))
    print("|---|---|---|" + ("" if args.no_train else "---|"))
    for name, entry in quality.items():
        acc = "" if args.no_train else f" {entry['accuracy']:.3f} |"
        print(f"| {name} | {int(entry['rows'])} | {entry['clean_share']:.0%} |{acc}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
