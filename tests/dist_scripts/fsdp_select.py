"""Launched by tests/test_fsdp.py under torchrun: live selection on a model sharded with FSDP2 ``fully_shard``.

Usage: ``fsdp_select.py OUT_DIR``. Every rank builds the tiny model and rows of ``fsdp_cases.py``, shards each
decoder layer and the root with ``fully_shard`` (gloo, CPU), and runs the cases there; it writes
``OUT_DIR/rank<r>.json`` mapping case name -> `Selection.to_dict()`, or ``{"error": <type: message>}`` for a
case that raised (every rank must raise, none may hang).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fsdp_cases import CASES, build_case, train_step
from torch.distributed.fsdp import fully_shard

from spice_trainer import select
from spice_trainer.features.gradients import is_sharded_model
from spice_trainer.features.reselect import FeatureCache


def shard(model: Any) -> Any:
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    results: dict[str, Any] = {}
    for name in CASES:
        model, data, config = build_case(name)
        model = shard(model)
        assert is_sharded_model(model)
        try:
            optimizer = train_step(model, data) if config.feature_norm == "adam" else None
            if name == "shortlist":
                cache = FeatureCache()
                select(model, data, config, show_progress=False, feature_cache=cache)
                selection = select(model, data, config, show_progress=False, feature_cache=cache)
            else:
                selection = select(model, data, config, show_progress=False, optimizer=optimizer)
            results[name] = selection.to_dict()
        except Exception as err:  # the test checks that every rank raised
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    # Tear gloo down together before the interpreter exits (its threads alive at exit abort the process).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)  # weights come from tiny.build's own generator; this only pins the test's process
    main()
