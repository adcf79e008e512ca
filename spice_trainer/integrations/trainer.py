"""SPICE inside `transformers.Trainer` and TRL `SFTTrainer`: `SpiceDataCallback` (the sampler lives in `sampler.py`,
the checkpoint state in `state.py`).

``callbacks=[SpiceDataCallback(SpiceConfig(budget=0.1))]`` (or ``trainer.add_callback(...)`` before ``train()``) is
all a training script adds. The callback is thin: every round is
`spice_trainer.pipeline.select` on the trainer's model and dataset, and `SpiceSampler` only replays recorded
subsets. How it hooks in, without a subclass:

1. When it joins a trainer (``on_init_end`` for ``callbacks=[...]``, ``Trainer.add_callback``, or
   `SpiceDataCallback.attach`) it checks the settings it cannot honour (raising there, not mid-run) and replaces
   three *instance* attributes of that trainer: ``_get_train_sampler`` (so the first selection runs when the train
   dataloader is built — before the trainer derives its step count from ``len(dataloader)``, so
   ``num_train_epochs`` means passes over the subset and the LR schedule spans exactly those steps), ``train`` (to
   learn ``resume_from_checkpoint`` and read the checkpoint's selection state before anything else) and
   ``get_batch_samples`` (to re-collate batches the dataloader prefetched before a subset switch; see
   `spice_trainer.integrations.sampler`). A callback belongs to one trainer.
2. Reselection (``reselect_every_steps``) runs in ``on_step_end`` with the live model. The sampler's length
   stays fixed; the new subset applies from the first sample position the trainer has not consumed (optimizer
   steps × gradient accumulation × global batch: the same for any number of dataloader workers and any prefetch
   factor). A later round that raises is logged, counted in ``spice/failed_rounds`` and leaves the sampler as it
   was (training goes on with the previous subset); a failing first round raises, since there is no subset to
   fall back on. In mode ``"grow"`` a round is skipped once the subset fills the budget.
3. Checkpoints carry the selection state through the trainer's own mechanism (``state()`` of
   `transformers.trainer_callback.ExportableState`, written into ``trainer_state.json`` before the checkpoint
   counts as complete; `spice_trainer.integrations.state`). Each ``trainer.train()`` without
   ``resume_from_checkpoint`` is a new run: it selects afresh on the current model. Each round logs ``spice/...``
   metrics through ``trainer.log`` and writes ``output_dir/_spice/round-N.json`` and ``round-N.png`` (the leading
   underscore keeps them out of the model repo ``Trainer.push_to_hub`` uploads: its upload filter skips ``_*``).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from spice_trainer.config import SpiceConfig
from spice_trainer.core.selection import Selection
from spice_trainer.distributed import comm as sd
from spice_trainer.features.gradients import adam_or_unit
from spice_trainer.features.reselect import FeatureCache
from spice_trainer.integrations.reporting import (
    round_line,
    round_metrics,
    send_to_trackers,
    use_trainer_log_level,
)
from spice_trainer.integrations.sampler import BatchLayout, SpiceSampler
from spice_trainer.integrations.state import (
    CALLBACK_STATE_KEY,
    RESUME_SAFE_FIELDS,
    TRAINER_STATE_FILE,
    CheckpointStateError,
    RoundRecord,
    RunState,
    dataset_fingerprint,
    file_sha256,
    read_checkpoint_state,
)

# transformers' logging: the spice_trainer loggers follow the trainer's log_level / log_level_replica
# (integrations/reporting.py `use_trainer_log_level`).
logger = hf_logging.get_logger(__name__)

SelectFn = Callable[..., Selection]

#: The cheap-reselection memory (`FeatureCache`) in each checkpoint of a run with ``reselect_shortlist``.
FEATURE_CACHE_FILE = "spice_feature_cache.pt"

#: Where each round's report goes, under the trainer's ``output_dir``. ``Trainer.push_to_hub`` (and the uploads
#: of ``hub_strategy``) skip ``_*`` in ``output_dir``, so the reports stay out of the model repo.
REPORT_DIR = "_spice"

# The callback whose trainer.train() is running: the trainer's restore_callback_states_from_checkpoint rebuilds
# exportable callbacks as ``type(cb)(**state["args"])``; for SpiceDataCallback that returns this live instance.
_TRAINING: contextvars.ContextVar[SpiceDataCallback | None] = contextvars.ContextVar("spice_training", default=None)


# --- the callback -------------------------------------------------------------------------------------


class SpiceDataCallback(TrainerCallback, ExportableState):
    """Select the training subset with SPICE before training, and again on schedule during it.

    Works with `transformers.Trainer` and TRL's `SFTTrainer` as a plain callback, passed as ``callbacks=[...]``
    or added with ``trainer.add_callback(...)`` before ``train()``. After training, ``callback.selection`` is the
    latest `Selection` and ``callback.selected_rows`` the current subset as rows of the dataset the user passed
    (through TRL's filtering and shuffling); ``callback.failed_rounds`` counts the reselection rounds that raised
    (each logged, the previous subset kept). An instance belongs to the one trainer it joined first.

    Args:
        config: the selection settings.
        select_fn: the function a round calls; defaults to `spice_trainer.pipeline.select` (a proxy- or
            distribution-aware variant can be passed; it receives ``(model, dataset, config, collator, **kw)``).
    """

    def __new__(
        cls, config: SpiceConfig | None = None, *, select_fn: SelectFn | None = None, _resumed: bool = False
    ) -> SpiceDataCallback:
        if _resumed:
            # The trainer restoring exportable callbacks from a checkpoint (restore_callback_states_from_checkpoint):
            # the live callback already restored its own state when train() started; keep that instance.
            live = _TRAINING.get()
            if isinstance(live, cls):
                return live
            raise RuntimeError(
                "SpiceDataCallback restores its state itself when trainer.train(resume_from_checkpoint=...) runs; "
                "build it with SpiceDataCallback(config)"
            )
        return super().__new__(cls)

    def __init__(
        self, config: SpiceConfig | None = None, *, select_fn: SelectFn | None = None, _resumed: bool = False
    ) -> None:
        if _resumed:
            return  # the live instance (see __new__), already initialised
        if config is not None and not isinstance(config, SpiceConfig):
            raise TypeError(f"SpiceDataCallback takes a SpiceConfig, got {type(config).__name__}")
        self.config = config or SpiceConfig()
        self._select_fn = select_fn
        self._feature_cache = FeatureCache()  # used with config.reselect_shortlist (features/reselect.py)
        self.trainer: Trainer | None = None
        self.sampler: SpiceSampler | None = None
        self.selection: Selection | None = None
        self.rounds: list[RoundRecord] = []
        self._dataset: Any = None
        self._fingerprint: str | None = None
        self._resume_from: str | None = None
        self._resume_state: RunState | None = None
        self._reference_gain: float | None = None
        self._pending_logs: list[dict[str, float]] = []
        self._pending_plots: list[tuple[Selection, int, int, Path | None]] = []
        self._last_round_step = -1
        self._train_calls = 0
        self._layout: BatchLayout | None = None
        self.failed_rounds = 0
        #: Batches the dataloader had drawn before a subset switch that covers them, re-collated when taken.
        self.recollated_batches = 0

    # --- wiring -------------------------------------------------------------------------------------
    def attach(self, trainer: Trainer) -> SpiceDataCallback:
        """Hook into ``trainer`` (done automatically for ``callbacks=[...]`` and ``trainer.add_callback``).

        Raises:
            ValueError: the callback already belongs to another trainer, the trainer already has a
                SpiceDataCallback, or a setting cannot work with SPICE (each names the fix).
            RuntimeError: the trainer is already training (its dataloader is built).
        """
        if self.trainer is trainer:
            return self
        if self.trainer is not None:
            raise ValueError(
                "this SpiceDataCallback already belongs to another Trainer: it holds that trainer's selection, "
                "sampler and checkpoint state. Create a new SpiceDataCallback(config) for each Trainer"
            )
        if getattr(trainer, "is_in_train", False):
            raise RuntimeError(
                "SpiceDataCallback cannot join a Trainer that is already training (its dataloader is built); add it "
                "before trainer.train()"
            )
        if any(isinstance(cb, SpiceDataCallback) and cb is not self for cb in trainer.callback_handler.callbacks):
            raise ValueError("this Trainer already has a SpiceDataCallback; a trainer takes one")
        _check_supported(trainer, self.config)
        _check_optimizer(trainer, self.config)
        _check_batches(trainer, self.config)
        select_fn = self._select_fn
        if self.config.proxy_model is not None and select_fn is None:
            # Rounds select with the proxy (loaded and checked against the trainer's model and tokenizer now),
            # refreshed on what the target trained on since the previous round (integrations/proxy_rounds.py).
            from spice_trainer.integrations.proxy_rounds import ProxyRounds

            select_fn = ProxyRounds(self, trainer)
        self._select_fn = select_fn
        self.trainer = trainer
        use_trainer_log_level(trainer.args)
        count_selected_examples(trainer, self)
        original_sampler_fn = trainer._get_train_sampler
        original_train = trainer.train
        original_batch_samples = trainer.get_batch_samples

        def get_train_sampler(train_dataset: Any = None) -> Sampler[int]:
            dataset = train_dataset if train_dataset is not None else trainer.train_dataset
            return self._build_sampler(dataset, fallback=original_sampler_fn)

        def train(resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(_output_dir(trainer.args))
                if resume_from_checkpoint is None:  # the trainer's own error, before any selection work
                    return original_train(True, *args, **kwargs)
            self._start_run(str(resume_from_checkpoint) if resume_from_checkpoint else None)
            token = _TRAINING.set(self)
            try:
                return original_train(resume_from_checkpoint, *args, **kwargs)
            finally:
                _TRAINING.reset(token)

        def get_batch_samples(epoch_iterator: Iterator[Any], num_batches: int, device: Any) -> Any:
            return original_batch_samples(self._current_batches(epoch_iterator), num_batches, device)

        trainer._get_train_sampler = get_train_sampler  # type: ignore[method-assign]
        trainer.train = train  # type: ignore[method-assign]
        trainer.get_batch_samples = get_batch_samples  # type: ignore[method-assign]
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        trainer = _find_owning_trainer(self)
        if trainer is None:
            raise RuntimeError(
                "SpiceDataCallback could not find its Trainer; call `callback.attach(trainer)` after building it"
            )
        self.attach(trainer)

    def _start_run(self, checkpoint: str | None) -> None:
        """``trainer.train()`` was called: read the checkpoint's selection state, or start a new run."""
        self._train_calls += 1
        self._resume_from = checkpoint
        self._resume_state = None
        if checkpoint is not None:
            state, trainer_state = read_checkpoint_state(checkpoint)
            if state is None:
                raise _missing_state_error(checkpoint, trainer_state)
            self._resume_state = state
        elif self._train_calls == 1 and self.sampler is not None:
            return  # the train dataloader was built before the first train(): that selection starts this run
        # A new run (fresh or resumed) starts from its own first round: nothing of an earlier train() carries over.
        self.sampler = None
        self.selection = None
        self.rounds = []
        self._dataset = None
        self._reference_gain = None
        self._last_round_step = -1
        self._layout = None
        self._feature_cache = FeatureCache()
        self.failed_rounds = 0
        start_run = getattr(self._select_fn, "start_run", None)  # e.g. the proxy's round position (ProxyRounds)
        if callable(start_run):
            start_run()

    # --- the first round, when the train dataloader is built ---------------------------------------
    def _build_sampler(self, dataset: Any, fallback: Callable[..., Any]) -> Sampler[int]:
        trainer = self._require_trainer()
        _check_map_style(dataset)
        if self.sampler is not None and dataset is self._dataset:
            # A second dataloader in the same run (e.g. after auto_find_batch_size): keep the subset.
            return self.sampler
        self._dataset = dataset
        self._fingerprint = dataset_fingerprint(dataset)
        if self._resume_state is not None:
            self._restore(self._resume_state, dataset)
            assert self.sampler is not None
            return self.sampler
        self.config.budget_count(len(dataset))  # a clear error before any work when the budget cannot fit
        selection = self._run_round(trainer.model, step=0)
        rows = selection.selected
        if not rows:
            from spice_trainer.pipeline import no_selection_message

            raise ValueError(no_selection_message(selection, self.config, len(dataset)))
        _check_subset_fills_a_batch(trainer, len(rows))
        self.sampler = SpiceSampler(rows, seed=self.config.seed)
        self._reference_gain = selection.gains[0] if selection.gains else None
        self._finish_round(selection, step=0, rows=rows)
        return self.sampler

    # --- rounds during training ----------------------------------------------------------------------
    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.sampler is not None and state.epoch is not None:
            self.sampler.set_epoch(math.floor(state.epoch + 1e-6))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.trainer is None or self.sampler is None:
            # Only reachable past the supported paths (e.g. trainer.callback_handler.add_callback directly): the
            # train dataloader was built without SPICE, and training on the full dataset is not an option.
            raise RuntimeError(
                "SpiceDataCallback joined the Trainer without hooking into it, so the dataloader was built without "
                "SPICE. Pass it as Trainer(..., callbacks=[SpiceDataCallback(config)]), or add it with "
                "trainer.add_callback(callback) before trainer.train()"
            )
        # A checkpoint's trainer state is rebuilt from its JSON; make sure the next save finds our entry.
        if isinstance(state.stateful_callbacks, dict):
            state.stateful_callbacks.setdefault(CALLBACK_STATE_KEY, self.state())
        self._layout = None
        if self.config.reselect_every_steps is not None:
            self._batch_layout()  # a dataloader whose batches cannot be followed fails here, before the first step
        self._flush_logs()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        step = state.global_step
        if self.sampler is None or step == self._last_round_step or not self._is_reselect_step(step):
            return
        if state.max_steps and step >= state.max_steps:
            return  # nothing would be drawn from a subset chosen at the last step
        trainer = self._require_trainer()
        # The first position the trainer has not consumed: where a new subset applies, and up to where the proxy
        # refreshes on what the target trained on.
        at = self._consumed_position(step)
        self.sampler.consumed = at
        current = self.sampler.rows
        grow = self.config.mode == "grow"
        if grow and len(current) >= self.config.budget_count(len(self._dataset)):
            # Nothing can be added: skip the gradient pass and keep the subset (and its order) as it is.
            logger.info("spice: the subset already fills the budget (%d rows); no round at step %d", len(current), step)
            self._last_round_step = step
            return
        selection: Selection | None = None
        try:
            selection = self._run_round(
                trainer.model,
                step=step,
                initial=current if grow else None,
                reference_gain=self._reference_gain if grow else None,
                optimizer=trainer.optimizer,
            )
        except Exception:
            # A later round must not cost the run: the sampler is untouched (a round only switches it after
            # it succeeded), so training goes on with the previous subset. The first round raises instead
            # (`_build_sampler`): there is no subset to fall back on.
            logger.exception(
                "spice: the selection round at step %d failed; training continues with the previous subset (%d rows)",
                step,
                len(current),
            )
        # Every rank keeps the previous subset if any rank's round failed, so that their samplers agree.
        if max(flag for (flag,) in sd.all_gather_ints([int(selection is None)])):
            self.failed_rounds += 1
            self._last_round_step = step
            self._pending_logs.append({"spice/failed_rounds": float(self.failed_rounds)})
            self._flush_logs()
            return
        assert selection is not None
        rows = selection.selected
        if not rows:
            logger.warning("spice: round at step %d selected nothing; keeping the previous subset", step)
            self._last_round_step = step
            return
        # Every rank computes the same position from the same counters: no collective needed.
        self.sampler.switch_to(rows, len(self.rounds), at)
        self._finish_round(selection, step=step, rows=rows)
        self._flush_logs()

    # --- what the trainer has consumed --------------------------------------------------------------
    def _batch_layout(self) -> BatchLayout:
        if self._layout is None:
            trainer, sampler = self._require_trainer(), self.sampler
            dataloader = trainer.callback_handler.train_dataloader
            assert sampler is not None and dataloader is not None
            self._layout = BatchLayout(dataloader.batch_sampler, len(sampler))
        return self._layout

    def _epoch_and_micro_batch(self, global_step: int) -> tuple[int, int]:
        """``(epoch, micro-batches taken in it)`` after ``global_step`` optimizer steps (the trainer's own count:
        ``len(dataloader)`` batches per epoch, cut into updates of ``gradient_accumulation_steps``)."""
        trainer = self._require_trainer()
        dataloader: Any = trainer.callback_handler.train_dataloader
        accumulation = trainer.args.gradient_accumulation_steps
        updates_per_epoch = max(math.ceil(len(dataloader) / accumulation), 1)
        epoch, updates = divmod(global_step, updates_per_epoch)
        return epoch, updates * accumulation

    def _consumed_position(self, global_step: int) -> tuple[int, int]:
        """The first sampler position ``(epoch, position)`` no rank has consumed after ``global_step`` steps."""
        assert self.sampler is not None
        epoch, micro = self._epoch_and_micro_batch(global_step)
        position = self._batch_layout().consumed(micro)
        return (epoch + 1, 0) if position >= len(self.sampler) else (epoch, position)

    def _current_batches(self, epoch_iterator: Iterator[Any]) -> Iterator[Any]:
        """``epoch_iterator`` as the trainer takes it, with prefetched batches that a later subset switch covers
        re-collated from the rows the history now assigns to their positions."""
        trainer, sampler = self._require_trainer(), self.sampler
        if sampler is None or len(sampler.history) == 1 or trainer.callback_handler.train_dataloader is None:
            return epoch_iterator  # no switch yet: nothing drawn can be stale
        epoch, micro = self._epoch_and_micro_batch(trainer.state.global_step)
        return _CurrentBatches(self, epoch_iterator, epoch, micro)

    def _current_batch(self, batch: Any, epoch: int, micro: int) -> Any:
        sampler = self.sampler
        assert sampler is not None
        positions = self._batch_layout().positions(micro)
        if not positions or not sampler.stale(epoch, positions):
            return batch
        trainer = self._require_trainer()
        dataloader: Any = trainer.callback_handler.train_dataloader
        rows = [sampler.row_at(epoch, p) for p in positions]
        dataset = dataloader.dataset
        fetch = getattr(dataset, "__getitems__", None)
        items = fetch(rows) if callable(fetch) else [dataset[r] for r in rows]
        fresh = dataloader.collate_fn(items)
        device = getattr(dataloader, "device", None)
        if device is not None:
            from accelerate.utils import send_to_device

            fresh = send_to_device(fresh, device)
        self.recollated_batches += 1
        return fresh

    def _is_reselect_step(self, step: int) -> bool:
        schedule = self.config.reselect_every_steps
        if schedule is None or step <= 0:
            return False
        if isinstance(schedule, int):
            return step % schedule == 0
        return step in schedule

    def _run_round(self, model: Any, *, step: int, **kwargs: Any) -> Selection:
        """One selection round on the training dataset (the single place a round selects)."""
        trainer = self._require_trainer()
        select_fn = self._select_fn
        if select_fn is None:
            from spice_trainer.pipeline import select

            select_fn = select
            if self.config.reselect_shortlist is not None:
                # Cheap reselection: rounds remember the pool and later ones measure a shortlist of it.
                kwargs["feature_cache"] = self._feature_cache
        config = adam_or_unit(self.config, kwargs.get("optimizer"))  # the first round runs before any step
        show = sd.is_main_process() and not trainer.args.disable_tqdm
        start = time.perf_counter()
        selection = select_fn(model, self._dataset, config, _gradient_collator(trainer), show_progress=show, **kwargs)
        selection.metadata.setdefault("seconds", time.perf_counter() - start)
        selection.metadata.update({"round": len(self.rounds), "step": step, "mode": self.config.mode})
        return selection

    def _finish_round(self, selection: Selection, *, step: int, rows: list[int]) -> None:
        self.selection = selection
        self._last_round_step = step
        record = RoundRecord(
            round=len(self.rounds),
            step=step,
            selected=len(rows),
            stop_reason=selection.stop_reason,
            first_gain=selection.gains[0] if selection.gains else None,
            seconds=float(selection.metadata.get("seconds", 0.0)),
        )
        self.rounds.append(record)
        trainer = self._require_trainer()
        # The rows of the dataset the user passed (through TRL's tokenisation, filtering and shuffling): what
        # `Selection.to_dataset(user_dataset)` returns, and what the round report names.
        selection.metadata["source_rows"] = source_rows(trainer, self._dataset, selection.selected)
        self._pending_logs.append(round_metrics(selection, round_index=record.round))
        if trainer.is_world_process_zero():
            logger.info(round_line(selection, round_index=record.round, step=step))
        plot = self._write_report(selection, record.round)
        self._pending_plots.append((selection, record.round, step, plot))

    def _flush_logs(self) -> None:
        trainer = self.trainer
        if trainer is None or not self._pending_logs:
            return
        pending, self._pending_logs = self._pending_logs, []
        plots, self._pending_plots = self._pending_plots, []
        # Trainer.log clears control.should_log; inside on_step_end that would drop the trainer's own loss
        # log for this step (its loss then folds into the next logged average), so keep the flag.
        should_log = trainer.control.should_log
        for logs in pending:
            trainer.log(logs)
        trainer.control.should_log = should_log
        if trainer.is_world_process_zero():
            # After trainer.log: the trackers of report_to are set up by now (the first round runs before).
            for selection, round_index, step, plot in plots:
                send_to_trackers(trainer, selection, round_index=round_index, step=step, plot=plot)

    def _write_report(self, selection: Selection, round_index: int) -> Path | None:
        """Write ``output_dir/_spice/round-N.json`` and ``.png`` (main process); returns the PNG's path if written."""
        trainer = self._require_trainer()
        if not self.config.write_reports or not trainer.is_world_process_zero():
            return None
        folder = Path(_output_dir(trainer.args)) / REPORT_DIR
        try:
            folder.mkdir(parents=True, exist_ok=True)
            selection.save(folder / f"round-{round_index}.json")
        except OSError as err:  # a full or read-only disk must not stop training
            logger.warning("spice: could not write the round-%d report to %s: %s", round_index, folder, err)
            return None
        png = folder / f"round-{round_index}.png"
        try:
            selection.plot(png)
        except ImportError:
            logger.info("spice: matplotlib is not installed; skipping round-%d.png", round_index)
            return None
        except OSError as err:
            logger.warning("spice: could not write round-%d.png: %s", round_index, err)
            return None
        return png

    # --- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The selection state a checkpoint carries (transformers' `ExportableState`).

        ``Trainer._save_checkpoint`` calls this after writing the model, optimizer and RNG files and stores the
        result in the checkpoint's ``trainer_state.json`` (``stateful_callbacks["SpiceDataCallback"]``), before
        it rotates old checkpoints. During that call the proxy's tensors are written into the checkpoint folder
        too (``spice_proxy.pt``), and their checksum recorded here. ``"spice"`` is `RunState.to_json`; ``"args"``
        lets ``restore_callback_states_from_checkpoint=True`` hand back this same instance (see ``__new__``).
        """
        payload = None
        if self.sampler is not None and self._dataset is not None:
            payload = RunState(
                fingerprint=self._fingerprint or "",
                num_rows=len(self._dataset),
                config=self.config.to_dict(),
                sampler=self.sampler.state_dict(),
                rounds=[vars(r) for r in self.rounds],
                reference_gain=self._reference_gain,
                proxy=self._save_proxy_state(),
                feature_cache=self._save_feature_cache(),
            ).to_json()
        return {"args": {"_resumed": True}, "attributes": {}, "spice": payload}

    def _checkpoint_being_written(self) -> Path | None:
        """The checkpoint folder ``Trainer._save_checkpoint`` is writing while it calls `state`, else `None`."""
        trainer = self.trainer
        if trainer is None or not trainer.control.should_save:
            return None
        folder = Path(_output_dir(trainer.args)) / f"checkpoint-{trainer.state.global_step}"
        if not folder.is_dir() or (folder / TRAINER_STATE_FILE).exists():
            return None  # not inside Trainer._save_checkpoint (it writes trainer_state.json right after this call)
        return folder

    def _save_proxy_state(self) -> dict[str, str] | None:
        """Write the proxy's state into the checkpoint being written, if any; its name and SHA-256."""
        save_state = getattr(self._select_fn, "save_state", None)  # e.g. the proxy's adapter (ProxyRounds)
        folder = self._checkpoint_being_written()
        if not callable(save_state) or folder is None:
            return None
        name = str(save_state(folder))
        return {"file": name, "sha256": file_sha256(folder / name)}

    def _save_feature_cache(self) -> dict[str, str] | None:
        """Write the cheap-reselection memory (`FeatureCache`) into the checkpoint being written, if any: a resumed
        run's next shortlist round must start from the same memory as the uninterrupted run's."""
        cache = self._feature_cache
        folder = self._checkpoint_being_written()
        if cache.sqnorms is None or folder is None:
            return None
        state = cache.state_dict()
        tmp = folder / f".{FEATURE_CACHE_FILE}.tmp"
        try:
            torch.save(state, tmp)
            tmp.replace(folder / FEATURE_CACHE_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        return {"file": FEATURE_CACHE_FILE, "sha256": file_sha256(folder / FEATURE_CACHE_FILE)}

    def _load_feature_cache(self, saved: RunState, folder: Path) -> None:
        """Restore the `FeatureCache` a cheap-reselection run had at this checkpoint (checked against its checksum)."""
        record = saved.feature_cache
        if record is None:
            if self.config.reselect_shortlist is not None:
                raise CheckpointStateError(
                    f"checkpoint {str(folder)!r} holds no reselection memory ({FEATURE_CACHE_FILE}) but this run uses "
                    "reselect_shortlist; resume with the config the run had, or start a new run"
                )
            return
        path = _recorded_file(folder, record)
        try:
            cache = FeatureCache.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:
            raise CheckpointStateError(
                f"{path} cannot be read ({type(err).__name__}: {err}); resume from another "
                "checkpoint, or start a new run"
            ) from err
        self._feature_cache = cache

    def _restore(self, saved: RunState, dataset: Any) -> None:
        """Continue the run recorded in ``saved`` (read from ``self._resume_from`` by `_start_run`)."""
        checkpoint = self._resume_from
        if saved.num_rows != len(dataset) or saved.fingerprint != self._fingerprint:
            raise ValueError(
                f"the training dataset differs from the one checkpoint {checkpoint!r} selected from "
                f"({saved.num_rows} rows, fingerprint {saved.fingerprint!r}; now {len(dataset)} rows, "
                f"{self._fingerprint!r}); resume with the same dataset, or start a new run (new output_dir) to "
                "select on the new data"
            )
        changed = sorted(
            k for k, v in self.config.to_dict().items() if k not in RESUME_SAFE_FIELDS and saved.config.get(k, v) != v
        )
        if changed:
            raise ValueError(
                f"SpiceConfig changed since checkpoint {checkpoint!r} was written (fields: {', '.join(changed)}); "
                "resume with the same config, or start a new run"
            )
        load_state = getattr(self._select_fn, "load_state", None)
        if callable(load_state):
            folder = Path(str(checkpoint))
            proxy = saved.proxy
            if proxy is None:
                raise CheckpointStateError(
                    f"checkpoint {checkpoint!r} holds no proxy state, but this run selects with a proxy_model; "
                    "resume with the config the run had, or from a checkpoint written with the proxy"
                )
            _recorded_file(folder, proxy)
            load_state(folder)
        self._load_feature_cache(saved, Path(str(checkpoint)))
        self.sampler = SpiceSampler.from_state_dict(saved.sampler)
        self.rounds = [RoundRecord(**r) for r in saved.rounds]
        self._reference_gain = saved.reference_gain
        self._last_round_step = self.rounds[-1].step
        logger.info("spice: resumed the selection state of %s (%d rounds)", checkpoint, len(self.rounds))

    # --- results -----------------------------------------------------------------------------------
    @property
    def selected(self) -> list[int]:
        """The current subset as rows of the trainer's training dataset."""
        return list(self.sampler.rows) if self.sampler is not None else []

    @property
    def selected_rows(self) -> list[int]:
        """The current subset as rows of the dataset the user passed (before TRL's filtering/shuffling)."""
        if self._dataset is None or self.trainer is None:
            return []
        return source_rows(self.trainer, self._dataset, self.selected)

    @property
    def proxy(self) -> Any:
        """The `spice_trainer.ProxyModel` the rounds measure with: ``config.proxy_model``, loaded and checked
        against the trainer's model when the callback was attached; `None` without a proxy, before that, or with
        a custom ``select_fn``."""
        return getattr(self._select_fn, "proxy", None)

    def _require_trainer(self) -> Trainer:
        if self.trainer is None:
            raise RuntimeError("SpiceDataCallback is not attached to a Trainer; call `callback.attach(trainer)`")
        return self.trainer


# --- helpers -----------------------------------------------------------------------------------------


class _CurrentBatches:
    """The trainer's epoch iterator, each batch checked against the sampler's history as the trainer takes it
    (see `SpiceDataCallback._current_batch`). ``micro`` counts the batches taken in the epoch."""

    def __init__(self, callback: SpiceDataCallback, iterator: Iterator[Any], epoch: int, micro: int) -> None:
        self.callback, self.iterator, self.epoch, self.micro = callback, iterator, epoch, micro

    def __iter__(self) -> _CurrentBatches:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        micro, self.micro = self.micro, self.micro + 1
        return self.callback._current_batch(batch, self.epoch, micro)


def _missing_state_error(checkpoint: str, trainer_state: dict[str, Any]) -> CheckpointStateError:
    """The error for a checkpoint whose trainer_state.json holds no selection state: why, and what to do."""
    history = trainer_state.get("log_history") or []
    had_callback = any(isinstance(e, dict) and any(str(k).startswith("spice/") for k in e) for e in history)
    legacy = (Path(checkpoint) / "spice_state.json").is_file()
    if had_callback or legacy:
        return CheckpointStateError(
            f"checkpoint {checkpoint!r} was written by a run with SpiceDataCallback (its log history has spice/ "
            f"metrics{'; it holds the spice_state.json of spice-trainer 0.1' if legacy else ''}), but its "
            f"{TRAINER_STATE_FILE} holds no selection state (stateful_callbacks.{CALLBACK_STATE_KEY}), so the subset "
            "it trained on cannot be restored. Resume from a checkpoint written by this spice-trainer, or start a "
            "new run (new output_dir)"
        )
    step = trainer_state.get("global_step")
    return CheckpointStateError(
        f"checkpoint {checkpoint!r} was written by a run without SpiceDataCallback: its global_step={step} counts "
        "steps over the full dataset, which do not carry over to a SPICE subset (the resumed run would train no "
        "step). Resume it without the callback, or start a new run with SpiceDataCallback (a new output_dir) from "
        f"its weights: load the model (or the PEFT adapter) from {checkpoint!r}"
    )


def _check_optimizer(trainer: Trainer, config: SpiceConfig) -> None:
    """``feature_norm="adam"`` reads Adam's second moments: refuse an optimizer without them before training."""
    if config.feature_norm != "adam":
        return
    optimizer_cls: type | None = type(trainer.optimizer) if trainer.optimizer is not None else None
    if optimizer_cls is None:
        given = getattr(trainer, "optimizer_cls_and_kwargs", None)
        if given is not None:
            optimizer_cls = given[0]
        else:
            try:
                optimizer_cls = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)[0]  # type: ignore[arg-type]
            except Exception:  # an optimizer whose package is missing fails in the trainer itself, with its message
                return
    if isinstance(optimizer_cls, type) and not issubclass(optimizer_cls, torch.optim.Adam | torch.optim.AdamW):
        optim = getattr(trainer.args.optim, "value", trainer.args.optim)
        raise ValueError(
            f"feature_norm='adam' scales each gradient by Adam's second moments (exp_avg_sq), but the trainer's "
            f"optimizer {optimizer_cls.__name__} (optim={optim!r}) keeps none, so every reselection "
            "round would fail; use optim='adamw_torch' (any torch Adam/AdamW), or SpiceConfig(feature_norm='unit')"
        )


def _check_batches(trainer: Trainer, config: SpiceConfig) -> None:
    """Settings of the train dataloader SPICE cannot follow, refused before any work."""
    accelerator_config = getattr(trainer.args, "accelerator_config", None)
    if getattr(accelerator_config, "dispatch_batches", None) is True:
        raise ValueError(
            "accelerator_config.dispatch_batches=True makes the main process draw every rank's batches, which "
            "SpiceDataCallback cannot follow; leave dispatch_batches unset (map-style datasets do not need it)"
        )
    dataset: Any = trainer.train_dataset
    if trainer.args.dataloader_drop_last and dataset is not None:
        _check_subset_fills_a_batch(trainer, config.budget_count(len(dataset)), planned=True)


def _check_subset_fills_a_batch(trainer: Trainer, rows: int, *, planned: bool = False) -> None:
    """With ``dataloader_drop_last`` a subset smaller than one global batch gives no batch at all."""
    args = trainer.args
    batch = args.per_device_train_batch_size * max(args.world_size, 1)
    if args.dataloader_drop_last and rows < batch:
        what = f"the budget allows at most {rows} rows" if planned else f"SPICE selected {rows} rows"
        raise ValueError(
            f"{what}, fewer than one batch (per_device_train_batch_size={args.per_device_train_batch_size} x "
            f"{max(args.world_size, 1)} processes = {batch}); with dataloader_drop_last=True the trainer would drop "
            "them all and train no step. Set dataloader_drop_last=False, lower per_device_train_batch_size, or "
            "select more rows (a larger budget, or stop_rule='none' to fill it)"
        )


def _install_add_callback_hook() -> None:
    """Make ``Trainer.add_callback(SpiceDataCallback(...))`` join the trainer as ``callbacks=[...]`` does.

    ``add_callback`` fires no event, and the first event after it (``on_train_begin``) comes after the train
    dataloader and the step count were built. So `Trainer.add_callback` is wrapped once, when this module is
    imported: for a `SpiceDataCallback` it attaches the callback to the trainer right away (anything that cannot
    work raises here, and the callback is not added), and adding the same instance twice adds it once. Every other
    callback goes through unchanged.
    """
    original = Trainer.add_callback
    if getattr(original, "_spice_hook", False):
        return

    @functools.wraps(original)
    def add_callback(self: Trainer, callback: Any) -> None:
        if isinstance(callback, SpiceDataCallback) and callback in self.callback_handler.callbacks:
            callback.attach(self)  # already added (e.g. attach() then add_callback()): never twice
            return
        original(self, callback)
        added = callback if not isinstance(callback, type) else self.callback_handler.callbacks[-1]
        if isinstance(added, SpiceDataCallback) and added.trainer is not self:
            try:
                added.attach(self)
            except BaseException:
                self.callback_handler.remove_callback(added)
                raise

    add_callback._spice_hook = True  # type: ignore[attr-defined]
    Trainer.add_callback = add_callback  # type: ignore[method-assign]


def count_selected_examples(trainer: Trainer, callback: SpiceDataCallback) -> None:
    """Make the trainer count the rows it draws, not the whole dataset, in its throughput figures.

    `Trainer.num_examples` returns ``len(dataloader.dataset)``, which sets "Num examples" in the training
    banner and ``train_samples_per_second`` (10x too high at a 10 % budget). For a dataloader that draws from
    the SPICE sampler it returns the sampler's length (rows drawn per epoch) instead; other dataloaders
    (evaluation) are counted as before.
    """
    original = trainer.num_examples

    def num_examples(dataloader: Any) -> int:
        sampler = callback.sampler
        if sampler is not None and _draws_from(dataloader, sampler):
            return len(sampler)
        return original(dataloader)

    trainer.num_examples = num_examples  # type: ignore[method-assign]


def _draws_from(dataloader: Any, sampler: Sampler[int]) -> bool:
    """Whether ``sampler`` is in ``dataloader``'s sampler chain (through accelerate's shard wrappers)."""
    seen: set[int] = set()
    frontier = [dataloader]
    for _ in range(6):
        found = []
        for obj in frontier:
            for name in ("sampler", "batch_sampler", "base_dataloader"):
                child = getattr(obj, name, None)
                if child is sampler:
                    return True
                if child is not None and id(child) not in seen:
                    seen.add(id(child))
                    found.append(child)
        frontier = found
    return False


def _find_owning_trainer(callback: SpiceDataCallback) -> Trainer | None:
    """The `Trainer` under construction whose callback list holds ``callback`` (found on the call stack)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def _check_map_style(dataset: Any) -> None:
    if dataset is None:
        raise ValueError(
            "SpiceDataCallback needs a train_dataset to select from; pass train_dataset=... to the trainer"
        )
    if isinstance(dataset, torch.utils.data.IterableDataset) or not (
        hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    ):
        raise ValueError(
            "SPICE selection needs a map-style train_dataset with random access (len() and indexing); got "
            f"{type(dataset).__name__}. Materialise an IterableDataset first (e.g. "
            "datasets.Dataset.from_generator) or select offline with spice_trainer.select"
        )


def _output_dir(args: TrainingArguments) -> str:
    return str(args.output_dir or "trainer_output")


def _check_supported(trainer: Trainer, config: SpiceConfig) -> None:
    args = trainer.args
    _check_map_style(trainer.train_dataset)
    trl = _trl_module(trainer)
    if trl is not None:
        trl.check_sft_args(trainer)
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy not in (None, "random", "sequential"):
        raise ValueError(
            f"train_sampling_strategy={strategy!r} replaces the sampler SPICE draws from; use the default "
            "'random' with SpiceDataCallback"
        )
    if getattr(args, "group_by_length", False):
        raise ValueError("group_by_length=True replaces the sampler SPICE draws from; set group_by_length=False")
    if config.proxy_model is None:
        _check_sharding(trainer, config)


def _check_sharding(trainer: Trainer, config: SpiceConfig) -> None:
    """Live selection under FSDP2 and DeepSpeed (ZeRO-3 too): every rank measures its shard of rows on the
    sharded model in lockstep (`spice_trainer.features.gradients.Lockstep`). FSDP1 and Adam-normalised features
    under ZeRO-3 are refused; a proxy model (outside the wrapper) remains the cheap option."""
    if trainer.is_fsdp_enabled:
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", 1)
        if version != 2:
            raise ValueError(
                f"live SPICE selection under FSDP needs FSDP2 (fully_shard); this run uses FSDP{version}. Set "
                "fsdp_config={'version': 2, ...} in TrainingArguments, or select with a smaller model of the same "
                "family: SpiceConfig(proxy_model=...)"
            )
    if trainer.is_deepspeed_enabled and config.feature_norm == "adam":
        stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            raise ValueError(
                "feature_norm='adam' is not supported under DeepSpeed ZeRO-3 (the optimizer keeps its second "
                "moments in flat partitions); use feature_norm='unit' or 'none', or a proxy model"
            )


def _gradient_collator(trainer: Trainer) -> Callable[[list[dict[str, Any]]], dict[str, Any]] | None:
    """The trainer's collator, unless it flattens the batch (padding-free), where rows must stay apart."""
    collator = trainer.data_collator
    if collator is None or getattr(collator, "padding_free", False) or getattr(collator, "return_position_ids", False):
        return None
    return collator


def _trl_module(trainer: Trainer) -> Any:
    """`spice_trainer.integrations.trl` if ``trainer`` is a TRL `SFTTrainer`, else None.

    A trainer can only be an `SFTTrainer` if TRL is already imported, so a plain `Trainer` never imports it.
    """
    if "trl" not in sys.modules:
        return None
    from spice_trainer.integrations import trl

    return trl if trl.is_sft_trainer(trainer) else None


def source_rows(trainer: Trainer, dataset: Any, rows: Sequence[int]) -> list[int]:
    """Map rows of the trainer's training dataset to rows of the dataset the user passed.

    `transformers.Trainer` trains on the user's dataset as given (only columns are removed), so the rows are
    their own source — even when the user's dataset carries its own index mapping (``ds.select``/``shuffle``).
    `SFTTrainer` tokenises, may filter and shuffle: `spice_trainer.integrations.trl.sft_source_rows`.
    """
    trl = _trl_module(trainer)
    if trl is None:
        return [int(r) for r in rows]
    return list(trl.sft_source_rows(trainer, dataset, rows))


_install_add_callback_hook()


def _recorded_file(folder: Path, record: dict[str, str]) -> Path:
    """The checkpoint file ``record`` names (``{"file", "sha256"}``), checked against the SHA-256 recorded for it.

    Raises:
        CheckpointStateError: naming the file, when it is missing or is not the file the checkpoint recorded.
    """
    path = folder / record["file"]
    if not path.is_file() or file_sha256(path) != record["sha256"]:
        raise CheckpointStateError(
            f"{path} is {'missing' if not path.is_file() else 'not the file the checkpoint recorded'} (its "
            f"{TRAINER_STATE_FILE} holds its SHA-256); the checkpoint was changed or damaged after it was "
            "written: resume from another checkpoint, or start a new run"
        )
    return path
