"""`Selection`: what a SPICE greedy run chose, and the numbers that explain why.

Per pick ``t`` (docs/concepts.md, section 2): the gain ``Δ_t = Δ_{x_t}(S_{t−1})``, its base term
``b_t = log(1 + α‖g_{x_t}‖²)``, the interaction ``ε_t = Δ_t − b_t ≤ 0``, the conflict ``c_t`` and the
score ``Δ_t − λ c_t``; and the cumulative utility ``log det(I + α F_{S_t})`` (initial rows included).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spice_trainer.core.stopping import STOP_REASONS, StopReason

logger = logging.getLogger(__name__)

__all__ = ["Selection", "StopReason"]

_FLOAT_LISTS = ("gains", "base_gains", "interactions", "conflicts", "scores", "objective")


@dataclass
class Selection:
    """The result of one selection round.

    Attributes:
        indices: picked rows in pick order (``initial`` rows are not repeated here).
        gains: ``Δ`` per pick, the information gain ``log(1 + α g_xᵀ(I + αF_S)⁻¹g_x)``.
        base_gains: ``b`` per pick, ``log(1 + α‖g_x‖²)`` (the example alone).
        interactions: ``ε = Δ − b ≤ 0`` per pick (what the selected set already explained).
        conflicts: ``c = max(0, −cos(g_x, ḡ_S))`` per pick.
        scores: ``Δ − λ c`` per pick (what the greedy maximised).
        objective: cumulative ``log det(I + α F_S)`` after each pick, counting ``initial``.
        stop_reason: why the run ended, one of `spice_trainer.core.stopping.STOP_REASONS`: ``"budget"``,
            ``"early_stop"`` (the stopping rule) or ``"exhausted"`` (no eligible candidate was left).
        n_candidates: rows in the pool (``n``).
        skipped: rows with non-finite features, never picked.
        excluded: the rows the candidate guards made ineligible, by reason (each row under its first reason, in
            this order): ``"no_supervised_token"``, ``"non_finite_loss"``, ``"non_finite_gradient"``, ``"solved"``
            (loss at or below ``min_loss``), ``"loss_cap"`` (above the ``max_loss_quantile`` cap). Empty when the
            greedy ran on bare features (`select_from_features`).
        down_weighted_rows: rows that stayed eligible with a weight below 1 (a label token more surprising than
            ``surprise_threshold``), ascending.
        down_weights: the weight of each row of ``down_weighted_rows`` (its Fisher contribution's factor).
        initial: rows that were already selected before this round (mode ``"grow"``).
        config: ``SpiceConfig.to_dict()`` of the run.
        metadata: free-form facts (round, step, seconds, method, reference gain, ...).
    """

    indices: list[int] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)
    base_gains: list[float] = field(default_factory=list)
    interactions: list[float] = field(default_factory=list)
    conflicts: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    stop_reason: StopReason = "budget"
    n_candidates: int = 0
    skipped: list[int] = field(default_factory=list)
    excluded: dict[str, list[int]] = field(default_factory=dict)
    down_weighted_rows: list[int] = field(default_factory=list)
    down_weights: list[float] = field(default_factory=list)
    initial: list[int] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = len(self.indices)
        for name in _FLOAT_LISTS:
            if len(getattr(self, name)) != k:
                raise ValueError(
                    f"Selection.{name} has {len(getattr(self, name))} entries but there are {k} picks; "
                    "every per-pick list must have one entry per index"
                )
        if len(self.down_weights) != len(self.down_weighted_rows):
            raise ValueError(
                f"Selection.down_weights has {len(self.down_weights)} entries for {len(self.down_weighted_rows)} "
                "down_weighted_rows; give one weight per row"
            )
        if self.stop_reason not in STOP_REASONS:
            choices = ", ".join(repr(reason) for reason in STOP_REASONS)
            raise ValueError(f"stop_reason must be one of {choices}, got {self.stop_reason!r}")

    @classmethod
    def from_picks(
        cls,
        *,
        indices: list[int],
        gains: list[float],
        base_gains: list[float],
        conflicts: list[float],
        conflict_weight: float,
        **fields: Any,
    ) -> Selection:
        """A record from the per-pick ``Δ``, ``b`` and ``c``; derives ``ε = Δ − b`` and ``score = Δ − λc``."""
        return cls(
            indices=list(indices),
            gains=gains,
            base_gains=base_gains,
            interactions=[g - b for g, b in zip(gains, base_gains, strict=True)],
            conflicts=conflicts,
            scores=[g - conflict_weight * c for g, c in zip(gains, conflicts, strict=True)],
            **fields,
        )

    def __len__(self) -> int:
        """Number of rows picked in this round (``initial`` not counted)."""
        return len(self.indices)

    @property
    def selected(self) -> list[int]:
        """Every selected row: ``initial`` followed by this round's picks."""
        return [*self.initial, *self.indices]

    @property
    def down_weighted_picks(self) -> int:
        """How many of this round's picks are among ``down_weighted_rows``."""
        return len(set(self.down_weighted_rows).intersection(self.indices))

    def weight_of(self, rows: Sequence[int]) -> list[float]:
        """The trust weight each of ``rows`` counted with (1.0 unless it is in ``down_weighted_rows``)."""
        weights = dict(zip(self.down_weighted_rows, self.down_weights, strict=True))
        return [float(weights.get(int(r), 1.0)) for r in rows]

    # --- as a dataset ------------------------------------------------------------------------

    def to_dataset(self, train_dataset: Any, *, rows: Sequence[int] | None = None) -> Any:
        """The selected rows of ``train_dataset`` as a `datasets.Dataset`, with why each was chosen.

        Rows come in `selected` order (``initial`` first, then this round's picks) with every column of
        ``train_dataset`` and these added:

        - ``spice_row``: the row's index in ``train_dataset``;
        - ``spice_pick``: its position in this round's pick order (``None`` for ``initial`` rows);
        - ``spice_gain`` (Δ), ``spice_base_gain`` (b), ``spice_conflict`` (c), ``spice_score`` (Δ − λc):
          the pick's numbers (``None`` for ``initial`` rows, chosen in an earlier round);
        - ``spice_weight``: the trust weight the row counted with (`weight_of`; below 1 for a surprising label);
        - ``spice_round``: the selection round (``metadata["round"]``, 0 outside a trainer).

        Args:
            train_dataset: a `datasets.Dataset` (or anything ``datasets.Dataset.from_list`` accepts as a list of
                dict rows) whose rows the selection indexes.
            rows: the row of ``train_dataset`` for each entry of `selected`, when the selection ran on a derived
                dataset; defaults to ``metadata["source_rows"]`` when present (`SpiceDataCallback` records the
                rows of the dataset the user passed there, through TRL's tokenisation, filtering and
                shuffling), else `selected` itself.

        Raises:
            ImportError: ``datasets`` is not installed.
            ValueError: ``rows`` does not have one entry per selected row, or a row is out of range.
        """
        try:
            import datasets
        except ImportError as err:  # pragma: no cover - datasets is a dependency; the core imports it lazily
            raise ImportError("Selection.to_dataset needs the `datasets` package: pip install datasets") from err
        selected = self.selected
        if rows is None:
            rows = self.metadata.get("source_rows") or selected
        rows = [int(r) for r in rows]
        if len(rows) != len(selected):
            raise ValueError(
                f"rows has {len(rows)} entries but the selection holds {len(selected)} rows; pass one row of "
                "train_dataset per entry of Selection.selected"
            )
        if not isinstance(train_dataset, datasets.Dataset):
            train_dataset = datasets.Dataset.from_list([dict(r) for r in train_dataset])
        n = len(train_dataset)
        bad = [r for r in rows if not 0 <= r < n]
        if bad:
            raise ValueError(
                f"rows {bad[:10]} are out of range for a train_dataset of {n} rows; pass the dataset the selection "
                "was made on (or rows=... mapping into this one)"
            )
        k0 = len(self.initial)
        none: list[float | None] = [None] * k0
        round_index = int(self.metadata.get("round", 0))
        out = train_dataset.select(rows)
        added: dict[str, list[Any]] = {
            "spice_row": rows,
            "spice_pick": [None] * k0 + list(range(len(self.indices))),
            "spice_gain": none + [float(v) for v in self.gains],
            "spice_base_gain": none + [float(v) for v in self.base_gains],
            "spice_conflict": none + [float(v) for v in self.conflicts],
            "spice_score": none + [float(v) for v in self.scores],
            "spice_weight": self.weight_of(selected),
            "spice_round": [round_index] * len(rows),
        }
        clash = sorted(set(added) & set(out.column_names))
        if clash:
            out = out.remove_columns(clash)  # a dataset written by an earlier to_dataset: the new round's numbers
        features = {
            "spice_row": datasets.Value("int64"),
            "spice_pick": datasets.Value("int64"),
            "spice_round": datasets.Value("int64"),
            **{
                name: datasets.Value("float64")
                for name in added
                if name.endswith(("gain", "conflict", "score", "weight"))
            },
        }
        for name, values in added.items():
            out = out.add_column(name, values, feature=features[name])
        return out

    # --- persistence -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly fields (lists, numbers, strings)."""
        return asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the selection as JSON (floats as their shortest round-trip repr, so `load` is exact)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        """Read a selection written by `save`."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: not a Selection file, unknown keys {sorted(unknown)}")
        return cls(**data)

    # --- reporting ---------------------------------------------------------------------------

    def summary(self) -> str:
        """A short human-readable block: size, stop reason, gain decay, conflicts, utility."""
        k = len(self.indices)
        lines = [
            f"SPICE selection: {k} picked + {len(self.initial)} initial of {self.n_candidates} candidates "
            f"(stop: {self.stop_reason})",
        ]
        if self.skipped:
            lines.append(f"  skipped (non-finite features): {len(self.skipped)}")
        if self.excluded:
            lines.append(
                "  excluded: " + ", ".join(f"{len(rows)} {reason}" for reason, rows in self.excluded.items() if rows)
            )
        if self.down_weighted_rows:
            lines.append(
                f"  down-weighted (surprising labels): {len(self.down_weighted_rows)} rows, "
                f"{self.down_weighted_picks} of them picked"
            )
        if k:
            mean_c = sum(self.conflicts) / k
            nonzero = sum(1 for c in self.conflicts if c > 0)
            lines += [
                f"  gain Δ: first {self.gains[0]:.4g}, last {self.gains[-1]:.4g} "
                f"(last/first {_ratio(self.gains[-1], self.gains[0])})",
                f"  base b: first {self.base_gains[0]:.4g}, last {self.base_gains[-1]:.4g}; "
                f"interaction ε: min {min(self.interactions):.4g}",
                f"  conflict c: mean {mean_c:.4g}, max {max(self.conflicts):.4g}, non-zero {nonzero}/{k}",
                f"  score Δ−λc: first {self.scores[0]:.4g}, last {self.scores[-1]:.4g}",
                f"  log det(I + αF_S): {self.objective[-1]:.6g}",
            ]
        cfg = self.config
        if cfg:
            lines.append(
                "  config: "
                + ", ".join(
                    f"{key}={cfg[key]!r}"
                    for key in ("budget", "fisher_scale", "conflict_weight", "stop_rule", "stop_on", "greedy")
                    if key in cfg
                )
            )
        if "seconds" in self.metadata:
            lines.append(f"  seconds: {self.metadata['seconds']:.3g}")
        return "\n".join(lines)

    def plot(self, path: str | Path, *, missing_ok: bool = False) -> bool:
        """Save a PNG: gain decay (Δ, b, ε), cumulative information, and conflict per pick.

        Args:
            path: the PNG file to write (folders are created).
            missing_ok: without matplotlib, log a warning and return False instead of raising.

        Returns:
            True when the plot was written.

        Raises:
            ImportError: when matplotlib is missing (``pip install 'spice-trainer[plot]'``) and not ``missing_ok``.
        """
        try:
            # The object-oriented API (no pyplot): no global backend switch, no figure registry.
            from matplotlib.figure import Figure
        except ImportError as err:
            message = "Selection.plot needs matplotlib: pip install 'spice-trainer[plot]'"
            if missing_ok:
                logger.warning("%s; skipping the plot", message)
                return False
            raise ImportError(message) from err
        steps = list(range(1, len(self.indices) + 1))
        fig = Figure(figsize=(15, 4))
        axes = fig.subplots(1, 3)
        ax = axes[0]
        ax.plot(steps, self.gains, label="gain Δ")
        ax.plot(steps, self.base_gains, label="base b", alpha=0.7)
        ax.plot(steps, self.interactions, label="interaction ε", alpha=0.7)
        ax.plot(steps, self.scores, label="score Δ−λc", linestyle="--", alpha=0.7)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_xlabel("pick")
        ax.set_title(f"gain decay (stop: {self.stop_reason})")
        ax.legend()
        axes[1].plot(steps, self.objective)
        axes[1].set_xlabel("pick")
        axes[1].set_title("log det(I + αF_S)")
        axes[2].plot(steps, self.conflicts, color="tab:red")
        axes[2].set_xlabel("pick")
        axes[2].set_title("conflict c")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
        return True


def _ratio(a: float, b: float) -> str:
    if b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return "n/a"
    return f"{a / b:.3g}"
