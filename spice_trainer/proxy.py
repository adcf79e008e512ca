"""The proxy model: cheap gradients from a smaller model of the same family, kept current online.

Computing per-example gradients on the full target is the expensive part of selection. SPICE (Chang et
al., ICLR 2026, DESIGN.md section 1) computes them on a smaller model of the same architecture family (a
0.5B Qwen2 proxy for a 7B target) that carries its *own* LoRA adapter, and keeps that adapter current:

- **Online pooled regime** (``config.greedy == "pooled"``, `ProxyModel.select_online`): the candidate
  stream is cut in order into pools of ``pool_size``; exact greedy makes up to ``picks_per_pool`` picks in
  each pool with the selected set ``S`` carried across pools (the objective's state: ``(I + α F_S)⁻¹`` and
  ``Σ_S g``, updated with each picked feature vector); every ``T`` = ``proxy_refresh_every_pools`` pools
  the proxy's adapter takes one AdamW step (``proxy_learning_rate``) on the picks of those ``T`` pools,
  and the features of later pools come from the updated proxy.
- **Static regimes** (``"exact"``, ``"stochastic"``): the proxy's features of the whole pool go through
  `spice_trainer.pipeline.select` (sharding and the feature store included).
- **During training** (`ProxyRounds`, the select function `SpiceDataCallback` uses when
  ``config.proxy_model`` is set): before each reselection the proxy is refreshed on what the target has
  trained on since the last round (the rows its sampler yielded), and an agreement report compares the
  proxy with the live model on a seeded probe of candidates (`proxy_agreement`).

Transfer is good within a family and weak across families, so construction checks that the proxy
tokenizes like the target (same vocabulary, special tokens and chat template: a mismatch is a
`ValueError`) and warns when the ``model_type`` differs.

The proxy is never the trainer's model: it is not handed to the Trainer, accelerate, DeepSpeed or FSDP;
it is loaded outside DeepSpeed ZeRO-3's partitioning, and its refresh steps touch only its own adapter
(the target's parameters, ``.grad``s, optimizer state and every RNG stream are left alone; the step runs
with dropout off, so it draws no random numbers). Imports transformers and peft on use.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from spice_trainer import distributed as sd
from spice_trainer.config import SpiceConfig
from spice_trainer.gradients import (
    GradientFeatures,
    _pad_id,
    _PadCollator,
    _prepare_row,
    compute_gradient_features,
    find_lora_weights,
)
from spice_trainer.greedy import best_candidate
from spice_trainer.objective import SpiceObjective
from spice_trainer.selection import Selection, StopReason

logger = logging.getLogger(__name__)

Collator = Callable[[list[dict[str, Any]]], dict[str, Any]]

#: The file in each checkpoint that holds the proxy's adapter, its optimizer state and the round position.
PROXY_STATE_FILE = "spice_proxy.pt"

#: Candidates in the agreement probe (seeded by ``config.seed``; the same rows every round).
PROBE_SIZE = 64

# The adapter a proxy gets when the target is not a PEFT model: PEFT's usual starting point.
_DEFAULT_LORA: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}

__all__ = [
    "PROBE_SIZE",
    "PROXY_STATE_FILE",
    "Agreement",
    "ProxyModel",
    "ProxyRounds",
    "check_proxy_compatible",
    "probe_rows",
    "proxy_agreement",
    "spearman",
]


# ---------------------------------------------------------------------------------------------
# compatibility
# ---------------------------------------------------------------------------------------------


def check_proxy_compatible(
    proxy: nn.Module,
    target: nn.Module | None = None,
    *,
    tokenizer: Any = None,
    proxy_tokenizer: Any = None,
) -> None:
    """Refuse a proxy that tokenizes differently from the target; warn when its family differs.

    Gradients transfer row by row: the proxy must read the same token ids as the target. With both
    tokenizers the check is exact (vocabulary, special tokens and their ids, chat template). Without the
    proxy's tokenizer it compares what the proxy's config says: its ``vocab_size`` against the target's
    and its special token ids against the target tokenizer's (or config's). Two vocabularies of the same
    size with different tokens cannot be told apart that way; pass ``proxy_tokenizer`` for the exact check.

    Raises:
        ValueError: the vocabularies, special tokens or chat templates differ, the proxy's embedding has
            fewer rows than the target tokenizer has tokens, or the proxy shares parameters with the target.
    """
    tokenizer = _text_tokenizer(tokenizer)
    proxy_tokenizer = _text_tokenizer(proxy_tokenizer)
    proxy_config = getattr(proxy, "config", None)
    target_config = getattr(target, "config", None) if target is not None else None
    if target is not None:
        shared = {id(p) for p in proxy.parameters()} & {id(p) for p in target.parameters()}
        if shared:
            raise ValueError(
                f"proxy_model shares {len(shared)} parameters with the trainer's model; the proxy must be a "
                "separate (smaller) model with its own weights, e.g. loaded with "
                "AutoModelForCausalLM.from_pretrained(path) — to select with the live model, set proxy_model=None"
            )
    fix = (
        "The proxy must share the target's tokenizer: use a smaller model of the same family (e.g. a Qwen2-0.5B "
        "proxy for a Qwen2-7B target), or proxy_model=None to select with the live model"
    )
    if tokenizer is not None and proxy_tokenizer is not None:
        _compare_tokenizers(tokenizer, proxy_tokenizer, fix)
    else:
        _compare_configs(proxy_config, target_config, tokenizer, fix)
    if tokenizer is not None:
        rows = _embedding_rows(proxy)
        if rows is not None and rows < len(tokenizer):
            raise ValueError(
                f"the proxy's embedding has {rows} rows but the target tokenizer has {len(tokenizer)} tokens: "
                f"the proxy cannot read every token id of the training data. {fix}"
            )
    proxy_type = getattr(proxy_config, "model_type", None)
    target_type = getattr(target_config, "model_type", None)
    if proxy_type and target_type and proxy_type != target_type:
        logger.warning(
            "spice: the proxy is a %r model and the target a %r model: selection patterns transfer weakly "
            "across families (SPICE, section on proxies), so the proxy's picks may not be the ones the target "
            "would make. Prefer a smaller model of the target's family; the per-round spice/proxy_rank_corr and "
            "spice/proxy_overlap show how well it agrees with the live model",
            proxy_type,
            target_type,
        )


def _compare_tokenizers(target_tok: Any, proxy_tok: Any, fix: str) -> None:
    target_vocab, proxy_vocab = target_tok.get_vocab(), proxy_tok.get_vocab()
    if target_vocab != proxy_vocab:
        examples = []
        for token, idx in sorted(target_vocab.items(), key=lambda item: item[1]):
            other = proxy_vocab.get(token)
            if other != idx:
                examples.append(
                    f"{token!r} is id {idx} in the target and "
                    + ("missing" if other is None else f"id {other}")
                    + " in the proxy"
                )
            if len(examples) == 3:
                break
        if not examples:
            extra = sorted(set(proxy_vocab) - set(target_vocab))[:3]
            examples.append(f"the proxy has tokens the target lacks, e.g. {extra}")
        raise ValueError(
            f"the proxy's vocabulary differs from the target's ({len(proxy_vocab)} vs {len(target_vocab)} tokens; "
            f"{'; '.join(examples)}). {fix}"
        )
    differing = []
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        a, b = getattr(target_tok, name, None), getattr(proxy_tok, name, None)
        a_id, b_id = getattr(target_tok, f"{name}_id", None), getattr(proxy_tok, f"{name}_id", None)
        if (str(a) if a is not None else None) != (str(b) if b is not None else None) or a_id != b_id:
            differing.append(f"{name}: target {a!r} (id {a_id}), proxy {b!r} (id {b_id})")
    target_special = set(map(str, getattr(target_tok, "all_special_tokens", [])))
    proxy_special = set(map(str, getattr(proxy_tok, "all_special_tokens", [])))
    if target_special != proxy_special:
        differing.append(
            f"special tokens only in the target {sorted(target_special - proxy_special)}, "
            f"only in the proxy {sorted(proxy_special - target_special)}"
        )
    if differing:
        raise ValueError(f"the proxy's special tokens differ from the target's ({'; '.join(differing)}). {fix}")
    if getattr(target_tok, "chat_template", None) != getattr(proxy_tok, "chat_template", None):
        raise ValueError(
            "the proxy's chat template differs from the target's, so conversational rows would be rendered into "
            f"different token sequences. {fix}; or set proxy_tokenizer.chat_template = tokenizer.chat_template "
            "when the difference is cosmetic"
        )


def _compare_configs(proxy_config: Any, target_config: Any, tokenizer: Any, fix: str) -> None:
    proxy_vocab = getattr(proxy_config, "vocab_size", None)
    target_vocab = getattr(target_config, "vocab_size", None)
    if proxy_vocab is not None and target_vocab is not None and proxy_vocab != target_vocab:
        raise ValueError(
            f"the proxy's vocab_size ({proxy_vocab}) differs from the target's ({target_vocab}) and the proxy's "
            "tokenizer is unknown, so SPICE cannot tell padded embeddings of one tokenizer (e.g. Qwen2-0.5B "
            "151936 vs Qwen2-7B 152064) from another vocabulary. Pass the proxy as a local path that holds its "
            f"tokenizer, or ProxyModel(..., proxy_tokenizer=...) for the exact check. {fix}"
        )
    differing = []
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        proxy_id = _first_id(getattr(proxy_config, name, None))
        ref = getattr(tokenizer, name, None) if tokenizer is not None else getattr(target_config, name, None)
        ref_id = _first_id(ref)
        if proxy_id is not None and ref_id is not None and proxy_id != ref_id:
            differing.append(f"{name}: target {ref_id}, proxy {proxy_id}")
    if differing:
        raise ValueError(f"the proxy's special token ids differ from the target's ({'; '.join(differing)}). {fix}")


def _first_id(value: Any) -> int | None:
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    return int(value) if value is not None else None


def _embedding_rows(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def _text_tokenizer(tok: Any) -> Any:
    """The text tokenizer of a tokenizer or a processor (``processor.tokenizer``)."""
    if tok is None or hasattr(tok, "get_vocab"):
        return tok
    inner = getattr(tok, "tokenizer", None)
    return inner if inner is not None and hasattr(inner, "get_vocab") else None


# ---------------------------------------------------------------------------------------------
# the proxy model
# ---------------------------------------------------------------------------------------------


class ProxyModel:
    """A smaller model of the target's family with its own LoRA adapter, for SPICE's gradients.

    Args:
        source: the proxy: a causal LM object (a PEFT model keeps its adapter; a plain model gets one), or a
            local directory (or a hub id already in the local cache) for
            ``AutoModelForCausalLM.from_pretrained(source, local_files_only=True)``: nothing is downloaded. Its
            tokenizer is read from the same place when present.
        config: uses ``proxy_device``, ``proxy_learning_rate``, ``batch_size``, ``max_length`` (and the
            selection fields in `select`).
        target: the target model (the trainer's). Gives the default device, the default adapter (the
            target's ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` when it is a PEFT model)
            and the compatibility checks.
        tokenizer: the target's tokenizer (the trainer's ``processing_class``), for the exact check.
        proxy_tokenizer: the proxy's tokenizer, when ``source`` is an object (default: read from the
            directory ``source`` or ``source.config._name_or_path`` when it is local).
        lora_config: a ``peft.LoraConfig`` for the proxy's adapter, overriding the default.

    Raises:
        ValueError: see `check_proxy_compatible`; a path that is neither a local model directory nor in the
            local cache; a proxy that is the target; a proxy partitioned by DeepSpeed ZeRO-3.
        TypeError: ``source`` is neither a model nor a path.
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
        if isinstance(source, os.PathLike):
            source = os.fspath(source)
        if isinstance(source, str):
            model, found_tokenizer = _load_local(source)
            proxy_tokenizer = proxy_tokenizer if proxy_tokenizer is not None else found_tokenizer
        elif isinstance(source, nn.Module):
            model = source
            if proxy_tokenizer is None:
                proxy_tokenizer = _tokenizer_beside(model)
        else:
            raise TypeError(f"the proxy must be a model object or a local directory (str), got {type(source).__name__}")
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
        self.model: nn.Module = _with_adapter(model, target, lora_config, config.seed)
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

    def parameters(self) -> Iterator[nn.Parameter]:
        """The proxy model's parameters (so that ``SpiceConfig(proxy_model=ProxyModel(...))`` is accepted)."""
        return self.model.parameters()

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
            self._feature_config(config),
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
        collate = data_collator or _PadCollator(_pad_id(self.model))
        batches = [
            collate([_prepare_row(dataset[i], self.config.max_length) for i in rows[lo : lo + size]])
            for lo in range(0, len(rows), size)
        ]
        total = sum(int((_labels(b)[:, 1:] != -100).sum()) for b in batches)
        if total == 0:
            raise ValueError(f"the {len(rows)} refresh rows have no supervised token (every label is -100)")
        was_training = self.model.training
        self.model.eval()
        loss_sum = 0.0
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                for batch in batches:
                    logits = self.model(**_model_inputs(batch, self.device)).logits
                    summed = _token_loss_sum(logits, _labels(batch).to(self.device))
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
        from spice_trainer.pipeline import select

        return select(
            self.model,
            dataset,
            self._feature_config(config),
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
        the loss guard (`spice_trainer.pipeline.eligible_rows`) applies within the pool; exact greedy picks
        up to ``config.picks_per_pool`` rows maximising ``Δ_x(S) − λ c_x(S)`` with ``S`` every row picked so
        far (``initial`` first), whose Fisher state ``(I + α F_S)⁻¹`` and conflict sum ``Σ_S g`` carry over
        from earlier pools (each pick's feature vector as it was when picked). Before pool ``p + 1`` with
        ``p`` a multiple of ``T`` = ``config.proxy_refresh_every_pools``, the proxy takes one `refresh` step
        on the picks of pools ``p − T + 1 .. p`` (skipped when they picked nothing). So ``P_visited`` pools
        give ``⌊(P_visited − 1) / T⌋`` steps at most.

        Early stopping (``ω`` = ``config.stop_ratio``) ends a pool's picks when the watched gain is
        ``≤ ω ·`` the reference (``reference_gain``, or this run's first pick's ``Δ``), and the stream goes
        on — as in `select_from_features` with ``greedy="pooled"``, which this equals when no refresh
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
        init = _check_initial(initial, n)
        to_pick = max(0, budget - len(init))
        cfg = self._feature_config(config)
        if config.feature_store is not None:
            logger.info("spice: the online proxy regime recomputes features as the proxy changes; feature_store unused")
        lam, alpha, omega = config.conflict_weight, config.fisher_scale, config.stop_ratio
        objective = SpiceObjective(
            torch.zeros(0, config.proj_dim), alpha, capacity=len(init) + to_pick, track_rows=False
        )
        feature_seconds = refresh_seconds = 0.0
        taken = torch.zeros(n, dtype=torch.bool)
        if init:
            t0 = time.perf_counter()
            init_feats = self.features(dataset, cfg, data_collator, indices=init).features
            feature_seconds += time.perf_counter() - t0
            bad = [r for r, ok in zip(init, torch.isfinite(init_feats).all(dim=1).tolist(), strict=True) if not ok]
            if bad:
                raise ValueError(f"initial rows {bad[:10]} have non-finite proxy features; drop them from initial")
            for g in init_feats:
                objective.add(g)
            taken[torch.tensor(init)] = True
        initial_logdet = objective.logdet

        picks: list[int] = []
        values: list[tuple[float, float, float]] = []  # (Δ, c, b) per pick
        skipped: list[int] = []
        window: list[int] = []
        refresh_losses: list[float] = []
        reference = reference_gain
        pools = stopped = 0
        bar = _progress(math.ceil(n / config.pool_size), show_progress, "spice proxy pools")
        try:
            for begin in range(0, n, config.pool_size):
                if len(picks) >= to_pick:
                    break
                if pools and pools % config.proxy_refresh_every_pools == 0 and window:
                    t0 = time.perf_counter()
                    refresh_losses.append(self.refresh(dataset, window, data_collator))
                    refresh_seconds += time.perf_counter() - t0
                    window = []
                pools += 1
                if bar is not None:
                    bar.update(1)
                rows = [r for r in range(begin, min(begin + config.pool_size, n)) if not taken[r]]
                if not rows:
                    continue
                t0 = time.perf_counter()
                grads = self.features(dataset, cfg, data_collator, indices=rows)
                feature_seconds += time.perf_counter() - t0
                quota = min(config.picks_per_pool, to_pick - len(picks), len(rows))
                from spice_trainer.pipeline import eligible_rows

                finite = torch.isfinite(grads.features).all(dim=1)
                skipped += [r for r, ok in zip(rows, finite.tolist(), strict=True) if not ok]
                mask = finite & eligible_rows(grads, config.with_changes(budget=quota))
                available = int(mask.sum())
                if available == 0:
                    continue
                objective.features = torch.where(finite.unsqueeze(1), grads.features, torch.zeros(()))
                objective.restrict(torch.arange(len(rows)))
                blocked = ~mask
                for _ in range(quota):
                    if available == 0:
                        break
                    at, gain_t, conflict_t, score_t = best_candidate(objective, blocked, available, lam)
                    pos, gain, score, conflict = torch.stack(
                        [at.to(score_t.dtype), gain_t, score_t, conflict_t]
                    ).tolist()
                    if reference is None:
                        reference = gain  # the run's first pick sets the reference and is kept
                    elif omega is not None and (gain if config.stop_on == "gain" else score) <= omega * reference:
                        stopped += 1
                        break
                    local = int(pos)
                    g = objective.features[local]
                    objective.add(g)
                    blocked[local] = True
                    available -= 1
                    row = rows[local]
                    taken[row] = True
                    picks.append(row)
                    window.append(row)
                    values.append((gain, conflict, math.log1p(alpha * float(g.double().square().sum()))))
        finally:
            if bar is not None:
                bar.close()

        reason: StopReason = "budget" if len(picks) >= to_pick else ("early_stop" if stopped else "exhausted")
        gains = [v[0] for v in values]
        conflicts = [v[1] for v in values]
        base = [v[2] for v in values]
        cumulative: list[float] = []
        running = initial_logdet
        for gain in gains:
            running += gain
            cumulative.append(running)
        selection = Selection.from_picks(
            indices=picks,
            gains=gains,
            base_gains=base,
            conflicts=conflicts,
            conflict_weight=lam,
            objective=cumulative,
            stop_reason=reason,
            n_candidates=n,
            skipped=sorted(skipped),
            initial=init,
            config=config.to_dict(),
            metadata={
                "greedy": "pooled",
                "online_proxy": True,
                "budget": budget,
                "pools_visited": pools,
                "pools_stopped_early": stopped,
                "refresh_steps": len(refresh_losses),
                "refresh_losses": refresh_losses,
                "reference_gain": reference,
                "initial_objective": initial_logdet,
                "method": objective.method,
                "feature_seconds": feature_seconds,
                "refresh_seconds": refresh_seconds,
                "seconds": time.perf_counter() - start,
            },
        )
        if sd.is_distributed():
            selection = sd.broadcast_object(selection, src=0)
        return selection

    # --- helpers ------------------------------------------------------------------------------------
    def _has_stepped(self) -> bool:
        return any("exp_avg_sq" in self.optimizer.state.get(p, {}) for p in self._params)

    def _feature_config(self, config: SpiceConfig) -> SpiceConfig:
        if config.feature_norm == "adam" and not self._has_stepped():
            logger.info("spice: the proxy's adapter has not stepped yet; feature_norm='adam' falls back to 'unit'")
            return config.with_changes(feature_norm="unit")
        return config


def _load_local(path: str) -> tuple[nn.Module, Any]:
    """``AutoModelForCausalLM`` (and, when present, ``AutoTokenizer``) from a local directory or a hub id
    already in the local cache — never downloaded (no network request), never partitioned by ZeRO-3."""
    from transformers import AutoModelForCausalLM

    folder = path if os.path.isdir(path) else _cached_snapshot(path)
    with _outside_zero3():
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return model, _tokenizer_in(folder)


def _cached_snapshot(name: str) -> str:
    """The local snapshot folder of a hub id in the Hugging Face cache (no network request)."""
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError) as err:  # not in the cache (OSError), or not a valid repo id (ValueError)
        raise ValueError(
            f"proxy_model={name!r} is not a local model directory nor in the local Hugging Face cache; the proxy "
            "is never downloaded. Download it first (e.g. `hf download Qwen/Qwen2-0.5B --local-dir ./qwen2-0.5b`) "
            f"and pass the folder, or pass a model object ({type(err).__name__})"
        ) from err


def _tokenizer_beside(model: nn.Module) -> Any:
    """The tokenizer saved next to a model loaded from a local directory, if any."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return _tokenizer_in(path) if isinstance(path, str) and path and os.path.isdir(path) else None


def _tokenizer_in(path: str) -> Any:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, name)) for name in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        logger.warning("spice: could not read the proxy's tokenizer in %s (%s); comparing configs only", path, err)
        return None


@contextlib.contextmanager
def _outside_zero3() -> Iterator[None]:
    """Load without ZeRO-3 partitioning: transformers partitions every ``from_pretrained`` while a ZeRO-3
    ``HfDeepSpeedConfig`` is alive, and a partitioned proxy cannot give per-example gradients."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    if saved is None:
        yield
        return
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _with_adapter(model: nn.Module, target: nn.Module | None, lora_config: Any, seed: int) -> nn.Module:
    """``model`` with a LoRA adapter: its own if it has one, else ``lora_config``, else the target's shape."""
    if hasattr(model, "peft_config"):
        if lora_config is not None:
            raise ValueError(
                "the proxy already has a PEFT adapter; pass a plain model with lora_config=..., or neither"
            )
        find_lora_weights(model)  # a clear error for non-LoRA PEFT adapters
        return model
    from peft import LoraConfig, get_peft_model

    explicit = lora_config is not None
    if lora_config is None:
        settings: dict[str, Any] = dict(_DEFAULT_LORA)
        peft_configs = getattr(target, "peft_config", None)
        if isinstance(peft_configs, dict) and peft_configs:
            active = getattr(target, "active_adapter", None)
            source = peft_configs.get(active) if isinstance(active, str) else None
            source = source or next(iter(peft_configs.values()))
            for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"):
                if getattr(source, key, None) is not None:
                    settings[key] = getattr(source, key)
        lora_config = LoraConfig(task_type="CAUSAL_LM", **settings)
    # PEFT initialises lora_A from the global RNG: draw it from a seeded, forked stream instead.
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, lora_config)
        except ValueError as err:
            if explicit or "target modules" not in str(err).lower():
                raise
            logger.warning(
                "spice: the target's LoRA target_modules %s do not exist in the proxy (%s); the proxy's adapter "
                "uses target_modules='all-linear'",
                lora_config.target_modules,
                type(model).__name__,
            )
            fallback = LoraConfig(
                task_type="CAUSAL_LM",
                r=lora_config.r,
                lora_alpha=lora_config.lora_alpha,
                lora_dropout=lora_config.lora_dropout,
                target_modules="all-linear",
            )
            return get_peft_model(model, fallback)


def _device_of(model: nn.Module | None) -> torch.device:
    if model is None:
        return torch.device("cpu")
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _labels(batch: dict[str, Any]) -> torch.Tensor:
    """The batch's labels; without any (e.g. ``DataCollatorWithPadding``) every real token is a target."""
    if batch.get("labels") is not None:
        return torch.as_tensor(batch["labels"])
    input_ids = torch.as_tensor(batch["input_ids"])
    mask = batch.get("attention_mask")
    return input_ids if mask is None else input_ids.masked_fill(torch.as_tensor(mask) == 0, -100)


def _model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Model kwargs as `compute_gradient_features` builds them (positions counted from each row's start)."""
    inputs: dict[str, Any] = {"input_ids": torch.as_tensor(batch["input_ids"]).to(device), "use_cache": False}
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = torch.as_tensor(mask).to(device)
        inputs["attention_mask"] = mask
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    if "position_ids" in batch:
        inputs["position_ids"] = torch.as_tensor(batch["position_ids"]).to(device)
    return inputs


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``Σ_{i,t} ℓ_{i,t}`` over supervised next-token targets (labels shifted left by one, -100 ignored)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


def _check_initial(initial: Sequence[int] | None, n: int) -> list[int]:
    if initial is None:
        return []
    rows = [int(r) for r in (initial.flatten().tolist() if isinstance(initial, torch.Tensor) else initial)]
    bad = [r for r in rows if not 0 <= r < n]
    if bad:
        raise ValueError(f"initial has row indices outside [0, {n}): {bad[:10]}")
    if len(set(rows)) != len(rows):
        raise ValueError("initial has duplicated rows; each row can be selected once")
    return rows


def _progress(total: int, show: bool, desc: str) -> Any:
    if not show or total <= 1:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pool", leave=False)


# ---------------------------------------------------------------------------------------------
# agreement with the live model
# ---------------------------------------------------------------------------------------------


@dataclass
class Agreement:
    """How well the proxy stands in for the live model on a probe of candidates.

    Attributes:
        rank_corr: Spearman rank correlation of the base gains ``b_x = log(1 + α‖g_x‖²)`` (the first greedy
            step's gains, ``Δ_x(∅) = b_x``) of the probe rows with finite features under both models.
        overlap: ``|picks_proxy ∩ picks_target| / k`` for ``k`` greedy picks made on each model's features.
        jaccard: ``|∩| / |∪|`` of the same picks.
        k: picks per model.
        probe_rows: the probe (dataset rows).
        proxy_picks: the proxy's picks (dataset rows, pick order).
        target_picks: the live model's picks.
        seconds: wall-clock time of the report (both gradient passes and both greedy runs).
    """

    rank_corr: float
    overlap: float
    jaccard: float
    k: int
    probe_rows: list[int] = field(default_factory=list)
    proxy_picks: list[int] = field(default_factory=list)
    target_picks: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank_corr": self.rank_corr,
            "overlap": self.overlap,
            "jaccard": self.jaccard,
            "k": self.k,
            "probe_rows": self.probe_rows,
            "proxy_picks": self.proxy_picks,
            "target_picks": self.target_picks,
            "seconds": self.seconds,
        }


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's ρ of two ``(m,)`` samples: Pearson correlation of their ranks (ties get average ranks).

    NaN when ``m < 2`` or either sample is constant.
    """
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"spearman needs two 1-D samples of the same length, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.numel() < 2:
        return float("nan")
    rx, ry = _average_ranks(x.double()), _average_ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    _, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # 1-based rank of each distinct value's last occurrence
    return (last - (counts.double() - 1) / 2)[inverse]


def probe_rows(n: int, config: SpiceConfig, size: int = PROBE_SIZE) -> list[int]:
    """``min(size, n)`` distinct rows drawn with a local generator seeded by ``config.seed`` (sorted)."""
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    return sorted(torch.randperm(n, generator=gen)[: min(size, n)].tolist())


def proxy_agreement(
    proxy: ProxyModel,
    target: nn.Module,
    dataset: Any,
    config: SpiceConfig,
    data_collator: Collator | None = None,
    *,
    probe_size: int = PROBE_SIZE,
    picks: int | None = None,
    target_optimizer: torch.optim.Optimizer | None = None,
) -> Agreement:
    """Compare the proxy's and the live model's SPICE gains on a seeded probe of candidates.

    Both models' features of the probe rows (`probe_rows`) are computed with ``config``; ``rank_corr`` is
    Spearman's ρ of the base gains, and each model's own loss guard and exact greedy (no early stopping)
    pick ``k`` rows (default ``⌊m / 4⌋``: enough picks that one or two do not dominate the overlap, few
    enough that the choice is selective) for ``overlap`` and ``jaccard``. Neither model's weights,
    ``.grad``s or optimizer state change.

    Raises:
        ValueError: the target has no LoRA adapter (see `find_lora_weights`).
    """
    from spice_trainer.greedy import select_from_features
    from spice_trainer.pipeline import eligible_rows

    start = time.perf_counter()
    rows = probe_rows(len(dataset), config, probe_size)
    m = len(rows)
    k = max(1, m // 4) if picks is None else min(int(picks), m)
    probe_cfg = config.with_changes(budget=k, greedy="exact", stop_ratio=None, feature_store=None)
    proxy_cfg = proxy._feature_config(probe_cfg)
    target_cfg = probe_cfg
    if probe_cfg.feature_norm == "adam" and (target_optimizer is None or proxy_cfg.feature_norm != "adam"):
        proxy_cfg = target_cfg = probe_cfg.with_changes(feature_norm="unit")
    ours = proxy.features(dataset, proxy_cfg, data_collator, indices=rows)
    theirs = compute_gradient_features(
        target, dataset, target_cfg, data_collator, indices=rows, optimizer=target_optimizer, show_progress=False
    )
    both = torch.isfinite(ours.features).all(dim=1) & torch.isfinite(theirs.features).all(dim=1)
    alpha = config.fisher_scale
    b_proxy = torch.log1p(alpha * ours.features[both].double().square().sum(dim=1))
    b_target = torch.log1p(alpha * theirs.features[both].double().square().sum(dim=1))
    rho = spearman(b_proxy, b_target)

    def picks_of(grads: GradientFeatures, cfg: SpiceConfig) -> list[int]:
        finite = torch.isfinite(grads.features).all(dim=1)
        if not bool(finite.any()) or not bool(grads.features[finite].any()):
            return []
        chosen = select_from_features(grads.features, cfg, eligible=eligible_rows(grads, cfg))
        return [rows[i] for i in chosen.indices]

    proxy_picks, target_picks = picks_of(ours, proxy_cfg), picks_of(theirs, target_cfg)
    common = len(set(proxy_picks) & set(target_picks))
    union = len(set(proxy_picks) | set(target_picks))
    return Agreement(
        rank_corr=rho,
        overlap=common / k,
        jaccard=common / union if union else float("nan"),
        k=k,
        probe_rows=rows,
        proxy_picks=proxy_picks,
        target_picks=target_picks,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# rounds during training
# ---------------------------------------------------------------------------------------------


class _SamplerLike(Protocol):
    def drawn_position(self) -> tuple[int, int]: ...

    def row_at(self, epoch: int, position: int) -> int: ...

    def __len__(self) -> int: ...


class ProxyRounds:
    """The select function of `SpiceDataCallback` when ``config.proxy_model`` is set.

    Built when the callback attaches to its trainer, so the proxy is loaded and checked against the
    trainer's model and ``processing_class`` before training starts. Each round (called as
    ``rounds(model, dataset, config, collator, show_progress=..., initial=..., reference_gain=...,
    optimizer=...)`` with the trainer's live ``model``):

    1. refresh: the rows the sampler yielded since the previous round (deduplicated, in draw order) are
       cut into groups of ``T · picks_per_pool`` rows — the paper's one step per ``T`` pools' picks — and
       the proxy takes one `ProxyModel.refresh` step per group;
    2. agreement: `proxy_agreement` between the proxy and the live model on the seeded probe (skipped under
       DeepSpeed/FSDP, where the live model's LoRA weights are sharded, or when it has no LoRA adapter);
    3. selection: `ProxyModel.select` (the online regime for ``greedy="pooled"``).

    ``metadata`` gains ``proxy`` (device, refresh steps and rows, agreement) and the flat
    ``proxy_rank_corr`` / ``proxy_overlap`` the callback logs as ``spice/proxy_rank_corr`` and
    ``spice/proxy_overlap``.

    Args:
        callback: the `SpiceDataCallback` (its ``sampler`` tells what was drawn).
        trainer: the `Trainer` it is attached to.
    """

    def __init__(self, callback: Any, trainer: Any) -> None:
        config: SpiceConfig = callback.config
        self._callback = callback
        self._trainer = trainer
        source = config.proxy_model
        tokenizer = getattr(trainer, "processing_class", None)
        if isinstance(source, ProxyModel):
            check_proxy_compatible(source.model, trainer.model, tokenizer=tokenizer, proxy_tokenizer=source.tokenizer)
            self.proxy = source
        else:
            self.proxy = ProxyModel(source, config, target=trainer.model, tokenizer=tokenizer)
        self._mark: tuple[int, int] = (0, 0)
        self.agreements: list[Agreement] = []

    def __call__(
        self,
        model: nn.Module,
        dataset: Any,
        config: SpiceConfig,
        data_collator: Collator | None = None,
        *,
        show_progress: bool = True,
        initial: Sequence[int] | None = None,
        reference_gain: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> Selection:
        start = time.perf_counter()
        sampler: _SamplerLike | None = self._callback.sampler
        trained = self._drawn_rows(sampler) if sampler is not None else []
        group = config.proxy_refresh_every_pools * config.picks_per_pool
        losses = [
            self.proxy.refresh(dataset, trained[lo : lo + group], data_collator) for lo in range(0, len(trained), group)
        ]
        refresh_seconds = time.perf_counter() - start
        if sampler is not None:
            # Set now, so a round that fails after the refresh does not train the proxy on the same rows twice.
            self._mark = sampler.drawn_position()
        agreement = None
        if self._live_measurable(model):
            agreement = proxy_agreement(self.proxy, model, dataset, config, data_collator, target_optimizer=optimizer)
            self.agreements.append(agreement)
        selection = self.proxy.select(
            dataset, config, data_collator, initial=initial, reference_gain=reference_gain, show_progress=show_progress
        )
        selection.metadata["proxy"] = {
            "model_type": getattr(getattr(self.proxy.model, "config", None), "model_type", None),
            "device": str(self.proxy.device),
            "trained_rows": len(trained),
            "refresh_steps_before_round": len(losses),
            "refresh_losses_before_round": losses,
            "refresh_seconds_before_round": refresh_seconds,
            "total_refresh_steps": self.proxy.refresh_steps,
            "agreement": agreement.to_dict() if agreement is not None else None,
        }
        if agreement is not None:
            selection.metadata["proxy_rank_corr"] = agreement.rank_corr
            selection.metadata["proxy_overlap"] = agreement.overlap
            logger.info(
                "spice: proxy agreement with the live model: rank corr %.3f, overlap %.2f (%d picks of %d probe rows)",
                agreement.rank_corr,
                agreement.overlap,
                agreement.k,
                len(agreement.probe_rows),
            )
        selection.metadata["seconds"] = time.perf_counter() - start
        return selection

    def save_state(self, folder: Path) -> None:
        """Write the proxy's adapter, its optimizer state and the last round's sample position to
        ``folder / PROXY_STATE_FILE`` (called by the callback in each checkpoint), so a resumed run refreshes
        and selects exactly as the uninterrupted one. A failing write is logged, never raised."""
        state = {
            "adapter": {name: p.detach().cpu() for name, p in self._adapter_parameters()},
            "optimizer": self.proxy.optimizer.state_dict(),
            "mark": list(self._mark),
            "refresh_steps": self.proxy.refresh_steps,
        }
        try:
            tmp = folder / f".{PROXY_STATE_FILE}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, folder / PROXY_STATE_FILE)
        except OSError as err:
            logger.warning("spice: could not save the proxy state into %s: %s", folder, err)

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote; without the file the proxy keeps its fresh adapter (logged)."""
        path = folder / PROXY_STATE_FILE
        if not path.is_file():
            logger.warning("spice: %s has no %s; the proxy restarts from its initial adapter", folder, PROXY_STATE_FILE)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        params = dict(self._adapter_parameters())
        if set(state["adapter"]) != set(params):
            raise ValueError(
                f"{path} holds an adapter with other weights than the proxy's ({len(state['adapter'])} vs "
                f"{len(params)} tensors); resume with the same proxy_model"
            )
        with torch.no_grad():
            for name, value in state["adapter"].items():
                params[name].copy_(value.to(params[name].device))
        self.proxy.optimizer.load_state_dict(state["optimizer"])
        self._mark = (int(state["mark"][0]), int(state["mark"][1]))
        self.proxy.refresh_steps = int(state["refresh_steps"])

    def _adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        ids = {id(p) for p in self.proxy._params}
        return [(name, p) for name, p in self.proxy.model.named_parameters() if id(p) in ids]

    def _drawn_rows(self, sampler: _SamplerLike) -> list[int]:
        """Distinct rows yielded from the previous round's position up to now, in first-draw order."""
        end = sampler.drawn_position()
        epoch, position = self._mark
        size = len(sampler)
        seen: dict[int, None] = {}
        while (epoch, position) < end:
            seen.setdefault(sampler.row_at(epoch, position))
            position += 1
            if position >= size:
                epoch, position = epoch + 1, 0
        return list(seen)

    def _live_measurable(self, model: nn.Module) -> bool:
        trainer = self._trainer
        if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
            return False
        try:
            find_lora_weights(model)
        except ValueError:
            return False
        return True
