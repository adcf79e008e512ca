"""The proxy's checkpoint state (integrations/proxy_rounds.py save_state/load_state): written with the checkpoint,
before it counts as complete, and checked on resume."""

import copy
import json

import pytest
import trainer_world as tw
from test_proxy import TOK, TrainingCollator, _config, _proxy_base, _target
from transformers import Trainer, TrainerCallback

from spice_trainer import SpiceDataCallback
from spice_trainer.integrations.proxy_rounds import PROXY_STATE_FILE
from spice_trainer.integrations.state import (
    CALLBACK_STATE_KEY,
    TRAINER_STATE_FILE,
    CheckpointStateError,
    file_sha256,
)


class Killed(BaseException):
    pass


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed


def _run(folder, base, *, resume=None, callbacks=()):
    config = _config(budget=8, proxy_model=copy.deepcopy(base), proxy_refresh_every_pools=2, reselect_every_steps=2)
    callback = SpiceDataCallback(config)
    trainer = Trainer(
        model=_target(),
        args=tw.args(folder, num_train_epochs=3, save_strategy="steps", save_steps=2, learning_rate=5e-2),
        train_dataset=tw.dataset(32),
        data_collator=TrainingCollator(),
        processing_class=TOK,
        callbacks=[*callbacks, callback],
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer, callback


@pytest.mark.slow
def test_the_proxy_state_is_written_with_the_checkpoint_and_checked_on_resume(tmp_path):
    base = _proxy_base()
    # Killed right after the trainer wrote checkpoint-2 (its on_save, before SpiceDataCallback's): the proxy's
    # file is already in the checkpoint, with its checksum in trainer_state.json.
    with pytest.raises(Killed):
        _run(tmp_path / "cut", base, callbacks=[KillAfterCheckpoint(2)])
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    proxy_file = checkpoint / PROXY_STATE_FILE
    saved = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())["stateful_callbacks"][CALLBACK_STATE_KEY]
    assert saved["spice"]["proxy"] == {"file": PROXY_STATE_FILE, "sha256": file_sha256(proxy_file)}

    _, full_callback = _run(tmp_path / "full", base)
    _, callback = _run(tmp_path / "resumed", base, resume=checkpoint)
    assert [s.rows for s in callback.sampler.history] == [s.rows for s in full_callback.sampler.history]
    assert callback.proxy.refresh_steps == full_callback.proxy.refresh_steps

    original = proxy_file.read_bytes()
    for damage, message in (
        (lambda: proxy_file.write_bytes(original[:-7] + b"garbage"), "not the file the checkpoint recorded"),
        (proxy_file.unlink, "missing"),
    ):
        damage()
        with pytest.raises(CheckpointStateError, match=rf"{PROXY_STATE_FILE} is {message}"):
            _run(tmp_path / "again", base, resume=checkpoint)
