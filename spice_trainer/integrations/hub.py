"""Loading Hugging Face models and tokenizers for spice-trainer: local folders and Hub ids, ZeRO-3.

Wherever a local folder is accepted, a Hub id is too. Hub ids resolve as in transformers: the Hugging Face
cache first (``HF_HUB_CACHE``), a download otherwise, and never a download under ``HF_HUB_OFFLINE=1``
(nothing here sets that variable: only the tests and the demo do).

The only place that reaches into transformers' loading machinery (transformers stays in ``integrations/``:
docs/architecture.md).
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

__all__ = [
    "adapter_base",
    "cached_snapshot",
    "is_offline",
    "load_causal_lm",
    "load_proxy",
    "load_tokenizer",
    "outside_zero3",
    "tokenizer_beside",
    "tokenizer_in",
]


def load_proxy(
    source: Any,
    config: SpiceConfig,
    *,
    target: nn.Module | None = None,
    tokenizer: Any = None,
    proxy_tokenizer: Any = None,
    lora_config: Any = None,
) -> ProxyModel:
    """A `ProxyModel` from a model object, a local directory or a Hub id (cache first; see `load_causal_lm`).

    A path is loaded with `load_causal_lm` (outside ZeRO-3 partitioning, with the tokenizer found there); for
    an object loaded from a local folder, the tokenizer saved beside it is used for the exact compatibility
    check. A `ProxyModel` is returned as is.

    Raises:
        TypeError: ``source`` is neither a model, a `ProxyModel` nor a path.
        ValueError: see `ProxyModel`; a path that is neither a local model directory nor a loadable Hub id.
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


def load_causal_lm(name_or_path: str, **kwargs: Any) -> tuple[nn.Module, Any]:
    """``AutoModelForCausalLM`` (and, when there is one, ``AutoTokenizer``) from a local folder or a Hub id.

    A Hub id is resolved as transformers resolves it: from the Hugging Face cache (``HF_HUB_CACHE`` /
    ``HF_HOME``) when the files are there, downloaded into it otherwise, and never downloaded under
    ``HF_HUB_OFFLINE=1``. The model is loaded outside ZeRO-3 partitioning (`outside_zero3`).

    Args:
        name_or_path: a folder written by ``save_pretrained`` or a Hub id such as ``"Qwen/Qwen2-0.5B"``.
        kwargs: passed to ``from_pretrained`` (e.g. ``revision``, ``dtype``).

    Raises:
        ValueError: the model can be found neither locally nor on the Hub (or in the cache, when offline),
            naming what was tried and the fix.
    """
    from transformers import AutoModelForCausalLM

    try:
        with outside_zero3():
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise ValueError(_not_found(name_or_path, "model", err)) from err
    return model, load_tokenizer(name_or_path, revision=kwargs.get("revision"))


def load_tokenizer(name_or_path: str, *, revision: str | None = None) -> Any:
    """The tokenizer of a local folder or a Hub id (cache and ``HF_HUB_OFFLINE`` as for the model), or None.

    None when the folder or repository holds no tokenizer (a plain model saved without one).
    """
    if os.path.isdir(name_or_path) and not _has_tokenizer_files(name_or_path):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError, TypeError) as err:
        logger.warning("spice: could not read a tokenizer from %s (%s)", name_or_path, err)
        return None


def adapter_base(name_or_path: str) -> str | None:
    """The base model a PEFT adapter (local folder or Hub id) was trained on, or None if it is not an adapter."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "adapter_config.json")):
            return None
    elif not is_offline() and not _hub_has_file(name_or_path, "adapter_config.json"):
        return None
    from peft import PeftConfig

    try:
        return str(PeftConfig.from_pretrained(name_or_path).base_model_name_or_path)
    except (OSError, ValueError):
        return None  # offline and not in the cache as an adapter: try it as a model


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read now, not at import), as huggingface_hub reads it."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return bool(constants.HF_HUB_OFFLINE) or (value is not None and value.upper() in {"1", "ON", "YES", "TRUE"})


def _hub_has_file(repo_id: str, filename: str) -> bool:
    from huggingface_hub import file_exists

    try:
        return bool(file_exists(repo_id, filename))
    except Exception:  # no network, bad id, gated repo: let from_pretrained give its own error
        return False


def _has_tokenizer_files(path: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any(os.path.isfile(os.path.join(path, name)) for name in names)


def _not_found(name: str, what: str, err: BaseException) -> str:
    if os.path.exists(name):
        return f"{name} holds no loadable {what} (a folder written by save_pretrained is expected): {err}"
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        return f"{name} is not a local model directory (no such folder) and not a Hub id such as 'org/name'"
    if is_offline():
        return (
            f"{name!r} is not a local folder, and HF_HUB_OFFLINE=1 forbids downloading it: it is not in the Hugging "
            f"Face cache either. Unset HF_HUB_OFFLINE (or run `hf download {name}`) and try again ({err})"
        )
    return f"{name!r} is neither a local folder nor a {what} that could be loaded from the Hub: {err}"


def cached_snapshot(name: str) -> str:
    """The local snapshot folder of a hub id, downloaded into the Hugging Face cache unless it is already there
    or ``HF_HUB_OFFLINE=1`` is set (the whole repository: prefer `load_causal_lm`, which fetches what it needs)."""
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(name, local_files_only=is_offline()))
    except (OSError, ValueError) as err:
        raise ValueError(_not_found(name, "model", err)) from err


def tokenizer_beside(model: nn.Module) -> Any:
    """The tokenizer saved next to a model loaded from a local directory, if any."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return tokenizer_in(path) if isinstance(path, str) and path and os.path.isdir(path) else None


def tokenizer_in(path: str) -> Any:
    """The tokenizer saved in a local folder, or None (no tokenizer files, or unreadable: then a warning)."""
    if not _has_tokenizer_files(path):
        return None
    return load_tokenizer(path)


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
