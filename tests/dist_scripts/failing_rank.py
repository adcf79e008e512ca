"""Launched by tests/test_distributed.py: `select` where the gradient pass fails on the last rank only.

The last row of the pool has a label outside the vocabulary, so only the rank holding it raises in
its gradient pass. Every rank must raise (none may hang in a collective waiting for it). Each rank
writes ``OUT/rank<r>.json`` with the exception it saw. Usage: ``failing_rank.py OUT [STORE_DIR]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from teardown import leave
from tiny import build, rows

from spice_trainer import SpiceConfig
from spice_trainer.pipeline import select


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    tok, model = build()
    data = rows(tok, n=16)
    data[-1]["labels"] = [*data[-1]["labels"][:-1], len(tok) + 5]  # outside the vocabulary
    # batch_size 2: with a store, chunks of 8 rows, one per rank, so row 15 is rank 1's either way.
    config = SpiceConfig(budget=4, proj_dim=8, batch_size=2, feature_store=sys.argv[2] if len(sys.argv) > 2 else None)
    try:
        select(model, data, config, show_progress=False)
        seen = {"error": None}
    except Exception as exc:
        seen = {"error": type(exc).__name__, "message": str(exc)}
    # Still in step: one more collective succeeds on every rank.
    dist.barrier()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(seen))
    leave()


if __name__ == "__main__":
    main()
