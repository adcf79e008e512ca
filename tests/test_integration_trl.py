"""SpiceDataCallback on a real TRL SFTTrainer: prompt-completion and conversational data, row identity, packing."""

import pytest
import torch
import trainer_world as tw
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from spice_trainer import SpiceConfig, SpiceDataCallback


def _text_rows(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [f"w{int(t)}" for t in torch.randint(0, 60, (6,), generator=g)]
        # TRL concatenates prompt and completion as they are: the trailing space keeps the word boundary.
        out.append({"prompt": " ".join(words[:3]) + " ", "completion": " ".join(words[3:]) + f" w{i % 60}"})
    return out


def _config(tmp_path, **overrides):
    settings = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "num_train_epochs": 1,
        "max_length": 32,
        "report_to": "none",
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 3,
    }
    settings.update(overrides)
    return SFTConfig(**settings)


def _sft(tmp_path, data, config, **overrides):
    callback = SpiceDataCallback(config)
    trainer = SFTTrainer(
        model=tw.model(),
        args=_config(tmp_path, **overrides),
        train_dataset=data,
        processing_class=tw.TOK,
        callbacks=[callback],
    )
    recorder = tw.RecordingCollator()
    recorder.inner = trainer.data_collator
    trainer.data_collator = recorder
    trainer.train()
    return trainer, callback, recorder


def test_prompt_completion_selects_and_draws_only_selected_rows_with_completion_only_loss(tmp_path):
    data = Dataset.from_list(_text_rows())
    trainer, callback, recorder = _sft(
        tmp_path, data, SpiceConfig(budget=0.25, stop_rule="none", stop_ratio=None, proj_dim=32)
    )
    processed = trainer.train_dataset
    # TRL's completion-only loss is on: the prompt's tokens carry no label.
    assert all(processed[r]["labels"][:3] == [-100] * 3 for r in range(len(processed)))
    drawn = recorder.drawn_rows(processed)
    assert sorted(drawn) == sorted(callback.selected) and len(drawn) == 6
    # Row identity: the selected rows' token ids are the tokenised prompt+completion of the user's rows.
    for row, source in zip(callback.selected, callback.selected_rows, strict=True):
        user = data[source]
        expected = tw.TOK(user["prompt"] + user["completion"])["input_ids"]
        assert processed[row]["input_ids"][: len(expected)] == expected


def test_rows_map_back_through_trl_shuffling(tmp_path):
    data = Dataset.from_list(_text_rows())
    trainer, callback, _ = _sft(tmp_path, data, SpiceConfig(budget=0.25, proj_dim=32), shuffle_dataset=True)
    processed = trainer.train_dataset
    for row, source in zip(callback.selected, callback.selected_rows, strict=True):
        user = data[source]
        expected = tw.TOK(user["prompt"] + user["completion"])["input_ids"]
        assert processed[row]["input_ids"][: len(expected)] == expected
    assert callback.selected_rows != callback.selected  # the shuffle moved rows; the mapping undid it


def test_conversational_dataset(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in _text_rows(20)
    ]
    trainer, callback, recorder = _sft(tmp_path, Dataset.from_list(rows), SpiceConfig(budget=5, proj_dim=32))
    drawn = recorder.drawn_rows(trainer.train_dataset)
    # Exactly the budget: the rule cannot stop a run this short early, and no row of an untrained model is
    # solved or capped away (the loss cap never leaves fewer eligible rows than the budget).
    assert set(drawn) == set(callback.selected) and len(callback.selected) == 5
    assert callback.selection is not None and callback.selection.stop_reason == "budget"


def test_packing_is_refused_with_a_fix(tmp_path):
    with pytest.raises(ValueError, match=r"packing=True.*Set packing=False"):
        SFTTrainer(
            model=tw.model(),
            args=_config(tmp_path, packing=True),
            train_dataset=Dataset.from_list(_text_rows()),
            processing_class=tw.TOK,
            callbacks=[SpiceDataCallback(SpiceConfig())],
        )


def _assert_every_row_maps_back(trainer, data, callback):
    """Each prepared row is the (possibly truncated) tokenisation of the user row it maps to."""
    from spice_trainer.integrations.trl import sft_source_rows

    processed = trainer.train_dataset
    sources = sft_source_rows(trainer, processed, range(len(processed)))
    assert len(set(sources)) == len(sources)
    for row, source in enumerate(sources):
        user = data[source]
        expected = tw.TOK(user["prompt"] + user["completion"])["input_ids"]
        n = min(len(expected), len(processed[row]["input_ids"]))
        assert processed[row]["input_ids"][:n] == expected[:n], (row, source)
    assert callback.selected_rows == [sources[r] for r in callback.selected]
    return sources


def test_rows_map_back_through_trl_filtering_and_a_user_index_mapping(tmp_path):
    rows = _text_rows(24)
    for i in (2, 9, 17):  # a prompt that fills max_length alone: no supervised token left, TRL drops the row
        rows[i]["prompt"] = " ".join(f"w{j}" for j in range(14)) + " "
    data = Dataset.from_list(rows).shuffle(seed=1).select(range(2, 24))  # the user's own index mapping
    trainer, callback, _ = _sft(
        tmp_path, data, SpiceConfig(budget=0.25, proj_dim=32), max_length=10, shuffle_dataset=True
    )
    sources = _assert_every_row_maps_back(trainer, data, callback)
    dropped = {i for i in range(len(data)) if data[i]["prompt"].count(" ") >= 14}
    assert len(dropped) >= 2 and set(range(len(data))) - set(sources) == dropped


def test_rows_map_back_for_pretokenized_data_without_max_length(tmp_path):
    # Already tokenised with labels and max_length=None: TRL maps nothing and only shuffles.
    data = tw.dataset(24).shuffle(seed=4)
    trainer, callback, _ = _sft(
        tmp_path, data, SpiceConfig(budget=0.25, proj_dim=32), max_length=None, shuffle_dataset=True
    )
    processed = trainer.train_dataset
    for row, source in zip(callback.selected, callback.selected_rows, strict=True):
        assert processed[row]["input_ids"] == data[source]["input_ids"]
    assert callback.selected_rows != callback.selected


@pytest.mark.slow
def test_example_script_runs_offline(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "sft_spice.py"
    spec = importlib.util.spec_from_file_location("sft_spice", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    module.main(["--output-dir", str(out), "--toy-rows", "48", "--epochs", "1", "--budget", "8"])
    assert "trained on 8 of 48 rows" in capsys.readouterr().out
    assert (out / "_spice" / "round-0.json").is_file()


def test_a_round_is_seen_on_the_console_in_the_metrics_and_in_tensorboard(tmp_path, caplog):
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = Dataset.from_list(_text_rows(24))
    with caplog.at_level(logging.INFO, logger="spice_trainer"):
        trainer, callback, recorder = _sft(
            tmp_path,
            data,
            SpiceConfig(budget=6, stop_rule="none", stop_ratio=None, proj_dim=32),
            report_to="tensorboard",
        )
    selection = callback.selection
    meta = selection.metadata
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("spice: round")]
    assert len(lines) == 1
    expected = f"spice: round 0 selected 6 of {len(trainer.train_dataset)} rows (stop: budget) in "
    assert lines[0].startswith(expected), lines[0]
    solved = meta["solved_rows"]
    assert (f"excluded {solved} solved" in lines[0]) == (solved > 0)

    (logged,) = [h for h in trainer.state.log_history if "spice/round" in h]
    assert logged["spice/stop_reason"] == 0.0 and logged["spice/selected"] == 6.0
    assert logged["spice/candidates"] == float(len(trainer.train_dataset))
    assert logged.get("spice/excluded_solved", 0.0) == float(solved)
    assert meta["solved_rows"] + meta["loss_cap_rows"] == meta["loss_guard_excluded"]

    # Throughput counts the rows drawn (6 per epoch), not the 24-row dataset.
    (final,) = [h for h in trainer.state.log_history if "train_samples_per_second" in h]
    speed, runtime = final["train_samples_per_second"], final["train_runtime"]
    drawn = len(recorder.drawn_rows(trainer.train_dataset))
    # transformers rounds the runtime to 4 decimals and the speed to 3: their product is within that rounding.
    assert drawn == 6 and abs(speed * runtime - drawn) <= 5e-4 * runtime + 5e-5 * speed + 2.5e-8

    # The selection as a dataset of the user's rows, with the round's numbers.
    chosen = selection.to_dataset(data)
    assert chosen["spice_row"] == callback.selected_rows
    assert chosen["prompt"] == [data[r]["prompt"] for r in callback.selected_rows]
    assert chosen["spice_gain"] == selection.gains

    (run_dir,) = {p.parent for p in (tmp_path / "runs").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "spice/round-0" in events.Tags()["images"]
    assert "spice/stop_reason/text_summary" in events.Tags()["tensors"]
    assert "train/spice/selected" in events.Tags()["scalars"]
