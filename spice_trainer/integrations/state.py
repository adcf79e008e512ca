"""The selection state a checkpoint carries: what it holds, where it is written, and how it is read back.

Where. The state travels in the checkpoint's ``trainer_state.json``, under
``stateful_callbacks["SpiceDataCallback"]``: transformers' own mechanism for callback state
(`transformers.trainer_callback.ExportableState`). ``Trainer._save_checkpoint`` asks every exportable callback
for its ``state()`` after the model, optimizer and RNG files and writes ``trainer_state.json`` with them, before it
rotates old checkpoints; a checkpoint without ``trainer_state.json`` is not resumable by the trainer itself. So
no checkpoint that resume accepts can lack the selection state of a run that had the callback. The proxy's
tensors (``spice_proxy.pt``, `spice_trainer.integrations.proxy_rounds`) are written into the checkpoint folder at
the same moment, and the state records their SHA-256.

What. `RunState`: the dataset fingerprint and length, the config, the sampler's subset history, the rounds, the
early-stopping reference gain, and the proxy file's checksum. `RunState.from_json` checks every field (types,
ranges, consistency between the history and the rounds); each error names the file, the field and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spice_trainer.features.fingerprint import dataset_fingerprint

__all__ = [
    "CALLBACK_STATE_KEY",
    "RESUME_SAFE_FIELDS",
    "STATE_VERSION",
    "TRAINER_STATE_FILE",
    "CheckpointStateError",
    "RoundRecord",
    "RunState",
    "dataset_fingerprint",
    "file_sha256",
    "read_checkpoint_state",
]

#: The trainer's own state file in each checkpoint (transformers' ``TRAINER_STATE_NAME``).
TRAINER_STATE_FILE = "trainer_state.json"
#: The key of the selection state in ``trainer_state.json``'s ``stateful_callbacks`` (the callback's class name).
CALLBACK_STATE_KEY = "SpiceDataCallback"
# 2: the state lives in trainer_state.json (1 was a separate spice_state.json written after the checkpoint).
STATE_VERSION = 2
# Config fields that may differ on resume without changing which rows were selected so far.
RESUME_SAFE_FIELDS = frozenset({"write_reports", "proxy_device", "threads"})

_FIX_DAMAGED = (
    "the checkpoint was changed or damaged after it was written: resume from another checkpoint, or start a new run "
    "(new output_dir)"
)


class CheckpointStateError(ValueError):
    """A checkpoint's selection state is missing, damaged or does not fit this run."""


@dataclass
class RoundRecord:
    """One selection round as the callback records it."""

    round: int
    step: int
    selected: int
    stop_reason: str
    first_gain: float | None
    seconds: float


@dataclass
class RunState:
    """What a checkpoint carries: the sampler history, the rounds, and what they were computed on.

    Attributes:
        fingerprint: `dataset_fingerprint` of the training dataset.
        num_rows: its length.
        config: `SpiceConfig.to_dict` of the run.
        sampler: `SpiceSampler.state_dict`.
        rounds: `RoundRecord` fields, one dict per round, in order.
        reference_gain: the early-stopping reference (mode ``"grow"``), or `None`.
        proxy: ``{"file": name, "sha256": hex}`` of the proxy's state file in the checkpoint, or `None`.
        feature_cache: the same for the cheap-reselection memory (``reselect_shortlist``), or `None`.
    """

    fingerprint: str
    num_rows: int
    config: dict[str, Any]
    sampler: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    reference_gain: float | None = None
    proxy: dict[str, str] | None = None
    feature_cache: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **vars(self)}

    @classmethod
    def from_json(cls, payload: Any, source: str) -> RunState:
        """Validate ``payload`` (read from ``source``) field by field.

        Raises:
            CheckpointStateError: naming ``source``, the field, the value and the fix.
        """
        check = _Checker(source)
        check.true(isinstance(payload, dict), "", payload, "a JSON object")
        version = payload.get("version")
        check.true(
            version == STATE_VERSION,
            "version",
            version,
            f"{STATE_VERSION} (this spice-trainer's state format)",
            fix="resume with the spice-trainer version that wrote the checkpoint, or start a new run",
        )
        fingerprint = check.string(payload, "fingerprint")
        num_rows = check.integer(payload, "num_rows", minimum=1)
        config = payload.get("config")
        check.true(isinstance(config, dict), "config", config, "a JSON object of SpiceConfig fields")
        sampler = payload.get("sampler")
        check.true(isinstance(sampler, dict), "sampler", sampler, "a JSON object")
        check.integer(sampler, "seed", prefix="sampler.")
        num_samples = check.integer(sampler, "num_samples", minimum=1, prefix="sampler.")
        history = sampler.get("history")
        check.true(isinstance(history, list) and len(history) >= 1, "sampler.history", history, "a non-empty list")
        previous: tuple[int, int, int] | None = None
        for i, switch in enumerate(history):
            name = f"sampler.history[{i}]"
            check.true(
                isinstance(switch, dict) and set(switch) == {"round", "epoch", "position", "rows"},
                name,
                switch,
                "an object with round, epoch, position and rows",
            )
            round_index = check.integer(switch, "round", minimum=0, prefix=f"{name}.")
            epoch = check.integer(switch, "epoch", minimum=0, prefix=f"{name}.")
            position = check.integer(switch, "position", minimum=0, prefix=f"{name}.")
            check.true(position < num_samples, f"{name}.position", position, f"< sampler.num_samples={num_samples}")
            rows = switch["rows"]
            check.true(isinstance(rows, list) and len(rows) >= 1, f"{name}.rows", rows, "a non-empty list of rows")
            for j, row in enumerate(rows):
                ok = isinstance(row, int) and not isinstance(row, bool) and 0 <= row < num_rows
                check.true(ok, f"{name}.rows[{j}]", row, f"a row index in [0, {num_rows})")
            check.true(len(set(rows)) == len(rows), f"{name}.rows", "(repeated rows)", "distinct row indices")
            if previous is None:
                check.true((round_index, epoch, position) == (0, 0, 0), name, switch, "round 0 at epoch 0, position 0")
                check.true(
                    num_samples == len(rows),
                    "sampler.num_samples",
                    num_samples,
                    f"the first subset's size ({len(rows)} rows)",
                )
            else:
                check.true(
                    round_index > previous[0] and (epoch, position) > previous[1:],
                    name,
                    {"round": round_index, "epoch": epoch, "position": position},
                    "a later round at a later (epoch, position) than the previous switch "
                    f"(round {previous[0]}, epoch {previous[1]}, position {previous[2]})",
                )
            previous = (round_index, epoch, position)
        rounds = payload.get("rounds")
        check.true(isinstance(rounds, list) and len(rounds) >= 1, "rounds", rounds, "a non-empty list")
        last_step = -1
        for i, record in enumerate(rounds):
            name = f"rounds[{i}]"
            keys = set(RoundRecord.__dataclass_fields__)
            check.true(isinstance(record, dict) and set(record) == keys, name, record, f"an object with {sorted(keys)}")
            check.true(record["round"] == i, f"{name}.round", record["round"], str(i))
            step = check.integer(record, "step", minimum=0, prefix=f"{name}.")
            check.true(step > last_step, f"{name}.step", step, f"> the previous round's step {last_step}")
            last_step = step
            check.integer(record, "selected", minimum=1, prefix=f"{name}.")
            check.string(record, "stop_reason", prefix=f"{name}.")
            check.number(record, "first_gain", optional=True, prefix=f"{name}.")
            check.number(record, "seconds", minimum=0.0, prefix=f"{name}.")
        rounds_seen = {int(s["round"]) for s in history}
        check.true(
            max(rounds_seen) < len(rounds),
            "sampler.history",
            sorted(rounds_seen),
            f"rounds < len(rounds)={len(rounds)}",
        )
        reference = check.number(payload, "reference_gain", optional=True)
        files = {}
        for name in ("proxy", "feature_cache"):
            record = payload.get(name)
            if record is not None:
                check.true(
                    isinstance(record, dict)
                    and set(record) == {"file", "sha256"}
                    and all(isinstance(v, str) and v for v in record.values())
                    and "/" not in record["file"],
                    name,
                    record,
                    'null or {"file": a file name in the checkpoint, "sha256": hex digest}',
                )
            files[name] = record
        return cls(
            fingerprint=fingerprint,
            num_rows=num_rows,
            config=config,
            sampler=sampler,
            rounds=rounds,
            reference_gain=reference,
            proxy=files["proxy"],
            feature_cache=files["feature_cache"],
        )


def read_checkpoint_state(checkpoint: str | Path) -> tuple[RunState | None, dict[str, Any]]:
    """Read the selection state of ``checkpoint`` from its ``trainer_state.json``.

    Returns:
        ``(state, trainer_state)``: the validated `RunState` (or `None` when the file has no selection state) and
        the parsed ``trainer_state.json``.

    Raises:
        CheckpointStateError: ``trainer_state.json`` is missing, unreadable or not JSON, or the selection state in
            it fails `RunState.from_json`; the message names the file.
    """
    path = Path(checkpoint) / TRAINER_STATE_FILE
    try:
        trainer_state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointStateError(
            f"{path} does not exist: {checkpoint} is not a complete checkpoint (the trainer writes "
            f"{TRAINER_STATE_FILE} last); resume from an earlier checkpoint"
        ) from err
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointStateError(f"{path} cannot be read as JSON ({err}); {_FIX_DAMAGED}") from err
    if not isinstance(trainer_state, dict):
        raise CheckpointStateError(f"{path} holds {type(trainer_state).__name__}, not a JSON object; {_FIX_DAMAGED}")
    callbacks = trainer_state.get("stateful_callbacks") or {}
    entry = callbacks.get(CALLBACK_STATE_KEY) if isinstance(callbacks, dict) else None
    if entry is None:
        return None, trainer_state
    source = f"{path} (stateful_callbacks.{CALLBACK_STATE_KEY})"
    if isinstance(entry, list):
        raise CheckpointStateError(
            f"{source} holds the state of {len(entry)} SpiceDataCallback instances; a trainer takes one. Resume "
            "with the single callback the run had"
        )
    payload = entry.get("spice") if isinstance(entry, dict) else None
    if payload is None:
        raise CheckpointStateError(
            f"{source} holds no selection (its 'spice' field is missing or null): the checkpoint was written before "
            f"the first selection round finished. {_FIX_DAMAGED}"
        )
    return RunState.from_json(payload, source), trainer_state


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Checker:
    """Field checks that raise `CheckpointStateError` naming the file, the field, the value and the fix."""

    def __init__(self, source: str) -> None:
        self.source = source

    def true(self, ok: bool, name: str, value: Any, expected: str, *, fix: str = _FIX_DAMAGED) -> None:
        if ok:
            return
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        where = f"field {name!r}" if name else "the selection state"
        raise CheckpointStateError(f"{self.source}: {where} is {shown}, expected {expected}; {fix}")

    def integer(self, obj: dict[str, Any], key: str, *, minimum: int | None = None, prefix: str = "") -> int:
        value = obj.get(key)
        ok = isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)
        self.true(ok, prefix + key, value, "an integer" + ("" if minimum is None else f" >= {minimum}"))
        return int(value)  # type: ignore[arg-type]

    def string(self, obj: dict[str, Any], key: str, *, prefix: str = "") -> str:
        value = obj.get(key)
        self.true(isinstance(value, str) and bool(value), prefix + key, value, "a non-empty string")
        return str(value)

    def number(
        self, obj: dict[str, Any], key: str, *, optional: bool = False, minimum: float | None = None, prefix: str = ""
    ) -> float | None:
        value = obj.get(key)
        if value is None and optional:
            return None
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (minimum is None or value >= minimum)
        )
        bound = "" if minimum is None else f" >= {minimum}"
        self.true(ok, prefix + key, value, ("null or " if optional else "") + f"a finite number{bound}")
        return float(value)  # type: ignore[arg-type]
