"""Launched by tests/test_distributed.py under torchrun: exercises the collective helpers on gloo.

Writes ``<out>/rank<r>.json`` with what this rank received.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from teardown import leave

from spice_trainer.distributed import comm as sd


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    r, w = sd.rank(), sd.world_size()
    n = 11
    rows = sd.local_rows(n)
    # Uneven shards: rank r holds rows [start, stop) of a known matrix.
    full = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    gathered = sd.gather_rows(full[rows.start : rows.stop])
    flags = sd.gather_rows(torch.tensor([i % 2 == 0 for i in rows], dtype=torch.bool))
    empty = sd.gather_rows(torch.zeros((0 if r == 0 else 2, 4)))
    result = {
        "rank": r,
        "world": w,
        "rows": [rows.start, rows.stop],
        "gathered": gathered.tolist(),
        "flags": flags.tolist(),
        "flags_dtype": str(flags.dtype),
        "empty_shape": list(empty.shape),
        "any_only_last": sd.any_rank(r == w - 1),
        "all_only_last": sd.all_ranks(r == w - 1),
        "object": sd.broadcast_object({"from": r}, src=w - 1),
        "table": sd.all_gather_table(torch.tensor([float(r), 2.0 * r])).tolist(),
        "bcast": sd.broadcast_tensor(
            torch.full((3,), 7.0 + r) if r == 1 else None, 1, shape=(3,), dtype=torch.float64
        ).tolist(),
    }
    (out / f"rank{r}.json").write_text(json.dumps(result))
    leave()


if __name__ == "__main__":
    main()
