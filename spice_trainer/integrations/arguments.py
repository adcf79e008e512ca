"""`SpiceArguments`: SPICE's settings as command-line flags and YAML keys of any Hugging Face / TRL script.

A dataclass that `transformers.HfArgumentParser` and TRL's `TrlParser` accept next to `SFTConfig`,
`ScriptArguments` and `ModelConfig`. Every `SpiceConfig` field ``x`` is the flag ``--spice_x`` (and
``--spice-x``) and the YAML key ``spice_x``; `SpiceArguments.to_config` returns the `SpiceConfig`.

One home for each field's default and help: both are read from `SpiceConfig` (its field defaults and the
``Args:`` section of its docstring) when this module is imported, so the flags cannot drift from the config.
What this module adds is only how a value is *written* on a command line:

- ``--spice_budget 0.1`` is a fraction of the pool, ``--spice_budget 500`` a count of rows (a whole number
  >= 2; in YAML an int is a count too), ``--spice_budget 1`` the whole pool;
- ``--spice_reselect_every_steps 50`` selects every 50 optimizer steps, ``--spice_reselect_every_steps
  100,250,400`` at those steps (in YAML also a list);
- a setting that can be switched off (``stop_ratio``, ``min_loss``, ``surprise_threshold``, ...) takes
  ``none`` on the command line (``null`` in YAML);
- ``--spice_proxy_model`` is a local folder or a Hub id;
- ``--use_spice false`` (or ``--no_use_spice``) trains without SPICE: the baseline run of the same script.

Only the standard library and `spice_trainer.config` are imported: a script can parse its flags before
torch, transformers or TRL are loaded.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from spice_trainer.config import (
    ExactSearch,
    FeatureNorm,
    GreedyKind,
    ModeKind,
    ProjectionKind,
    SpiceConfig,
    StopOn,
    StopRule,
)

__all__ = ["PREFIX", "SpiceArguments", "config_field_help"]

#: Every SPICE flag starts with this, so that none collides with a flag of the trainer or the script
#: (``--seed``, ``--max_length`` and ``--batch_size``-like names exist in both).
PREFIX = "spice_"

_NONE_WORDS = frozenset({"none", "null", ""})


def config_field_help() -> dict[str, str]:
    """The help text of every `SpiceConfig` field, read from the ``Args:`` section of its docstring.

    Returns:
        ``{field name: the field's description as one paragraph}``, with the type line's default left out.

    Raises:
        RuntimeError: a `SpiceConfig` field is not documented in its docstring.
    """
    doc = inspect.cleandoc(SpiceConfig.__doc__ or "")
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    entries: dict[str, list[str]] = {}
    current: str | None = None
    for line in args.splitlines():
        header = re.match(r"^    (\w+) \(.*\):\s*$", line)
        if header:
            current = header.group(1)
            entries[current] = []
        elif current is not None and line.startswith("        "):
            entries[current].append(line.strip())
        elif line.strip() and not line.startswith(" "):
            current = None  # the next section of the docstring
    names = [f.name for f in dataclasses.fields(SpiceConfig)]
    missing = [name for name in names if not entries.get(name)]
    if missing:
        raise RuntimeError(f"SpiceConfig's docstring does not document the fields {missing}; add them under Args:")
    return {name: " ".join(entries[name]) for name in names}


_HELP = config_field_help()
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SpiceConfig)}

# How each field is written on a command line, appended to the config's own help.
_FORMAT = {
    "budget": "On the command line: a fraction up to 1 (0.1; 1 is the whole pool) or a whole number of rows (500).",
    "reselect_every_steps": "On the command line: N (every N optimizer steps), a comma-separated list of steps "
    "(100,250,400), or none.",
    "proxy_model": "On the command line: a local folder or a Hub id (downloaded unless HF_HUB_OFFLINE=1), or none.",
    "surprise_threshold": "On the command line: uniform, a number of nats, or none.",
}
_OPTIONAL_FORMAT = "On the command line: a value or none."


def _spice_field(name: str) -> Any:
    """A dataclass field for `SpiceConfig` field ``name``: its default, and its help as argparse shows it."""
    default = _DEFAULTS[name]
    text = _HELP[name]
    extra = _FORMAT.get(name)
    if extra is None and name in _NONE_ABLE:
        extra = _OPTIONAL_FORMAT
    if extra:
        text = f"{text} {extra}"
    # argparse %-formats help strings (HfArgumentParser appends "(default: %(default)s)"): escape literal %.
    return field(default=default, metadata={"help": f"[SPICE] {text}".replace("%", "%%")})


# Fields whose value may be None although their default is not, or that a YAML file may have set: the
# command line spells None as "none". Their annotation includes ``str`` so that HfArgumentParser passes the
# text through; `SpiceArguments.__post_init__` turns it into the typed value.
_NONE_ABLE = frozenset(
    {
        "stop_ratio",
        "min_loss",
        "surprise_threshold",
        "max_loss_quantile",
        "max_length",
        "feature_store",
        "threads",
        "reselect_shortlist",
        "proxy_device",
    }
)


@dataclass
class SpiceArguments:
    """SPICE data selection settings, parsed by `HfArgumentParser` / `TrlParser` (flags or YAML keys).

    Each field is a `SpiceConfig` field with the ``spice_`` prefix, with the same default and help; see
    `SpiceConfig` for their meaning. ``use_spice`` switches selection off without editing the script.

    Example (a TRL script; the three SPICE lines are marked)::

        from spice_trainer import SpiceArguments, SpiceDataCallback                    # 1

        parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, SpiceArguments))  # 2
        script_args, training_args, model_args, spice_args = parser.parse_args_and_config()
        trainer = SFTTrainer(..., callbacks=spice_args.callbacks())                     # 3

    Raises:
        ValueError: at construction (so at parse time), naming the ``--spice_...`` flag, the value and the fix,
            when a value is not valid for `SpiceConfig`.
    """

    _argument_group_name: ClassVar[str] = "SPICE data selection (spice-trainer)"

    use_spice: bool = field(
        default=True,
        metadata={"help": "[SPICE] Select the training subset with SPICE. false trains on the whole dataset."},
    )

    # --- budget and objective -------------------------------------------------------------
    spice_budget: float = _spice_field("budget")
    spice_fisher_scale: float = _spice_field("fisher_scale")
    spice_conflict_weight: float = _spice_field("conflict_weight")
    spice_stop_rule: StopRule = _spice_field("stop_rule")
    spice_plateau_ratio: float = _spice_field("plateau_ratio")
    spice_stop_ratio: float | str | None = _spice_field("stop_ratio")
    spice_stop_on: StopOn = _spice_field("stop_on")

    # --- gradient features ---------------------------------------------------------------
    spice_proj_dim: int = _spice_field("proj_dim")
    spice_projection: ProjectionKind = _spice_field("projection")
    spice_feature_norm: FeatureNorm = _spice_field("feature_norm")
    spice_min_loss: float | str | None = _spice_field("min_loss")
    spice_surprise_threshold: float | str | None = _spice_field("surprise_threshold")
    spice_max_loss_quantile: float | str | None = _spice_field("max_loss_quantile")
    spice_batch_size: int = _spice_field("batch_size")
    spice_max_length: int | str | None = _spice_field("max_length")
    spice_feature_store: str | None = _spice_field("feature_store")
    spice_threads: int | str | None = _spice_field("threads")

    # --- greedy regime -------------------------------------------------------------------
    spice_seed: int = _spice_field("seed")
    spice_greedy: GreedyKind = _spice_field("greedy")
    spice_exact_search: ExactSearch = _spice_field("exact_search")
    spice_stochastic_epsilon: float = _spice_field("stochastic_epsilon")
    spice_pool_size: int = _spice_field("pool_size")
    spice_picks_per_pool: int = _spice_field("picks_per_pool")

    # --- schedule during training --------------------------------------------------------
    spice_reselect_every_steps: int | str | list[int] | None = _spice_field("reselect_every_steps")
    spice_reselect_shortlist: float | str | None = _spice_field("reselect_shortlist")
    spice_mode: ModeKind = _spice_field("mode")

    # --- proxy model ---------------------------------------------------------------------
    spice_proxy_model: str | None = _spice_field("proxy_model")
    spice_proxy_refresh_every_pools: int = _spice_field("proxy_refresh_every_pools")
    spice_proxy_learning_rate: float = _spice_field("proxy_learning_rate")
    spice_proxy_device: str | None = _spice_field("proxy_device")

    # --- reporting -----------------------------------------------------------------------
    spice_write_reports: bool = _spice_field("write_reports")

    def __post_init__(self) -> None:
        # Command-line text becomes the typed value (YAML and Python values arrive typed already).
        for name in _NONE_ABLE:
            attr = PREFIX + name
            value = getattr(self, attr)
            if isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
                setattr(self, attr, None)
            elif name == "surprise_threshold" and isinstance(value, str) and value.strip().lower() == "uniform":
                setattr(self, attr, "uniform")
            elif isinstance(value, str) and name not in ("feature_store", "proxy_device"):
                setattr(self, attr, _number(attr, value, int if name in ("max_length", "threads") else float))
        if isinstance(self.spice_proxy_model, str) and self.spice_proxy_model.strip().lower() in _NONE_WORDS:
            self.spice_proxy_model = None
        self.spice_reselect_every_steps = _schedule(self.spice_reselect_every_steps)
        self.to_config()  # validate now: a bad flag fails at parse time, not when training starts

    def to_config(self) -> SpiceConfig:
        """The `SpiceConfig` these arguments describe.

        Raises:
            ValueError: naming the flag, the value and the fix (`SpiceConfig`'s own validation).
        """
        values: dict[str, Any] = {}
        for f in dataclasses.fields(SpiceConfig):
            value = getattr(self, PREFIX + f.name)
            if f.name == "budget":
                value = _budget(value)
            elif f.name == "reselect_every_steps" and isinstance(value, list):
                value = tuple(value)
            values[f.name] = value
        try:
            return SpiceConfig(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{_flag_of(str(err))}{err}") from err

    def callbacks(self) -> list[Any]:
        """``[SpiceDataCallback(self.to_config())]``, or ``[]`` with ``use_spice=False``.

        Pass it as ``callbacks=`` to the trainer (or append it to the callbacks you already pass).
        """
        if not self.use_spice:
            return []
        from spice_trainer.integrations.trainer import SpiceDataCallback

        return [SpiceDataCallback(self.to_config())]


def _flag_of(message: str) -> str:
    """``"--spice_x: "`` for the `SpiceConfig` field a validation message starts with (empty if none)."""
    match = re.match(r"^(\w+)", message)
    if match and match.group(1) in _DEFAULTS:
        return f"--spice_{match.group(1)}: "
    return ""


def _number(flag: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"--{flag}: expected {what} or none, got {text!r}") from None


def _budget(value: Any) -> float | int:
    """A fraction up to 1 stays a fraction (1 is the whole pool); a whole number >= 2 is a count of rows.

    A command line cannot tell ``1`` from ``1.0`` (the flag is a float), and a one-row budget is never what is
    meant there, so ``--spice_budget 1`` is the whole pool, as ``SpiceConfig(budget=1.0)`` is.
    """
    if isinstance(value, bool):
        raise ValueError(f"--spice_budget: expected a fraction such as 0.1 or a row count such as 500, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(
                f"--spice_budget: expected a fraction such as 0.1 or a row count such as 500, got {value!r}"
            ) from None
    if isinstance(value, int | float) and value == 1:
        return 1.0
    if isinstance(value, float) and value > 1:
        if value != int(value):
            raise ValueError(
                f"--spice_budget: {value!r} is neither a fraction up to 1 nor a whole number of rows; "
                f"pass e.g. {int(value)} rows or a fraction such as 0.1"
            )
        return int(value)
    return value


def _schedule(value: Any) -> int | list[int] | None:
    """``reselect_every_steps`` from a flag (``"50"``, ``"100,250"``, ``"none"``), YAML (int, list) or Python."""
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in _NONE_WORDS:
        return None
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    try:
        steps = [int(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"--spice_reselect_every_steps: expected N (every N steps), a list of steps such as 100,250,400 or "
            f"none, got {value!r}"
        ) from None
    if "," in text or len(steps) > 1:
        return steps
    return steps[0]
