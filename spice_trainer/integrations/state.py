"""The selection state a checkpoint carries: what it holds, how it is written and read back, and the dataset
identity it was computed on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["RESUME_SAFE_FIELDS", "STATE_FILE", "STATE_VERSION", "RoundRecord", "RunState", "dataset_fingerprint"]

STATE_FILE = "spice_state.json"
STATE_VERSION = 1
# Config fields that may differ on resume without changing which rows were selected so far.
RESUME_SAFE_FIELDS = frozenset({"write_reports", "proxy_device", "threads"})


@dataclass
class RoundRecord:
    round: int
    step: int
    selected: int
    stop_reason: str
    first_gain: float | None
    seconds: float


@dataclass
class RunState:
    """What a checkpoint carries: the sampler history, the rounds, and what they were computed on."""

    fingerprint: str
    config: dict[str, Any]
    sampler: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    reference_gain: float | None = None


def dataset_fingerprint(dataset: Any) -> str:
    """A cheap identity of the training rows: their count and a hash of up to 64 evenly spaced rows."""
    n = len(dataset)
    h = hashlib.sha256(str(n).encode())
    for i in sorted({int(j * (n - 1) / 63) for j in range(64)} if n > 1 else set(range(n))):
        row = dataset[i]
        ids = row.get("input_ids") if isinstance(row, dict) else row
        h.update(repr(ids.tolist() if isinstance(ids, torch.Tensor) else ids).encode())
    return h.hexdigest()[:32]
