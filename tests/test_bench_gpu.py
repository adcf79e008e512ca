"""bench/gpu.py (the GPU figures of issue 14) runs end to end at its tiny sizes on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_runs_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--repeats", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["tiny"] and report["device"] == "cpu"
    assert [r["tokens"] for r in report["features"]] == [64, 128]
    for row in report["features"]:
        assert row["plain_s"] > 0 and row["rademacher_s"] > 0 and row["kronecker_s"] > 0
    assert {g["greedy"] for g in report["greedy"]} == {"exact", "stochastic"}
    assert all(g["log_det"] > 0 for g in report["greedy"])
    trainer = report["trainer"]
    # The first round and at least one cheap reselection round ran inside the Trainer run.
    assert trainer["epoch_s"] > 0 and trainer["first_round_s"] > 0 and len(trainer["reselect_rounds_s"]) >= 1
