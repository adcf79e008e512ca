"""Loading Hugging Face models and tokenizers for spice-trainer: local folders, the HF cache, ZeRO-3.

The only place that reaches into transformers' loading machinery (STYLE.md: transformers stays in
``integrations/``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers.utils import logging as hf_logging

from spice_trainer.config import SpiceConfig
from spice_trainer.proxy.model import ProxyModel

# transformers' logging: the spice_trainer loggers follow the trainer's log_level / log_level_replica
# (integrations/reporting.py `use_trainer_log_level`).
logger = hf_logging.get_logger(__name__)

__all__ = ["cached_snapshot", "load_causal_lm", "load_proxy", "outside_zero3", "tokenizer_beside", "tokenizer_in"]


def load_proxy(
    source: Any,
    config: SpiceConfig,
    *,
    target: nn.Module | None = None,
    tokenizer: Any = None,
    proxy_tokenizer: Any = None,
    lora_config: Any = None,
) -> ProxyModel:
    """A `ProxyModel` from a model object, a local directory or a hub id in the local cache.

    A path is loaded with `load_causal_lm` (outside ZeRO-3 partitioning, with the tokenizer found there); for
    an object loaded from a local folder, the tokenizer saved beside it is used for the exact compatibility
    check. A `ProxyModel` is returned as is.

    Raises:
        TypeError: ``source`` is neither a model, a `ProxyModel` nor a path.
        ValueError: see `ProxyModel`; a path that is neither a local model directory nor in the local cache.
    """
    if isinstance(source, ProxyModel):
        return source
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        model, found = load_causal_lm(source)
    elif isinstance(source, nn.Module):
        model, found = source, tokenizer_beside(source)
    else:
        raise TypeError(f"the proxy must be a model object or a local directory (str), got {type(source).__name__}")
    return ProxyModel(
        model,
        config,
        target=target,
        tokenizer=tokenizer,
        proxy_tokenizer=proxy_tokenizer if proxy_tokenizer is not None else found,
        lora_config=lora_config,
    )


def load_causal_lm(path: str) -> tuple[nn.Module, Any]:
    """``AutoModelForCausalLM`` (and, when present, ``AutoTokenizer``) from a local directory or a hub id
    already in the local cache — never downloaded (no network request), never partitioned by ZeRO-3."""
    from transformers import AutoModelForCausalLM

    folder = path if os.path.isdir(path) else cached_snapshot(path)
    with outside_zero3():
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return model, tokenizer_in(folder)


def cached_snapshot(name: str) -> str:
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


def tokenizer_beside(model: nn.Module) -> Any:
    """The tokenizer saved next to a model loaded from a local directory, if any."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return tokenizer_in(path) if isinstance(path, str) and path and os.path.isdir(path) else None


def tokenizer_in(path: str) -> Any:
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
def outside_zero3() -> Iterator[None]:
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
