"""Give a model a LoRA adapter (PEFT): its own, a given one, or one shaped like another model's.

One home for the default adapter spice-trainer adds (the proxy's, and the command line's for a plain model).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from spice_trainer.features.gradients import find_lora_weights

logger = logging.getLogger(__name__)

#: The adapter added to a plain model when nothing else says how: PEFT's usual starting point.
DEFAULT_LORA: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}

__all__ = ["DEFAULT_LORA", "with_lora_adapter"]


def with_lora_adapter(
    model: nn.Module, *, like: nn.Module | None = None, lora_config: Any = None, seed: int = 0
) -> nn.Module:
    """``model`` with a LoRA adapter: its own if it has one, else ``lora_config``, else shaped like ``like``'s.

    Without ``lora_config`` the adapter copies ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` and
    ``use_rslora`` of ``like``'s active adapter when ``like`` is a PEFT model, else `DEFAULT_LORA`. ``lora_A``
    is drawn from a forked global RNG seeded with ``seed`` (PEFT draws it from the global stream), so the
    caller's RNG does not move.

    Raises:
        ValueError: ``model`` already has a PEFT adapter and ``lora_config`` is given too, or its adapter is not
            LoRA.
    """
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
        settings: dict[str, Any] = dict(DEFAULT_LORA)
        peft_configs = getattr(like, "peft_config", None)
        if isinstance(peft_configs, dict) and peft_configs:
            active = getattr(like, "active_adapter", None)
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
