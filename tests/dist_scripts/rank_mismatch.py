"""Launched by tests/test_pipeline.py: `select` when the ranks do not hold the same training rows.

Usage: ``rank_mismatch.py OUT CASE``. CASE is what rank 1 holds compared with rank 0:

- ``length``: one row fewer;
- ``shuffled``: the same rows in another order;
- ``labels``: the same rows, one row's labels changed;
- ``rebuilt``: the same rows, built as a `datasets.Dataset` another way (a control: must select normally).

Rows are `datasets.Dataset` rows on every rank (``_fingerprint`` available) except for ``labels``, which uses
plain lists (the content hash). Each rank writes ``OUT/rank<r>.json``: the error it saw, or its selection.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from datasets import Dataset
from teardown import leave
from tiny import build, rows

from spice_trainer import SpiceConfig
from spice_trainer.pipeline import select


def main() -> None:
    out, case = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok, model = build()
    data: list[dict[str, list[int]]] = rows(tok, n=16)
    dataset: object
    if case == "labels":
        if rank == 1:
            data[11]["labels"] = [-100, *data[11]["labels"][1:-1], -100]
        dataset = data
    else:
        dataset = Dataset.from_list(data)
        if rank == 1 and case == "length":
            dataset = dataset.select(range(15))
        elif rank == 1 and case == "shuffled":
            dataset = dataset.shuffle(seed=3)
        elif rank == 1 and case == "rebuilt":
            dataset = Dataset.from_dict({key: [r[key] for r in data] for key in data[0]})
    config = SpiceConfig(budget=4, proj_dim=8, batch_size=4)
    try:
        selection = select(model, dataset, config, show_progress=False)
        seen = {"error": None, "indices": selection.indices}
    except Exception as exc:
        seen = {"error": type(exc).__name__, "message": str(exc)}
    dist.barrier()  # still in step: every rank got here
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    leave()


if __name__ == "__main__":
    main()
