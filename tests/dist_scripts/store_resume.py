"""Launched by tests/test_feature_store.py: `select` through the on-disk feature store, optionally killed.

Usage: ``store_resume.py STORE_DIR OUT_JSON KILL_AFTER``. With ``KILL_AFTER = k >= 0`` the process
SIGKILLs itself when it is about to mark chunk ``k + 1`` complete: that chunk's rows are already
written and flushed but its manifest is not, exactly what a kill mid-pass leaves behind. With -1 it
runs to the end and writes ``OUT_JSON``: the picks, the store's reuse counts, the chunk count, its
pid, and a hash of the stored features.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

from tiny import build, rows

from spice_trainer.config import SpiceConfig
from spice_trainer.features import store as feature_store
from spice_trainer.pipeline import select


def main() -> None:
    store_dir, out, kill_after = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    if kill_after >= 0:
        write_json = feature_store._atomic_write_json
        written = [0]

        def write_then_maybe_die(path: Path, payload: dict) -> None:
            if path.parent.name == "chunks":
                if written[0] == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                written[0] += 1
            write_json(path, payload)

        feature_store._atomic_write_json = write_then_maybe_die

    tok, model = build()
    data = rows(tok, n=64)
    # batch_size 2 -> chunks of max(4 * 2, ceil(64 / 256)) = 8 rows: 8 chunks.
    config = SpiceConfig(
        budget=12, proj_dim=16, batch_size=2, stop_rule="none", stop_ratio=None, feature_store=store_dir
    )
    selection = select(model, data, config, show_progress=False)
    meta = selection.metadata["feature_store"]
    store = feature_store.FeatureStore.open(store_dir, Path(meta["path"]).name, n=64, proj_dim=16, chunk_rows=8)
    feats, losses, _, _ = store.read_rows(range(64))
    result = {
        "indices": selection.indices,
        "store": {"reused": meta["reused_chunks"], "computed": meta["computed_chunks"]},
        "num_chunks": store.num_chunks,
        "pid": os.getpid(),
        "features_sha": hashlib.sha256(feats.numpy().tobytes() + losses.numpy().tobytes()).hexdigest(),
    }
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
