"""`ProxyRounds`: the select function `SpiceDataCallback` uses when ``SpiceConfig.proxy_model`` is set."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from spice_trainer.config import SpiceConfig
from spice_trainer.core.selection import Selection
from spice_trainer.features.batches import Collator
from spice_trainer.features.gradients import find_lora_weights
from spice_trainer.integrations.hub import load_proxy
from spice_trainer.proxy.agreement import Agreement, proxy_agreement
from spice_trainer.proxy.compat import check_proxy_compatible
from spice_trainer.proxy.model import ProxyModel

# transformers' logging: the spice_trainer loggers follow the trainer's log_level / log_level_replica
# (integrations/reporting.py `use_trainer_log_level`).
logger = hf_logging.get_logger(__name__)

#: The file in each checkpoint that holds the proxy's adapter, its optimizer state and the round position.
PROXY_STATE_FILE = "spice_proxy.pt"

__all__ = ["PROXY_STATE_FILE", "ProxyRounds"]


class _SamplerLike(Protocol):
    def consumed_position(self) -> tuple[int, int]: ...

    def row_at(self, epoch: int, position: int) -> int: ...

    def __len__(self) -> int: ...


class ProxyRounds:
    """The select function of `SpiceDataCallback` when ``config.proxy_model`` is set.

    Built when the callback attaches to its trainer, so the proxy is loaded and checked against the
    trainer's model and ``processing_class`` before training starts. Each round (called as
    ``rounds(model, dataset, config, collator, show_progress=..., initial=..., reference_gain=...,
    optimizer=...)`` with the trainer's live ``model``):

    1. refresh: the rows the trainer consumed since the previous round (deduplicated, in draw order) are
       cut into groups of ``T · picks_per_pool`` rows — the paper's one step per ``T`` pools' picks — and
       the proxy takes one `ProxyModel.refresh` step per group;
    2. agreement: `proxy_agreement` between the proxy and the live model on the seeded probe (skipped under
       DeepSpeed/FSDP, where the live model's LoRA weights are sharded, or when it has no LoRA adapter);
    3. selection: `ProxyModel.select` (the online regime for ``greedy="pooled"``).

    ``metadata`` gains ``proxy`` (device, refresh steps and rows, agreement) and the flat
    ``proxy_rank_corr`` / ``proxy_overlap`` the callback logs as ``spice/proxy_rank_corr`` and
    ``spice/proxy_overlap``.

    Args:
        callback: the `SpiceDataCallback` (its ``sampler`` tells what the trainer consumed).
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
        self.proxy = load_proxy(source, config, target=trainer.model, tokenizer=tokenizer)
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
            self._mark = sampler.consumed_position()
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

    def start_run(self) -> None:
        """A new training run (``trainer.train()`` without resume): nothing consumed yet. The proxy keeps its
        adapter, which has followed the target model's training so far."""
        self._mark = (0, 0)

    def save_state(self, folder: Path) -> str:
        """Write the proxy's adapter, its optimizer state and the last round's sample position to
        ``folder / PROXY_STATE_FILE``, so a resumed run refreshes and selects exactly as the uninterrupted one.

        Called by the callback while the trainer writes the checkpoint (before ``trainer_state.json``, which records
        the file's checksum). A failing write raises, as a failing write of the trainer's own files does.

        Returns:
            The file name (inside ``folder``).
        """
        state = {
            "adapter": {name: p.detach().cpu() for name, p in self._adapter_parameters()},
            "optimizer": self.proxy.optimizer.state_dict(),
            "mark": list(self._mark),
            "refresh_steps": self.proxy.refresh_steps,
        }
        tmp = folder / f".{PROXY_STATE_FILE}.tmp"
        try:
            torch.save(state, tmp)
            os.replace(tmp, folder / PROXY_STATE_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        return PROXY_STATE_FILE

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote (the caller has checked the file's checksum).

        Raises:
            ValueError: the file is missing, unreadable, or holds other fields or another adapter than this
                proxy's; the message names the file and the fix.
        """
        path = folder / PROXY_STATE_FILE
        fix = "resume from another checkpoint, or start a new run (new output_dir)"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as err:
            raise ValueError(f"{path} is missing: the checkpoint has no proxy state; {fix}") from err
        except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError on damaged files
            raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}); {fix}") from err
        fields = {"adapter", "optimizer", "mark", "refresh_steps"}
        if not isinstance(state, dict) or set(state) != fields:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path} holds {found}, expected the fields {sorted(fields)}; {fix}")
        mark, steps = state["mark"], state["refresh_steps"]
        if not (
            isinstance(mark, list | tuple)
            and len(mark) == 2
            and all(isinstance(v, int) and v >= 0 for v in mark)
            and isinstance(steps, int)
            and steps >= 0
        ):
            raise ValueError(f"{path}: mark {mark!r} / refresh_steps {steps!r} are not non-negative integers; {fix}")
        params = dict(self._adapter_parameters())
        adapter = state["adapter"]
        if not isinstance(adapter, dict) or set(adapter) != set(params):
            raise ValueError(
                f"{path} holds an adapter with other weights than the proxy's ({len(adapter)} vs "
                f"{len(params)} tensors); resume with the same proxy_model"
            )
        for name, value in adapter.items():
            if not isinstance(value, torch.Tensor) or value.shape != params[name].shape:
                raise ValueError(f"{path}: adapter weight {name!r} has another shape than the proxy's; {fix}")
        with torch.no_grad():
            for name, value in adapter.items():
                params[name].copy_(value.to(params[name].device))
        self.proxy.optimizer.load_state_dict(state["optimizer"])
        self._mark = (int(mark[0]), int(mark[1]))
        self.proxy.refresh_steps = int(steps)

    def _adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        ids = {id(p) for p in self.proxy.lora_weights}
        return [(name, p) for name, p in self.proxy.model.named_parameters() if id(p) in ids]

    def _drawn_rows(self, sampler: _SamplerLike) -> list[int]:
        """Distinct rows the trainer consumed from the previous round's position up to now, in draw order."""
        end = sampler.consumed_position()
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
