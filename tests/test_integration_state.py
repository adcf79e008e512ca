"""The checkpoint state (integrations/state.py): every field is checked on load, with the file, the field and the
fix in the message; the dataset fingerprint covers every row and column."""

import copy
import json

import datasets
import pytest
import torch
import trainer_world as tw
from transformers import Trainer

from spice_trainer import SpiceConfig, SpiceDataCallback
from spice_trainer.features.fingerprint import tensor_bytes
from spice_trainer.integrations.state import (
    CALLBACK_STATE_KEY,
    TRAINER_STATE_FILE,
    CheckpointStateError,
    RunState,
    dataset_fingerprint,
    read_checkpoint_state,
)

CONFIG = SpiceConfig(budget=0.25, stop_rule="none", stop_ratio=None, proj_dim=32, reselect_every_steps=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint-4 of a run with rounds at steps 0 and 2 (8 rows, batch 4: two steps per epoch)."""
    out = tmp_path_factory.mktemp("state") / "run"
    trainer = Trainer(
        model=tw.model(),
        args=tw.args(out, num_train_epochs=3, save_strategy="steps", save_steps=2),
        train_dataset=tw.dataset(),
        data_collator=tw.RecordingCollator(),
        callbacks=[SpiceDataCallback(CONFIG)],
    )
    trainer.train()
    return out / "checkpoint-4"


def _payload(checkpoint):
    return json.loads((checkpoint / TRAINER_STATE_FILE).read_text())["stateful_callbacks"][CALLBACK_STATE_KEY]["spice"]


def test_the_saved_state_reads_back(checkpoint):
    state, trainer_state = read_checkpoint_state(checkpoint)
    assert trainer_state["global_step"] == 4
    assert state.num_rows == 32 and [r["step"] for r in state.rounds] == [0, 2, 4]
    assert state.sampler["num_samples"] == 8 and len(state.sampler["history"]) == 3


def _set(path, value):
    def apply(payload):
        target = payload
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return apply


_DELETE = object()

# (what is changed, the field the message must name)
MUTATIONS = [
    (_set(["version"], 99), "version"),
    (_set(["version"], _DELETE), "version"),
    (_set(["fingerprint"], 12), "fingerprint"),
    (_set(["num_rows"], -3), "num_rows"),
    (_set(["config"], "budget=0.25"), "config"),
    (_set(["sampler", "num_samples"], 1000), "sampler.num_samples"),  # would train 500 steps instead of 8
    (_set(["sampler", "num_samples"], 0), "sampler.num_samples"),
    (_set(["sampler", "seed"], "42"), "sampler.seed"),
    (_set(["sampler", "history"], []), "sampler.history"),
    (_set(["sampler", "history", 0, "rows", 3], -1), "sampler.history[0].rows[3]"),
    (_set(["sampler", "history", 0, "rows", 3], 32), "sampler.history[0].rows[3]"),
    (_set(["sampler", "history", 0, "rows", 3], 2.5), "sampler.history[0].rows[3]"),
    (_set(["sampler", "history", 1, "position"], 8), "sampler.history[1].position"),
    (_set(["sampler", "history", 1, "epoch"], -1), "sampler.history[1].epoch"),
    (_set(["sampler", "history", 2, "round"], 1), "sampler.history[2]"),  # not after the previous switch
    (_set(["sampler", "history", 1, "rows"], []), "sampler.history[1].rows"),
    (_set(["sampler", "history", 0, "epoch"], 1), "sampler.history[0]"),
    (_set(["rounds", 1, "step"], 0), "rounds[1].step"),
    (_set(["rounds", 1, "round"], 5), "rounds[1].round"),
    (_set(["rounds", 0, "seconds"], float("nan")), "rounds[0].seconds"),
    (_set(["rounds", 0, "selected"], 0), "rounds[0].selected"),
    (_set(["rounds", 2], _DELETE), "sampler.history"),  # a switch of a round that is not recorded
    (_set(["reference_gain"], "big"), "reference_gain"),
    (_set(["proxy"], {"file": "spice_proxy.pt"}), "proxy"),
]


@pytest.mark.parametrize(("mutate", "field"), MUTATIONS, ids=[f for _, f in MUTATIONS])
def test_every_field_is_checked_with_the_file_the_field_and_the_fix(checkpoint, tmp_path, mutate, field):
    payload = copy.deepcopy(_payload(checkpoint))
    mutate(payload)
    source = f"{tmp_path}/checkpoint-4/{TRAINER_STATE_FILE}"
    with pytest.raises(CheckpointStateError) as err:
        RunState.from_json(json.loads(json.dumps(payload)), source)
    message = str(err.value)
    assert message.startswith(source) and f"field {field!r}" in message, message
    assert "resume from another checkpoint" in message or "spice-trainer version" in message


@pytest.mark.parametrize("content", ["", '{"global_step": 4, "stateful', "[1, 2]", "\x00\xff garbage"])
def test_an_unreadable_trainer_state_names_the_file(checkpoint, tmp_path, content):
    broken = tmp_path / "checkpoint-4"
    broken.mkdir()
    (broken / TRAINER_STATE_FILE).write_bytes(content.encode("latin-1"))
    with pytest.raises(CheckpointStateError, match=rf"{broken / TRAINER_STATE_FILE}"):
        read_checkpoint_state(broken)
    with pytest.raises(CheckpointStateError, match="is not a complete checkpoint"):
        read_checkpoint_state(tmp_path / "checkpoint-missing")


def test_a_damaged_state_stops_resume_before_any_work(checkpoint, tmp_path):
    # The case: num_samples 1000 was accepted and trained 500 steps instead of 8.
    damaged = tmp_path / "checkpoint-4"
    damaged.mkdir()
    trainer_state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    trainer_state["stateful_callbacks"][CALLBACK_STATE_KEY]["spice"]["sampler"]["num_samples"] = 1000
    (damaged / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state))
    trainer = Trainer(
        model=tw.model(),
        args=tw.args(tmp_path / "out", num_train_epochs=3),
        train_dataset=tw.dataset(),
        data_collator=tw.RecordingCollator(),
        callbacks=[SpiceDataCallback(CONFIG)],
    )
    with pytest.raises(CheckpointStateError, match=r"field 'sampler.num_samples' is 1000, expected the first subset"):
        trainer.train(resume_from_checkpoint=str(damaged))
    assert trainer.state.global_step == 0


def test_the_fingerprint_covers_every_row_and_column():
    rows = tw.rows(200)
    base = dataset_fingerprint(rows)
    assert dataset_fingerprint([dict(r) for r in rows]) == base  # deterministic
    for change in (
        lambda r: r[150].update(labels=[*r[150]["labels"][:2], -100, *r[150]["labels"][3:]]),  # one label
        lambda r: r[99].update(input_ids=[*r[99]["input_ids"][:-1], 9]),  # a row outside any sample of 64
        lambda r: r.reverse(),  # order
        lambda r: r.pop(),  # length
        lambda r: r[0].update(weight=1.0),  # another column
    ):
        changed = [dict(r) for r in rows]
        change(changed)
        assert dataset_fingerprint(changed) != base
    tensors = [{k: torch.tensor(v) for k, v in r.items()} for r in rows]
    assert dataset_fingerprint(tensors) != base  # the container is part of the identity
    # A tensor is hashed by its dtype and bytes: the same bits as bfloat16 and as int16 are two datasets.
    bits = torch.tensor([1, -2, 300], dtype=torch.int16)
    assert tensor_bytes(bits.view(torch.bfloat16)) == tensor_bytes(bits) == bits.numpy().tobytes()
    assert dataset_fingerprint([{"x": bits.view(torch.bfloat16)}]) != dataset_fingerprint([{"x": bits}])
    # A datasets.Dataset brings its own fingerprint: every transform changes it, a rebuild keeps it.
    data = datasets.Dataset.from_list(rows)
    assert dataset_fingerprint(data) == dataset_fingerprint(datasets.Dataset.from_list(rows))
    relabelled = data.map(
        lambda r, i: {"labels": [-100] * len(r["labels"]) if i == 150 else r["labels"]}, with_indices=True
    )
    assert dataset_fingerprint(relabelled) != dataset_fingerprint(data)
    assert dataset_fingerprint(data.shuffle(seed=0)) != dataset_fingerprint(data)
