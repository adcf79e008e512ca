"""The ``spice-trainer`` command: select (same picks as the callback, formats, outputs, Hub push), report, help."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from spice_trainer import SpiceConfig, SpiceDataCallback
from spice_trainer.cli import main as cli
from spice_trainer.core.selection import Selection
from spice_trainer.demo import world
from spice_trainer.demo.experiment import DEMO_BATCH_SIZE, DEMO_FULL, DEMO_QUICK, DemoSettings
from spice_trainer.demo.toy import build_model, build_tokenizer
from spice_trainer.proxy.adapter import DEFAULT_LORA


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny plain Llama and its tokenizer (with a chat template), written with save_pretrained."""
    path = tmp_path_factory.mktemp("model")
    tok = build_tokenizer(world.vocabulary())
    build_model(tok, hidden_size=16, num_layers=1, num_heads=2, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved_adapter(saved_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA adapter on ``saved_model`` (lora_B made non-zero, as after some training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
    model.peft_config["default"].base_model_name_or_path = str(saved_model)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


POOL = world.candidate_pool(30, "noisy", seed=0).rows


def _formats() -> dict[str, list[dict]]:
    return {
        "prompt-completion": [{"prompt": r["prompt"], "completion": r["completion"]} for r in POOL],
        "text": [{"text": r["prompt"] + r["completion"]} for r in POOL],
        "messages": [
            {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in POOL
        ],
    }


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


SPICE_FLAGS = ["--spice-budget", "6", "--spice-proj-dim", "32", "--spice_min_loss", "none"]
CONFIG = SpiceConfig(budget=6, proj_dim=32, min_loss=None)


def _callback_picks(model, rows: list[dict], tmp_path: Path, *, max_length: int = 1024) -> SpiceDataCallback:
    """A user's training run: SFTTrainer + SpiceDataCallback with default SFTConfig data settings."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    callback = SpiceDataCallback(CONFIG)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path / "train"),
            max_length=max_length,
            per_device_train_batch_size=2,
            max_steps=1,
            report_to="none",
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
            save_strategy="no",
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model.peft_config["default"].base_model_name_or_path),
        callbacks=[callback],
    )
    trainer.train()
    return callback


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["prompt-completion", "text", "messages"])
def test_the_command_picks_the_rows_the_callback_trains_on(
    fmt: str, saved_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import AutoPeftModelForCausalLM

    rows = _formats()[fmt]
    data = _write_jsonl(tmp_path / "pool.jsonl", rows)
    out = tmp_path / "out"
    argv = ["select", "--model", str(saved_adapter), "--dataset", str(data), "--out", str(out), "--quiet"]
    assert cli.main([*argv, *SPICE_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "loaded the PEFT adapter" in printed and "spice: round 0 selected 6 of 30 rows (stop: budget)" in printed

    callback = _callback_picks(
        AutoPeftModelForCausalLM.from_pretrained(saved_adapter, is_trainable=True), rows, tmp_path
    )
    indices = json.loads((out / "indices.json").read_text())
    assert indices == callback.selected_rows and len(indices) == 6
    assert Selection.load(out / "selection.json").gains == callback.selection.gains  # bit-identical features

    chosen = datasets.load_dataset("json", data_files=str(out / "selected" / "train.jsonl"), split="train")
    assert chosen["spice_row"] == indices
    assert [{k: chosen[i][k] for k in rows[0]} for i in range(6)] == [rows[i] for i in indices]
    # JSON lines carry 15 decimals (pandas' most): within half a unit of the 15th decimal.
    assert chosen["spice_gain"] == pytest.approx(callback.selection.gains, rel=0, abs=5e-16)


@pytest.mark.slow
def test_a_plain_model_gets_the_default_lora_and_says_so(
    saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    from spice_trainer.proxy.adapter import with_lora_adapter

    rows = _formats()["prompt-completion"]
    folder = tmp_path / "pool"  # a folder of jsonl files, as TRL's load_dataset takes it
    _write_jsonl(folder / "part-0.jsonl", rows[:15])
    _write_jsonl(folder / "part-1.jsonl", rows[15:])
    out = tmp_path / "out"
    argv = ["select", "--model", str(saved_model), "--dataset", str(folder), "--out", str(out), "--quiet"]
    assert cli.main([*argv, *SPICE_FLAGS, "--format", "parquet", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    shown = ", ".join(f"{k}={v}" for k, v in DEFAULT_LORA.items())
    assert f"added a LoRA adapter ({shown}" in printed and "lora_A drawn from seed 42" in printed

    # The same LoRA by hand (the documented one home, seeded the same) in a training run: the same picks.
    model = with_lora_adapter(AutoModelForCausalLM.from_pretrained(saved_model), seed=CONFIG.seed)
    model.peft_config["default"].base_model_name_or_path = str(saved_model)
    callback = _callback_picks(model, rows, tmp_path)
    assert json.loads((out / "indices.json").read_text()) == callback.selected_rows
    chosen = datasets.Dataset.from_parquet(str(out / "selected" / "train.parquet"))
    assert chosen["spice_row"] == callback.selected_rows


@pytest.mark.slow
def test_selected_rows_train_as_they_are(saved_adapter: Path, saved_model: Path, tmp_path: Path) -> None:
    """The written selection (user columns + spice_ columns) is a dataset TRL trains on directly."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    saved = datasets.Dataset.from_list(_formats()["messages"])
    saved.save_to_disk(str(tmp_path / "pool"))
    out = tmp_path / "out"
    argv = ["select", "--model", str(saved_adapter), "--dataset", str(tmp_path / "pool"), "--out", str(out)]
    assert cli.main([*argv, *SPICE_FLAGS, "--format", "disk", "--quiet"]) == 0
    chosen = datasets.load_from_disk(str(out / "selected"))
    assert len(chosen) == 6 and "spice_score" in chosen.column_names
    trainer = SFTTrainer(
        model=AutoPeftModelForCausalLM.from_pretrained(saved_adapter, is_trainable=True),
        args=SFTConfig(
            output_dir=str(tmp_path / "t"), max_steps=2, report_to="none", use_cpu=True, bf16=False, disable_tqdm=True
        ),
        train_dataset=chosen,
        processing_class=AutoTokenizer.from_pretrained(saved_model),
    )
    trainer.train()
    assert trainer.state.global_step == 2


def test_push_to_hub_is_refused_offline_and_calls_datasets_online(
    saved_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _write_jsonl(tmp_path / "pool.jsonl", _formats()["prompt-completion"])
    out = tmp_path / "out"
    argv = ["select", "--model", str(saved_adapter), "--dataset", str(data), "--out", str(out), "--quiet"]
    argv += [*SPICE_FLAGS, "--push-to-hub", "me/picks"]
    assert cli.main(argv) == 2  # conftest sets HF_HUB_OFFLINE=1
    err = capsys.readouterr().err
    assert "--push-to-hub me/picks: HF_HUB_OFFLINE=1 is set" in err
    assert (out / "selected" / "train.jsonl").is_file()  # saved before the refusal

    # Online: the network boundary (Dataset.push_to_hub) receives the selection dataset.
    import huggingface_hub.constants

    pushed: list[tuple[str, list[int], bool]] = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        datasets.Dataset,
        "push_to_hub",
        lambda self, repo, private=False: pushed.append((repo, self["spice_row"], private)),
    )
    assert cli.main([*argv, "--private"]) == 0
    assert pushed == [("me/picks", json.loads((out / "indices.json").read_text()), True)]
    assert "pushed the selection dataset to https://huggingface.co/datasets/me/picks" in capsys.readouterr().out


def test_select_reads_the_training_yaml(saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--config`` takes the YAML of the training run (TRL's keys + spice_*): the same picks as the flags."""
    data = _write_jsonl(tmp_path / "pool.jsonl", _formats()["prompt-completion"])
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text(
        f"model_name_or_path: {saved_model}\ndataset_name: {data}\nmax_length: 64\nlearning_rate: 2.0e-4\n"
        "use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: all-linear\n"
        "spice_budget: 6\nspice_proj_dim: 32\nspice_min_loss: null\nspice_reselect_every_steps: 200\n"
    )
    out_yaml, out_flags = tmp_path / "yaml", tmp_path / "flags"
    assert cli.main(["select", "--config", str(yaml_path), "--out", str(out_yaml), "--quiet"]) == 0
    assert "added a LoRA adapter (r=4, lora_alpha=8" in capsys.readouterr().out
    argv = ["select", "--model", str(saved_model), "--dataset", str(data), "--out", str(out_flags), "--quiet"]
    argv += ["--max-length", "64", "--lora-r", "4", "--lora-alpha", "8", *SPICE_FLAGS]
    assert cli.main(argv) == 0
    picks = json.loads((out_flags / "indices.json").read_text())
    assert json.loads((out_yaml / "indices.json").read_text()) == picks and len(picks) == 6
    # A flag overrides the YAML; a misspelt spice_ key is refused rather than ignored.
    assert cli.main(["select", "--config", str(yaml_path), "--out", str(out_yaml), "--spice-budget", "3"]) == 0
    assert len(json.loads((out_yaml / "indices.json").read_text())) == 3
    yaml_path.write_text(yaml_path.read_text() + "spice_budgte: 0.2\n")
    assert cli.main(["select", "--config", str(yaml_path), "--out", str(out_yaml)]) == 2
    assert "unknown SPICE key 'spice_budgte'" in capsys.readouterr().err


def test_paper_preset_keeps_only_the_given_flags() -> None:
    parser = cli.build_parser()
    argv = ["select", "--model", "m", "--dataset", "d", "--out", "o", "--paper", "--spice-budget", "0.2"]
    config = cli.config_from_args(parser.parse_args(argv), argv)
    assert config == SpiceConfig.paper(budget=0.2)
    argv += ["--spice_min_loss", "0.1"]  # equal to the default, but given: kept over the preset's None
    assert cli.config_from_args(parser.parse_args(argv), argv) == SpiceConfig.paper(budget=0.2, min_loss=0.1)
    plain = ["select", "--model", "m", "--dataset", "d", "--out", "o", "--spice-reselect-every-steps", "5,9"]
    assert cli.config_from_args(parser.parse_args(plain), plain) == SpiceConfig(reselect_every_steps=(5, 9))


def test_select_errors_name_the_problem(saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")

    def run(dataset: str, model: str = str(saved_model), *extra: str) -> str:
        assert cli.main(["select", "--model", model, "--dataset", dataset, "--out", out, "--quiet", *extra]) == 2
        return capsys.readouterr().err

    assert "no such file, folder or Hub dataset" in run(str(tmp_path / "missing.jsonl"))
    (tmp_path / "rows.txt").write_text("hello\n")
    assert "unknown format '.txt'" in run(str(tmp_path / "rows.txt"))
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    err = run(str(bad))
    assert "['answer', 'question']" in err and "'prompt' and 'completion'" in err and "'text'" in err
    # A row without a completion (missing key or null): TRL's own preparation failed on it with an
    # AttributeError naming no row.
    holes = [{"prompt": "add 1 2 =", "completion": " 3"}, {"prompt": "add 2 2 ="}, {"prompt": "x", "completion": None}]
    err = run(str(_write_jsonl(tmp_path / "holes.jsonl", holes)))
    assert "2 row(s) have no 'completion' (missing or null): row(s) 1, 2" in err and "drop them" in err
    good = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "add 1 2 =", "completion": " 3"}])
    assert "nomodel is not a local model directory (no such folder)" in run(str(good), str(tmp_path / "nomodel"))
    assert "forbids downloading it" in run(str(good), "someone/not-cached")
    assert "budget=2 exceeds the pool size" in run(str(good), str(saved_model), "--spice-budget", "2")
    assert "--spice_stop_ratio: stop_ratio must be in [0, 1)" in run(
        str(good), str(saved_model), "--spice-stop-ratio", "2"
    )
    datasets.DatasetDict({"train": datasets.Dataset.from_list(POOL)}).save_to_disk(str(tmp_path / "dd"))
    assert "has the splits ['train'], not 'test'" in run(str(tmp_path / "dd"), str(saved_model), "--split", "test")


@pytest.mark.parametrize("command", [[], ["demo"], ["select"], ["report"], ["compare"]])
def test_every_help_is_formatted(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "%%" not in text and "%(" not in text
    if command == ["demo"]:
        assert "10% (SpiceDataCallback)" in " ".join(text.split())
    if command == ["select"]:
        assert "--spice_budget" in text and "--threads" in text and "--push-to-hub" in text
        assert "--use_spice" not in text  # select always selects
        assert "1 is fastest on a shared or small CPU" in " ".join(text.split())
    if not command:
        assert all(c in text for c in ("demo", "select", "report", "compare"))


def _selection(n_picks: int, seed: int) -> Selection:
    from spice_trainer.core.greedy import select_from_features

    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(30, 8, generator=gen)
    return select_from_features(feats, SpiceConfig(budget=n_picks, stop_rule="none", stop_ratio=None))


def test_report_renders_rounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rounds = tmp_path / "run" / "_spice"
    sels = [_selection(5, 0), _selection(7, 1)]
    for i, sel in enumerate(sels):
        sel.save(rounds / f"round-{i}.json")
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    report = (rounds / "report.md").read_text()
    table_rows = [line for line in report.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert len(table_rows) == 2
    assert "| 5 |" in table_rows[0] and "| 7 |" in table_rows[1] and "| budget |" in table_rows[0]
    assert f"{sels[1].gains[0]:.4g}" in table_rows[1]
    assert (rounds / "round-0.png").exists() and (rounds / "round-1.png").exists()
    assert "report written to" in capsys.readouterr().out

    single = tmp_path / "sel"
    sels[0].save(single / "selection.json")
    path = cli.render_report(single)
    assert path == single / "report.md" and "selection" in path.read_text()

    assert cli.main(["report", str(tmp_path / "empty-does-not-exist")]) == 2
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "found no selection" in capsys.readouterr().err


def test_the_quick_demo_does_less_of_every_costly_thing() -> None:
    # What a demo run costs, in rows: pretraining passes, fine-tuning passes (spice and random train on
    # a tenth of the pool each, full on all of it), and greedy decoding of the held-out set.
    def rows(s: DemoSettings) -> tuple[float, float, float]:
        return s.pretrain_rows, s.pool_size * s.epochs * 1.2, s.test_rows_per_task

    quick, full = rows(DEMO_QUICK), rows(DEMO_FULL)
    assert all(q <= f for q, f in zip(quick, full, strict=True)) and sum(quick) < sum(full)
    assert quick[1] <= full[1] / 2 and quick[2] <= full[2] / 2  # half the fine-tuning and the evaluation


@pytest.mark.slow
def test_demo_quick_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for method in ("spice", "random", "full"):
        assert method in printed
    results = json.loads((out / "results.json").read_text())
    by_method = {r["method"]: r for r in results}
    assert by_method["full"]["rows"] == DEMO_QUICK.pool_size
    budget = SpiceConfig(budget=0.1).budget_count(DEMO_QUICK.pool_size)
    assert by_method["random"]["rows"] == budget
    # Exactly the budget: the default stop_ratio=None never stops early, and the guards left more eligible rows
    # than the budget (the round's stop reason says the greedy ran out of budget, not of rows).
    assert by_method["spice"]["rows"] == budget
    assert Selection.load(out / "runs" / "spice" / "_spice" / "round-0.json").stop_reason == "budget"
    # The quick settings ran: the full pool's steps are those of the quick pool, fewer than the full demo's.
    steps = {s: math.ceil(s.pool_size / DEMO_BATCH_SIZE) * s.epochs for s in (DEMO_QUICK, DEMO_FULL)}
    assert by_method["full"]["steps"] == steps[DEMO_QUICK] < steps[DEMO_FULL]
    # The callback ran inside SFTTrainer and wrote its round; the demo reports the rows it trained on.
    round_file = out / "runs" / "spice" / "_spice" / "round-0.json"
    assert by_method["spice"]["rows"] == len(Selection.load(round_file).selected)
    assert (out / "report.md").exists() and (out / "accuracy.png").exists()
