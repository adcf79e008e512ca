"""`select`: gradient features, candidate guards, then the SPICE greedy, in one call.

In a single process without a feature store this is the plain path: one gradient pass over the whole
dataset, then `select_from_features`; with the loss-quantile guard on, losses come first from a forward pass
and gradients only of the rows the guards admit (`_guarded_features`: the same selection for less work).
Under ``torch.distributed`` with more than one process (torchrun, accelerate, DeepSpeed, FSDP2), and whenever
``config.feature_store`` is set, the sharded path runs instead (`spice_trainer.distributed.comm`): each rank
computes its own rows (read back from the store where a chunk is already complete; in lockstep when the
model itself is sharded), losses are gathered so that every rank applies the same guards, and the greedy
runs either on the gathered features or distributed over the shards. With ``config.reselect_shortlist`` and
a run's `FeatureCache`, rounds after the first measure a shortlist only (`_select_shortlist`). Every rank
returns the same `Selection`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.core.greedy import progress_bar, select_from_features
from spice_trainer.core.guards import Guards, candidate_guards
from spice_trainer.core.selection import Selection
from spice_trainer.distributed import comm as sd
from spice_trainer.distributed.greedy import distributed_greedy
from spice_trainer.features.batches import output_vocab_size
from spice_trainer.features.fingerprint import content_fingerprint, dataset_fingerprint
from spice_trainer.features.gradients import (
    GradientFeatures,
    Lockstep,
    compute_gradient_features,
    compute_losses,
    is_sharded_model,
)
from spice_trainer.features.reselect import FeatureCache, shortlist
from spice_trainer.features.store import FeatureStore, default_chunk_rows, store_fingerprint

logger = logging.getLogger(__name__)


def row_guards(grads: GradientFeatures, config: SpiceConfig) -> Guards:
    """The candidate guards (`spice_trainer.core.guards.candidate_guards`) on one gradient pass's numbers.

    A row is ineligible without a supervised token, with a non-finite loss or non-finite gradient features, at
    or below ``config.min_loss`` (solved), or above the optional ``max_loss_quantile`` cap; an eligible row whose
    least likely label token is more surprising than ``config.surprise_threshold`` counts with a weight below 1.
    """
    return candidate_guards(
        grads.losses,
        grads.num_tokens,
        config,
        max_token_losses=grads.max_token_losses,
        vocab_size=grads.vocab_size,
        finite_features=torch.isfinite(grads.features).all(dim=1),
    )


def select(
    model: Any,
    dataset: Any,
    config: SpiceConfig,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    *,
    initial: Sequence[int] | None = None,
    reference_gain: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    show_progress: bool = True,
    feature_cache: FeatureCache | None = None,
) -> Selection:
    """Select a subset of ``dataset`` with SPICE using ``model``'s LoRA gradients.

    Computes per-example projected adapter gradients (`compute_gradient_features`), excludes rows
    that cannot be picked and weights the rest (`row_guards`), and runs the greedy of `select_from_features`.

    Args:
        model: a PEFT LoRA causal LM (the live model or a proxy of the same family).
        dataset: indexable rows with ``input_ids`` (and optionally ``labels`` / ``completion_mask``).
        config: the selection settings.
        data_collator: turns a list of rows into a batch; `None` pads with the model's pad token.
        initial: rows already selected (mode ``"grow"``); they count towards the budget.
        reference_gain: base of the early-stopping threshold; `None` uses this call's first gain.
        optimizer: the live optimizer, needed for ``feature_norm="adam"``.
        show_progress: show a progress bar over the gradient pass and the greedy.
        feature_cache: a run's memory of earlier rounds (`spice_trainer.features.reselect.FeatureCache`, one
            per training run). Every round records into it; with ``config.reselect_shortlist`` set and a
            usable memory, the round measures only a shortlist of rows (`_select_shortlist`).

    Multi-process: when ``torch.distributed`` is initialised with world size > 1, every rank must call
    this with the same dataset and config; each computes the gradients of its shard of rows
    (`spice_trainer.distributed.shard_rows`) and all ranks return the same `Selection` (see
    `_select_sharded`). With ``config.feature_store`` set, features go through the on-disk store.

    Returns:
        The `Selection`; ``metadata`` holds the timings and how many rows were excluded and why.
    """
    n = len(dataset)
    if feature_cache is not None and config.reselect_shortlist is not None and feature_cache.usable(n, config):
        return _select_shortlist(
            model,
            dataset,
            config,
            data_collator,
            cache=feature_cache,
            initial=initial,
            reference_gain=reference_gain,
            optimizer=optimizer,
            show_progress=show_progress,
        )
    if sd.is_distributed() or config.feature_store is not None:
        return _select_sharded(
            model,
            dataset,
            config,
            data_collator,
            initial=initial,
            reference_gain=reference_gain,
            optimizer=optimizer,
            show_progress=show_progress,
            feature_cache=feature_cache,
        )
    start = time.perf_counter()
    measured: torch.Tensor | None = None  # rows whose features were computed (None: every row)
    if _losses_first_pays(config, n):
        grads, measured = _guarded_features(model, dataset, config, data_collator, initial, optimizer, show_progress)
    else:
        grads = compute_gradient_features(
            model, dataset, config, data_collator, optimizer=optimizer, show_progress=show_progress
        )
    feature_seconds = time.perf_counter() - start
    guards = row_guards(grads, config)
    if measured is not None:
        guards.eligible &= measured  # the losses-first pass measured every eligible row (zeros elsewhere)
    _warn_exclusions(guards)
    selection = select_from_features(
        guards.scale(grads.features),
        config,
        initial=initial,
        eligible=guards.eligible,
        reference_gain=reference_gain,
        show_progress=show_progress,
    )
    _record_round(selection, guards, grads.losses, feature_seconds, start)
    selection.metadata["gradient_rows"] = n if measured is None else int(measured.sum())
    if feature_cache is not None:
        sqnorms = _sqnorms(guards.scale(grads.features))
        if measured is not None:
            sqnorms[~measured] = float("nan")  # not measured: no remembered gradient
        feature_cache.record(
            None,
            sqnorms,
            grads.losses,
            grads.num_tokens,
            grads.max_token_losses,
            selection.selected,
            config,
            n,
            vocab_size=grads.vocab_size,
        )
    return selection


def _losses_first_pays(config: SpiceConfig, n: int) -> bool:
    """Whether `_guarded_features` costs less than a gradient pass over the pool.

    A forward pass costs about a third of a forward and backward, so measuring losses first pays when at most
    about two thirds of the pool can be eligible: the loss-quantile guard bounds that share by
    ``max(max_loss_quantile, budget share)`` (the guard never leaves fewer rows than the budget); ``min_loss``
    alone bounds nothing before the losses are known.
    """
    if config.max_loss_quantile is None:
        return False
    return max(config.max_loss_quantile, config.budget_count(n) / n) <= 2 / 3


def _guarded_features(
    model: Any,
    dataset: Any,
    config: SpiceConfig,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None,
    initial: Sequence[int] | None,
    optimizer: torch.optim.Optimizer | None,
    show_progress: bool,
) -> tuple[GradientFeatures, torch.Tensor]:
    """Losses first, gradients only where they can matter: the same selection for less work.

    With a loss guard on, only the rows the guards admit (and the ``initial`` rows) can influence the
    greedy, and eligibility depends on the losses alone. So a forward pass over the pool (`compute_losses`, no
    backward) decides eligibility, and the gradient pass runs on the eligible and initial rows only. The other
    rows' features are never read by the greedy: they are returned as zeros (NaN where the gradient pass would
    have given NaN: rows without a finite loss or a supervised token, which the greedy reports as skipped). The
    losses are the forward pass's: the same computation as the gradient pass's, up to float32 rounding of
    batches of different rows. Cost: a forward over the pool plus a gradient pass over the eligible share.

    Returns:
        The features of every row (zeros where not measured) and the ``(n,)`` bool mask of measured rows.
    """
    losses, num_tokens, largest = compute_losses(model, dataset, config, data_collator, show_progress=show_progress)
    vocab = output_vocab_size(model)
    eligible = candidate_guards(losses, num_tokens, config, max_token_losses=largest, vocab_size=vocab).eligible
    rows = sorted({int(i) for i in eligible.nonzero().flatten().tolist()} | {int(i) for i in (initial or [])})
    n = len(losses)
    features = torch.zeros(n, config.proj_dim, dtype=torch.float32)
    features[~(torch.isfinite(losses) & (num_tokens > 0))] = float("nan")
    measured = torch.zeros(n, dtype=torch.bool)
    if rows:
        grads = compute_gradient_features(
            model, dataset, config, data_collator, indices=rows, optimizer=optimizer, show_progress=show_progress
        )
        features[rows] = grads.features
        measured[rows] = True
    pool = GradientFeatures(
        features=features, losses=losses, num_tokens=num_tokens, max_token_losses=largest, vocab_size=vocab
    )
    return pool, measured


def _select_shortlist(
    model: Any,
    dataset: Any,
    config: SpiceConfig,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None,
    *,
    cache: FeatureCache,
    initial: Sequence[int] | None,
    reference_gain: float | None,
    optimizer: torch.optim.Optimizer | None,
    show_progress: bool,
) -> Selection:
    """A cheap reselection round (``config.reselect_shortlist``; `spice_trainer.features.reselect`).

    1. The shortlist: `shortlist` on the cache, with eligibility under the remembered losses.
    2. Fresh features of the shortlist (sharded over ranks and all-gathered under ``torch.distributed``; the
       feature store is not used: the adapter has changed since it was filled).
    3. The eligibility rule on the pool's losses, fresh on the shortlist and remembered elsewhere; the greedy
       (``config.greedy``) on the shortlist's features with the pool's budget; picks mapped back to rows.
    Every rank computes the same shortlist from the same memory and returns the same `Selection`.
    """
    start = time.perf_counter()
    n = len(dataset)
    assert cache.losses is not None and cache.num_tokens is not None and cache.max_token_losses is not None
    remembered = candidate_guards(
        cache.losses,
        cache.num_tokens,
        config,
        max_token_losses=cache.max_token_losses,
        vocab_size=cache.vocab_size,
    )
    rows = shortlist(cache, config, remembered.eligible, initial)
    world, rank = sd.world_size(), sd.rank()
    part = sd.shard_rows(len(rows), world, rank)
    sharded = world > 1 and is_sharded_model(model)
    local: tuple[torch.Tensor, ...] | None = None
    error: BaseException | None = None
    try:
        grads = compute_gradient_features(
            model,
            dataset,
            config,
            data_collator,
            indices=rows[part.start : part.stop],
            optimizer=optimizer,
            show_progress=show_progress and rank == 0,
            lockstep=_lockstep(len(part), config.batch_size) if sharded else None,
        )
        assert grads.max_token_losses is not None
        local = (grads.features, grads.losses, grads.num_tokens, grads.max_token_losses)
    except Exception as exc:
        error = exc
    if sd.any_rank(error is not None):  # agreed before the gathers, as in _select_sharded
        if error is not None:
            raise error
        raise RuntimeError("spice: the gradient pass failed on another rank (see that rank's error)")
    assert local is not None
    features, fresh_losses, fresh_tokens, fresh_largest = (sd.gather_rows(t) for t in local)
    feature_seconds = time.perf_counter() - start

    index = torch.as_tensor(rows, dtype=torch.long)
    losses = cache.losses.clone()
    num_tokens = cache.num_tokens.clone()
    largest = cache.max_token_losses.clone()
    losses[index] = fresh_losses.float()
    num_tokens[index] = fresh_tokens.long()
    largest[index] = fresh_largest.float()
    finite = torch.ones(n, dtype=torch.bool)
    finite[index] = torch.isfinite(features).all(dim=1)
    guards = candidate_guards(
        losses, num_tokens, config, max_token_losses=largest, vocab_size=cache.vocab_size, finite_features=finite
    )
    _warn_exclusions(guards)
    position = {row: i for i, row in enumerate(rows)}
    budget = min(config.budget_count(n), len(rows))
    local_selection = select_from_features(
        guards.scale(features, index),
        config.with_changes(budget=budget),
        initial=[position[int(r)] for r in initial] if initial else None,
        eligible=guards.eligible[index],
        reference_gain=reference_gain,
        show_progress=show_progress and rank == 0,
    )
    selection = dataclasses.replace(
        local_selection,
        indices=[rows[i] for i in local_selection.indices],
        skipped=[rows[i] for i in local_selection.skipped],
        initial=[rows[i] for i in local_selection.initial],
        n_candidates=n,
        config=config.to_dict(),
    )
    _record_round(selection, guards, losses, feature_seconds, start)
    selection.metadata["gradient_rows"] = len(rows)
    selection.metadata["reselect"] = {
        "shortlist": len(rows),
        "pool": n,
        "share": len(rows) / n,
        "rule": "selected rows, then the largest remembered (weighted) gradient norms among eligible rows",
    }
    cache.record(
        rows,
        _sqnorms(guards.scale(features, index)),
        fresh_losses,
        fresh_tokens,
        fresh_largest,
        selection.selected,
        config,
        n,
    )
    return selection


def _lockstep(local_rows: int, batch_size: int) -> Lockstep:
    """Every rank's pass count (the most batches any rank has) and the error agreement, for a sharded model."""
    batches = max(count for (count,) in sd.all_gather_ints([math.ceil(local_rows / batch_size)]))
    return Lockstep(batches=max(1, batches), any_failed=sd.any_rank)


def _sqnorms(features: torch.Tensor) -> torch.Tensor:
    """``(n,)`` float64 squared norms of feature rows (NaN rows stay NaN)."""
    return features.double().pow(2).sum(dim=1)


def _select_sharded(
    model: Any,
    dataset: Any,
    config: SpiceConfig,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None,
    *,
    initial: Sequence[int] | None,
    reference_gain: float | None,
    optimizer: torch.optim.Optimizer | None,
    show_progress: bool,
    feature_cache: FeatureCache | None = None,
) -> Selection:
    """The sharded path of `select` (any world size; also a single process with a feature store).

    1. Rows: rank ``r`` of ``w`` takes one contiguous block, ``shard_rows(n, w, r, chunk_rows)`` (whole
       store chunks when a store is used).
    2. Features of those rows: `compute_gradient_features(..., indices=rows)`, or through the store:
       chunks already complete are read back, the others computed and written (`FeatureStore.fill`).
    3. Losses, token counts and largest token losses are all-gathered (``n`` numbers each), so every rank
       computes the same eligibility and trust weights (`candidate_guards`: the loss-quantile guard needs the
       whole pool).
    4. Greedy: ``"gather"`` (all-gather the ``(n, d)`` features, then `select_from_features`: any greedy
       regime) while ``n · d · 4`` bytes fit under `spice_trainer.distributed.gather_limit_bytes`, else the
       distributed exact greedy (`spice_trainer.distributed.greedy.distributed_greedy`). Stochastic and pooled
       greedy always gather (they are defined over the whole pool's order and sample stream).
    """
    start = time.perf_counter()
    n = len(dataset)
    world, rank = sd.world_size(), sd.rank()
    main = rank == 0
    d = config.proj_dim
    if world > 1:
        check_ranks_agree(dataset)

    # A model sharded across ranks (FSDP2, ZeRO-3) gathers weights collectively in every forward and backward:
    # every rank runs the same number of passes, and the feature store (whose chunks differ per rank) is not used.
    lockstep = world > 1 and is_sharded_model(model)
    if lockstep and config.feature_store is not None:
        if main:
            logger.warning(
                "spice: the feature store is not used with a model sharded across ranks (FSDP2 / ZeRO-3): every "
                "rank must run the same gradient passes; features are computed directly"
            )
        config = config.with_changes(feature_store=None)

    def compute(rows: list[int], progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if not rows and not lockstep:
            return torch.zeros(0, d), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0)
        grads = compute_gradient_features(
            model,
            dataset,
            config,
            data_collator,
            indices=rows,
            optimizer=optimizer,
            show_progress=progress,
            lockstep=_lockstep(len(rows), config.batch_size) if lockstep else None,
        )
        assert grads.max_token_losses is not None
        return grads.features, grads.losses, grads.num_tokens, grads.max_token_losses

    store_meta: dict[str, Any] | None = None
    chunk = 1
    stats = None
    error: BaseException | None = None
    # The local pass may fail on one rank only (a bad row in its shard). Every rank then raises here,
    # agreed before the next collective, instead of leaving the others waiting in an all_gather.
    try:
        if config.feature_store is not None:
            store = _open_store(model, dataset, config, data_collator, optimizer, n)
            chunk = store.chunk_rows
            rows = sd.shard_rows(n, world, rank, chunk_rows=chunk)
            chunks = sd.shard_chunks(store.num_chunks, world, rank)
            bar = progress_bar(len(chunks), show_progress and main and len(chunks) > 1, "spice gradients", "chunk")
            try:

                def compute_chunk(
                    chunk_rows: list[int],
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
                    out = compute(chunk_rows, False)
                    if bar is not None:
                        bar.update(1)
                    return out

                stats = store.fill(chunks, compute_chunk)
            finally:
                if bar is not None:
                    bar.close()
            local_feats, local_losses, local_tokens, local_largest = store.read_rows(rows)
        else:
            rows = sd.shard_rows(n, world, rank)
            local_feats, local_losses, local_tokens, local_largest = compute(list(rows), show_progress and main)
    except Exception as exc:
        error = exc
    if sd.any_rank(error is not None):
        if error is not None:
            raise error
        raise RuntimeError(
            "spice: the gradient pass failed on another rank (see that rank's error); every rank stops this round"
        )
    if stats is not None:
        totals = [sum(col) for col in zip(*sd.all_gather_ints([stats.reused, stats.computed]), strict=True)]
        store_meta = {"path": str(store.path), "reused_chunks": totals[0], "computed_chunks": totals[1]}
    feature_seconds = time.perf_counter() - start

    losses = sd.gather_rows(local_losses.float())
    num_tokens = sd.gather_rows(local_tokens.long())
    largest = sd.gather_rows(local_largest.float())
    finite_features = sd.gather_rows(torch.isfinite(local_feats).all(dim=1).long()).bool()
    vocab = output_vocab_size(model)
    guards = candidate_guards(
        losses, num_tokens, config, max_token_losses=largest, vocab_size=vocab, finite_features=finite_features
    )
    if main:
        _warn_exclusions(guards)
    strategy: sd.Strategy = sd.choose_strategy(n, d) if world > 1 else "gather"
    if strategy == "distributed" and config.greedy != "exact":
        if main:
            logger.warning(
                "spice: greedy=%r runs on gathered features (only exact greedy is distributed over shards); "
                "the %d x %d feature matrix is held on every rank",
                config.greedy,
                n,
                d,
            )
        strategy = "gather"
    local_index = torch.arange(rows.start, rows.stop)
    local_feats = guards.scale(local_feats, local_index)
    if strategy == "gather":
        features = sd.gather_rows(local_feats)
        selection = select_from_features(
            features,
            config,
            initial=initial,
            eligible=guards.eligible,
            reference_gain=reference_gain,
            show_progress=show_progress and main,
        )
    else:
        selection = distributed_greedy(
            local_feats,
            rows,
            n,
            config,
            initial=initial,
            local_eligible=guards.eligible[rows.start : rows.stop],
            reference_gain=reference_gain,
            show_progress=show_progress,
        )
    _record_round(selection, guards, losses, feature_seconds, start)
    selection.metadata.update(
        {
            "distributed": {
                "world_size": world,
                "strategy": strategy,
                "rows_per_rank": [len(r) for r in (sd.shard_rows(n, world, i, chunk_rows=chunk) for i in range(world))],
            },
        }
    )
    selection.metadata["gradient_rows"] = n
    if store_meta is not None:
        selection.metadata["feature_store"] = store_meta
    if feature_cache is not None:
        # n numbers per row kind: the memory never needs the (n, d) features, so the distributed greedy works too.
        sqnorms = sd.gather_rows(_sqnorms(local_feats))
        feature_cache.record(
            None, sqnorms, losses, num_tokens, largest, selection.selected, config, n, vocab_size=vocab
        )
    return selection


def _open_store(
    model: Any,
    dataset: Any,
    config: SpiceConfig,
    data_collator: Any,
    optimizer: torch.optim.Optimizer | None,
    n: int,
) -> FeatureStore:
    """Rank 0 fingerprints and creates the store, then broadcasts the key; every other rank opens it.

    A failure on rank 0 (fingerprint, disk) is broadcast as a missing key, so every rank raises.
    """
    assert config.feature_store is not None
    key: str | None = None
    description: dict[str, Any] | None = None
    chunk_rows = default_chunk_rows(n, config.batch_size)
    store: FeatureStore | None = None
    error: BaseException | None = None
    if sd.is_main_process():
        try:
            key, description = store_fingerprint(model, dataset, config, data_collator, optimizer=optimizer)
            store = FeatureStore.open(
                config.feature_store, key, n=n, proj_dim=config.proj_dim, chunk_rows=chunk_rows, description=description
            )
        except Exception as exc:  # agreed below: the other ranks must not wait for a key that never comes
            error = exc
    key = sd.broadcast_object(None if error is not None else key, src=0)
    if error is not None:
        raise error
    if key is None:
        raise RuntimeError("spice: rank 0 could not open the feature store (see its error)")
    if store is None:
        # The files exist: rank 0 created them before broadcasting the key.
        store = FeatureStore.open(
            config.feature_store, key, n=n, proj_dim=config.proj_dim, chunk_rows=chunk_rows, create=False
        )
    return store


def _record_round(
    selection: Selection, guards: Guards, losses: torch.Tensor, feature_seconds: float, start: float
) -> None:
    """What the guards decided and the round's timings, on the `Selection` (every path).

    Per row: ``selection.excluded`` (reason -> rows) and ``down_weighted_rows`` / ``down_weights``. Counts in
    ``metadata``: ``no_supervised_token_rows``; ``non_finite_loss_rows`` (every row without a finite loss,
    including those without a target, which have none); ``non_finite_gradient_rows``; ``solved_rows`` (finite
    loss ``<= min_loss``); ``loss_cap_rows``; ``loss_guard_excluded`` = solved + loss cap; ``down_weighted_rows``.
    """
    counts = guards.counts()
    selection.excluded = {reason: rows for reason, rows in guards.excluded.items() if rows}
    selection.down_weighted_rows, selection.down_weights = guards.down_weighted
    no_tokens = counts.get("no_supervised_token", 0)
    solved = counts.get("solved", 0)
    capped = counts.get("loss_cap", 0)
    finite = torch.isfinite(losses)
    selection.metadata.update(
        {
            "feature_seconds": feature_seconds,
            "seconds": time.perf_counter() - start,
            "no_supervised_token_rows": no_tokens,
            "non_finite_loss_rows": no_tokens + counts.get("non_finite_loss", 0),
            "non_finite_gradient_rows": counts.get("non_finite_gradient", 0),
            "solved_rows": solved,
            "loss_cap_rows": capped,
            "loss_guard_excluded": solved + capped,
            "down_weighted_rows": counts["down_weighted"],
            "surprise_threshold_nats": guards.threshold,
            "mean_loss_selected": _mean_at(losses, selection.indices),
            "mean_loss_pool": float(losses[finite].double().mean()) if bool(finite.any()) else None,
        }
    )


def _mean_at(values: torch.Tensor, indices: Sequence[int]) -> float | None:
    if not indices:
        return None
    return float(values[torch.as_tensor(list(indices), dtype=torch.long)].double().mean())


def _warn_exclusions(guards: Guards) -> None:
    """One warning for the rows excluded because something is wrong with them (not for solved or capped rows)."""
    counts = guards.counts()
    problems = [
        (counts.get("no_supervised_token", 0), "have no supervised token (empty, or every label -100)"),
        (counts.get("non_finite_loss", 0), "have a non-finite loss"),
        (
            counts.get("non_finite_gradient", 0),
            "have a finite loss but non-finite gradients (an overflow in the backward)",
        ),
    ]
    said = [f"{count} {what}" for count, what in problems if count > 0]
    if said:
        logger.warning("spice: %s; they are never picked", "; ".join(said))


def no_selection_message(selection: Selection, config: SpiceConfig, num_rows: int) -> str:
    """Why a round picked no row, from its metadata (`_record_round`), with the fix for the main cause."""
    meta = selection.metadata
    no_tokens = int(meta.get("no_supervised_token_rows") or 0)
    parts = [
        (no_tokens, "have no supervised token", "check the labels (-100 marks tokens without loss)"),
        (
            int(meta.get("non_finite_loss_rows") or 0) - no_tokens,
            "have a non-finite loss",
            "check the model and data for overflow (load the model in float32 or bfloat16, not float16)",
        ),
        (
            int(meta.get("non_finite_gradient_rows") or 0),
            "have non-finite gradients",
            "the backward overflows: load the model in float32, or use a lower learning rate",
        ),
        (
            int(meta.get("solved_rows") or 0),
            f"have a loss at or below min_loss={config.min_loss}",
            "the model already solves them: lower min_loss (or set min_loss=None)",
        ),
        (
            int(meta.get("loss_cap_rows") or 0),
            f"are above the loss cap (max_loss_quantile={config.max_loss_quantile})",
            "raise max_loss_quantile (or set it to None)",
        ),
    ]
    listed = ", ".join(f"{count} {what}" for count, what, _ in parts if count > 0)
    count, _, fix = max(parts, key=lambda p: p[0])
    return (
        f"SPICE selected no rows: none of the {num_rows} rows could be picked ({listed or 'no cause recorded'}); "
        f"{fix if count > 0 else 'check the data and the model'}"
    )


def check_ranks_agree(dataset: Any) -> None:
    """Every rank holds the same rows in the same order; else the same `ValueError` on every rank.

    Each rank computes the features of its own shard of row indices, so a rank with another length, a shuffled
    copy or other rows would attribute features to the wrong rows without any error. Compares the lengths, then
    `dataset_fingerprint`; when only `datasets`' lineage fingerprints differ (the same rows built another way), the
    rows themselves are hashed (`content_fingerprint`) before concluding.
    """
    n = len(dataset)
    gathered = sd.all_gather_ints([n, *_hash_ints(dataset_fingerprint(dataset))])
    lengths = [g[0] for g in gathered]
    if len(set(lengths)) > 1:
        per_rank = ", ".join(f"rank {r}: {count}" for r, count in enumerate(lengths))
        raise ValueError(
            f"the ranks hold training datasets of different lengths ({per_rank} rows), so a row index does not name "
            "the same row on every rank; every rank must pass the same train_dataset (load and prepare it the same "
            "way on every rank: the trainer shards the batches itself)"
        )
    if len({tuple(g[1:]) for g in gathered}) == 1:
        return
    content = sd.all_gather_ints(_hash_ints(content_fingerprint(dataset)))
    if len({tuple(c) for c in content}) == 1:
        return
    differ = [r for r, c in enumerate(content) if c != content[0]]
    raise ValueError(
        f"the ranks hold different training data: the same length ({n} rows) but other rows or another order on "
        f"rank(s) {differ} than on rank 0, so features would be attributed to the wrong rows; every rank must pass "
        "the same train_dataset in the same order (no per-rank shuffle or filter: the trainer shards the batches)"
    )


def _hash_ints(fingerprint: str) -> list[int]:
    """A fingerprint as three non-negative int64 values (for an all-gather)."""
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()
    return [int(digest[i : i + 15], 16) for i in (0, 15, 30)]
