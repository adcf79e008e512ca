"""Dataset identity: one fingerprint for "the same rows in the same order", used wherever that must hold.

Three places compare datasets: a resumed run against the checkpoint it resumes from
(`spice_trainer.integrations.state`), the ranks of a multi-process selection against each other
(`spice_trainer.pipeline`), and a feature store against the data it was filled from
(`spice_trainer.features.store`). All three use `dataset_fingerprint`:

- a `datasets.Dataset` has its own fingerprint (``Dataset._fingerprint``): a hash of its source files or
  in-memory table and of every transform applied since (``map``, ``filter``, ``select``, ``shuffle``, column
  removal), deterministic across processes and runs. It covers every row and every column, without reading them;
- any other indexable dataset is hashed in full by `content_fingerprint`: every row, every column (labels
  included), in one streaming pass (memory O(1 row)).

Only hashlib, numpy and torch are imported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["content_fingerprint", "dataset_fingerprint", "tensor_bytes"]


def dataset_fingerprint(dataset: Any) -> str:
    """The identity of ``dataset``: its length plus `datasets`' own fingerprint, or a hash of every row.

    Returns:
        ``"datasets:<fingerprint>:<n>"`` for a `datasets.Dataset`, else ``"rows:<sha256>"`` (`content_fingerprint`).
    """
    fingerprint = getattr(dataset, "_fingerprint", None)
    if isinstance(fingerprint, str) and fingerprint:
        return f"datasets:{fingerprint}:{len(dataset)}"
    return content_fingerprint(dataset)


def content_fingerprint(dataset: Any) -> str:
    """``"rows:<sha256>"`` over the length and every row of ``dataset``, every column included.

    A row is hashed column by column in sorted column order, each value by its type and content (a tensor or
    array by dtype, shape and bytes; anything else by ``repr``). The container is part of the identity: a list
    and a tensor of the same ids hash differently.
    """
    h = hashlib.sha256()
    n = len(dataset)
    h.update(f"n={n};".encode())
    for i in range(n):
        _update_row(h, dataset[i])
    return f"rows:{h.hexdigest()[:40]}"


def _update_row(h: Any, row: Any) -> None:
    items = sorted(row.items(), key=lambda kv: str(kv[0])) if isinstance(row, Mapping) else [("", row)]
    h.update(b"{")
    for key, value in items:
        h.update(f"{key}=".encode())
        _update_value(h, value)
    h.update(b"}")


def _update_value(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        h.update(f"tensor{value.dtype}{tuple(value.shape)}:".encode())
        h.update(tensor_bytes(value))
    elif isinstance(value, np.ndarray):
        h.update(f"array{value.dtype}{value.shape}:".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    else:
        h.update(repr(value).encode())
    h.update(b";")


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` (on CPU, contiguous; bfloat16 read as int16, which numpy lacks): what every
    fingerprint here and in `spice_trainer.features.store` hashes for a tensor."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()
