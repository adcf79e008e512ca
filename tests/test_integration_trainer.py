"""SpiceDataCallback on a real transformers.Trainer: what the dataloader draws, steps, rounds, resume."""

import itertools
import json

import pytest
import torch
import trainer_world as tw
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback

from spice_trainer import Selection, SpiceConfig, SpiceDataCallback
from spice_trainer.integrations.trainer import STATE_FILE


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` optimizer steps, like a job killed right after a checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _train(tmp_path, config, *, data=None, model=None, stop_at=None, eval_dataset=None, **arg_overrides):
    data = data if data is not None else tw.dataset()
    collator = tw.RecordingCollator()
    callback = SpiceDataCallback(config)
    trainer = Trainer(
        model=model if model is not None else tw.model(),
        args=tw.args(tmp_path / "run", **arg_overrides),
        train_dataset=data,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[callback] + ([StopAt(stop_at)] if stop_at else []),
    )
    trainer.train()
    return trainer, callback, collator, data


def test_dataloader_draws_only_the_selected_rows_and_steps_span_the_subset(tmp_path):
    config = SpiceConfig(budget=0.25, stop_ratio=None, proj_dim=32)
    trainer, callback, collator, data = _train(tmp_path, config, gradient_accumulation_steps=2)
    selected = callback.selected
    assert len(selected) == 8  # 25% of 32 rows, no early stopping
    drawn = collator.drawn_rows(data)
    assert set(drawn) == set(selected)
    assert len(drawn) == 2 * 8  # two epochs over the subset, every row once per epoch
    assert sorted(drawn[:8]) == sorted(selected) and sorted(drawn[8:]) == sorted(selected)
    # 8 rows / batch 4 = 2 batches per epoch, accumulated 2 at a time: 1 optimizer step per epoch.
    assert trainer.state.max_steps == 2 and trainer.state.global_step == 2
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)  # linear decay ends at the last step
    # The selection is what the library selects offline on the same model and data.
    from spice_trainer import select

    offline = select(tw.model(), data, config, tw.RecordingCollator(), show_progress=False)  # the step-0 weights
    assert callback.selection is not None and callback.selection.indices == offline.indices
    assert selected == offline.selected


def test_first_selection_equals_offline_select(tmp_path):
    from spice_trainer import select

    config = SpiceConfig(budget=6, proj_dim=32)
    data = tw.dataset()
    offline = select(tw.model(), data, config, tw.RecordingCollator(), show_progress=False)
    _, callback, _, _ = _train(tmp_path, config, data=data, max_steps=1)
    assert callback.rounds[0].selected == len(offline.selected)
    assert callback.selection.indices == offline.indices


def test_reselection_fires_on_schedule_and_changes_what_is_drawn(tmp_path):
    config = SpiceConfig(budget=0.25, stop_ratio=None, proj_dim=32, reselect_every_steps=2, mode="replace")
    trainer, callback, collator, data = _train(tmp_path, config, num_train_epochs=4, learning_rate=5e-2)
    assert [r.step for r in callback.rounds] == [0, 2, 4, 6]  # the final step (8) selects nothing
    logged = [entry for entry in trainer.state.log_history if "spice/round" in entry]
    assert [entry["step"] for entry in logged] == [0, 2, 4, 6]
    # Replay: each drawn row is the one the recorded history assigns to its position.
    drawn = collator.drawn_rows(data)
    sampler = callback.sampler
    expected = [sampler.row_at(epoch, pos) for epoch in range(4) for pos in range(len(sampler))]
    assert drawn == expected
    subsets = [switch.rows for switch in sampler.history]
    assert any(set(a) != set(b) for a, b in itertools.pairwise(subsets))
    later = sampler.history[-1]
    assert set(drawn[later.epoch * len(sampler) + later.position :]) <= set(later.rows)


def test_grow_never_drops_a_selected_row(tmp_path):
    # ω = 0.9 stops the first round early, leaving room in the budget for later rounds to grow into.
    config = SpiceConfig(
        budget=0.5, stop_ratio=0.9, feature_norm="none", proj_dim=32, reselect_every_steps=1, mode="grow"
    )
    _, callback, _, _ = _train(tmp_path, config, num_train_epochs=3, learning_rate=5e-2)
    subsets = [switch.rows for switch in callback.sampler.history]
    assert len(subsets) >= 3
    for before, after in itertools.pairwise(subsets):
        assert after[: len(before)] == before  # kept, in order, and only appended to
    assert len(subsets[-1]) <= 16


def test_training_after_selection_is_identical_to_training_on_the_indices_directly(tmp_path):
    # LoRA dropout > 0: any RNG draw by the selection would change the training losses.
    config = SpiceConfig(budget=0.25, proj_dim=32)
    trainer_a, callback, collator_a, data = _train(tmp_path / "a", config, model=tw.model(dropout=0.1))
    order = collator_a.drawn_rows(data)

    class FixedOrder(Sampler[int]):
        def __init__(self, epoch_len):
            self.epoch, self.epoch_len = 0, epoch_len

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return self.epoch_len

        def __iter__(self):
            return iter(order[self.epoch * self.epoch_len : (self.epoch + 1) * self.epoch_len])

    collator_b = tw.RecordingCollator()
    trainer_b = Trainer(
        model=tw.model(dropout=0.1), args=tw.args(tmp_path / "b"), train_dataset=data, data_collator=collator_b
    )
    fixed = FixedOrder(len(callback.sampler))
    trainer_b._get_train_sampler = lambda *a, **k: fixed
    trainer_b.train()
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert collator_b.batches == collator_a.batches
    assert losses(trainer_a) == losses(trainer_b)
    for (name, p), (_, q) in zip(trainer_a.model.named_parameters(), trainer_b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    config = SpiceConfig(budget=0.25, stop_ratio=None, proj_dim=32, reselect_every_steps=3)
    common = {"num_train_epochs": 3, "save_strategy": "steps", "save_steps": 2, "learning_rate": 5e-2}
    full, _, full_collator, data = _train(tmp_path / "full", config, **common)

    # The interrupted run: same settings, stopped after step 4 (its checkpoint-4 holds the SPICE state).
    _train(tmp_path / "cut", config, data=data, stop_at=4, **common)
    checkpoint = tmp_path / "cut" / "run" / "checkpoint-4"
    assert json.loads((checkpoint / STATE_FILE).read_text())["sampler"]["num_samples"] == 8

    collator = tw.RecordingCollator()
    callback = SpiceDataCallback(config)
    resumed = Trainer(
        model=tw.model(),
        args=tw.args(tmp_path / "cut" / "run", **common),
        train_dataset=data,
        data_collator=collator,
        callbacks=[callback],
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    losses = lambda t: {e["step"]: e["loss"] for e in t.state.log_history if "loss" in e}  # noqa: E731
    full_losses, resumed_losses = losses(full), losses(resumed)
    assert {s: full_losses[s] for s in resumed_losses} == resumed_losses
    assert max(resumed_losses) == full.state.global_step
    # 8 rows / batch 4 = one batch per optimizer step: the resumed run draws the full run's batches 5 and 6.
    assert collator.batches == full_collator.batches[4:]


def test_resume_with_a_changed_dataset_is_refused(tmp_path):
    config = SpiceConfig(budget=0.25, proj_dim=32)
    _train(tmp_path, config, max_steps=2, save_strategy="steps", save_steps=2)
    callback = SpiceDataCallback(config)
    trainer = Trainer(
        model=tw.model(),
        args=tw.args(tmp_path / "run", max_steps=4),
        train_dataset=tw.dataset(seed=5),
        data_collator=tw.RecordingCollator(),
        callbacks=[callback],
    )
    with pytest.raises(ValueError, match="training dataset differs"):
        trainer.train(resume_from_checkpoint=True)
    changed = Trainer(
        model=tw.model(),
        args=tw.args(tmp_path / "run", max_steps=4),
        train_dataset=tw.dataset(),
        data_collator=tw.RecordingCollator(),
        callbacks=[SpiceDataCallback(SpiceConfig(budget=0.5, proj_dim=32))],
    )
    with pytest.raises(ValueError, match=r"SpiceConfig changed .*fields: budget"):
        changed.train(resume_from_checkpoint=True)


def test_reports_and_logs(tmp_path):
    config = SpiceConfig(budget=0.25, proj_dim=32)
    trainer, callback, _, _ = _train(tmp_path, config, max_steps=1)
    folder = tmp_path / "run" / "spice"
    loaded = Selection.load(folder / "round-0.json")
    assert loaded.indices == callback.selection.indices
    assert (folder / "round-0.png").stat().st_size > 0
    logged = next(e for e in trainer.state.log_history if "spice/selected" in e)
    assert logged["spice/selected"] == len(callback.selected)
    for key in ("spice/first_gain", "spice/last_gain", "spice/mean_conflict", "spice/stop_step", "spice/seconds"):
        assert key in logged


def test_unsupported_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="train_sampling_strategy='group_by_length'"):
        Trainer(
            model=tw.model(),
            args=tw.args(tmp_path, train_sampling_strategy="group_by_length"),
            train_dataset=tw.dataset(),
            callbacks=[SpiceDataCallback(SpiceConfig())],
        )
    with pytest.raises(TypeError, match="SpiceDataCallback takes a SpiceConfig"):
        SpiceDataCallback({"budget": 0.1})
    with pytest.raises(ValueError, match="needs a train_dataset"):
        Trainer(model=tw.model(), args=tw.args(tmp_path), callbacks=[SpiceDataCallback(SpiceConfig())])
    too_big = Trainer(
        model=tw.model(),
        args=tw.args(tmp_path, max_steps=1),
        train_dataset=tw.dataset(),
        data_collator=tw.RecordingCollator(),
        callbacks=[SpiceDataCallback(SpiceConfig(budget=40))],
    )
    with pytest.raises(ValueError, match="budget=40 exceeds the pool size n=32"):
        too_big.train()


def test_iterable_dataset_is_refused(tmp_path):
    iterable = tw.dataset().to_iterable_dataset()
    with pytest.raises(ValueError, match="map-style train_dataset with random access"):
        Trainer(
            model=tw.model(),
            args=tw.args(tmp_path, max_steps=2),
            train_dataset=iterable,
            data_collator=tw.RecordingCollator(),
            callbacks=[SpiceDataCallback(SpiceConfig())],
        )


def test_dataloader_workers_and_eval_dataset(tmp_path):
    # Workers fetch rows in other processes; the sampler still runs in the main one, so the order and
    # therefore the losses match a run without workers. The eval dataset is evaluated whole.
    config = SpiceConfig(budget=0.25, proj_dim=32)
    evaluation = tw.dataset(12, seed=9)
    runs = []
    for workers in (0, 2):
        trainer, callback, _, _ = _train(
            tmp_path / f"w{workers}",
            config,
            eval_dataset=evaluation,
            dataloader_num_workers=workers,
            eval_strategy="epoch",
        )
        runs.append((trainer, callback))
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t, _ in runs]
    eval_losses = [[e["eval_loss"] for e in t.state.log_history if "eval_loss" in e] for t, _ in runs]
    assert losses[0] == losses[1] and len(eval_losses[0]) == 2
    assert runs[0][1].selected == runs[1][1].selected
    assert len(runs[0][0].get_eval_dataloader().dataset) == 12  # every eval row: untouched by the selection


def test_rows_of_a_user_dataset_with_its_own_index_mapping(tmp_path):
    # A shuffled/selected dataset carries an index mapping over its table; Trainer trains on it as given, so
    # the rows the callback reports are rows of that dataset (not of the table beneath it).
    data = tw.dataset(40).shuffle(seed=7).select(range(4, 36))
    _, callback, collator, _ = _train(tmp_path, SpiceConfig(budget=0.25, proj_dim=32), data=data, max_steps=2)
    assert callback.selected_rows == callback.selected
    assert set(collator.drawn_rows(data)) == set(callback.selected_rows)


def test_callback_added_after_construction(tmp_path):
    data = tw.dataset()
    late = Trainer(model=tw.model(), args=tw.args(tmp_path / "late", max_steps=1), train_dataset=data)
    late.add_callback(SpiceDataCallback(SpiceConfig(budget=0.25, proj_dim=32)))
    with pytest.raises(RuntimeError, match=r"callback.attach\(trainer\)"):
        late.train()  # training on the full dataset instead of the subset is refused, not silent

    collator = tw.RecordingCollator()
    attached = Trainer(
        model=tw.model(), args=tw.args(tmp_path / "attached", max_steps=1), train_dataset=data, data_collator=collator
    )
    callback = SpiceDataCallback(SpiceConfig(budget=0.25, proj_dim=32)).attach(attached)
    attached.train()
    assert callback in attached.callback_handler.callbacks
    assert set(collator.drawn_rows(data)) <= set(callback.selected) and len(callback.selected) == 8
