"""An optional on-disk store of gradient features, written chunk by chunk so a crashed job resumes.

Layout of one store (one directory per fingerprint under the user's ``feature_store`` directory)::

    <root>/<fingerprint>/
        meta.json           n, proj_dim, chunk_rows, the fingerprint and what went into it
        features.f16        (n, proj_dim) float16 numpy.memmap
        losses.f32          (n,) float32 numpy.memmap
        num_tokens.i64      (n,) int64 numpy.memmap
        surprise.f32        (n,) float32 numpy.memmap: each row's largest token loss (the guards' surprise)
        chunks/000012.json  one small manifest per finished chunk of rows, with the SHA-256 of its bytes

Rows are cut into fixed chunks ``[c · chunk_rows, (c + 1) · chunk_rows)``. A chunk counts as done
only once its manifest exists; the manifest is written to a temporary file and moved into place
with `os.replace` (atomic on POSIX) *after* the chunk's rows were flushed to the memmaps. A job
killed mid-pass therefore leaves whole chunks or nothing: on the next run the finished chunks are
read back and only the missing ones are computed.

Integrity. A finished chunk is reused only if its bytes (features, losses, token counts, surprise) still hash to the
checksum in its manifest; a data file whose size is not the store's (truncated, or grown: numpy would zero-extend
a short file silently) is resized and every chunk then re-checked. A chunk that fails (random bytes, NaN written
over it, zeroed losses, a truncated file, an unreadable manifest) is recomputed, with a warning naming the store
and the chunk; a ``meta.json`` that cannot be read is an error naming the store and the fix (delete it).

The fingerprint (`store_fingerprint`) covers everything that changes the features: the model
(class, config, a strided probe of every weight), the adapter weights (full hash), the dataset
(`spice_trainer.features.fingerprint.dataset_fingerprint`), the collator's class, the store's format version
and the config fields ``proj_dim``, ``projection``, ``feature_norm``, ``seed``, ``max_length`` (plus the
optimizer's second moments when ``feature_norm="adam"``). A changed adapter (a later selection round after
training steps) gets a fresh store; stale stores are never deleted automatically.

Features are stored as float16 (half the disk of float32; unit-normalised features keep ~3 decimal
digits, ample for the greedy). A finite value beyond float16's range (|x| > 65504) is refused with an
error rather than stored as inf. Imports numpy and torch only.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.features.fingerprint import dataset_fingerprint, tensor_bytes

logger = logging.getLogger(__name__)

# 2: chunk manifests carry a SHA-256 of the chunk's bytes (a version-1 store has none, so it is never reused:
# the version is part of the fingerprint, so a version-2 run opens a fresh directory).
# 3: each row's largest token loss (surprise.f32), read by the candidate guards.
STORE_VERSION = 3
_DATA_FILES = (
    ("features.f16", np.float16),
    ("losses.f32", np.float32),
    ("num_tokens.i64", np.int64),
    ("surprise.f32", np.float32),
)
_FLOAT16_MAX = float(np.finfo(np.float16).max)
# Config fields that change the features of a row (batch_size does not: features are batch-invariant).
FEATURE_FIELDS = ("proj_dim", "projection", "feature_norm", "seed", "max_length")


def default_chunk_rows(n: int, batch_size: int) -> int:
    """Rows per chunk: four gradient batches, but at most ~256 chunks (manifest files) per store."""
    return max(4 * batch_size, math.ceil(n / 256), 1)


@dataclass(frozen=True)
class ChunkStats:
    """What a pass over the store did: chunks read back from disk vs computed now."""

    reused: int
    computed: int


class FeatureStore:
    """A float16 memmap of ``(n, proj_dim)`` features plus float32 losses, int64 token counts and float32
    largest token losses.

    Open with `FeatureStore.open` (creates the directory and files when missing, else checks that
    the existing store matches ``n`` and ``proj_dim``). Several processes may write *disjoint* chunks
    of one store at the same time (the distributed gradient pass does); creation must happen on one
    process first (`spice_trainer.pipeline` lets rank 0 create, then all ranks open).

    Args:
        path: the store's own directory (``<root>/<fingerprint>``).
        n: rows.
        proj_dim: feature dimension d.
        chunk_rows: rows per chunk.
    """

    def __init__(self, path: Path, n: int, proj_dim: int, chunk_rows: int) -> None:
        self.path = path
        self.n = n
        self.proj_dim = proj_dim
        self.chunk_rows = chunk_rows
        self._check_file_sizes()
        self._features = np.memmap(path / "features.f16", dtype=np.float16, mode="r+", shape=(n, proj_dim))
        self._losses = np.memmap(path / "losses.f32", dtype=np.float32, mode="r+", shape=(n,))
        self._num_tokens = np.memmap(path / "num_tokens.i64", dtype=np.int64, mode="r+", shape=(n,))
        self._surprise = np.memmap(path / "surprise.f32", dtype=np.float32, mode="r+", shape=(n,))

    # ---------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        fingerprint: str,
        *,
        n: int,
        proj_dim: int,
        chunk_rows: int,
        description: dict[str, Any] | None = None,
        create: bool = True,
    ) -> FeatureStore:
        """Open (or create) the store for ``fingerprint`` under ``root``.

        An existing store keeps its own ``chunk_rows`` (its chunk layout is on disk); ``chunk_rows``
        only applies to a new one.

        Raises:
            ValueError: the existing store was written for a different ``n`` or ``proj_dim`` (a
                fingerprint collision or a hand-edited directory), or its ``meta.json`` cannot be read:
                delete the directory named.
            FileNotFoundError: ``create=False`` and the store does not exist yet.
        """
        if n < 1 or proj_dim < 1 or chunk_rows < 1:
            raise ValueError(f"a feature store needs n, proj_dim, chunk_rows >= 1, got {n}, {proj_dim}, {chunk_rows}")
        path = Path(root) / fingerprint
        meta_path = path / "meta.json"
        if not meta_path.exists():
            if not create:
                raise FileNotFoundError(f"no feature store at {path}; it is created by the first process (rank 0)")
            cls._create(path, fingerprint, n, proj_dim, chunk_rows, description or {})
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict) or not all(
                isinstance(meta.get(k), int) and meta[k] >= 1 for k in ("n", "proj_dim", "chunk_rows")
            ):
                raise ValueError("n, proj_dim and chunk_rows must be positive integers")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(
                f"the feature store at {path} has an unreadable meta.json ({err}); it was damaged or edited: "
                f"delete {path} to rebuild it"
            ) from err
        if meta.get("version") != STORE_VERSION or meta["n"] != n or meta["proj_dim"] != proj_dim:
            raise ValueError(
                f"the feature store at {path} holds n={meta.get('n')}, proj_dim={meta.get('proj_dim')} "
                f"(version {meta.get('version')}), but this pass needs n={n}, proj_dim={proj_dim}; "
                f"delete {path} to rebuild it"
            )
        return cls(path, n, proj_dim, int(meta["chunk_rows"]))

    @staticmethod
    def _create(path: Path, fingerprint: str, n: int, proj_dim: int, chunk_rows: int, description: dict) -> None:
        (path / "chunks").mkdir(parents=True, exist_ok=True)
        # Size the data files first (sparse files: no n × d write), then publish meta.json last and
        # atomically, so a store with a meta.json always has its data files.
        for name, nbytes in (
            ("features.f16", n * proj_dim * 2),
            ("losses.f32", n * 4),
            ("num_tokens.i64", n * 8),
            ("surprise.f32", n * 4),
        ):
            with open(path / name, "ab") as fh:
                fh.truncate(nbytes)
        meta = {
            "version": STORE_VERSION,
            "fingerprint": fingerprint,
            "n": n,
            "proj_dim": proj_dim,
            "chunk_rows": chunk_rows,
            "created": time.time(),
            "description": description,
        }
        _atomic_write_json(path / "meta.json", meta)

    def _check_file_sizes(self) -> None:
        """Resize a data file whose size is not the store's; its chunks then fail their checksums."""
        rows = {"features.f16": self.n * self.proj_dim}
        for name, dtype in _DATA_FILES:
            file = self.path / name
            expected = rows.get(name, self.n) * np.dtype(dtype).itemsize
            size = file.stat().st_size if file.exists() else -1
            if size != expected:
                logger.warning(
                    "spice: feature store %s: %s has %d bytes, expected %d (truncated or changed); every chunk is "
                    "checked against its checksum and damaged ones are recomputed",
                    self.path,
                    name,
                    max(size, 0),
                    expected,
                )
                with open(file, "ab") as fh:
                    fh.truncate(expected)

    # ---------------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return math.ceil(self.n / self.chunk_rows)

    def chunk_range(self, chunk: int) -> range:
        """The rows of chunk ``chunk``."""
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} out of range [0, {self.num_chunks})")
        start = chunk * self.chunk_rows
        return range(start, min(self.n, start + self.chunk_rows))

    def _manifest(self, chunk: int) -> Path:
        return self.path / "chunks" / f"{chunk:06d}.json"

    def is_complete(self, chunk: int) -> bool:
        return self._manifest(chunk).exists()

    def manifest(self, chunk: int) -> dict[str, Any] | None:
        """The manifest of a finished chunk (who wrote it and when, its checksum), or `None` (also when unreadable)."""
        path = self._manifest(chunk)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):  # missing, or damaged: the chunk is recomputed
            return None
        return manifest if isinstance(manifest, dict) else None

    def chunk_checksum(self, chunk: int) -> str:
        """SHA-256 of the chunk's bytes as they are on disk now (features, losses, token counts, surprise)."""
        rows = self.chunk_range(chunk)
        sl = slice(rows.start, rows.stop)
        return _checksum(self._features[sl], self._losses[sl], self._num_tokens[sl], self._surprise[sl])

    def is_valid(self, chunk: int) -> bool:
        """The chunk is complete and its bytes match the checksum its manifest recorded."""
        manifest = self.manifest(chunk)
        rows = self.chunk_range(chunk)
        return (
            manifest is not None
            and manifest.get("start") == rows.start
            and manifest.get("stop") == rows.stop
            and manifest.get("sha256") == self.chunk_checksum(chunk)
        )

    def complete_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if self.is_complete(c)]

    def write_chunk(
        self,
        chunk: int,
        features: torch.Tensor,
        losses: torch.Tensor,
        num_tokens: torch.Tensor,
        max_token_losses: torch.Tensor,
    ) -> None:
        """Write one chunk's rows, flush them, then mark the chunk complete (atomically).

        Args:
            features: ``(rows, proj_dim)`` float tensor (NaN rows allowed: they mark skipped rows).
            losses: ``(rows,)``.
            num_tokens: ``(rows,)`` integers.
            max_token_losses: ``(rows,)``, each row's largest token loss.

        Raises:
            ValueError: shapes do not match the chunk, or a finite feature overflows float16.
        """
        rows = self.chunk_range(chunk)
        expected = (len(rows), self.proj_dim)
        if (
            tuple(features.shape) != expected
            or losses.shape[0] != len(rows)
            or num_tokens.shape[0] != len(rows)
            or max_token_losses.shape[0] != len(rows)
        ):
            raise ValueError(
                f"chunk {chunk} needs features {expected}, losses, num_tokens and max_token_losses ({len(rows)},); "
                f"got {tuple(features.shape)}, {tuple(losses.shape)}, {tuple(num_tokens.shape)}, "
                f"{tuple(max_token_losses.shape)}"
            )
        feats = features.detach().to("cpu", torch.float32).numpy()
        finite = np.isfinite(feats)
        if finite.any() and float(np.abs(feats[finite]).max()) > _FLOAT16_MAX:
            raise ValueError(
                f"gradient features reach {float(np.abs(feats[finite]).max()):.3g}, beyond float16's range "
                f"({_FLOAT16_MAX:.0f}); use feature_norm='unit' or leave feature_store=None"
            )
        sl = slice(rows.start, rows.stop)
        self._features[sl] = feats.astype(np.float16)
        self._losses[sl] = losses.detach().to("cpu", torch.float32).numpy()
        self._num_tokens[sl] = num_tokens.detach().to("cpu", torch.int64).numpy()
        self._surprise[sl] = max_token_losses.detach().to("cpu", torch.float32).numpy()
        for array in (self._features, self._losses, self._num_tokens, self._surprise):
            array.flush()
        manifest = {
            "chunk": chunk,
            "start": rows.start,
            "stop": rows.stop,
            "sha256": self.chunk_checksum(chunk),
            "pid": os.getpid(),
            "time": time.time(),
        }
        _atomic_write_json(self._manifest(chunk), manifest)

    def read_rows(self, rows: Sequence[int] | range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features ``(len(rows), proj_dim)`` float32, losses ``(len(rows),)`` float32, num_tokens int64, largest
        token losses float32."""
        if isinstance(rows, range) and rows.step == 1:
            index: Any = slice(rows.start, rows.stop)
        else:
            index = np.asarray(list(rows), dtype=np.int64)
        feats = torch.from_numpy(np.array(self._features[index], dtype=np.float32))
        losses = torch.from_numpy(np.array(self._losses[index], dtype=np.float32))
        tokens = torch.from_numpy(np.array(self._num_tokens[index], dtype=np.int64))
        surprise = torch.from_numpy(np.array(self._surprise[index], dtype=np.float32))
        return feats, losses, tokens, surprise

    def fill(
        self,
        chunks: Sequence[int],
        compute: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> ChunkStats:
        """Compute and write every chunk of ``chunks`` that is not complete, or whose bytes fail their checksum.

        A finished chunk that fails its checksum is recomputed with a warning naming the store and the chunk;
        `read_rows` of these chunks afterwards returns verified data.

        Args:
            chunks: chunk ids this process is responsible for.
            compute: maps a list of row indices to ``(features, losses, num_tokens, max_token_losses)`` for them.

        Returns:
            How many chunks were reused from disk and how many computed.
        """
        todo = []
        for c in chunks:
            if self.is_valid(c):
                continue
            if self._manifest(c).exists():
                logger.warning(
                    "spice: feature store %s: chunk %d (rows %d-%d) does not match its checksum (the store's files "
                    "were changed or damaged); recomputing it",
                    self.path,
                    c,
                    self.chunk_range(c).start,
                    self.chunk_range(c).stop - 1,
                )
            todo.append(c)
        for chunk in todo:
            self.write_chunk(chunk, *compute(list(self.chunk_range(chunk))))
        if len(todo) < len(chunks):
            logger.info(
                "spice: feature store %s: %d chunks reused, %d computed", self.path, len(chunks) - len(todo), len(todo)
            )
        return ChunkStats(reused=len(chunks) - len(todo), computed=len(todo))


# --- fingerprints ------------------------------------------------------------------------------


def store_fingerprint(
    model: Any,
    dataset: Any,
    config: SpiceConfig,
    data_collator: Any = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[str, dict[str, Any]]:
    """A hex key for the features ``model`` gives ``dataset`` under ``config``, and what went into it.

    Components (each hashed with SHA-256; the key is the hash of their JSON):

    - ``model``: class name, ``model.config`` as JSON (includes ``_name_or_path``), and a strided probe of
      up to 64 values of every parameter (catches differently initialised or fine-tuned base weights
      without hashing billions of them);
    - ``adapter``: every LoRA parameter (names containing ``lora_``), names, shapes and bytes in full;
    - ``dataset``: `spice_trainer.features.fingerprint.dataset_fingerprint` (``datasets``' own fingerprint, else a
      hash of every row, every column);
    - ``collator``: the collator's class (its padding/masking changes the losses);
    - ``config``: the fields of `FEATURE_FIELDS`;
    - ``optimizer``: with ``feature_norm="adam"``, the second-moment state of the adapter parameters.

    Returns:
        ``(fingerprint, description)``; the description is stored in the store's ``meta.json``.
    """
    description: dict[str, Any] = {
        "store_version": STORE_VERSION,
        "model": _model_digest(model),
        "adapter": _adapter_digest(model),
        "dataset": dataset_fingerprint(dataset),
        "collator": None if data_collator is None else _qualname(data_collator),
        "config": {name: getattr(config, name) for name in FEATURE_FIELDS},
    }
    if config.feature_norm == "adam":
        description["optimizer"] = _optimizer_digest(optimizer)
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
    return key, description


def _qualname(obj: Any) -> str:
    """``module.QualName`` of a function, else of the object's class."""
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _model_digest(model: Any) -> str:
    h = hashlib.sha256()
    h.update(type(model).__qualname__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        h.update(cfg.to_json_string(use_diff=False).encode())
    elif cfg is not None:
        h.update(repr(cfg).encode())
    if hasattr(model, "named_parameters"):
        with torch.no_grad():
            for name, param in model.named_parameters():
                flat = param.detach().reshape(-1)
                step = max(1, flat.numel() // 64)
                h.update(name.encode())
                h.update(str(tuple(param.shape)).encode())
                if flat.numel():
                    h.update(tensor_bytes(flat[::step][:64]))
    return h.hexdigest()


def _adapter_digest(model: Any) -> str:
    h = hashlib.sha256()
    if hasattr(model, "named_parameters"):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    h.update(name.encode())
                    h.update(str(tuple(param.shape)).encode())
                    h.update(tensor_bytes(param))
    return h.hexdigest()


def _optimizer_digest(optimizer: torch.optim.Optimizer | None) -> str | None:
    if optimizer is None:
        return None
    h = hashlib.sha256()
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key in ("exp_avg_sq", "step"):
                value = state.get(key)
                if isinstance(value, torch.Tensor):
                    h.update(tensor_bytes(value))
                elif value is not None:
                    h.update(repr(value).encode())
    return h.hexdigest()


def _checksum(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for array in arrays:
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file in the same directory, fsync it, then `os.replace` it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
