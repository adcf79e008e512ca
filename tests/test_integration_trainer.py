"""SpiceDataCallback on a real transformers.Trainer: what the dataloader draws, steps, rounds, resume."""

import itertools
import json
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
import trainer_world as tw
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback

from spice_trainer import Selection, SpiceConfig, SpiceDataCallback
from spice_trainer.integrations.state import CALLBACK_STATE_KEY, TRAINER_STATE_FILE, CheckpointStateError
from spice_trainer.integrations.trainer import REPORT_DIR


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
    model = model if model is not None else tw.model()
    consumed = tw.Consumed(model)
    trainer = Trainer(
        model=model,
        args=tw.args(tmp_path / "run", **arg_overrides),
        train_dataset=data,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[callback] + ([StopAt(stop_at)] if stop_at else []),
    )
    trainer.train()
    trainer.consumed = consumed
    return trainer, callback, collator, data


def test_dataloader_draws_only_the_selected_rows_and_steps_span_the_subset(tmp_path):
    config = SpiceConfig(budget=0.25, stop_rule="none", stop_ratio=None, proj_dim=32)
    trainer, callback, collator, data = _train(tmp_path, config, gradient_accumulation_steps=2)
    selected = callback.selected
    assert len(selected) == 8  # 25% of 32 rows, no early stopping
    drawn = collator.drawn_rows(data)
    assert set(drawn) == set(selected)
    assert len(drawn) == 2 * 8  # two epochs over the subset, every row once per epoch
    assert sorted(drawn[:8]) == sorted(selected) and sorted(drawn[8:]) == sorted(selected)
    # 8 rows / batch 4 = 2 batches per epoch, accumulated 2 at a time: 1 optimizer step per epoch.
    assert trainer.state.max_steps == 2 and trainer.state.global_step == 2
    assert trainer.lr_scheduler.get_last_lr()[0] == 0.0  # linear decay ends at the last step: lr x 0 exactly
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
    config = SpiceConfig(
        budget=0.25, stop_rule="none", stop_ratio=None, proj_dim=32, reselect_every_steps=2, mode="replace"
    )
    trainer, callback, _, data = _train(tmp_path, config, num_train_epochs=4, learning_rate=5e-2)
    assert [r.step for r in callback.rounds] == [0, 2, 4, 6]  # the final step (8) selects nothing
    logged = [entry for entry in trainer.state.log_history if "spice/round" in entry]
    assert [entry["step"] for entry in logged] == [0, 2, 4, 6]
    # Replay: each row trained on is the one the recorded history assigns to its position.
    drawn = trainer.consumed.rows(data)
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
        budget=0.5,
        stop_rule="ratio",
        stop_ratio=0.9,
        feature_norm="none",
        proj_dim=32,
        reselect_every_steps=1,
        mode="grow",
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


def _run(output_dir, config, data, *, resume=None, callbacks=(), **overrides):
    """A Trainer run with SpiceDataCallback; returns (trainer, callback, consumed batches)."""
    model = tw.model()
    consumed = tw.Consumed(model)
    callback = SpiceDataCallback(config)
    trainer = Trainer(
        model=model,
        args=tw.args(output_dir, **overrides),
        train_dataset=data,
        data_collator=tw.RecordingCollator(),
        callbacks=[callback, *callbacks],
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer, callback, consumed


def _history(callback):
    return [(s.round, s.epoch, s.position, s.rows) for s in callback.sampler.history]


# (reselect_every_steps, gradient_accumulation_steps): schedules that share steps with save_steps=2.
RESUME_CASES = [(2, 1), (3, 1), ((2, 5), 1), (2, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(("schedule", "accumulation"), RESUME_CASES)
def test_resume_from_every_checkpoint_reproduces_the_uninterrupted_run(tmp_path, schedule, accumulation, workers):
    # 16 selected rows, batch 2: 8 batches in the one epoch, so every round lands mid-epoch, where the dataloader
    # has drawn ahead (1 batch without workers, 2 workers x 2 prefetched with); a checkpoint every 2 optimizer
    # steps. A round at a checkpoint step is saved with that checkpoint; the batches drawn before it are not.
    config = SpiceConfig(budget=0.5, stop_rule="none", stop_ratio=None, proj_dim=32, reselect_every_steps=schedule)
    common = {
        "num_train_epochs": 1,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": accumulation,
        "learning_rate": 5e-2,
        "dataloader_num_workers": workers,
    }
    data = tw.dataset()
    full, full_callback, full_consumed = _run(
        tmp_path / "full", config, data, save_strategy="steps", save_steps=2, **common
    )
    steps = full.state.global_step
    assert steps == 8 // accumulation and len(full_callback.rounds) >= 2  # rounds happened
    assert all(s.position > 0 for s in full_callback.sampler.history[1:])  # mid-epoch switches
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "full").glob("checkpoint-*"))
    assert checkpoints == list(range(2, steps + 1, 2))
    full_losses = tw.losses(full)
    for k in checkpoints[:-1]:  # the last checkpoint is the end of training: nothing left to resume
        resumed, callback, consumed = _run(
            tmp_path / f"resume-{k}", config, data, resume=tmp_path / "full" / f"checkpoint-{k}", **common
        )
        # The resumed run trains exactly the batches the uninterrupted run trained after step k, with its losses.
        assert consumed.batches == full_consumed.batches[k * accumulation :], f"checkpoint-{k}"
        resumed_losses = tw.losses(resumed)
        assert sorted(resumed_losses) == list(range(1, steps + 1))
        later = range(k + 1, steps + 1)
        assert [resumed_losses[s] for s in later] == [full_losses[s] for s in later], f"checkpoint-{k}"
        assert _history(callback) == _history(full_callback)


@pytest.mark.slow
def test_a_subset_applies_from_what_the_trainer_consumed_whatever_the_workers(tmp_path):
    # Prefetching (accelerate's look-ahead, workers x prefetch_factor) draws batches ahead of training; where a
    # new subset applies must not depend on it.
    config = SpiceConfig(budget=0.25, stop_rule="none", stop_ratio=None, proj_dim=32, reselect_every_steps=3)
    data = tw.dataset()
    runs = []
    for workers, prefetch in ((0, None), (2, 2), (2, 6)):
        runs.append(
            _run(
                tmp_path / f"w{workers}-{prefetch}",
                config,
                data,
                num_train_epochs=2,
                per_device_train_batch_size=2,
                learning_rate=5e-2,
                dataloader_num_workers=workers,
                dataloader_prefetch_factor=prefetch,
            )
        )
    (base, base_callback, base_consumed), *others = runs
    history = _history(base_callback)
    # Independent of the library's counters: the round after step s applies from sample 2s (batch 2, one
    # process, no accumulation, 8 samples per epoch): step 3 -> epoch 0 position 6, step 6 -> epoch 1 position 4.
    assert [h[:3] for h in history] == [(0, 0, 0), (1, 0, 6), (2, 1, 4)]
    rows = base_consumed.rows(data)
    subsets = [set(h[3]) for h in history]
    assert set(rows[:6]) <= subsets[0] and set(rows[6:12]) <= subsets[1] and set(rows[12:]) <= subsets[2]
    for trainer, callback, consumed in others:
        assert consumed.batches == base_consumed.batches
        assert tw.losses(trainer) == tw.losses(base)
        assert _history(callback) == history
    # accelerate looks one batch ahead even without workers: each round found a batch drawn from the old subset.
    assert base_callback.recollated_batches >= 1 and all(cb.recollated_batches >= 1 for _, cb, _ in others)


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


@pytest.mark.parametrize("kind", ["datasets", "list"])
def test_resume_with_other_labels_or_a_row_outside_any_sample_is_refused(tmp_path, kind):
    # The fingerprint covers every row and every column: one row's labels, or one row of 200 (the old check hashed
    # the input_ids of 64 sampled rows), is enough to refuse.
    rows = tw.rows(200)
    as_data = (lambda r: datasets.Dataset.from_list(r)) if kind == "datasets" else list
    config = SpiceConfig(budget=8, proj_dim=32)
    _train(tmp_path, config, data=as_data(rows), max_steps=2, save_strategy="steps", save_steps=2)
    relabelled = [dict(r) for r in rows]
    labels = rows[101]["labels"]
    relabelled[101] = {**rows[101], "labels": [*labels[:2], -100, *labels[3:]]}  # one more masked token
    other_row = [dict(r) for r in rows]
    other_row[137] = {"input_ids": rows[137]["input_ids"][:-1], "labels": rows[137]["labels"][:-1]}
    for changed in (relabelled, other_row):
        trainer = Trainer(
            model=tw.model(),
            args=tw.args(tmp_path / "run", max_steps=4),
            train_dataset=as_data(changed),
            data_collator=tw.RecordingCollator(),
            callbacks=[SpiceDataCallback(config)],
        )
        with pytest.raises(ValueError, match="training dataset differs"):
            trainer.train(resume_from_checkpoint=True)
    same = Trainer(
        model=tw.model(),
        args=tw.args(tmp_path / "run", max_steps=4),
        train_dataset=as_data([dict(r) for r in rows]),  # rebuilt, same rows: resumes
        data_collator=tw.RecordingCollator(),
        callbacks=[SpiceDataCallback(config)],
    )
    same.train(resume_from_checkpoint=True)
    assert same.state.global_step == 4


# --- checkpoints: the selection state is saved with the checkpoint ------------------------------------------


class Killed(BaseException):
    """A SIGKILL stand-in: not an Exception, so nothing may swallow it."""


class KillAfterCheckpoint(TrainerCallback):
    """Dies right after the trainer finished writing checkpoint ``step`` (and rotated old ones)."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after checkpoint-{self.step}")


def _trainer_state(checkpoint):
    return json.loads((checkpoint / TRAINER_STATE_FILE).read_text())


def test_checkpoints_carry_the_selection_state_in_trainer_state(tmp_path):
    config = SpiceConfig(budget=0.25, stop_rule="none", stop_ratio=None, proj_dim=32, reselect_every_steps=3)
    _, callback, _ = _run(
        tmp_path / "run", config, tw.dataset(), num_train_epochs=2, save_strategy="steps", save_steps=2
    )
    for step in (2, 4):
        entry = _trainer_state(tmp_path / "run" / f"checkpoint-{step}")["stateful_callbacks"][CALLBACK_STATE_KEY]
        saved = entry["spice"]
        assert saved["version"] == 2 and saved["num_rows"] == 32
        rounds_by_then = [r for r in callback.rounds if r.step <= step]
        assert [r["step"] for r in saved["rounds"]] == [r.step for r in rounds_by_then]
        assert len(saved["sampler"]["history"]) == len(rounds_by_then)
    assert not list((tmp_path / "run").glob("checkpoint-*/spice_state.json"))


def test_a_kill_right_after_a_checkpoint_still_resumes_exactly(tmp_path):
    # The kill comes in on_save, after the trainer wrote checkpoint-4 and rotated the older ones: a state written
    # by the callback's own on_save (after this one) would be missing from checkpoint-4.
    config = SpiceConfig(budget=0.25, stop_rule="none", stop_ratio=None, proj_dim=32, reselect_every_steps=2)
    common = {"num_train_epochs": 3, "learning_rate": 5e-2, "save_strategy": "steps", "save_steps": 2}
    data = tw.dataset()
    full, _, full_consumed = _run(tmp_path / "full", config, data, **common)
    model = tw.model()
    callbacks = [KillAfterCheckpoint(4), SpiceDataCallback(config)]
    cut = Trainer(
        model=model,
        args=tw.args(tmp_path / "cut", save_total_limit=1, **common),
        train_dataset=data,
        data_collator=tw.RecordingCollator(),
        callbacks=callbacks,
    )
    with pytest.raises(Killed):
        cut.train()
    assert [p.name for p in (tmp_path / "cut").glob("checkpoint-*")] == ["checkpoint-4"]  # rotation ran
    resumed, _, consumed = _run(tmp_path / "resumed", config, data, resume=tmp_path / "cut" / "checkpoint-4", **common)
    assert consumed.batches == full_consumed.batches[4:]
    assert {s: v for s, v in tw.losses(resumed).items() if s > 4} == {s: v for s, v in tw.losses(full).items() if s > 4}


def test_a_checkpoint_of_a_spice_run_without_its_state_is_an_error(tmp_path):
    config = SpiceConfig(budget=0.25, proj_dim=32)
    _run(tmp_path / "run", config, tw.dataset(), max_steps=4, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    trainer_state = _trainer_state(checkpoint)
    del trainer_state["stateful_callbacks"][CALLBACK_STATE_KEY]
    (checkpoint / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state))
    trainer = Trainer(
        model=tw.model(),
        args=tw.args(tmp_path / "again", max_steps=4),
        train_dataset=tw.dataset(),
        data_collator=tw.RecordingCollator(),
        callbacks=[SpiceDataCallback(config)],
    )
    with pytest.raises(CheckpointStateError, match=r"checkpoint-2.* with SpiceDataCallback .*holds no selection state"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0


def test_resuming_a_run_without_the_callback_is_an_error_not_zero_steps(tmp_path):
    plain = Trainer(
        model=tw.model(),
        args=tw.args(tmp_path / "plain", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=tw.dataset(),
        data_collator=tw.RecordingCollator(),
    )
    plain.train()
    trainer = Trainer(
        model=tw.model(),
        args=tw.args(tmp_path / "plain", num_train_epochs=2),
        train_dataset=tw.dataset(),
        data_collator=tw.RecordingCollator(),
        callbacks=[SpiceDataCallback(SpiceConfig(budget=0.25, proj_dim=32))],
    )
    with pytest.raises(CheckpointStateError, match=r"checkpoint-4.* without SpiceDataCallback.*new run"):
        trainer.train(resume_from_checkpoint=True)


def test_restore_callback_states_from_checkpoint_keeps_the_live_callback(tmp_path):
    # transformers rebuilds exportable callbacks from the checkpoint when asked to; SpiceDataCallback stays itself.
    config = SpiceConfig(budget=0.25, stop_rule="none", stop_ratio=None, proj_dim=32, reselect_every_steps=2)
    common = {"num_train_epochs": 2, "learning_rate": 5e-2, "save_strategy": "steps", "save_steps": 2}
    data = tw.dataset()
    _, _, full_consumed = _run(tmp_path / "full", config, data, **common)
    resumed, callback, consumed = _run(
        tmp_path / "resumed",
        config,
        data,
        resume=tmp_path / "full" / "checkpoint-2",
        restore_callback_states_from_checkpoint=True,
        **common,
    )
    assert [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, SpiceDataCallback)] == [callback]
    assert consumed.batches == full_consumed.batches[2:]


def test_reports_and_logs(tmp_path):
    config = SpiceConfig(budget=0.25, proj_dim=32)
    trainer, callback, _, _ = _train(tmp_path, config, max_steps=1)
    folder = tmp_path / "run" / REPORT_DIR
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


# --- how the callback joins a trainer ---------------------------------------------------------------------


def _batches_of(way, tmp_path, config, data):
    """Train with the callback added ``way``; the batches trained on and the losses."""
    model = tw.model()
    consumed = tw.Consumed(model)
    callback = SpiceDataCallback(config)
    kwargs = {"callbacks": [callback]} if way == "callbacks" else {}
    trainer = Trainer(
        model=model,
        args=tw.args(tmp_path / way, num_train_epochs=2, learning_rate=5e-2),
        train_dataset=data,
        data_collator=tw.RecordingCollator(),
        **kwargs,
    )
    if way == "add_callback":
        trainer.add_callback(callback)
    elif way == "attach_then_add":
        callback.attach(trainer)
        trainer.add_callback(callback)  # the same instance twice: added once
    elif way == "add_then_attach":
        trainer.add_callback(callback)
        callback.attach(trainer)
    trainer.train()
    assert [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SpiceDataCallback)] == [callback]
    return consumed.batches, tw.losses(trainer), [r.step for r in callback.rounds]


def test_add_callback_works_like_the_callbacks_list_in_any_order(tmp_path):
    config = SpiceConfig(budget=0.25, stop_rule="none", stop_ratio=None, proj_dim=32, reselect_every_steps=2)
    data = tw.dataset()
    reference = _batches_of("callbacks", tmp_path, config, data)
    assert reference[2] == [0, 2]  # two epochs of 2 steps: rounds at steps 0 and 2
    for way in ("add_callback", "attach_then_add", "add_then_attach"):
        assert _batches_of(way, tmp_path, config, data) == reference, way


def test_what_cannot_work_raises_at_add_callback(tmp_path):
    data = tw.dataset()
    grouped = Trainer(
        model=tw.model(), args=tw.args(tmp_path, train_sampling_strategy="group_by_length"), train_dataset=data
    )
    callback = SpiceDataCallback(SpiceConfig(budget=0.25, proj_dim=32))
    with pytest.raises(ValueError, match="group_by_length"):
        grouped.add_callback(callback)
    assert callback not in grouped.callback_handler.callbacks and callback.trainer is None
    sgd = Trainer(model=tw.model(), args=tw.args(tmp_path, optim="sgd"), train_dataset=data)
    with pytest.raises(ValueError, match=r"feature_norm='adam' .*SGD .*optim='adamw_torch'"):
        sgd.add_callback(SpiceDataCallback(SpiceConfig(feature_norm="adam", proj_dim=32)))
    trainer = Trainer(model=tw.model(), args=tw.args(tmp_path), train_dataset=data)
    trainer.add_callback(SpiceDataCallback(SpiceConfig(budget=0.25, proj_dim=32)))
    with pytest.raises(ValueError, match="already has a SpiceDataCallback"):
        trainer.add_callback(SpiceDataCallback(SpiceConfig(budget=0.5, proj_dim=32)))
    assert sum(isinstance(cb, SpiceDataCallback) for cb in trainer.callback_handler.callbacks) == 1


def test_a_callback_belongs_to_one_trainer(tmp_path):
    config = SpiceConfig(budget=0.25, proj_dim=32)
    _, callback, _, _ = _train(tmp_path / "first", config, max_steps=1)
    for build in (
        lambda: Trainer(model=tw.model(), args=tw.args(tmp_path), train_dataset=tw.dataset(16), callbacks=[callback]),
        lambda: Trainer(model=tw.model(), args=tw.args(tmp_path), train_dataset=tw.dataset(16)).add_callback(callback),
    ):
        with pytest.raises(ValueError, match="already belongs to another Trainer"):
            build()


def test_a_second_train_is_a_new_run_with_every_scheduled_round(tmp_path):
    config = SpiceConfig(budget=0.25, stop_rule="none", stop_ratio=None, proj_dim=32, reselect_every_steps=2)
    model = tw.model()
    consumed = tw.Consumed(model)
    callback = SpiceDataCallback(config)
    trainer = Trainer(
        model=model,
        args=tw.args(tmp_path, num_train_epochs=2, learning_rate=5e-2),
        train_dataset=tw.dataset(),
        data_collator=tw.RecordingCollator(),
        callbacks=[callback],
    )
    trainer.train()
    first_rounds, first_selection = list(callback.rounds), callback.selection
    trained_first = len(consumed.batches)
    trainer.train()  # selects afresh on the trained model; the round at step 2 (the first run's last) still runs
    assert [r.step for r in first_rounds] == [r.step for r in callback.rounds] == [0, 2]
    assert callback.rounds[0] is not first_rounds[0] and callback.selection is not first_selection
    # The second run's own log holds both of its rounds (trainer.state starts afresh with each train()).
    assert [e["step"] for e in trainer.state.log_history if "spice/round" in e] == [0, 2]
    assert len(callback.sampler.history) == 2 and callback.sampler.history[1].round == 1
    assert len(consumed.batches) == 2 * trained_first and trainer.state.global_step == 4


# --- where the reports go ---------------------------------------------------------------------------------


def test_reports_stay_out_of_the_model_repo_push_to_hub_uploads(tmp_path, monkeypatch):
    # What Trainer.push_to_hub would upload, by the trainer's own call: its folder and ignore_patterns, filtered as
    # huggingface_hub's upload_folder does (no network: the upload itself is intercepted).
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kwargs: calls.append(kwargs))
    trainer, _, _, _ = _train(tmp_path, SpiceConfig(budget=0.25, proj_dim=32), max_steps=2)
    assert (tmp_path / "run" / REPORT_DIR / "round-0.json").is_file()
    trainer.hub_model_id = "someone/spice-model"  # an existing repo: push_to_hub skips creating one
    trainer.push_to_hub(blocking=True)
    (call,) = calls
    files = [p.relative_to(call["folder_path"]).as_posix() for p in Path(call["folder_path"]).rglob("*") if p.is_file()]
    uploaded = list(huggingface_hub.utils.filter_repo_objects(files, ignore_patterns=call["ignore_patterns"]))
    assert "adapter_model.safetensors" in uploaded or "model.safetensors" in uploaded
    assert not [f for f in uploaded if "spice" in f], uploaded


@pytest.mark.slow
def test_two_ranks_resume_from_reselection_checkpoints_like_the_uninterrupted_run(tmp_path):
    # Under torchrun with 2 gloo ranks the subset switch is placed by accelerate's sharded batch layout; the
    # round at step 2 lands mid-epoch (12 rows, 2 per device on 2 ranks: 3 steps per epoch), where each rank's
    # dataloader has already drawn its next batch from the old subset.
    from test_distributed import torchrun

    settings = json.dumps({"budget": 12, "stop_rule": "none", "stop_ratio": None, "reselect_every_steps": 2})
    full = tmp_path / "full"
    full.mkdir()
    torchrun("trainer_run.py", 2, str(full), settings, "3", "none", "2")
    runs = {r: json.loads((full / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert [h[:3] for h in runs[0]["history"]][:2] == [[0, 0, 0], [1, 0, 8]]  # step 2 = 2 x 2 x 2 samples in
    for k in (2, 4):
        out = tmp_path / f"resume-{k}"
        out.mkdir()
        torchrun("trainer_run.py", 2, str(out), settings, "3", "none", "0", str(full / "trainer" / f"checkpoint-{k}"))
        for rank in (0, 1):
            resumed = json.loads((out / f"rank{rank}.json").read_text())
            assert resumed["trained"] == runs[rank]["trained"][k:], (k, rank)
            assert resumed["history"] == runs[rank]["history"]
            later = {s: v for s, v in runs[rank]["losses"].items() if int(s) > k}
            assert {s: v for s, v in resumed["losses"].items() if int(s) > k} == later and later


@pytest.mark.slow
def test_resume_with_cheap_reselection_reproduces_the_uninterrupted_run(tmp_path):
    # reselect_shortlist: later rounds measure a shortlist chosen from the memory of earlier rounds; the
    # checkpoint carries that memory (spice_feature_cache.pt, its checksum in trainer_state.json).
    config = SpiceConfig(
        budget=0.25, stop_rule="none", stop_ratio=None, proj_dim=32, reselect_every_steps=2, reselect_shortlist=0.5
    )
    common = {"num_train_epochs": 2, "per_device_train_batch_size": 2, "learning_rate": 5e-2}
    data = tw.dataset()
    full, full_callback, full_consumed = _run(
        tmp_path / "full", config, data, save_strategy="steps", save_steps=2, **common
    )
    assert full_callback.rounds[1].step == 2 and len(full_callback.rounds) >= 3
    for k in (2, 4):
        assert (tmp_path / "full" / f"checkpoint-{k}" / "spice_feature_cache.pt").is_file()
        resumed, callback, consumed = _run(
            tmp_path / f"resume-{k}", config, data, resume=tmp_path / "full" / f"checkpoint-{k}", **common
        )
        assert consumed.batches == full_consumed.batches[k:]
        assert _history(callback) == _history(full_callback)
        later = range(k + 1, full.state.global_step + 1)
        assert [tw.losses(resumed)[s] for s in later] == [tw.losses(full)[s] for s in later]
    # A reselection memory changed after the checkpoint was written is refused, naming the file.
    memory = tmp_path / "full" / "checkpoint-2" / "spice_feature_cache.pt"
    memory.write_bytes(memory.read_bytes()[:-7] + b"garbage")
    with pytest.raises(CheckpointStateError, match=r"spice_feature_cache\.pt is not the file the checkpoint recorded"):
        _run(tmp_path / "damaged", config, data, resume=tmp_path / "full" / "checkpoint-2", **common)
