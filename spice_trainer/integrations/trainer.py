"""SPICE inside `transformers.Trainer` and TRL `SFTTrainer`: `SpiceDataCallback` (the sampler lives in `sampler.py`).

``callbacks=[SpiceDataCallback(SpiceConfig(budget=0.1))]`` is all a training script adds. The callback
is thin: every round is `spice_trainer.pipeline.select` on the trainer's model and
dataset, and `SpiceSampler` only replays recorded subsets. How it hooks in, without a subclass:

1. ``on_init_end`` finds the trainer that owns the callback (or the user calls `SpiceDataCallback.attach`)
   and replaces two *instance* attributes: ``_get_train_sampler`` (so the first selection runs when the
   train dataloader is built — before the trainer derives its step count from ``len(dataloader)``, so
   ``num_train_epochs`` means passes over the subset and the LR schedule spans exactly those steps) and
   ``train`` (to learn ``resume_from_checkpoint``, so a resumed run reloads its subset instead of
   selecting again).
2. Reselection (``reselect_every_steps``) runs in ``on_step_end`` with the live model. The sampler's length
   stays fixed; the new subset applies from the next sample position the dataloader has not drawn yet
   (recorded, so a resumed run replays the same order). A later round that raises is logged, counted in
   ``spice/failed_rounds`` and leaves the sampler as it was (training goes on with the previous subset); a
   failing first round raises, since there is no subset to fall back on. In mode ``"grow"`` a round is
   skipped once the subset fills the budget.
3. ``on_save`` writes ``spice_state.json`` into each checkpoint; each round logs ``spice/...`` metrics
   through ``trainer.log`` and writes ``output_dir/spice/round-N.json`` and ``round-N.png``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from spice_trainer.config import SpiceConfig
from spice_trainer.core.selection import Selection
from spice_trainer.distributed import comm as sd
from spice_trainer.features.reselect import FeatureCache
from spice_trainer.integrations.reporting import (
    round_line,
    round_metrics,
    send_to_trackers,
    use_trainer_log_level,
)
from spice_trainer.integrations.sampler import SpiceSampler
from spice_trainer.integrations.state import (
    RESUME_SAFE_FIELDS,
    STATE_FILE,
    STATE_VERSION,
    RoundRecord,
    RunState,
    dataset_fingerprint,
)

# transformers' logging: the spice_trainer loggers follow the trainer's log_level / log_level_replica
# (integrations/reporting.py `use_trainer_log_level`).
logger = hf_logging.get_logger(__name__)

SelectFn = Callable[..., Selection]


# --- the callback -------------------------------------------------------------------------------------


class SpiceDataCallback(TrainerCallback):
    """Select the training subset with SPICE before training, and again on schedule during it.

    Works with `transformers.Trainer` and TRL's `SFTTrainer` as a plain callback. After training,
    ``callback.selection`` is the latest `Selection` and ``callback.selected_rows`` the current subset as
    rows of the dataset the user passed (through TRL's filtering and shuffling); ``callback.failed_rounds``
    counts the reselection rounds that raised (each logged, the previous subset kept).

    Args:
        config: the selection settings.
        select_fn: the function a round calls; defaults to `spice_trainer.pipeline.select` (a proxy- or
            distribution-aware variant can be passed; it receives ``(model, dataset, config, collator, **kw)``).
    """

    def __init__(self, config: SpiceConfig | None = None, *, select_fn: SelectFn | None = None) -> None:
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
        self._reference_gain: float | None = None
        self._pending_logs: list[dict[str, float]] = []
        self._pending_plots: list[tuple[Selection, int, int, Path | None]] = []
        self._last_round_step = -1
        self.failed_rounds = 0

    # --- wiring -------------------------------------------------------------------------------------
    def attach(self, trainer: Trainer) -> SpiceDataCallback:
        """Hook into ``trainer`` (done automatically when the callback is passed to the constructor)."""
        if self.trainer is trainer:
            return self
        _check_supported(trainer, self.config)
        self.trainer = trainer
        use_trainer_log_level(trainer.args)
        count_selected_examples(trainer, self)
        if self.config.proxy_model is not None and self._select_fn is None:
            # Rounds select with the proxy (loaded and checked against the trainer's model and tokenizer now),
            # refreshed on what the target trained on since the previous round (integrations/proxy_rounds.py).
            from spice_trainer.integrations.proxy_rounds import ProxyRounds

            self._select_fn = ProxyRounds(self, trainer)
        original_sampler_fn = trainer._get_train_sampler
        original_train = trainer.train

        def get_train_sampler(train_dataset: Any = None) -> Sampler[int]:
            dataset = train_dataset if train_dataset is not None else trainer.train_dataset
            return self._build_sampler(dataset, fallback=original_sampler_fn)

        def train(resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(_output_dir(trainer.args))
            self._resume_from = str(resume_from_checkpoint) if resume_from_checkpoint else None
            return original_train(resume_from_checkpoint, *args, **kwargs)

        trainer._get_train_sampler = get_train_sampler  # type: ignore[method-assign]
        trainer.train = train  # type: ignore[method-assign]
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

    # --- the first round, when the train dataloader is built ---------------------------------------
    def _build_sampler(self, dataset: Any, fallback: Callable[..., Any]) -> Sampler[int]:
        trainer = self._require_trainer()
        _check_map_style(dataset)
        self._dataset = dataset
        self._fingerprint = dataset_fingerprint(dataset)
        if self.sampler is not None and self._resume_from is None:
            # A second dataloader in the same run (e.g. after auto_find_batch_size): keep the subset.
            return self.sampler
        if self._resume_from is not None and self._load_checkpoint_state(self._resume_from):
            assert self.sampler is not None
            return self.sampler
        self.config.budget_count(len(dataset))  # a clear error before any work when the budget cannot fit
        selection = self._run_round(trainer.model, step=0)
        rows = selection.selected
        if not rows:
            raise RuntimeError(
                "SPICE selected no rows: every candidate was ineligible (non-finite loss or no supervised "
                "token). Check the labels of the training data"
            )
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
            # Added with `trainer.add_callback` after construction: the train dataloader is already built
            # without SPICE, and training on the full dataset while the user asked for a subset is not an option.
            raise RuntimeError(
                "SpiceDataCallback was added after the Trainer was built, so it could not select before the "
                "dataloader was built. Pass it as Trainer(..., callbacks=[SpiceDataCallback(config)]), or call "
                "`callback.attach(trainer)` before `trainer.train()`"
            )
        self._flush_logs()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        step = state.global_step
        if self.sampler is None or step == self._last_round_step or not self._is_reselect_step(step):
            return
        if state.max_steps and step >= state.max_steps:
            return  # nothing would be drawn from a subset chosen at the last step
        trainer = self._require_trainer()
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
            return
        at = self.sampler.drawn_position()
        if sd.is_distributed():
            # Every rank switches at the same position: the furthest any rank has drawn.
            at = max(tuple(p) for p in sd.all_gather_ints(list(at)))  # type: ignore[assignment]
        self.sampler.switch_to(rows, len(self.rounds), at)
        self._finish_round(selection, step=step, rows=rows)
        self._flush_logs()

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
        config = self.config
        if config.feature_norm == "adam" and kwargs.get("optimizer") is None:
            logger.info("spice: feature_norm='adam' needs optimizer state; the first round uses unit norm")
            config = config.with_changes(feature_norm="unit")
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
        """Write ``output_dir/spice/round-N.json`` and ``.png`` (main process); returns the PNG's path if written."""
        trainer = self._require_trainer()
        if not self.config.write_reports or not trainer.is_world_process_zero():
            return None
        folder = Path(_output_dir(trainer.args)) / "spice"
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
        """The JSON-serialisable state a checkpoint carries."""
        if self.sampler is None:
            return {}
        run = RunState(
            fingerprint=self._fingerprint or "",
            config=self.config.to_dict(),
            sampler=self.sampler.state_dict(),
            rounds=[vars(r) for r in self.rounds],
            reference_gain=self._reference_gain,
        )
        return {"version": STATE_VERSION, **vars(run)}

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.sampler is None or not state.is_world_process_zero:
            return
        folder = Path(_output_dir(args)) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            logger.warning("spice: checkpoint folder %s not found; the selection state was not saved", folder)
            return
        tmp = folder / f".{STATE_FILE}.tmp"
        try:
            tmp.write_text(json.dumps(self.state()))
            os.replace(tmp, folder / STATE_FILE)
        except OSError as err:
            logger.warning("spice: could not save the selection state into %s: %s", folder, err)
        save_state = getattr(self._select_fn, "save_state", None)  # e.g. the proxy's adapter (ProxyRounds)
        if callable(save_state):
            save_state(folder)

    def _load_checkpoint_state(self, checkpoint: str) -> bool:
        path = Path(checkpoint) / STATE_FILE
        if not path.is_file():
            logger.warning("spice: %s has no %s; selecting afresh", checkpoint, STATE_FILE)
            return False
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != self._fingerprint:
            raise ValueError(
                f"the training dataset differs from the one checkpoint {checkpoint!r} selected from "
                f"(fingerprint {saved.get('fingerprint')!r} vs {self._fingerprint!r}); resume with the same "
                "dataset, or start a new run (new output_dir) to select on the new data"
            )
        changed = sorted(
            k
            for k, v in self.config.to_dict().items()
            if k not in RESUME_SAFE_FIELDS and saved.get("config", {}).get(k, v) != v
        )
        if changed:
            raise ValueError(
                f"SpiceConfig changed since checkpoint {checkpoint!r} was written (fields: {', '.join(changed)}); "
                "resume with the same config, or start a new run"
            )
        self.sampler = SpiceSampler.from_state_dict(saved["sampler"])
        self.rounds = [RoundRecord(**r) for r in saved.get("rounds", [])]
        self._reference_gain = saved.get("reference_gain")
        self._last_round_step = self.rounds[-1].step if self.rounds else -1
        load_state = getattr(self._select_fn, "load_state", None)
        if callable(load_state):
            load_state(Path(checkpoint))
        logger.info("spice: resumed the selection state of %s (%d rounds)", checkpoint, len(self.rounds))
        return True

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
