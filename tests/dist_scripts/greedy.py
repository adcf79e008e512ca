"""Launched by tests/test_distributed.py under torchrun: the distributed greedy on every case.

Each rank keeps only its own rows of each case's features and runs `distributed_greedy`; it writes
``<out>/rank<r>.json`` mapping case name -> `Selection.to_dict()`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from greedy_cases import cases
from teardown import leave

from spice_trainer.distributed import comm as sd
from spice_trainer.distributed.greedy import distributed_greedy


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    results = {}
    for name, case in cases().items():
        feats = case["features"]
        n = feats.shape[0]
        rows = sd.local_rows(n)
        eligible = case.get("eligible")
        selection = distributed_greedy(
            feats[rows.start : rows.stop],
            rows,
            n,
            case["config"],
            initial=case.get("initial"),
            local_eligible=None if eligible is None else eligible[rows.start : rows.stop],
            reference_gain=case.get("reference_gain"),
            stopping=case["stopping"]() if "stopping" in case else None,
        )
        results[name] = selection.to_dict()
    (out / f"rank{sd.rank()}.json").write_text(json.dumps(results))
    leave()


if __name__ == "__main__":
    main()
