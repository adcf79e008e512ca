"""The on-disk feature store: chunked float16 memmaps, atomic chunk manifests, fingerprints, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.features.store import FeatureStore, default_chunk_rows, store_fingerprint

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "dist_scripts"


def _rows(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=gen)
    losses = torch.rand(n, generator=gen) * 3
    tokens = torch.randint(0, 9, (n,), generator=gen)
    largest = losses * (1 + torch.rand(n, generator=gen))
    return feats, losses, tokens, largest


def test_chunks_round_trip_through_float16(tmp_path: Path) -> None:
    n, d = 23, 5
    feats, losses, tokens, largest = _rows(n, d)
    feats[4] = float("nan")  # a skipped row stays NaN
    store = FeatureStore.open(tmp_path, "key", n=n, proj_dim=d, chunk_rows=8)
    assert store.num_chunks == 3 and list(store.chunk_range(2)) == list(range(16, 23))
    for chunk in range(store.num_chunks):
        sl = slice(store.chunk_range(chunk).start, store.chunk_range(chunk).stop)
        store.write_chunk(chunk, feats[sl], losses[sl], tokens[sl], largest[sl])
    got_f, got_l, got_t, got_s = store.read_rows(range(n))
    # Reference: numpy's own float16 rounding of the same values.
    expected = torch.from_numpy(feats.numpy().astype(np.float16).astype(np.float32))
    assert torch.equal(got_f.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(got_f), torch.nan_to_num(expected))
    assert torch.equal(got_l, losses) and torch.equal(got_t, tokens) and torch.equal(got_s, largest)
    # Scattered reads follow the order asked for.
    f2, _, t2, s2 = store.read_rows([20, 3, 7])
    assert torch.equal(f2, got_f[[20, 3, 7]]) and torch.equal(t2, tokens[[20, 3, 7]])
    assert torch.equal(s2, largest[[20, 3, 7]])


def test_fill_computes_only_missing_chunks_and_reopen_keeps_layout(tmp_path: Path) -> None:
    n, d = 30, 4
    feats, losses, tokens, largest = _rows(n, d)
    calls: list[list[int]] = []

    def compute(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        calls.append(rows)
        return feats[rows], losses[rows], tokens[rows], largest[rows]

    store = FeatureStore.open(tmp_path, "key", n=n, proj_dim=d, chunk_rows=7)
    stats = store.fill([0, 2], compute)
    assert (stats.reused, stats.computed) == (0, 2)
    assert calls == [list(range(0, 7)), list(range(14, 21))]
    assert store.complete_chunks() == [0, 2]
    manifest = store.manifest(2)
    assert manifest is not None and (manifest["start"], manifest["stop"]) == (14, 21)
    assert store.manifest(1) is None

    # A new open (another process, a later run) with another chunk_rows keeps the on-disk layout.
    again = FeatureStore.open(tmp_path, "key", n=n, proj_dim=d, chunk_rows=3)
    assert again.chunk_rows == 7
    calls.clear()
    stats = again.fill(range(again.num_chunks), compute)
    assert (stats.reused, stats.computed) == (2, 3)
    assert calls == [list(range(7, 14)), list(range(21, 28)), list(range(28, 30))]
    got, _, _, _ = again.read_rows(range(n))
    # Stored as float16: exactly numpy's float16 rounding of the written values.
    assert torch.equal(got, torch.from_numpy(feats.numpy().astype(np.float16).astype(np.float32)))
    # No temporary files are left behind by the atomic manifest writes.
    assert not [p for p in (tmp_path / "key" / "chunks").iterdir() if p.suffix != ".json"]


def test_store_refuses_mismatch_and_overflow(tmp_path: Path) -> None:
    FeatureStore.open(tmp_path, "key", n=10, proj_dim=4, chunk_rows=5)
    with pytest.raises(ValueError, match="delete"):
        FeatureStore.open(tmp_path, "key", n=11, proj_dim=4, chunk_rows=5)
    with pytest.raises(FileNotFoundError):
        FeatureStore.open(tmp_path, "other", n=10, proj_dim=4, chunk_rows=5, create=False)
    store = FeatureStore.open(tmp_path, "key", n=10, proj_dim=4, chunk_rows=5)
    big = torch.full((5, 4), 1e6)
    with pytest.raises(ValueError, match="float16"):
        store.write_chunk(0, big, torch.zeros(5), torch.ones(5, dtype=torch.long), torch.zeros(5))
    assert not store.is_complete(0)
    with pytest.raises(ValueError, match="chunk 1 needs"):
        store.write_chunk(1, torch.zeros(4, 4), torch.zeros(4), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="chunk 1 needs"):
        store.write_chunk(1, torch.zeros(5, 4), torch.zeros(5), torch.zeros(5), torch.zeros(4))


def _filled(tmp_path: Path, n: int = 30, d: int = 4) -> tuple[FeatureStore, tuple, list[list[int]]]:
    feats, losses, tokens, largest = _rows(n, d)
    feats[3] = float("nan")  # a skipped row: NaN is legitimate content, covered by the checksum like any other
    calls: list[list[int]] = []

    def compute(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        calls.append(rows)
        return feats[rows], losses[rows], tokens[rows], largest[rows]

    store = FeatureStore.open(tmp_path, "key", n=n, proj_dim=d, chunk_rows=7)
    store.fill(range(store.num_chunks), compute)
    calls.clear()
    store.compute = compute  # type: ignore[attr-defined]
    return store, (feats, losses, tokens, largest), calls


def _damage(path: Path, fault: str) -> None:
    if fault == "random_bytes":  # rows 7-13 are chunk 1
        with open(path / "features.f16", "r+b") as fh:
            fh.seek(8 * 4 * 2)
            fh.write(np.random.default_rng(0).integers(0, 256, 16, dtype=np.uint8).tobytes())
    elif fault == "nan_chunk":
        features = np.memmap(path / "features.f16", dtype=np.float16, mode="r+", shape=(30, 4))
        features[7:14] = np.nan
        features.flush()
    elif fault == "zeroed_losses":
        losses = np.memmap(path / "losses.f32", dtype=np.float32, mode="r+", shape=(30,))
        losses[7:14] = 0.0
        losses.flush()
    elif fault == "zeroed_surprise":
        surprise = np.memmap(path / "surprise.f32", dtype=np.float32, mode="r+", shape=(30,))
        surprise[7:14] = 0.0
        surprise.flush()
    elif fault == "truncated":
        with open(path / "features.f16", "r+b") as fh:
            fh.truncate(100)  # rows 0-11 and part of row 12 survive; numpy would zero-extend the rest
    elif fault == "manifest":
        (path / "chunks" / "000001.json").write_text("{not json")


@pytest.mark.parametrize(
    "fault", ["random_bytes", "nan_chunk", "zeroed_losses", "zeroed_surprise", "truncated", "manifest"]
)
def test_a_damaged_store_is_recomputed_not_read(tmp_path: Path, fault: str, caplog) -> None:
    store, (feats, losses, tokens, largest), calls = _filled(tmp_path)
    _damage(store.path, fault)
    with caplog.at_level("WARNING", logger="spice_trainer.features.store"):
        reopened = FeatureStore.open(tmp_path, "key", n=30, proj_dim=4, chunk_rows=7)
        stats = reopened.fill(range(reopened.num_chunks), store.compute)  # type: ignore[attr-defined]
    damaged = {"truncated": [1, 2, 3, 4]}.get(fault, [1])  # bytes past 100: rows 12-29, chunks 1-4
    assert calls == [list(reopened.chunk_range(c)) for c in damaged]
    assert (stats.reused, stats.computed) == (5 - len(damaged), len(damaged))
    assert str(store.path) in caplog.text
    got_f, got_l, got_t, got_s = reopened.read_rows(range(30))
    expected = torch.from_numpy(feats.numpy().astype(np.float16).astype(np.float32))
    assert torch.equal(torch.nan_to_num(got_f, nan=7.0), torch.nan_to_num(expected, nan=7.0))
    assert torch.equal(got_l, losses) and torch.equal(got_t, tokens) and torch.equal(got_s, largest)


def test_an_unreadable_meta_json_names_the_store_and_the_fix(tmp_path: Path) -> None:
    store, _, _ = _filled(tmp_path)
    (store.path / "meta.json").write_text('{"n": 30, "proj_')
    with pytest.raises(ValueError, match=rf"{store.path}.*unreadable meta.json.*delete"):
        FeatureStore.open(tmp_path, "key", n=30, proj_dim=4, chunk_rows=7)


def test_select_through_a_damaged_store_equals_a_fresh_selection(tmp_path: Path) -> None:
    from spice_trainer.pipeline import select

    rows = [{"input_ids": [7 + (i % 4), 7 + (i % 3), 9, 7 + (i // 6) % 4]} for i in range(24)]
    config = SpiceConfig(proj_dim=8, budget=5, batch_size=4, feature_store=str(tmp_path / "store"))
    first = select(_tiny(), rows, config, show_progress=False)
    (key_dir,) = [p for p in (tmp_path / "store").iterdir() if p.is_dir()]
    features = np.memmap(key_dir / "features.f16", dtype=np.float16, mode="r+", shape=(24, 8))
    features[:] = 0.0  # every chunk zeroed: read back, the selection would silently change
    features.flush()
    again = select(_tiny(), rows, config, show_progress=False)
    store_meta = again.metadata["feature_store"]
    assert (
        store_meta["reused_chunks"] == 0
        and store_meta["computed_chunks"] == first.metadata["feature_store"]["computed_chunks"]
    )
    assert again.indices == first.indices
    assert again.gains == first.gains


def test_default_chunk_rows() -> None:
    assert default_chunk_rows(64, 2) == 8
    assert default_chunk_rows(100_000, 8) == 391  # ceil(100000 / 256): at most 256 manifests
    assert default_chunk_rows(5, 8) == 32


def _tiny(seed: int = 0, lora_seed: int = 0):
    from spice_trainer.demo.toy import add_lora, build_model, build_tokenizer

    tok = build_tokenizer(["a", "b", "c", "d"])
    model = add_lora(build_model(tok, hidden_size=16, num_layers=1, num_heads=2, seed=seed), r=2, seed=lora_seed)
    return model


def test_fingerprint_tracks_what_changes_features() -> None:
    cfg = SpiceConfig(proj_dim=8)
    data = [{"input_ids": [7, 8, 9]}, {"input_ids": [8, 9]}]
    key, desc = store_fingerprint(_tiny(), data, cfg)
    assert set(desc) == {"store_version", "model", "adapter", "dataset", "collator", "config"}
    # Rebuilding the same model and data gives the same key; batch_size does not change features.
    assert store_fingerprint(_tiny(), list(data), cfg.with_changes(batch_size=3))[0] == key
    # Each of these changes the features, so each changes the key.
    assert store_fingerprint(_tiny(seed=1), data, cfg)[0] != key  # base weights
    assert store_fingerprint(_tiny(lora_seed=1), data, cfg)[0] != key  # adapter weights
    assert store_fingerprint(_tiny(), [*data, {"input_ids": [7]}], cfg)[0] != key
    assert store_fingerprint(_tiny(), [{"input_ids": [7, 8, 8]}, data[1]], cfg)[0] != key
    for change in (
        {"proj_dim": 16},
        {"projection": "gaussian"},
        {"feature_norm": "none"},  # the default is "unit"
        {"seed": 1},
        {"max_length": 2},
    ):
        assert store_fingerprint(_tiny(), data, cfg.with_changes(**change))[0] != key, change
    assert store_fingerprint(_tiny(), data, cfg, data_collator=lambda rows: rows)[0] != key


@pytest.mark.slow
def test_store_resumes_after_a_kill_without_recomputing(tmp_path: Path) -> None:
    """Kill `select` (SIGKILL) after 3 of its chunks are complete; the rerun reuses exactly those.

    The script hard-kills itself in the middle of the 4th chunk's write (rows flushed, manifest not
    yet in place), so that chunk must count as unfinished and be recomputed.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    store_dir = tmp_path / "store"

    def run(out: Path, kill_after: int) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, str(SCRIPTS / "store_resume.py"), str(store_dir), str(out), str(kill_after)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    killed = run(tmp_path / "killed.json", 3)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (key_dir,) = [p for p in store_dir.iterdir() if p.is_dir()]
    manifests = sorted((key_dir / "chunks").glob("*.json"))
    assert [p.name for p in manifests] == ["000000.json", "000001.json", "000002.json"]
    before = {p.name: p.read_text() for p in manifests}

    resumed = run(tmp_path / "resumed.json", -1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads((tmp_path / "resumed.json").read_text())
    num_chunks = result["num_chunks"]
    assert num_chunks > 4
    assert result["store"] == {"reused": 3, "computed": num_chunks - 3}
    # The finished chunks' manifests were not rewritten: those rows were not recomputed.
    for name, text in before.items():
        assert (key_dir / "chunks" / name).read_text() == text
    assert json.loads(before["000000.json"])["pid"] != result["pid"]

    # An uninterrupted run into a fresh store selects the same rows with the same features.
    fresh = subprocess.run(
        [sys.executable, str(SCRIPTS / "store_resume.py"), str(tmp_path / "fresh"), str(tmp_path / "fresh.json"), "-1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    uninterrupted = json.loads((tmp_path / "fresh.json").read_text())
    assert uninterrupted["store"] == {"reused": 0, "computed": num_chunks}
    assert result["indices"] == uninterrupted["indices"]
    assert result["features_sha"] == uninterrupted["features_sha"]
