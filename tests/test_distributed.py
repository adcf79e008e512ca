"""Selection across processes: sharding, collectives over gloo, the distributed greedy, Trainer runs.

The multi-process tests launch real processes with ``torchrun`` (``python -m torch.distributed.run``) on
CPU with the gloo backend; the scripts live in ``tests/dist_scripts``. References are computed here, in
the single pytest process, with the single-process code path.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.core.greedy import select_from_features
from spice_trainer.distributed import comm as sd
from spice_trainer.distributed.greedy import distributed_bytes_per_pick, distributed_greedy

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "dist_scripts"


def _load_cases() -> Any:
    spec = importlib.util.spec_from_file_location("greedy_cases", SCRIPTS / "greedy_cases.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(script: str, nproc: int, *args: str, timeout: float = 240, env: dict[str, str] | None = None) -> str:
    """Run ``tests/dist_scripts/<script>`` under torchrun with ``nproc`` CPU processes; returns the output.

    One thread per process (the CI machine has 2 cores); offline; the repository on ``PYTHONPATH``.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(SCRIPTS / script),
        *args,
    ]
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and "address already in use" in output.lower():
        # Another process took the free port between our probe and torchrun's bind: once more, new port.
        cmd[cmd.index("--master_port") + 1] = str(_free_port())
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"torchrun {script} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def _rule(case: dict[str, Any]) -> Any:
    """A fresh stopping rule for a case that names one (rules keep state: one object per run)."""
    return case["stopping"]() if "stopping" in case else None


def _per_rank(out: Path, nproc: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


_PICK_LISTS = ("indices", "gains", "base_gains", "interactions", "conflicts", "scores", "objective")


def _assert_same_selection(got: dict[str, Any], ref: dict[str, Any], *, exact: bool = True) -> None:
    assert got["indices"] == ref["indices"]
    assert got["stop_reason"] == ref["stop_reason"]
    assert got["initial"] == ref["initial"] and got["skipped"] == ref["skipped"]
    for name in _PICK_LISTS[1:]:
        if exact:
            assert got[name] == ref[name], name
        else:
            assert got[name] == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name


# --- sharding and strategy (single process) ------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 10, 64, 65])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("chunk_rows", [1, 3, 8])
def test_shards_partition_rows_in_order(n: int, world: int, chunk_rows: int) -> None:
    shards = [sd.shard_rows(n, world, r, chunk_rows=chunk_rows) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    num_chunks = math.ceil(n / chunk_rows)
    sizes = [len(sd.shard_chunks(num_chunks, world, r)) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1
    for r, shard in enumerate(shards):
        chunks = sd.shard_chunks(num_chunks, world, r)
        if len(shard):  # a shard is exactly the rows of its chunks
            assert shard.start == chunks.start * chunk_rows and shard.stop == min(n, chunks.stop * chunk_rows)


def test_shard_rows_example_and_errors() -> None:
    assert [sd.shard_rows(10, 3, r) for r in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    with pytest.raises(ValueError, match="shard"):
        sd.shard_rows(10, 2, 2)
    with pytest.raises(ValueError, match="chunk_rows"):
        sd.shard_rows(10, 2, 0, chunk_rows=0)


def test_single_process_helpers_are_no_ops() -> None:
    assert (sd.world_size(), sd.rank(), sd.is_distributed(), sd.is_main_process()) == (1, 0, False, True)
    x = torch.arange(6.0).reshape(3, 2)
    assert sd.gather_rows(x) is x
    assert sd.any_rank(True) and not sd.all_ranks(False)
    assert sd.broadcast_object({"a": 1}) == {"a": 1}
    assert sd.collective_device() == torch.device("cpu")


def test_choose_strategy_by_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sd.GATHER_LIMIT_ENV, raising=False)
    # 1 GiB default: 1M candidates × 256 dims × 4 bytes = 1 GiB still gathers, one more row does not.
    assert sd.choose_strategy(1 << 20, 256) == "gather"
    assert sd.choose_strategy((1 << 20) + 1, 256) == "distributed"
    assert sd.choose_strategy(100, 8, limit_bytes=100 * 8 * 4) == "gather"
    assert sd.choose_strategy(100, 8, limit_bytes=100 * 8 * 4 - 1) == "distributed"
    monkeypatch.setenv(sd.GATHER_LIMIT_ENV, "0")
    assert sd.choose_strategy(1, 1) == "distributed"
    monkeypatch.setenv(sd.GATHER_LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=sd.GATHER_LIMIT_ENV):
        sd.choose_strategy(1, 1)


def test_bytes_per_pick_formulas(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2 ranks: a 6-column float64 table row from each rank + one float64 vector of d entries.
    assert distributed_bytes_per_pick(256, 2) == 2 * 6 * 8 + 256 * 8
    assert sd.gather_bytes(1000, 256) == 1000 * 256 * 4
    # The count is what the greedy sends: every table row it gathers in a run (one process) has that width.
    import spice_trainer.distributed.greedy as dgreedy

    widths: list[int] = []
    gather = dgreedy.all_gather_table
    monkeypatch.setattr(dgreedy, "all_gather_table", lambda row: widths.append(row.numel()) or gather(row))
    feats = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    distributed_greedy(feats, range(20), 20, SpiceConfig(budget=5, proj_dim=8))
    assert widths and set(widths) == {6}
    # ... and what the module docstring of comm says it sends.
    import re

    stated = re.search(r"``world · (\d+) · 8`` bytes", sd.__doc__ or "")
    assert stated is not None and int(stated.group(1)) == 6


def test_distributed_greedy_in_one_process_equals_single_process() -> None:
    """Without a process group the distributed greedy is the exact greedy over one shard: same numbers."""
    for name, case in _load_cases().cases().items():
        feats = case["features"]
        n = feats.shape[0]
        kwargs = {"initial": case.get("initial"), "reference_gain": case.get("reference_gain")}
        got = distributed_greedy(
            feats, range(n), n, case["config"], local_eligible=case.get("eligible"), stopping=_rule(case), **kwargs
        )
        ref = select_from_features(feats, case["config"], eligible=case.get("eligible"), stopping=_rule(case), **kwargs)
        _assert_same_selection(got.to_dict(), ref.to_dict())
        assert got.metadata["method"] == ref.metadata["method"], name


def test_distributed_greedy_input_errors() -> None:
    feats = torch.randn(6, 3)
    cfg = SpiceConfig(budget=2)
    with pytest.raises(ValueError, match="one index per row"):
        distributed_greedy(feats, range(5), 6, cfg)
    with pytest.raises(ValueError, match="strictly increasing"):
        distributed_greedy(feats, [0, 2, 1, 3, 4, 5], 6, cfg)
    with pytest.raises(ValueError, match="partition"):
        distributed_greedy(feats, range(6), 7, cfg)
    with pytest.raises(ValueError, match="budget=9 exceeds"):
        distributed_greedy(feats, range(6), 6, SpiceConfig(budget=9))


def test_stop_case_is_decided_by_the_last_ranks_rows() -> None:
    """Independent check of the case's premise: after the three big picks, the best remaining row
    (brute force log-det gains) lies in the second half, and its gain is below ω × the first gain."""
    feats = _load_cases().stop_on_rank1_rows().double()
    n, d = feats.shape
    chosen = [0, 1, 2]

    def logdet(rows: list[int]) -> float:
        g = feats[rows]
        return float(torch.logdet(torch.eye(d, dtype=torch.float64) + g.T @ g))

    base = logdet(chosen)
    gains = {i: logdet([*chosen, i]) - base for i in range(n) if i not in chosen}
    best = max(gains, key=lambda i: (gains[i], -i))
    assert best >= n // 2
    assert gains[best] <= 0.5 * math.log1p(9.0)


# --- launched processes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_collectives_over_gloo(tmp_path: Path) -> None:
    torchrun("collectives.py", 2, str(tmp_path))
    r0, r1 = _per_rank(tmp_path, 2)
    full = torch.arange(33, dtype=torch.float32).reshape(11, 3).tolist()
    for r, res in enumerate((r0, r1)):
        assert res["rows"] == [[0, 6], [6, 11]][r]
        assert res["gathered"] == full  # uneven shards (6 and 5 rows) come back whole and in order
        assert res["flags"] == [i % 2 == 0 for i in range(11)] and res["flags_dtype"] == "torch.bool"
        assert res["empty_shape"] == [2, 4]  # one rank sent 0 rows
        assert res["any_only_last"] is True and res["all_only_last"] is False
        assert res["object"] == {"from": 1}
        assert res["table"] == [[0.0, 0.0], [1.0, 2.0]]
        assert res["bcast"] == [8.0, 8.0, 8.0]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_distributed_greedy_equals_single_process(tmp_path: Path, nproc: int) -> None:
    """Every case, with 1, 2 and 4 ranks: every rank's selection equals `select_from_features` on the
    whole matrix, pick for pick and number for number (including early stops decided on one rank's rows,
    a rank with no eligible row, initial rows spread over ranks, NaN rows and exhaustion)."""
    torchrun("greedy.py", nproc, str(tmp_path))
    ranks = _per_rank(tmp_path, nproc)
    for name, case in _load_cases().cases().items():
        ref = select_from_features(
            case["features"],
            case["config"],
            initial=case.get("initial"),
            eligible=case.get("eligible"),
            reference_gain=case.get("reference_gain"),
            stopping=_rule(case),
        ).to_dict()
        for res in ranks:
            _assert_same_selection(res[name], ref)
            assert res[name]["metadata"]["distributed"]["world_size"] == nproc
    assert ranks[0]["stop_on_rank1_rows"]["stop_reason"] == "early_stop"
    assert ranks[0]["stop_on_rank1_rows"]["indices"] == [0, 1, 2]
    assert ranks[0]["exhausted"]["stop_reason"] == "exhausted"
    assert ranks[0]["overflow_row"]["skipped"] == [27] and 27 not in ranks[0]["overflow_row"]["indices"]
    # Rules of the StoppingRule interface: both stop inside the budget, at the same pick on every rank.
    for name in ("plateau_rule", "posthoc_cut"):
        assert ranks[0][name]["stop_reason"] == "early_stop" and 0 < len(ranks[0][name]["indices"]) < 30, name


# --- full Trainer runs -----------------------------------------------------------------------------


def _tiny() -> Any:
    spec = importlib.util.spec_from_file_location("tiny", SCRIPTS / "tiny.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference_selection(settings: dict[str, Any]) -> list[int]:
    """The first round as one process computes it: `select` on the same model, data and collator."""
    from transformers import default_data_collator

    from spice_trainer.pipeline import select

    tiny = _tiny()
    tok, model = tiny.build()
    config = SpiceConfig(**{"budget": 12, "proj_dim": 16, "batch_size": 4, **settings})
    return select(model, tiny.hf_dataset(tok, n=48), config, default_data_collator, show_progress=False).indices


@pytest.mark.slow
def test_trainer_two_ranks_select_like_one_process(tmp_path: Path) -> None:
    """`Trainer` + `SpiceDataCallback` under torchrun with 2 gloo processes (gather-then-greedy): the same
    selection on both ranks, equal to `select` in this single process on the same model, data and
    collator; the two ranks' dataloaders together yield exactly the selected rows; only rank 0 reports."""
    output = torchrun("trainer_run.py", 2, str(tmp_path), "{}")
    ranks = _per_rank(tmp_path, 2)
    expected = _reference_selection({})
    assert output.count("spice: round 0 selected 12 of 48 rows") == 1  # one console line, from rank 0
    for res in ranks:
        assert res["world"] == 2
        (only_round,) = res["rounds"]
        assert only_round["indices"] == expected
        assert only_round["metadata"]["distributed"] == {
            "world_size": 2,
            "strategy": "gather",
            "rows_per_rank": [24, 24],
        }
    yielded = [row for res in ranks for row in res["yielded"]]
    # 12 rows, 2 per device per step on 2 ranks: every selected row is drawn exactly once in the epoch.
    assert sorted(yielded) == sorted(expected)
    assert ranks[0]["reports"] == ["round-0.json", "round-0.png"]
    assert ranks[1]["reports"] is None


@pytest.mark.slow
def test_trainer_distributed_greedy_reselection_and_store(tmp_path: Path) -> None:
    """2 ranks, distributed greedy forced (SPICE_GATHER_LIMIT_BYTES=0), early stopping, the feature store,
    and reselection every 2 steps in grow mode: every round is identical on both ranks (the early stops
    included), each round grows the previous subset, the first equals one process's selection through its
    own store, and the dataloaders draw only selected rows."""
    # The paper's ω rule on raw gradients (the defaults before issue 11): it stops the first round early here.
    stopping = {"stop_rule": "ratio", "stop_ratio": 0.5, "stop_on": "gain", "feature_norm": "none"}
    settings = {"budget": 16, **stopping, "reselect_every_steps": 2, "mode": "grow"}
    store = tmp_path / "store"
    out = tmp_path / "run"
    out.mkdir()
    torchrun(
        "trainer_run.py",
        2,
        str(out),
        json.dumps({**settings, "feature_store": str(store)}),
        "3",
        env={sd.GATHER_LIMIT_ENV: "0"},
    )
    r0, r1 = _per_rank(out, 2)
    assert len(r0["rounds"]) >= 2  # the first round and at least one reselection
    for a, b in zip(r0["rounds"], r1["rounds"], strict=True):
        _assert_same_selection(a, b)
        assert a["metadata"]["distributed"]["strategy"] == "distributed"
        assert a["metadata"]["feature_store"] == b["metadata"]["feature_store"]
    first = r0["rounds"][0]
    assert first["stop_reason"] == "early_stop" and len(first["indices"]) < 16
    selected = set(first["indices"])
    for later in r0["rounds"][1:]:
        assert set(later["initial"]) == selected  # grow keeps every row
        selected |= set(later["indices"])
    # Both ranks wrote their own chunks of the first round's store; nothing was reused on a fresh store.
    meta = first["metadata"]["feature_store"]
    assert meta["reused_chunks"] == 0 and meta["computed_chunks"] >= 2
    drawn = [row for res in (r0, r1) for row in res["yielded"]]
    assert drawn and set(drawn) <= selected

    expected = _reference_selection({**stopping, "budget": 16, "feature_store": str(tmp_path / "ref")})
    assert first["indices"] == expected


@pytest.mark.slow
@pytest.mark.parametrize("with_store", [False, True])
def test_a_failure_on_one_rank_stops_every_rank(tmp_path: Path, with_store: bool) -> None:
    """A bad row in rank 1's shard makes only rank 1's gradient pass fail; rank 0 must raise too (the
    failure is agreed before the next collective) instead of waiting forever in an all_gather."""
    out = tmp_path / "out"
    out.mkdir()
    extra = [str(tmp_path / "store")] if with_store else []
    torchrun("failing_rank.py", 2, str(out), *extra, timeout=180)
    r0, r1 = _per_rank(out, 2)
    assert r1["error"] == "ValueError" and "outside" in r1["message"]
    assert r0["error"] == "RuntimeError" and "another rank" in r0["message"]
