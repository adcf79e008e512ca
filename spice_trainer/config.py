"""`SpiceConfig`: every knob of SPICE selection in one frozen, validated dataclass.

Symbols follow Chang et al., "SPICE: Submodular Penalized Information-Conflict Selection" (ICLR 2026):
``α`` = `fisher_scale`, ``λ`` = `conflict_weight`, ``ω`` = `stop_ratio`, ``d`` = `proj_dim`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

GreedyKind = Literal["exact", "stochastic", "pooled"]
ExactSearch = Literal["lazy", "incremental"]
ModeKind = Literal["grow", "replace"]
ProjectionKind = Literal["rademacher", "gaussian", "sparse", "kronecker"]
FeatureNorm = Literal["none", "unit", "adam"]
StopOn = Literal["gain", "score"]
StopRule = Literal["plateau", "ratio", "none"]


@dataclass(frozen=True, kw_only=True)
class SpiceConfig:
    """Configuration of SPICE data selection.

    The defaults are chosen on the quality benchmark (`bench/quality.py`, `docs/quality.md`);
    `SpiceConfig.paper(...)` gives the paper-exact behaviour.

    Args:
        budget (`float` or `int`, defaults to 0.1):
            How much of the pool to select at most: a fraction in (0, 1] of the candidates, or an
            absolute count >= 1 (an `int`). Early stopping may select fewer.
        fisher_scale (`float`, defaults to 1.0):
            α in ``U(S) = log det(I + α F_S)``. Larger values make the log-det saturate sooner.
        conflict_weight (`float`, defaults to 0.1):
            λ in ``score = Δ − λ c``. 0 gives plain Fisher (log-det) greedy. The paper finds [0.1, 0.5] stable.
        stop_rule (`"plateau"`, `"ratio"` or `"none"`, defaults to `"plateau"`):
            When to stop adding rows before the budget (the budget is the cap). `"plateau"` stops when the
            watched marginal gain has levelled off: the candidate, averaged with the two picks before it, brings
            at most `plateau_ratio` × what the earlier picks brought on average (`spice_trainer.core.stopping.
            PlateauStop`; scale-free and independent of the budget). `"ratio"` is the paper's SPICE+ rule: stop
            at the first pick whose watched gain is ``<= ω ×`` the first pick's (ω = `stop_ratio`). `"none"`
            selects exactly the budget.
        plateau_ratio (`float`, defaults to 0.2):
            The plateau rule's threshold in (0, 1): smaller values stop later (the curve must flatten more).
        stop_ratio (`float` or `None`, defaults to `None`):
            ω of `stop_rule="ratio"` (the paper: 0.5); it must be set with that rule and only with it.
        stop_on (`"gain"` or `"score"`, defaults to `"score"`):
            Which quantity the stopping rule watches: the penalized score Δ − λc, or the information gain Δ
            (the paper's rule).
        proj_dim (`int`, defaults to 256):
            d, the dimension gradients are projected to. Memory for features is ``n × d``.
        projection (`"rademacher"`, `"gaussian"`, `"sparse"` or `"kronecker"`, defaults to `"rademacher"`):
            The random projection family (all are Johnson-Lindenstrauss projections). `"kronecker"` projects
            each LoRA factor's two sides separately (LoGra): ``r``× cheaper than the dense families, the
            cheapest choice on small models and short rows (`spice_trainer.core.projection`).
        feature_norm (`"unit"`, `"none"` or `"adam"`, defaults to `"unit"`):
            How projected gradients are normalised before selection. `"unit"` scales each to norm 1, so a row
            buys information by the novelty of its direction, not by the size of its loss (with raw gradients
            the most surprising rows, often the mislabeled ones, buy the budget; among clean rows, directions
            alone also picked better subsets than raw gradients on the quality suite). `"none"` is the paper's
            raw gradient; `"adam"` preconditions with a live optimizer's second moments (LESS).
        min_loss (`float` or `None`, defaults to 0.1):
            Rows the model already solves teach nothing: candidates whose loss (mean nats per supervised
            token; 0.1 ≈ 90 % probability on each target token) is at or below this are never picked
            (recorded as ``"solved"`` in `Selection.excluded`). `None` disables the floor (the paper).
        surprise_threshold (`float`, `"uniform"` or `None`, defaults to `"uniform"`):
            Trust in a row's label. A supervised token whose surprisal ``−log p`` under the model exceeds this
            many nats contradicts what the model believes; a row whose most surprising token has surprisal
            ``m > τ`` counts in the objective with weight ``w = exp(τ − m) < 1`` (its feature scaled by ``√w``,
            so its Fisher contribution by ``w``): a token 10× less likely than the threshold probability
            ``e^{−τ}`` makes the row count a tenth. Such rows stay selectable, after the trusted ones.
            `"uniform"` sets ``τ = log V`` (``V`` the model's output vocabulary): a token less likely than a
            uniform guess. The weights are recorded in `Selection.down_weighted`. `None` trusts every label
            (the paper).
        max_loss_quantile (`float` or `None`, defaults to `None`):
            An optional hard loss cap (the "small-loss" criterion of learning with noisy labels, Han et al.
            2018): among the rows above `min_loss`, those whose loss is above this quantile are never picked
            (the cap rises to the budget-th smallest unsolved loss when fewer rows would remain). A fixed
            quantile is a prior about the noise; on the quality suite it kept the almost-solved and the
            prior-consistent wrong rows and lost to a random draw (`docs/quality.md`), so it is off by default.
        seed (`int`, defaults to 42):
            Seeds the projection, stochastic greedy and the sampler's order. Global RNG is never touched.
        greedy (`"exact"`, `"stochastic"` or `"pooled"`, defaults to `"exact"`):
            The greedy regime: exact greedy over the whole pool, stochastic ("lazier than lazy") greedy,
            or the paper's stream of pools with per-pool picks.
        exact_search (`"lazy"` or `"incremental"`, defaults to `"lazy"`):
            How an exact greedy pick (`greedy="exact"`, and the distributed greedy over shards) finds the best
            row. `"lazy"` keeps a shortlist of the rows with the highest score bounds exact and certifies each
            pick against the bound of every other row (bounds refreshed in blocks by one matrix product);
            `"incremental"` rescores every row at every pick. Both make the same picks (tested pick for pick);
            lazy is several times faster on large pools (`bench/greedy.py`).
        stochastic_epsilon (`float`, defaults to 0.01):
            ε of stochastic greedy: each pick scores ``(n / k) log(1 / ε)`` random candidates.
        pool_size (`int`, defaults to 120):
            Candidates per pool when `greedy="pooled"` (paper: 120).
        picks_per_pool (`int`, defaults to 12):
            Picks per pool when `greedy="pooled"` (paper: 12).
        batch_size (`int`, defaults to 8):
            Examples per batched forward+backward when computing gradient features.
        max_length (`int` or `None`, defaults to `None`):
            Truncate candidates to this many tokens for the gradient pass. `None` keeps them whole.
        feature_store (`str` or `None`, defaults to `None`):
            A directory for an on-disk float16 store of gradient features, keyed by a fingerprint of the
            model, adapter weights, dataset and feature settings, and written chunk by chunk so that a
            crashed job resumes without recomputing finished chunks. `None` keeps features in memory only.
        threads (`int` or `None`, defaults to `None`):
            torch CPU threads while a selection round computes on the CPU (the gradient pass of a model on the
            CPU). `None`: as many as there are idle cores, measured when the pass starts and every 10 s, at
            most ``torch.get_num_threads()`` (on a busy shared machine more threads than idle cores made the
            pass 8-25× slower than one thread); an int uses exactly that many. The caller's setting is
            restored afterwards (`spice_trainer.core.threads`).
        reselect_every_steps (`int`, `tuple[int, ...]` or `None`, defaults to `None`):
            When to select again during training: every N optimizer steps, or at the listed steps.
            `None` selects once, before training.
        reselect_shortlist (`float` or `None`, defaults to `None`):
            Cheap reselection: a round after the first measures only this share of the pool again (at least
            the budget) — the rows already selected and those with the largest gradients when last measured —
            and runs the greedy on their fresh features (`spice_trainer.features.reselect`). It costs that share
            of a gradient pass; it is an approximation (a row outside the shortlist cannot be picked), whose
            agreement with a full round `bench/overhead.py` measures. `None` measures the whole pool every
            round. Applies to the live model's rounds (not to a proxy's).
        mode (`"grow"` or `"replace"`, defaults to `"replace"`):
            At a reselection, `"grow"` keeps the selected set and adds while the gain holds up;
            `"replace"` selects afresh from the whole pool.
        proxy_model (model, `str` or `None`, defaults to `None`):
            A smaller model of the same family (object or local path) whose gradients stand in for the
            target's. `None` uses the live model.
        proxy_refresh_every_pools (`int`, defaults to 10):
            T: the proxy's adapter takes a training step on the picks every T pools.
        proxy_learning_rate (`float`, defaults to 1e-4):
            Learning rate of the proxy adapter's refresh steps.
        proxy_device (`str` or `None`, defaults to `None`):
            Device for the proxy model. `None` follows the target model.
        write_reports (`bool`, defaults to `True`):
            Write ``output_dir/_spice/round-N.json`` and a plot of the gain curves after each round.
    """

    # --- budget and objective -------------------------------------------------------------
    budget: float | int = 0.1
    fisher_scale: float = 1.0
    conflict_weight: float = 0.1
    stop_rule: StopRule = "plateau"
    plateau_ratio: float = 0.2
    stop_ratio: float | None = None
    stop_on: StopOn = "score"

    # --- gradient features ---------------------------------------------------------------
    proj_dim: int = 256
    projection: ProjectionKind = "rademacher"
    feature_norm: FeatureNorm = "unit"
    min_loss: float | None = 0.1
    surprise_threshold: float | Literal["uniform"] | None = "uniform"
    max_loss_quantile: float | None = None
    batch_size: int = 8
    max_length: int | None = None
    feature_store: str | None = None
    threads: int | None = None

    # --- greedy regime -------------------------------------------------------------------
    seed: int = 42
    greedy: GreedyKind = "exact"
    exact_search: ExactSearch = "lazy"
    stochastic_epsilon: float = 0.01
    pool_size: int = 120
    picks_per_pool: int = 12

    # --- schedule during training --------------------------------------------------------
    reselect_every_steps: int | tuple[int, ...] | None = None
    reselect_shortlist: float | None = None
    mode: ModeKind = "replace"

    # --- proxy model ---------------------------------------------------------------------
    proxy_model: Any = None
    proxy_refresh_every_pools: int = 10
    proxy_learning_rate: float = 1e-4
    proxy_device: str | None = None

    # --- reporting -----------------------------------------------------------------------
    write_reports: bool = True

    def __post_init__(self) -> None:
        _check_budget(self.budget)
        _check_positive_float("fisher_scale", self.fisher_scale)
        _check_finite_float("conflict_weight", self.conflict_weight, minimum=0.0)
        _check_choice("stop_rule", self.stop_rule, ("plateau", "ratio", "none"))
        _check_finite_float("plateau_ratio", self.plateau_ratio, minimum=0.0)
        if not 0.0 < self.plateau_ratio < 1.0:
            raise ValueError(f"plateau_ratio must be in (0, 1), got {self.plateau_ratio!r}; 0.2 is the default")
        if self.stop_ratio is not None:
            _check_finite_float("stop_ratio", self.stop_ratio, minimum=0.0)
            if self.stop_ratio >= 1.0:
                raise ValueError(
                    f"stop_ratio must be in [0, 1) or None, got {self.stop_ratio!r}; use stop_rule='none' to "
                    "select the whole budget"
                )
        if self.stop_rule == "ratio" and self.stop_ratio is None:
            raise ValueError(
                "stop_rule='ratio' needs stop_ratio (ω), e.g. SpiceConfig(stop_rule='ratio', stop_ratio=0.5)"
            )
        if self.stop_rule != "ratio" and self.stop_ratio is not None:
            raise ValueError(
                f"stop_ratio={self.stop_ratio!r} is read only by stop_rule='ratio' (the paper's rule), but "
                f"stop_rule is {self.stop_rule!r}; pass stop_rule='ratio' with it, or drop stop_ratio"
            )
        _check_choice("stop_on", self.stop_on, ("gain", "score"))
        _check_positive_int("proj_dim", self.proj_dim)
        _check_choice("projection", self.projection, ("rademacher", "gaussian", "sparse", "kronecker"))
        _check_choice("feature_norm", self.feature_norm, ("none", "unit", "adam"))
        if self.min_loss is not None:
            _check_finite_float("min_loss", self.min_loss, minimum=0.0)
        if self.surprise_threshold is not None and self.surprise_threshold != "uniform":
            threshold = self.surprise_threshold
            if (
                isinstance(threshold, bool)
                or not isinstance(threshold, int | float)
                or not math.isfinite(threshold)
                or threshold <= 0
            ):
                raise ValueError(
                    f"surprise_threshold must be 'uniform', a number of nats > 0 or None, got {threshold!r}; "
                    "'uniform' uses log(vocabulary size)"
                )
        if self.max_loss_quantile is not None:
            _check_finite_float("max_loss_quantile", self.max_loss_quantile, minimum=0.0)
            if not 0.0 < self.max_loss_quantile <= 1.0:
                raise ValueError(
                    f"max_loss_quantile must be in (0, 1] or None, got {self.max_loss_quantile!r}; "
                    "e.g. 0.95 excludes the 5% highest-loss rows, None disables the guard"
                )
        _check_positive_int("batch_size", self.batch_size)
        if self.max_length is not None:
            _check_positive_int("max_length", self.max_length)
        if self.feature_store is not None and (not isinstance(self.feature_store, str) or not self.feature_store):
            raise TypeError(
                f"feature_store must be a directory path (a non-empty str) or None, got {self.feature_store!r}; "
                "pass str(path) for a pathlib.Path"
            )
        if self.threads is not None:
            _check_positive_int("threads", self.threads)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        _check_choice("greedy", self.greedy, ("exact", "stochastic", "pooled"))
        _check_choice("exact_search", self.exact_search, ("lazy", "incremental"))
        _check_finite_float("stochastic_epsilon", self.stochastic_epsilon, minimum=0.0)
        if not 0.0 < self.stochastic_epsilon < 1.0:
            raise ValueError(
                f"stochastic_epsilon must be in (0, 1), got {self.stochastic_epsilon!r}; 0.01 is a good default"
            )
        _check_positive_int("pool_size", self.pool_size)
        _check_positive_int("picks_per_pool", self.picks_per_pool)
        if self.picks_per_pool > self.pool_size:
            raise ValueError(
                f"picks_per_pool ({self.picks_per_pool}) must not exceed pool_size ({self.pool_size}); "
                "lower picks_per_pool or raise pool_size"
            )
        _check_schedule(self.reselect_every_steps)
        if self.reselect_shortlist is not None:
            _check_finite_float("reselect_shortlist", self.reselect_shortlist, minimum=0.0)
            if not 0.0 < self.reselect_shortlist <= 1.0:
                raise ValueError(
                    f"reselect_shortlist must be a share of the pool in (0, 1] or None, got "
                    f"{self.reselect_shortlist!r}; e.g. 0.25 measures a quarter of the pool at each reselection"
                )
        _check_choice("mode", self.mode, ("grow", "replace"))
        _check_proxy_model(self.proxy_model)
        _check_positive_int("proxy_refresh_every_pools", self.proxy_refresh_every_pools)
        _check_positive_float("proxy_learning_rate", self.proxy_learning_rate)
        if self.proxy_device is not None and not isinstance(self.proxy_device, str):
            raise TypeError(f"proxy_device must be a device string such as 'cuda:1' or None, got {self.proxy_device!r}")
        if not isinstance(self.write_reports, bool):
            raise TypeError(f"write_reports must be a bool, got {self.write_reports!r}")

    # ------------------------------------------------------------------------------------
    @classmethod
    def paper(cls, **overrides: Any) -> SpiceConfig:
        """The paper-exact preset: raw gradients, α = 1, λ = 0.1, the ω = 0.5 rule on the gain, no guard.

        Any field can still be overridden, e.g. ``SpiceConfig.paper(budget=0.05)``.
        """
        preset: dict[str, Any] = {
            "fisher_scale": 1.0,
            "conflict_weight": 0.1,
            "stop_rule": "ratio",
            "stop_ratio": 0.5,
            "stop_on": "gain",
            "feature_norm": "none",
            "min_loss": None,
            "surprise_threshold": None,
            "max_loss_quantile": None,
        }
        preset.update(overrides)
        return cls(**preset)

    def budget_count(self, n: int) -> int:
        """The selection budget in examples for a pool of ``n`` candidates (at least 1, at most ``n``).

        Raises:
            ValueError: if ``n`` is 0, or an integer budget exceeds ``n``.
        """
        if n <= 0:
            raise ValueError("cannot select from an empty pool: the dataset or feature matrix has 0 rows")
        if isinstance(self.budget, int):
            if self.budget > n:
                raise ValueError(
                    f"budget={self.budget} exceeds the pool size n={n}; pass a count <= {n} "
                    "or a fraction such as budget=0.1"
                )
            return self.budget
        return max(1, min(n, math.ceil(self.budget * n)))

    def with_changes(self, **changes: Any) -> SpiceConfig:
        """A copy with some fields changed (validated like a new config)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-friendly values (a proxy model object is shown by its class name)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "proxy_model" and value is not None and not isinstance(value, str):
                value = f"<{type(value).__name__}>"
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


# --- validation helpers ------------------------------------------------------------------------


def _check_budget(budget: Any) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise TypeError(f"budget must be a fraction in (0, 1] or a count >= 1, got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget must be a fraction in (0, 1] or a count >= 1, got {budget!r}")
        return
    if not math.isfinite(budget) or not 0.0 < budget <= 1.0:
        raise ValueError(
            f"budget must be a fraction in (0, 1] or a count >= 1, got {budget!r}; "
            "pass an int (e.g. budget=500) for an absolute count"
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_finite_float(name: str, value: Any, *, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_positive_float(name: str, value: Any) -> None:
    _check_finite_float(name, value, minimum=0.0)
    if value == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_proxy_model(proxy: Any) -> None:
    if proxy is None or isinstance(proxy, str | os.PathLike):
        return
    from torch import nn

    # A torch module, or a built `spice_trainer.proxy.model.ProxyModel` (which holds one in ``.model``).
    if isinstance(proxy, nn.Module) or isinstance(getattr(proxy, "model", None), nn.Module):
        return
    raise TypeError(
        f"proxy_model must be a model object, a local path or hub id (str), a ProxyModel or None, "
        f"got {type(proxy).__name__}"
    )


def _check_schedule(schedule: Any) -> None:
    if schedule is None:
        return
    if isinstance(schedule, bool):
        raise TypeError(f"reselect_every_steps must be an int, a tuple of ints or None, got {schedule!r}")
    if isinstance(schedule, int):
        _check_positive_int("reselect_every_steps", schedule)
        return
    if isinstance(schedule, list):
        raise TypeError(
            f"reselect_every_steps must be a tuple (the config is frozen), got the list {schedule!r}; "
            f"pass tuple({schedule!r})"
        )
    if not isinstance(schedule, tuple) or not schedule:
        raise TypeError(f"reselect_every_steps must be an int, a non-empty tuple of ints or None, got {schedule!r}")
    for step in schedule:
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"reselect_every_steps entries must be optimizer steps >= 1, got {step!r} in {schedule!r}")
    if list(schedule) != sorted(set(schedule)):
        raise ValueError(
            f"reselect_every_steps must be strictly increasing without repeats, got {schedule!r}; "
            f"pass {tuple(sorted(set(schedule)))!r}"
        )
