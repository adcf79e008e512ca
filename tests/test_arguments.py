"""`SpiceArguments`: flags and YAML keys through HfArgumentParser / TrlParser, then a real TRL run of the example."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from spice_trainer import SpiceArguments, SpiceConfig
from spice_trainer.integrations.arguments import PREFIX, config_field_help

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_every_config_field_is_a_flag_with_the_configs_default_and_help() -> None:
    config_fields = {f.name: f for f in dataclasses.fields(SpiceConfig)}
    argument_fields = {f.name: f for f in dataclasses.fields(SpiceArguments)}
    assert set(argument_fields) == {PREFIX + name for name in config_fields} | {"use_spice"}
    helps = config_field_help()
    for name, f in config_fields.items():
        arg = argument_fields[PREFIX + name]
        assert arg.default == f.default, name
        # The help is the config's docstring entry (argparse escapes % as %%), plus how to write the value.
        assert arg.metadata["help"].replace("%%", "%").startswith(f"[SPICE] {helps[name]}"), name
        assert len(helps[name]) > 20, name
    assert SpiceArguments().to_config() == SpiceConfig()


def test_docstring_help_is_read_per_field() -> None:
    helps = config_field_help()
    assert helps["budget"].startswith("How much of the pool to select at most")
    assert helps["stop_on"].startswith("Which quantity the stopping rule watches")
    assert "defaults to" not in " ".join(helps.values())  # the type line is not part of the help


def _parse(argv: list[str]) -> SpiceArguments:
    (args,) = HfArgumentParser(SpiceArguments).parse_args_into_dataclasses(argv)
    return args


def test_flags_parse_into_a_config() -> None:
    config = _parse(
        [
            "--spice_budget",
            "500",
            "--spice-conflict-weight",
            "0.3",
            "--spice_stop_rule",
            "ratio",
            "--spice_stop_ratio",
            "0.5",
            "--spice_surprise_threshold",
            "uniform",
            "--spice_min_loss",
            "none",
            "--spice_greedy",
            "stochastic",
            "--spice_reselect_every_steps",
            "100,250,400",
            "--spice_proxy_model",
            "Qwen/Qwen2-0.5B",
            "--no_spice_write_reports",
        ]
    ).to_config()
    assert config.budget == 500 and isinstance(config.budget, int)
    assert config.conflict_weight == 0.3 and config.stop_ratio == 0.5 and config.min_loss is None
    assert config.stop_rule == "ratio" and config.surprise_threshold == "uniform"
    assert _parse(["--spice_surprise_threshold", "3.5"]).to_config().surprise_threshold == 3.5
    assert _parse(["--spice_surprise_threshold", "none"]).to_config().surprise_threshold is None
    assert config.greedy == "stochastic"
    assert config.reselect_every_steps == (100, 250, 400)
    assert config.proxy_model == "Qwen/Qwen2-0.5B"
    assert config.write_reports is False

    assert _parse(["--spice_budget", "0.25"]).to_config().budget == 0.25
    # A command line cannot tell 1 from 1.0: both are the whole pool (a one-row budget is never meant), as in
    # SpiceConfig(budget=1.0); a count starts at 2.
    for text in ("1", "1.0"):
        whole = _parse(["--spice_budget", text]).to_config()
        assert whole.budget == 1.0 and whole.budget_count(60) == 60
    assert _parse(["--spice_budget", "2"]).to_config().budget_count(60) == 2
    assert _parse(["--spice_reselect_every_steps", "50"]).to_config().reselect_every_steps == 50
    assert _parse(["--spice_max_length", "128"]).to_config().max_length == 128
    assert _parse(["--use_spice", "false"]).callbacks() == []


def test_bad_values_name_the_flag() -> None:
    with pytest.raises(ValueError, match=r"--spice_budget: 2\.5 is neither a fraction"):
        _parse(["--spice_budget", "2.5"])
    with pytest.raises(ValueError, match=r"--spice_stop_ratio: stop_ratio must be in \[0, 1\)"):
        _parse(["--spice_stop_ratio", "1.5"])
    with pytest.raises(ValueError, match=r"--spice_min_loss: expected a number or none, got 'low'"):
        _parse(["--spice_min_loss", "low"])
    with pytest.raises(ValueError, match=r"--spice_reselect_every_steps: expected N"):
        _parse(["--spice_reselect_every_steps", "often"])
    with pytest.raises(SystemExit):  # argparse's own refusal of a choice
        _parse(["--spice_greedy", "lazy"])


def _trl_parser():
    import importlib

    spec = importlib.util.spec_from_file_location("trl_sft_example", EXAMPLES / "trl_sft.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_trl_parser_reads_the_yaml_and_flags_override_it(tmp_path: Path) -> None:
    example = _trl_parser()
    parser = example.make_parser()
    yaml_path = EXAMPLES / "trl_sft.yaml"
    parsed = parser.parse_args_and_config(
        ["--config", str(yaml_path), "--use_cpu", "--bf16", "false", "--spice_proj_dim", "64"]
    )
    script_args, training_args, model_args, _, spice_args = parsed
    assert script_args.dataset_name == "trl-lib/Capybara" and model_args.model_name_or_path == "Qwen/Qwen2-0.5B"
    assert model_args.use_peft and training_args.learning_rate == 2e-4
    config = spice_args.to_config()
    assert config.budget == 0.1 and config.reselect_every_steps == 200 and config.stop_ratio is None
    assert config.proj_dim == 64  # the flag overrides the YAML's 256

    listed = tmp_path / "list.yaml"
    listed.write_text("spice_budget: 300\nspice_reselect_every_steps: [20, 50]\nspice_min_loss: null\n")
    *_, spice_args = parser.parse_args_and_config(["--config", str(listed), "--use_cpu", "--bf16", "false"])
    config = spice_args.to_config()
    assert config.budget == 300 and config.reselect_every_steps == (20, 50) and config.min_loss is None


def test_help_lists_every_spice_flag() -> None:
    text = _trl_parser().make_parser().format_help()  # raises on an unescaped % in any help string
    assert "SPICE data selection" in text
    for f in dataclasses.fields(SpiceArguments):
        assert f"--{f.name}" in text
    assert "90 % probability" in text


def _tiny_model_and_data(tmp_path: Path) -> tuple[Path, Path, list[dict[str, str]]]:
    from spice_trainer.demo import world
    from spice_trainer.demo.toy import build_model, build_tokenizer

    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    tok = build_tokenizer(world.vocabulary())
    build_model(tok, hidden_size=16, num_layers=1, num_heads=2, seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = world.candidate_pool(40, "noisy", seed=0).rows
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data_dir, rows


@pytest.mark.slow
def test_the_example_trains_on_the_spice_subset_from_yaml_and_flags(tmp_path: Path) -> None:
    from spice_trainer import SpiceDataCallback

    model_dir, data_dir, rows = _tiny_model_and_data(tmp_path)
    example = _trl_parser()
    out = tmp_path / "out"
    argv = ["--config", str(EXAMPLES / "trl_sft.yaml"), "--model_name_or_path", str(model_dir)]
    argv += ["--dataset_name", str(data_dir), "--output_dir", str(out), "--use_cpu", "--bf16", "false"]
    argv += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "64"]
    argv += ["--lora_r", "4", "--lora_alpha", "8", "--dtype", "float32", "--spice_budget", "6"]
    argv += ["--spice_proj_dim", "32", "--disable_tqdm", "true", "--save_strategy", "no"]
    trainer = example.main(*example.make_parser().parse_args_and_config(argv))

    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, SpiceDataCallback)]
    assert callback.config.budget == 6 and callback.config.reselect_every_steps == 200  # flag and YAML
    assert len(callback.selected_rows) == 6
    # num_train_epochs=1 over 6 selected rows in batches of 2: 3 optimizer steps, not 20 (the whole pool).
    assert trainer.state.global_step == math.ceil(6 / 2)
    assert (out / "_spice" / "round-0.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert len(rows) == 40
