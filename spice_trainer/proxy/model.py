"""The proxy model: cheap gradients from a smaller model of the same family, kept current online.

Computing per-example gradients on the full target is the expensive part of selection. SPICE (Chang et
al., ICLR 2026) computes them on a smaller model of the same architecture family (a
0.5B Qwen2 proxy for a 7B target) that carries its *own* LoRA adapter, and keeps that adapter current:

- **Online pooled regime** (``config.greedy == "pooled"``, `ProxyModel.select_online`): the candidate
  stream is cut in order into pools of ``pool_size``; exact greedy makes up to ``picks_per_pool`` picks in
  each pool with the selected set ``S`` carried across pools (the objective's state: ``(I + α F_S)⁻¹`` and
  ``Σ_S g``, updated with each picked feature vector); every ``T`` = ``proxy_refresh_every_pools`` pools
  the proxy's adapter takes one AdamW step (``proxy_learning_rate``) on the picks of those ``T`` pools,
  and the features of later pools come from the updated proxy.
- **Static regimes** (``"exact"``, ``"stochastic"``): the proxy's features of the whole pool go through
  `spice_trainer.pipeline.select` (sharding and the feature store included).
- **During training** (`spice_trainer.integrations.proxy_rounds.ProxyRounds`, used by `SpiceDataCallback` when
  ``config.proxy_model`` is set): before each reselection the proxy is refreshed on what the target has
  trained on since the last round (the rows its sampler yielded), and an agreement report compares the
  proxy with the live model on a seeded probe of candidates (`spice_trainer.proxy.agreement`).

Transfer is good within a family and weak across families, so construction checks that the proxy tokenizes
like the target (`spice_trainer.proxy.compat`: same vocabulary, special tokens and chat template: a mismatch is a
`ValueError`) and warns when the ``model_type`` differs.

The proxy is never the trainer's model: it is not handed to the Trainer, accelerate, DeepSpeed or FSDP;
it is loaded outside DeepSpeed ZeRO-3's partitioning, and its refresh steps touch only its own adapter
(the target's parameters, ``.grad``s, optimizer state and every RNG stream are left alone; the step runs
with dropout off, so it draws no random numbers). Loading from a folder or the Hub is
`spice_trainer.integrations.hub.load_proxy`. Imports peft on use (`spice_trainer.proxy.adapter`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from spice_trainer.config import SpiceConfig
from spice_trainer.core.greedy import (
    PooledSource,
    check_initial,
    progress_bar,
    run_greedy,
    selection_from_run,
    usable_rows,
)
from spice_trainer.core.objective import SpiceObjective
from spice_trainer.core.selection import Selection
from spice_trainer.core.stopping import stopping_rule
from spice_trainer.distributed import comm as sd
from spice_trainer.features.batches import (
    Collator,
    PadCollator,
    batch_labels,
    collate,
    model_inputs,
    pad_token_id,
    prepare_row,
    token_loss_sum,
)
from spice_trainer.features.gradients import (
    GradientFeatures,
    adam_or_unit,
    compute_gradient_features,
    find_lora_weights,
    has_adam_moments,
)
from spice_trainer.pipeline import row_guards, select
from spice_trainer.proxy.adapter import with_lora_adapter
from spice_trainer.proxy.compat import check_proxy_compatible

logger = logging.getLogger(__name__)

__all__ = ["ProxyModel"]


class ProxyModel:
    """A smaller model of the target's family with its own LoRA adapter, for SPICE's gradients.

    Args:
        source: the proxy, a causal LM object (a PEFT model keeps its adapter; a plain model gets one). From a
            folder or a hub id: `spice_trainer.integrations.hub.load_proxy`.
        config: uses ``proxy_device``, ``proxy_learning_rate``, ``batch_size``, ``max_length`` (and the
            selection fields in `select`).
        target: the target model (the trainer's). Gives the default device, the default adapter (the
            target's ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` when it is a PEFT model)
            and the compatibility checks.
        tokenizer: the target's tokenizer (the trainer's ``processing_class``), for the exact check.
        proxy_tokenizer: the proxy's tokenizer, for the exact compatibility check (without it the configs are
            compared).
        lora_config: a ``peft.LoraConfig`` for the proxy's adapter, overriding the default.

    Raises:
        ValueError: see `check_proxy_compatible`; a path that is neither a local model directory nor in the
            a proxy that is the target; a proxy partitioned by DeepSpeed ZeRO-3.
        TypeError: ``source`` is not a model object.
    """

    def __init__(
        self,
        source: Any,
        config: SpiceConfig,
        *,
        target: nn.Module | None = None,
        tokenizer: Any = None,
        proxy_tokenizer: Any = None,
        lora_config: Any = None,
    ) -> None:
        if isinstance(source, ProxyModel):
            raise TypeError("source is already a ProxyModel; use it directly")
        if not isinstance(source, nn.Module):
            raise TypeError(
                f"ProxyModel takes a model object, got {type(source).__name__}; load a folder or a hub id with "
                "spice_trainer.integrations.hub.load_proxy(path, config, ...), or pass SpiceConfig(proxy_model=path)"
            )
        model = source
        if target is not None and (model is target or model is getattr(target, "base_model", None)):
            raise ValueError(
                "proxy_model is the trainer's own model; pass a separate smaller model of the same family, or "
                "proxy_model=None to select with the live model"
            )
        if any(hasattr(p, "ds_id") or (p.numel() == 0 and p.ndim > 0) for p in model.parameters()):
            raise ValueError(
                "the proxy's weights are partitioned by DeepSpeed ZeRO-3; the proxy must stay outside the "
                "training wrapper: pass a local path (it is then loaded without partitioning) or build the model "
                "outside the HfDeepSpeedConfig / deepspeed.zero.Init context"
            )
        check_proxy_compatible(model, target, tokenizer=tokenizer, proxy_tokenizer=proxy_tokenizer)
        self.config = config
        self.tokenizer = proxy_tokenizer
        self.model: nn.Module = with_lora_adapter(model, like=target, lora_config=lora_config, seed=config.seed)
        self.device = torch.device(config.proxy_device) if config.proxy_device else _device_of(target)
        self.model.to(self.device)
        self.model.eval()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        _, lora = find_lora_weights(self.model)
        lora_ids = {id(m.weight) for _, m in lora}
        # The refresh steps train the adapter only: the proxy's base weights stay as they were loaded.
        for p in trainable:
            if id(p) not in lora_ids:
                p.requires_grad_(False)
        self._params = [m.weight for _, m in lora]
        for weight in self._params:  # e.g. a PEFT proxy loaded with is_trainable=False
            weight.requires_grad_(True)
        # Weight decay 0, like Trainer's default: a refresh moves the adapter only where the loss pulls it.
        self.optimizer = torch.optim.AdamW(self._params, lr=config.proxy_learning_rate, weight_decay=0.0)
        self.refresh_steps = 0
        logger.info(
            "spice: proxy %s (%s, %.1fM parameters, adapter %.2fM) on %s",
            type(self.model).__name__,
            getattr(getattr(self.model, "config", None), "model_type", "?"),
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            sum(p.numel() for p in self._params) / 1e6,
            self.device,
        )

    # --- features and refresh ---------------------------------------------------------------------
    def features(
        self,
        dataset: Any,
        config: SpiceConfig,
        data_collator: Collator | None = None,
        *,
        indices: Sequence[int] | None = None,
        show_progress: bool = False,
    ) -> GradientFeatures:
        """`compute_gradient_features` on the proxy (``feature_norm="adam"`` uses the proxy's own optimizer)."""
        return compute_gradient_features(
            self.model,
            dataset,
            self.feature_config(config),
            data_collator,
            indices=indices,
            optimizer=self.optimizer if self._has_stepped() else None,
            show_progress=show_progress,
        )

    def refresh(self, dataset: Any, rows: Sequence[int], data_collator: Collator | None = None) -> float:
        """One AdamW step of the proxy's adapter on ``rows``; returns their loss before the step.

        The loss is the token mean over every supervised token of the rows,
        ``L = Σ_i Σ_t ℓ_{i,t} / Σ_i T_i`` (labels shifted by one, -100 ignored: transformers' causal-LM
        loss on one batch holding all the rows), accumulated over batches of ``config.batch_size`` rows.
        Runs in eval mode (no dropout, so no RNG stream moves); ``.grad`` of the adapter is cleared after.

        Raises:
            ValueError: ``rows`` is empty or has no supervised token.
        """
        rows = [int(r) for r in rows]
        if not rows:
            raise ValueError("refresh needs at least one row")
        size = self.config.batch_size
        collator = data_collator or PadCollator(pad_token_id(self.model))
        batches = [
            collate(collator, [prepare_row(dataset[i], self.config.max_length) for i in rows[lo : lo + size]])
            for lo in range(0, len(rows), size)
        ]
        total = sum(int((batch_labels(b)[:, 1:] != -100).sum()) for b in batches)
        if total == 0:
            raise ValueError(f"the {len(rows)} refresh rows have no supervised token (every label is -100)")
        was_training = self.model.training
        self.model.eval()
        loss_sum = 0.0
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                for batch in batches:
                    logits = self.model(**model_inputs(batch, self.device)).logits
                    summed = token_loss_sum(logits, batch_labels(batch).to(self.device))
                    (summed / total).backward()
                    loss_sum += float(summed.detach())
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train(was_training)
        self.refresh_steps += 1
        return loss_sum / total

    # --- selection ----------------------------------------------------------------------------------
    def select(
        self,
        dataset: Any,
        config: SpiceConfig,
        data_collator: Collator | None = None,
        *,
        initial: Sequence[int] | None = None,
        reference_gain: float | None = None,
        show_progress: bool = False,
    ) -> Selection:
        """Select with the proxy's gradients: `select_online` for ``greedy="pooled"``, else
        `spice_trainer.pipeline.select` on the proxy (the whole pool's features, then the greedy)."""
        if config.greedy == "pooled":
            return self.select_online(
                dataset,
                config,
                data_collator,
                initial=initial,
                reference_gain=reference_gain,
                show_progress=show_progress,
            )
        return select(
            self.model,
            dataset,
            self.feature_config(config),
            data_collator,
            initial=initial,
            reference_gain=reference_gain,
            optimizer=self.optimizer if self._has_stepped() else None,
            show_progress=show_progress,
        )

    def select_online(
        self,
        dataset: Any,
        config: SpiceConfig,
        data_collator: Collator | None = None,
        *,
        initial: Sequence[int] | None = None,
        reference_gain: float | None = None,
        show_progress: bool = False,
    ) -> Selection:
        """The paper's online regime: pools in stream order, greedy inside each, proxy steps every T pools.

        Rows ``0 .. n−1`` are cut in order into pools of ``P`` = ``config.pool_size``. For pool ``p``
        (1-based): its features come from the proxy *as it is now*; rows already selected are skipped;
        the candidate guards (`spice_trainer.pipeline.row_guards`) apply within the pool; exact greedy picks
        up to ``config.picks_per_pool`` rows maximising ``Δ_x(S) − λ c_x(S)`` with ``S`` every row picked so
        far (``initial`` first), whose Fisher state ``(I + α F_S)⁻¹`` and conflict sum ``Σ_S g`` carry over
        from earlier pools (each pick's feature vector as it was when picked). Before pool ``p + 1`` with
        ``p`` a multiple of ``T`` = ``config.proxy_refresh_every_pools``, the proxy takes one `refresh` step
        on the picks of pools ``p − T + 1 .. p`` (skipped when they picked nothing). So ``P_visited`` pools
        give ``⌊(P_visited − 1) / T⌋`` steps at most.

        Early stopping (the configured rule, `spice_trainer.core.stopping.stopping_rule`) ends a pool's picks
        when it fires (the ratio rule against ``reference_gain``, or this run's first pick's ``Δ``), and the
        stream goes on — as in `select_from_features` with ``greedy="pooled"``, which this equals when no refresh
        happens. Under ``torch.distributed`` every rank runs the stream (the proxy is not sharded) and
        rank 0's selection is broadcast, so all ranks agree.

        Returns:
            A `Selection` whose ``metadata`` holds ``pools_visited``, ``pools_stopped_early``,
            ``refresh_steps``, ``refresh_losses``, ``feature_seconds``, ``refresh_seconds``, ``seconds``.

        Raises:
            ValueError: bad ``initial`` rows (out of range, duplicated, non-finite features), or a budget
                larger than the pool.
        """
        start = time.perf_counter()
        n = len(dataset)
        budget = config.budget_count(n)
        init = check_initial(initial, n, ())
        to_pick = max(0, budget - len(init))
        cfg = self.feature_config(config)
        if config.feature_store is not None:
            logger.info("spice: the online proxy regime recomputes features as the proxy changes; feature_store unused")
        objective = SpiceObjective(
            torch.zeros(0, config.proj_dim),
            config.fisher_scale,
            capacity=len(init) + to_pick,
            conflict_weight=config.conflict_weight,
            rows="direct",
        )
        timings = {"features": 0.0, "refresh": 0.0}
        if init:
            t0 = time.perf_counter()
            init_feats = self.features(dataset, cfg, data_collator, indices=init).features
            timings["features"] += time.perf_counter() - t0
            usable = usable_rows(init_feats, config.fisher_scale).usable
            bad = [r for r, ok in zip(init, usable.tolist(), strict=True) if not ok]
            if bad:
                raise ValueError(
                    f"initial rows {bad[:10]} have non-finite proxy features (or norms beyond float64's range); "
                    "drop them from initial"
                )
            for g in init_feats:
                objective.add(g)
        initial_objective = objective.logdet

        skipped: list[int] = []
        excluded: dict[str, list[int]] = {}
        weighted: dict[int, float] = {}
        refresh_losses: list[float] = []
        refreshed = 0  # picks already used by a refresh step
        period = config.proxy_refresh_every_pools
        bar = progress_bar(
            math.ceil(n / config.pool_size), show_progress and n > config.pool_size, "spice proxy pools", "pool"
        )

        def on_pool(index: int, picks: list[int]) -> None:
            # Before pool index + 1 (1-based) with index a multiple of T: one step on the picks of the last T pools.
            nonlocal refreshed
            if index and index % period == 0 and len(picks) > refreshed:
                t0 = time.perf_counter()
                refresh_losses.append(self.refresh(dataset, picks[refreshed:], data_collator))
                timings["refresh"] += time.perf_counter() - t0
                refreshed = len(picks)
            if bar is not None:
                bar.update(1)

        def pool_features(rows: list[int], quota: int) -> tuple[torch.Tensor, torch.Tensor]:
            # The proxy as it is now; the loss guard within the pool, for the pool's picks.
            t0 = time.perf_counter()
            grads = self.features(dataset, cfg, data_collator, indices=rows)
            timings["features"] += time.perf_counter() - t0
            guards = row_guards(grads, config.with_changes(budget=quota))
            for reason, local in guards.excluded.items():
                excluded.setdefault(reason, []).extend(rows[i] for i in local)
            for i, weight in zip(*guards.down_weighted, strict=True):
                weighted[rows[i]] = weight
            features = guards.scale(grads.features)
            usable = usable_rows(features, config.fisher_scale).usable  # finite, norms within float64
            skipped.extend(r for r, ok in zip(rows, usable.tolist(), strict=True) if not ok)
            return torch.where(usable.unsqueeze(1), features, torch.zeros(())), usable & guards.eligible

        source = PooledSource(
            objective,
            n=n,
            pool_size=config.pool_size,
            picks_per_pool=config.picks_per_pool,
            quota=to_pick,
            pool_features=pool_features,
            selected=init,
            on_pool=on_pool,
        )
        try:
            run = run_greedy(source, stopping_rule(config), to_pick, reference_gain=reference_gain)
        finally:
            if bar is not None:
                bar.close()
        selection = selection_from_run(
            run,
            config,
            n_candidates=n,
            initial=init,
            skipped=sorted(skipped),
            initial_objective=initial_objective,
            metadata={
                "greedy": "pooled",
                "online_proxy": True,
                "budget": budget,
                "method": objective.method,
                **source.metadata(),
                "pools_stopped_early": run.rule_stops,
                "refresh_steps": len(refresh_losses),
                "refresh_losses": refresh_losses,
                "feature_seconds": timings["features"],
                "refresh_seconds": timings["refresh"],
                "seconds": time.perf_counter() - start,
            },
        )
        selection.excluded = {reason: sorted(rows) for reason, rows in excluded.items()}
        selection.down_weighted_rows = sorted(weighted)
        selection.down_weights = [weighted[r] for r in selection.down_weighted_rows]
        if sd.is_distributed():
            selection = sd.broadcast_object(selection, src=0)
        return selection

    # --- helpers ------------------------------------------------------------------------------------
    def _has_stepped(self) -> bool:
        return has_adam_moments(self.optimizer, self._params)

    @property
    def lora_weights(self) -> list[torch.Tensor]:
        """The adapter weights the refresh steps train (``lora_A``/``lora_B`` of every LoRA layer)."""
        return list(self._params)

    def feature_config(self, config: SpiceConfig) -> SpiceConfig:
        """``config`` as the proxy's gradient pass uses it: ``feature_norm="adam"`` needs the second moments
        of the proxy's own optimizer, so before its first refresh step the proxy measures with ``"unit"``
        (`spice_trainer.features.gradients.adam_or_unit`)."""
        return adam_or_unit(config, self.optimizer, self._params)


def _device_of(model: nn.Module | None) -> torch.device:
    if model is None:
        return torch.device("cpu")
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
