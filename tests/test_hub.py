"""Hub ids wherever a local path is accepted (integrations/hub.py, the command line), offline from a local cache.

The Hugging Face cache is laid out by hand as huggingface_hub and datasets write it after a download
(``models--org--name/refs/main`` + ``snapshots/<commit>/`` for models, a prepared ``org___name/default/...``
folder for datasets), in a temporary folder that ``HF_HUB_CACHE`` / ``HF_DATASETS_CACHE`` point at. Both are
read when huggingface_hub and datasets are imported, so the Hub-id runs happen in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spice_trainer.cli import main as cli
from spice_trainer.demo import world
from spice_trainer.demo.toy import build_model, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _snapshot(cache: Path, kind: str, repo_id: str, files: Path) -> Path:
    """Lay ``files`` (a folder) out as the cached snapshot of ``repo_id`` at revision main."""
    root = cache / f"{kind}--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    shutil.copytree(files, snapshot)
    return snapshot


def _prepared_dataset(cache: Path, repo_id: str, data_file: Path) -> None:
    """The prepared copy `datasets.load_dataset(repo_id)` leaves in ``HF_DATASETS_CACHE`` (what offline mode reads)."""
    from datasets.packaged_modules.json.json import Json

    scratch, name = cache / "_scratch", repo_id.split("/")[-1]  # the arrow files are named after the dataset
    builder = Json(cache_dir=str(scratch), dataset_name=name, hash="0" * 16, data_files={"train": [str(data_file)]})
    builder.download_and_prepare()
    (config_dir,) = (scratch / name).iterdir()
    target = cache / repo_id.replace("/", "___")
    target.mkdir(parents=True)
    shutil.move(str(config_dir), str(target / "default"))
    shutil.rmtree(scratch)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    model_dir, data = root / "model", root / "pool.jsonl"
    tok = build_tokenizer(world.vocabulary())
    build_model(tok, hidden_size=16, num_layers=1, num_heads=2, seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data.write_text("".join(json.dumps(r) + "\n" for r in world.candidate_pool(40, "noisy", seed=0).rows))
    _snapshot(root / "hub", "models", "spice-test/tiny-llama", model_dir)
    _prepared_dataset(root / "datasets", "spice-test/pool", data)
    return {"root": root, "model": model_dir, "data": data, "hub": root / "hub", "datasets": root / "datasets"}


def _run(code: str, cache: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache["hub"]),
        "HF_DATASETS_CACHE": str(cache["datasets"]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_hub_ids_for_model_dataset_and_proxy_come_from_the_cache(hub_cache: dict[str, Path], tmp_path: Path) -> None:
    out_hub, out_local = tmp_path / "hub", tmp_path / "local"
    code = f"""
import json
from spice_trainer import SpiceConfig
from spice_trainer.cli import main as cli
from spice_trainer.integrations.hub import adapter_base, load_causal_lm, load_proxy

flags = ["--spice-budget", "6", "--spice-proj-dim", "32", "--quiet"]
assert cli.main(["select", "--model", "spice-test/tiny-llama", "--dataset", "spice-test/pool",
                 "--out", {str(out_hub)!r}, *flags]) == 0
model, tok = load_causal_lm("spice-test/tiny-llama")
assert tok is not None and adapter_base("spice-test/tiny-llama") is None
config = SpiceConfig(proxy_model="spice-test/tiny-llama")
proxy = load_proxy("spice-test/tiny-llama", config, target=model, tokenizer=tok)
print("PROXY", type(proxy.model).__name__, proxy.model.config.vocab_size == model.config.vocab_size)
try:
    load_causal_lm("spice-test/not-cached")
except ValueError as err:
    print("MISSING", err)
"""
    result = _run(code, hub_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PROXY PeftModelForCausalLM True" in result.stdout
    assert "'spice-test/not-cached' is not a local folder, and HF_HUB_OFFLINE=1 forbids downloading it" in result.stdout
    assert "spice: round 0 selected 6 of 40 rows" in result.stdout

    # The same model and rows from local paths give the same picks.
    argv = ["select", "--model", str(hub_cache["model"]), "--dataset", str(hub_cache["data"]), "--out", str(out_local)]
    assert cli.main([*argv, "--spice-budget", "6", "--spice-proj-dim", "32", "--quiet"]) == 0
    picks = json.loads((out_local / "indices.json").read_text())
    assert json.loads((out_hub / "indices.json").read_text()) == picks and len(picks) == 6


def test_the_command_leaves_offline_mode_to_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spice_trainer.core.selection import Selection

    Selection().save(tmp_path / "selection.json")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ  # the old CLI forced it for every command


def test_examples_do_not_force_offline_mode() -> None:
    import re

    setting = re.compile(r"environ(\.setdefault\(|\[)\s*[\"']HF_HUB_OFFLINE")
    for script in [*(REPO / "examples").glob("*.py"), REPO / "spice_trainer" / "cli" / "select.py"]:
        assert not setting.search(script.read_text()), script.name


def test_offline_is_read_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from spice_trainer.integrations.hub import is_offline

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert is_offline()
