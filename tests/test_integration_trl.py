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
    trainer, callback, recorder = _sft(tmp_path, data, SpiceConfig(budget=0.25, stop_ratio=None, proj_dim=32))
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
    assert set(drawn) == set(callback.selected) and len(callback.selected) <= 5


def test_packing_is_refused_with_a_fix(tmp_path):
    with pytest.raises(ValueError, match=r"packing=True.*Set packing=False"):
        SFTTrainer(
            model=tw.model(),
            args=_config(tmp_path, packing=True),
            train_dataset=Dataset.from_list(_text_rows()),
            processing_class=tw.TOK,
            callbacks=[SpiceDataCallback(SpiceConfig())],
        )
