"""The cases of tests/test_fsdp.py, built identically in the pytest process and on every FSDP rank."""

from __future__ import annotations

from typing import Any

import torch
from tiny import build, rows

from spice_trainer import SpiceConfig

# 13 rows over 2 ranks: 7 and 6, so with batch 2 the ranks have 4 and 3 batches (the lockstep pads one).
CASES = ("plain", "uneven", "adam", "shortlist", "bad_label")


def build_case(name: str) -> tuple[Any, list[dict[str, Any]], SpiceConfig]:
    tok, model = build()
    data = rows(tok, n=13 if name == "uneven" else 16)
    config = SpiceConfig(budget=4, proj_dim=16, batch_size=2 if name == "uneven" else 4, min_loss=None)
    if name == "uneven":
        data[12]["labels"] = [-100] * len(data[12]["labels"])  # a row without targets on the last rank
    if name == "adam":
        config = config.with_changes(feature_norm="adam")
    if name == "shortlist":
        config = config.with_changes(reselect_shortlist=0.5, max_loss_quantile=None)
    if name == "bad_label":
        data[14]["labels"] = [*data[14]["labels"][:-1], 10_000]  # outside the vocabulary, on rank 1's shard
    return model, data, config


def train_step(model: Any, data: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """One AdamW step on the first 8 rows (the same batch on every rank), so Adam has second moments."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = {k: torch.tensor([r[k] for r in data[:8]]) for k in ("input_ids", "attention_mask", "labels")}
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return optimizer
