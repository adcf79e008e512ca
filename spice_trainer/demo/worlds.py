"""A suite of structurally different synthetic instruction worlds for the quality benchmark.

`spice_trainer.demo.world` is one world (the demo's). This module describes worlds by a `WorldSpec` whose
fields are the axes a data selector can fail on, and names nine of them (`WORLDS`):

==============  ==============================================================================================
world           what varies (everything else as in ``base``)
==============  ==============================================================================================
``base``        today's world: noise the base model finds surprising, fully solved redundancy, balanced tasks
``prior``       the base model is pretrained to follow a wrong rule on two tasks: pool rows labelled by that
                rule (and near-miss labels) have a *low* loss
``almost``      the base model nearly solves one task (pretraining saw its hard form with some label noise): a
                large block of correct rows of it have a loss just above 0.1 nats/token
``imbalance``   one task has 5x the rows of another
``lengths``     lists of 3-5 words: short rows are solved, long rows are new
``duplicates``  exact and near copies of clean and of noisy rows
``large-model`` a base model with hidden size 256 and 4 layers, mixed noise kinds
``large-pool``  a pool of 20,000 rows
``mixed``       every axis at once, at moderate strength
==============  ==============================================================================================

Every world has two scenarios, ``"curated"`` (about 8-10 % of the pool has a wrong label) and ``"noisy"``
(about 45-50 %), a pretrained tiny base model (`build_base_model`, cached on disk when asked), a clean
held-out test set per task and a small trusted *reference* set per task (clean rows, disjoint from the pool
and the test set, for methods that take a reference).

The tasks are those of `spice_trainer.demo.world` (``add`` mod 5, ``reverse``, ``sort``, ``wrap``, plus
``copy`` in pretraining only) over 12 words. Each pool row carries a hidden *kind* and a finer *detail*:

================  ================  ===========================================================================
kind              detail            the row
================  ================  ===========================================================================
``clean``         ``clean``         a correct hard row the base model does not solve
``solved``        ``solved``        an easy row the base model already solves (fully redundant)
``almost``        ``almost``        a correct hard row of the task the base model nearly solves
``surprising``    ``mislabeled``    a hard prompt with a random wrong answer (high loss)
``surprising``    ``other-rule``    a consistent other rule the base model never saw (subtraction, copy, ...)
``surprising``    ``junk``          random tokens in the prompt and the completion
``prior``         ``prior-rule``    the wrong rule the base model was *pretrained* to follow for that task
``prior``         ``near-miss``     a ``reverse`` answer with its last two items swapped (a plausible slip)
``duplicate``     ``exact-copy``    a copy of another pool row (clean or noisy)
``duplicate``     ``near-copy``     that row with one argument changed, relabelled by the same rule
================  ================  ===========================================================================

``add`` has only 20 hard prompts (``a + b`` mod 5, ``b >= 1``): it is a lookup task, and its test, reference
and pool rows share prompts. For the list tasks the hard prompt space is split by a seeded hash into a test
part (20 %), a reference part (5 %) and a pool part (75 %), so test and reference rows never occur in a
pool or in pretraining.

Randomness flows only through local ``torch.Generator`` objects seeded from ``seed``. Imports torch at module
level, transformers/peft (through `spice_trainer.demo.toy`) on use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from spice_trainer.demo import world as demo_world

# The tasks, their rules and the symbols are the demo world's (one home: `spice_trainer.demo.world`).
from spice_trainer.demo.world import (
    DIGITS,
    EASY_ONLY_TASKS,
    MODULUS,
    SYMBOLS,
    TASKS,
    answer,
    other_rule_answer,
    wrapped,
)

logger = logging.getLogger(__name__)

LIST_TASKS: tuple[str, ...] = ("reverse", "sort", "wrap")
# Near-miss rows are plausible slips: ``reverse`` with its last two items swapped costs the base models about
# the loss of a correct row (they half-copy the input); a swapped ``sort`` is as surprising as a random order.
NEAR_MISS_TASKS: tuple[str, ...] = ("reverse",)
WORDS: tuple[str, ...] = ("ant", "bee", "cat", "dog", "elk", "fox", "gnu", "hen", "ibis", "jay", "kit", "owl")

KINDS: tuple[str, ...] = ("clean", "solved", "almost", "surprising", "prior", "duplicate")
DETAIL_KIND: dict[str, str] = {
    "clean": "clean",
    "solved": "solved",
    "almost": "almost",
    "mislabeled": "surprising",
    "other-rule": "surprising",
    "junk": "surprising",
    "prior-rule": "prior",
    "near-miss": "prior",
    "exact-copy": "duplicate",
    "near-copy": "duplicate",
}
DETAILS: tuple[str, ...] = tuple(DETAIL_KIND)
WRONG_DETAILS: frozenset[str] = frozenset({"mislabeled", "other-rule", "junk", "prior-rule", "near-miss"})
SCENARIO_NAMES: tuple[str, ...] = ("curated", "noisy")

# Where a hard list prompt lives, by a seeded hash of its text: [0, 20) test, [20, 25) reference, else pool.
_TEST_PERCENT = 20
_REFERENCE_PERCENT = 5
# Bump when what a cached base model depends on changes in code (the corpus generator, the pretraining loop).
_CACHE_VERSION = 1


def vocabulary() -> list[str]:
    """Every word a row of any world can contain (the tokenizer's vocabulary, special tokens aside)."""
    return [*TASKS, *EASY_ONLY_TASKS, *DIGITS, *WORDS, *SYMBOLS]


Mix = tuple[tuple[str, float], ...]


def mix(**shares: float) -> Mix:
    """A scenario mix from ``detail=share`` keywords (``-`` in a detail written as ``_``)."""
    return tuple((name.replace("_", "-"), float(share)) for name, share in shares.items())


# --- the spec -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WorldSpec:
    """One world: its base model, its rows and its two pool scenarios. Every field is an axis.

    Args:
        name: the world's name (`WORLDS` key).
        description: one line saying what the world varies.
        hidden_size: the base model's hidden size (a Llama with 4 heads, MLP 4x hidden).
        num_layers: the base model's layers.
        pretrain_rows: rows of the pretraining corpus.
        pretrain_epochs: passes over the corpus (all weights trained, AdamW lr ``pretrain_learning_rate``).
        pretrain_learning_rate: pretraining learning rate.
        pretrain_hard_share: share of the corpus that is clean hard rows of every task (the base model then
            solves part of the hard forms, and finds a wrong answer more surprising than a right one).
        prior_tasks: tasks whose hard form the base model is pretrained to answer with the *other* rule.
        prior_pretrain_share: share of the corpus per prior task: hard rows answered by the other rule with
            probability ``prior_rule_share``, correctly otherwise.
        prior_rule_share: see ``prior_pretrain_share``; below 1 so that prior rows stay above a 0.1 loss floor.
        almost_task: the task the base model nearly solves (`None`: no such task).
        almost_pretrain_share: share of the corpus that is hard rows of ``almost_task``, each mislabelled with
            probability ``almost_pretrain_noise`` (so the base model's confidence stays below 1).
        almost_pretrain_noise: see ``almost_pretrain_share``.
        easy_lengths: list lengths of the easy (solved) rows of the list tasks.
        hard_lengths: list lengths of the hard rows (what fine-tuning should teach).
        task_weights: relative number of rows per task of `TASKS` for clean and noisy rows (solved rows are
            uniform over the tasks and ``copy``).
        pool_size: rows per candidate pool.
        curated: the curated scenario's mix: ``(detail, share)`` pairs summing to 1.
        noisy: the noisy scenario's mix.
        duplicate_noise_fraction: share of the copies (``exact-copy``/``near-copy``) whose source row is noisy.
        copies_per_source: copies made of each duplicated source row.
        test_rows_per_task: held-out clean rows per task.
        reference_rows_per_task: trusted reference rows per task.
        epochs: fine-tuning epochs over a method's rows in the benchmark.
    """

    name: str
    description: str = ""
    # --- the base model ------------------------------------------------------------------
    hidden_size: int = 64
    num_layers: int = 2
    pretrain_rows: int = 3000
    pretrain_epochs: float = 6.0
    pretrain_learning_rate: float = 3e-3
    pretrain_hard_share: float = 0.03
    prior_tasks: tuple[str, ...] = ()
    prior_pretrain_share: float = 0.0
    prior_rule_share: float = 0.7
    almost_task: str | None = None
    almost_pretrain_share: float = 0.0
    almost_pretrain_noise: float = 0.3
    # --- rows ----------------------------------------------------------------------------
    easy_lengths: tuple[int, ...] = (1, 2)
    hard_lengths: tuple[int, ...] = (3,)
    task_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    # --- pools ---------------------------------------------------------------------------
    pool_size: int = 1000
    curated: Mix = ()
    noisy: Mix = ()
    duplicate_noise_fraction: float = 0.5
    copies_per_source: int = 3
    # --- evaluation ----------------------------------------------------------------------
    test_rows_per_task: int = 100
    reference_rows_per_task: int = 16
    epochs: float = 20.0

    def __post_init__(self) -> None:
        for task in self.prior_tasks:
            if task not in TASKS:
                raise ValueError(f"prior_tasks must hold tasks of {TASKS!r}, got {task!r}")
        if self.almost_task is not None and (self.almost_task not in TASKS or self.almost_task in self.prior_tasks):
            raise ValueError(
                f"almost_task must be a task of {TASKS!r} that is not a prior task, got {self.almost_task!r}"
            )
        if len(self.task_weights) != len(TASKS) or min(self.task_weights) <= 0:
            raise ValueError(
                f"task_weights must be {len(TASKS)} positive numbers (one per task), got {self.task_weights!r}"
            )
        if min(self.hard_lengths) < 3 or max(self.hard_lengths) > len(WORDS):
            raise ValueError(f"hard_lengths must lie in [3, {len(WORDS)}], got {self.hard_lengths!r}")
        if set(self.easy_lengths) & set(self.hard_lengths) or min(self.easy_lengths) < 1:
            raise ValueError(f"easy_lengths must be >= 1 and apart from hard_lengths, got {self.easy_lengths!r}")
        for scenario in SCENARIO_NAMES:
            shares = dict(getattr(self, scenario))
            unknown = set(shares) - set(DETAILS)
            if unknown:
                raise ValueError(f"{scenario}: unknown details {sorted(unknown)}; known: {DETAILS!r}")
            if abs(sum(shares.values()) - 1.0) > 1e-9 or min(shares.values()) < 0:
                raise ValueError(f"{scenario}: the shares must be >= 0 and sum to 1, got {shares!r}")
            if shares.get("almost", 0) > 0 and self.almost_task is None:
                raise ValueError(f"{scenario}: 'almost' rows need an almost_task")
            if shares.get("prior-rule", 0) > 0 and not self.prior_tasks:
                raise ValueError(f"{scenario}: 'prior-rule' rows need prior_tasks")
        if not 0.0 <= self.duplicate_noise_fraction <= 1.0:
            raise ValueError(f"duplicate_noise_fraction must be in [0, 1], got {self.duplicate_noise_fraction!r}")
        if self.copies_per_source < 1:
            raise ValueError(f"copies_per_source must be >= 1, got {self.copies_per_source!r}")

    def scenario(self, name: str) -> dict[str, float]:
        """The ``detail -> share`` mix of scenario ``name`` (``"curated"`` or ``"noisy"``)."""
        if name not in SCENARIO_NAMES:
            raise ValueError(f"scenario must be one of {SCENARIO_NAMES!r}, got {name!r}")
        return dict(getattr(self, name))

    def with_changes(self, **changes: Any) -> WorldSpec:
        """A copy with some fields changed (e.g. a smaller ``pool_size`` for a quick run)."""
        return replace(self, **changes)

    def model_key(self, seed: int) -> str:
        """A hash of everything the base model depends on (the cache key): the pretraining fields and seed."""
        fields_ = {
            k: v
            for k, v in asdict(self).items()
            if k.startswith("pretrain_")
            or k.startswith("prior_")
            or k.startswith("almost_")
            or k in ("hidden_size", "num_layers", "easy_lengths", "hard_lengths")
        }
        text = json.dumps({"spec": fields_, "seed": seed, "version": _CACHE_VERSION, "words": WORDS}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# The base world's mixes (today's world: clean 12 %, most of the rest solved; the noise is surprising).
_BASE_CURATED = mix(clean=0.12, solved=0.80, mislabeled=0.04, other_rule=0.02, junk=0.02)
_BASE_NOISY = mix(clean=0.12, solved=0.38, mislabeled=0.22, other_rule=0.08, junk=0.20)
# Mixed noise kinds: half surprising, half agreeing with the base model's prior.
_PRIOR_CURATED = mix(clean=0.12, solved=0.79, mislabeled=0.02, junk=0.01, prior_rule=0.04, near_miss=0.02)
_PRIOR_NOISY = mix(
    clean=0.12, solved=0.40, mislabeled=0.10, junk=0.06, other_rule=0.02, prior_rule=0.20, near_miss=0.10
)

WORLDS: dict[str, WorldSpec] = {
    spec.name: spec
    for spec in (
        WorldSpec(
            name="base",
            description="surprising noise, fully solved redundancy, balanced tasks (the demo's world)",
            curated=_BASE_CURATED,
            noisy=_BASE_NOISY,
        ),
        WorldSpec(
            name="prior",
            description=(
                "the base model follows a wrong rule on add and wrap: rows with it (and near misses) have a low loss"
            ),
            prior_tasks=("add", "wrap"),
            prior_pretrain_share=0.12,
            curated=_PRIOR_CURATED,
            noisy=_PRIOR_NOISY,
        ),
        WorldSpec(
            name="almost",
            description="the base model nearly solves add: many correct add rows just above a 0.1 loss floor",
            almost_task="add",
            almost_pretrain_share=0.10,
            curated=mix(clean=0.12, almost=0.35, solved=0.45, mislabeled=0.04, other_rule=0.02, junk=0.02),
            noisy=mix(clean=0.12, almost=0.25, solved=0.15, mislabeled=0.22, other_rule=0.06, junk=0.20),
        ),
        WorldSpec(
            name="imbalance",
            description="reverse has 5x the clean and noisy rows of add and wrap (sort 2x)",
            task_weights=(1.0, 5.0, 2.0, 1.0),
            curated=_BASE_CURATED,
            noisy=_BASE_NOISY,
        ),
        WorldSpec(
            name="lengths",
            description="lists of 3-5 words to learn; the solved rows are the short ones",
            hard_lengths=(3, 4, 5),
            curated=_BASE_CURATED,
            noisy=_BASE_NOISY,
        ),
        WorldSpec(
            name="duplicates",
            description="a fifth of the pool is exact or near copies, of clean and of noisy rows",
            duplicate_noise_fraction=0.3,
            curated=mix(
                clean=0.10,
                solved=0.655,
                mislabeled=0.015,
                other_rule=0.005,
                junk=0.005,
                exact_copy=0.12,
                near_copy=0.10,
            ),
            noisy=mix(
                clean=0.10, solved=0.28, mislabeled=0.16, other_rule=0.06, junk=0.16, exact_copy=0.12, near_copy=0.12
            ),
        ),
        WorldSpec(
            name="large-model",
            description="a base model of hidden size 256 and 4 layers; mixed noise kinds",
            hidden_size=256,
            num_layers=4,
            pretrain_learning_rate=1e-3,
            prior_tasks=("wrap",),
            prior_pretrain_share=0.12,
            pool_size=500,
            curated=_PRIOR_CURATED,
            noisy=_PRIOR_NOISY,
        ),
        WorldSpec(
            name="large-pool",
            description="a pool of 20,000 rows",
            pool_size=20_000,
            epochs=5.0,
            curated=_BASE_CURATED,
            noisy=_BASE_NOISY,
        ),
        WorldSpec(
            name="mixed",
            description="every axis at once, at moderate strength",
            prior_tasks=("wrap",),
            prior_pretrain_share=0.12,
            almost_task="add",
            almost_pretrain_share=0.10,
            hard_lengths=(3, 4),
            task_weights=(1.0, 3.0, 1.0, 2.0),
            duplicate_noise_fraction=0.4,
            curated=mix(
                clean=0.12,
                almost=0.15,
                solved=0.58,
                mislabeled=0.02,
                junk=0.01,
                prior_rule=0.02,
                near_miss=0.02,
                exact_copy=0.04,
                near_copy=0.04,
            ),
            noisy=mix(
                clean=0.12,
                almost=0.10,
                solved=0.22,
                mislabeled=0.12,
                junk=0.08,
                other_rule=0.02,
                prior_rule=0.12,
                near_miss=0.08,
                exact_copy=0.07,
                near_copy=0.07,
            ),
        ),
    )
}
# Declared before any tuning (docs/quality.md): defaults are chosen on these worlds, the rest are held out.
SELECTION_WORLDS: tuple[str, ...] = ("base", "prior", "almost")
HELD_OUT_WORLDS: tuple[str, ...] = ("imbalance", "lengths", "duplicates", "large-model", "large-pool", "mixed")


def get_spec(world: str | WorldSpec) -> WorldSpec:
    """The `WorldSpec` of a world name (or the spec itself)."""
    if isinstance(world, WorldSpec):
        return world
    if world not in WORLDS:
        raise ValueError(f"world must be one of {tuple(WORLDS)!r}, got {world!r}")
    return WORLDS[world]


# --- rows -----------------------------------------------------------------------------------------


def _randint(gen: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (1,), generator=gen).item())


def _choice(gen: torch.Generator, options: Sequence[Any]) -> Any:
    return options[_randint(gen, len(options))]


def _weighted_choice(gen: torch.Generator, options: Sequence[str], weights: Sequence[float]) -> str:
    probs = torch.tensor(list(weights), dtype=torch.float64)
    return options[int(torch.multinomial(probs, 1, generator=gen).item())]


def near_miss_answer(task: str, args: Sequence[str]) -> list[str]:
    """The correct list with its last two items swapped (list tasks only)."""
    if task not in LIST_TASKS:
        raise ValueError(f"near-miss labels exist for the list tasks {LIST_TASKS!r}, got {task!r}")
    items = answer("reverse" if task == "reverse" else "sort" if task == "sort" else "copy", args)
    items[-1], items[-2] = items[-2], items[-1]
    return wrapped(items) if task == "wrap" else items


def mislabeled_answer(task: str, args: Sequence[str], gen: torch.Generator) -> list[str]:
    """A random wrong answer that is neither the correct one, the other rule's nor the near miss.

    ``add``: another digit. List tasks: a random order of the arguments, or (when every order is taken,
    which cannot happen for lists of 3 or more) random words.
    """
    taken = [answer(task, args), other_rule_answer(task, args)]
    if task == "add":
        options = [d for d in DIGITS if [d] not in taken]
        return [_choice(gen, options)]
    taken.append(near_miss_answer(task, args))
    for _ in range(64):
        order = torch.randperm(len(args), generator=gen).tolist()
        shuffled = [args[i] for i in order]
        candidate = wrapped(shuffled) if task == "wrap" else shuffled
        if candidate not in taken:
            return candidate
    words = [_choice(gen, WORDS) for _ in args]
    return wrapped(words) if task == "wrap" else words


def _part(task: str, args: Sequence[str], seed: int) -> str:
    """``"test"``, ``"reference"`` or ``"pool"``: where a hard prompt lives (``add``: everywhere, ``"any"``)."""
    if task == "add":
        return "any"
    bucket = zlib.crc32(f"{seed}|{task}|{' '.join(args)}".encode()) % 100
    if bucket < _TEST_PERCENT:
        return "test"
    if bucket < _TEST_PERCENT + _REFERENCE_PERCENT:
        return "reference"
    return "pool"


def prompt_part(row: Mapping[str, str], seed: int) -> str:
    """Where the prompt of ``row`` lives for a world of this ``seed`` (see `_part`); ``"easy"`` for rows
    that are not hard rows of a task (easy rows, ``copy``, junk)."""
    words = row["prompt"].split()
    task, args = words[0], words[1:-1]
    if task not in TASKS or len(words) < 3 or words[-1] != "=":
        return "easy"
    if task == "add":
        return "any" if args[1] != "0" else "easy"
    return _part(task, args, seed) if len(args) >= 3 else "easy"


def _hard_args(task: str, spec: WorldSpec, gen: torch.Generator, seed: int, part: str) -> list[str]:
    """Arguments of a hard prompt of ``task`` whose prompt lives in ``part`` (rejection sampling)."""
    for _ in range(10_000):
        if task == "add":
            args = [str(_randint(gen, MODULUS)), str(1 + _randint(gen, MODULUS - 1))]
        else:
            length = _choice(gen, spec.hard_lengths)
            args = [WORDS[i] for i in torch.randperm(len(WORDS), generator=gen)[:length].tolist()]
        if _part(task, args, seed) in (part, "any"):
            return args
    raise RuntimeError(f"no hard {task} prompt found in part {part!r}")  # pragma: no cover - 20 % of 1320+


def _easy_row(task: str, spec: WorldSpec, gen: torch.Generator) -> dict[str, str]:
    if task == "add":
        args = [str(_randint(gen, MODULUS)), "0"]
    else:
        lengths = (*spec.easy_lengths, *spec.hard_lengths) if task == "copy" else spec.easy_lengths
        length = _choice(gen, lengths)
        args = [WORDS[i] for i in torch.randperm(len(WORDS), generator=gen)[:length].tolist()]
    return _row(task, args, answer(task, args))


def _row(task: str, args: Sequence[str], completion: Sequence[str]) -> dict[str, str]:
    return {"prompt": " ".join([task, *args, "="]), "completion": " " + " ".join(completion)}


def _junk_row(gen: torch.Generator) -> dict[str, str]:
    tokens = vocabulary()
    prompt = [_choice(gen, tokens) for _ in range(2 + _randint(gen, 5))]
    completion = [_choice(gen, tokens) for _ in range(1 + _randint(gen, 6))]
    return {"prompt": " ".join([*prompt, "="]), "completion": " " + " ".join(completion)}


def labelled_row(task: str, detail: str, args: Sequence[str], gen: torch.Generator) -> dict[str, str]:
    """The row of ``task`` on ``args`` labelled as ``detail`` says (a hard-row detail)."""
    if detail in ("clean", "almost"):
        return _row(task, args, answer(task, args))
    if detail in ("other-rule", "prior-rule"):
        return _row(task, args, other_rule_answer(task, args))
    if detail == "near-miss":
        return _row(task, args, near_miss_answer(task, args))
    if detail == "mislabeled":
        return _row(task, args, mislabeled_answer(task, args, gen))
    raise ValueError(f"{detail!r} is not a labelled hard-row detail")


def _tasks_for(detail: str, spec: WorldSpec) -> tuple[list[str], list[float]]:
    """The tasks a row of ``detail`` may have, and their weights."""
    weights = dict(zip(TASKS, spec.task_weights, strict=True))
    if detail == "almost":
        allowed = [spec.almost_task] if spec.almost_task else []
    elif detail == "prior-rule":
        allowed = list(spec.prior_tasks)
    elif detail == "near-miss":
        allowed = list(NEAR_MISS_TASKS)
    elif detail == "other-rule":
        allowed = [t for t in TASKS if t not in spec.prior_tasks and t != spec.almost_task]
    elif detail == "clean":
        allowed = [t for t in TASKS if t != spec.almost_task]
    else:  # mislabeled: any task
        allowed = list(TASKS)
    return allowed, [weights[t] for t in allowed]


# --- pools ----------------------------------------------------------------------------------------


@dataclass
class WorldPool:
    """A candidate pool with its hidden labels.

    Attributes:
        rows: ``{"prompt", "completion"}`` dicts — all a model or a selector ever sees.
        tasks: the task of each row (``"copy"`` for solved copy rows, ``"junk"`` for junk).
        details: the detail of each row (`DETAILS`); `kinds` derives from it.
        sources: for ``exact-copy``/``near-copy`` rows the index of the row copied, else -1.
        wrong: whether the row's completion is a wrong answer (noise, including copies of noise).
    """

    rows: list[dict[str, str]] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    wrong: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kinds(self) -> list[str]:
        """The kind of each row (`KINDS`)."""
        return [DETAIL_KIND[d] for d in self.details]

    def kind_shares(self, indices: Sequence[int] | None = None) -> dict[str, float]:
        """Share of each kind among ``indices`` (default: the whole pool), plus ``"noise"`` (wrong labels)
        and ``"dup-noise"`` (copies of noisy rows)."""
        picked = list(range(len(self)) if indices is None else indices)
        total = max(1, len(picked))
        counter = Counter(DETAIL_KIND[self.details[i]] for i in picked)
        out = {kind: counter.get(kind, 0) / total for kind in KINDS}
        out["noise"] = sum(self.wrong[i] for i in picked) / total
        out["dup-noise"] = sum(self.wrong[i] and self.sources[i] >= 0 for i in picked) / total
        return out

    def detail_shares(self, indices: Sequence[int] | None = None) -> dict[str, float]:
        """Share of each detail among ``indices`` (default: the whole pool)."""
        picked = list(range(len(self)) if indices is None else indices)
        counter = Counter(self.details[i] for i in picked)
        return {d: counter.get(d, 0) / max(1, len(picked)) for d in DETAILS}

    def indices_of(self, *kinds: str) -> list[int]:
        """Rows whose kind is one of ``kinds``."""
        return [i for i, d in enumerate(self.details) if DETAIL_KIND[d] in kinds]


def make_pool(world: str | WorldSpec, scenario: str, seed: int = 0, *, pool_size: int | None = None) -> WorldPool:
    """The candidate pool of ``world`` in ``scenario`` for ``seed`` (``pool_size`` overrides the spec's).

    Each detail gets ``round(share · n)`` rows (the remainder goes to ``clean``), in shuffled order. Copies
    (``exact-copy``/``near-copy``) copy rows drawn from the rest of the pool: a ``duplicate_noise_fraction`` of
    the sources is noisy, the rest clean (or almost-solved), ``copies_per_source`` copies each.
    """
    spec = get_spec(world)
    n = pool_size or spec.pool_size
    if n < 1:
        raise ValueError(f"pool_size must be >= 1, got {n!r}")
    shares = spec.scenario(scenario)
    counts = {d: round(shares.get(d, 0.0) * n) for d in DETAILS if d != "clean"}
    counts["clean"] = n - sum(counts.values())
    gen = torch.Generator(device="cpu").manual_seed(seed * 7919 + zlib.crc32(f"{spec.name}|{scenario}".encode()))
    pool = WorldPool()
    for detail in DETAILS:
        if detail in ("exact-copy", "near-copy"):
            continue
        for _ in range(counts[detail]):
            row, task = _draw_row(detail, spec, gen, seed)
            pool.rows.append(row)
            pool.tasks.append(task)
            pool.details.append(detail)
            pool.sources.append(-1)
            pool.wrong.append(detail in WRONG_DETAILS)
    _add_copies(pool, spec, counts["exact-copy"], counts["near-copy"], gen, seed)
    order = torch.randperm(len(pool), generator=gen).tolist()
    position = {old: new for new, old in enumerate(order)}
    return WorldPool(
        rows=[pool.rows[i] for i in order],
        tasks=[pool.tasks[i] for i in order],
        details=[pool.details[i] for i in order],
        sources=[position[pool.sources[i]] if pool.sources[i] >= 0 else -1 for i in order],
        wrong=[pool.wrong[i] for i in order],
    )


def _draw_row(detail: str, spec: WorldSpec, gen: torch.Generator, seed: int) -> tuple[dict[str, str], str]:
    if detail == "junk":
        return _junk_row(gen), "junk"
    if detail == "solved":
        task = _choice(gen, (*TASKS, *EASY_ONLY_TASKS))
        return _easy_row(task, spec, gen), task
    tasks, weights = _tasks_for(detail, spec)
    task = _weighted_choice(gen, tasks, weights)
    args = _hard_args(task, spec, gen, seed, "pool")
    return labelled_row(task, detail, args, gen), task


def _add_copies(pool: WorldPool, spec: WorldSpec, n_exact: int, n_near: int, gen: torch.Generator, seed: int) -> None:
    total = n_exact + n_near
    if total == 0:
        return
    noisy = [i for i, d in enumerate(pool.details) if d in WRONG_DETAILS]
    good = [i for i, d in enumerate(pool.details) if d in ("clean", "almost")]
    n_sources = math.ceil(total / spec.copies_per_source)
    n_noisy = min(len(noisy), round(spec.duplicate_noise_fraction * n_sources))
    n_good = min(len(good), n_sources - n_noisy)
    sources = [noisy[i] for i in torch.randperm(len(noisy), generator=gen)[:n_noisy].tolist()]
    sources += [good[i] for i in torch.randperm(len(good), generator=gen)[:n_good].tolist()]
    if not sources:
        raise ValueError(f"world {spec.name!r}: copies need clean or noisy rows to copy")
    kinds = ["exact-copy"] * n_exact + ["near-copy"] * n_near
    for j, detail in enumerate(kinds):
        source = sources[j % len(sources)]
        row = dict(pool.rows[source])
        if detail == "near-copy":
            row = _near_copy(pool.tasks[source], pool.details[source], row, spec, gen, seed)
        pool.rows.append(row)
        pool.tasks.append(pool.tasks[source])
        pool.details.append(detail)
        pool.sources.append(source)
        pool.wrong.append(pool.wrong[source])


def _near_copy(
    task: str, detail: str, row: dict[str, str], spec: WorldSpec, gen: torch.Generator, seed: int
) -> dict[str, str]:
    """``row`` with one argument changed and relabelled by the same rule (a junk row: one prompt token)."""
    if task == "junk":
        words = row["prompt"].split()
        words[_randint(gen, len(words) - 1)] = _choice(gen, vocabulary())
        return {"prompt": " ".join(words), "completion": row["completion"]}
    args = row["prompt"].split()[1:-1]
    for _ in range(64):
        changed = list(args)
        position = _randint(gen, len(args))
        if task == "add":
            changed[position] = str(_randint(gen, MODULUS)) if position == 0 else str(1 + _randint(gen, MODULUS - 1))
        else:
            changed[position] = _choice(gen, [w for w in WORDS if w not in args])
        if changed != args and _part(task, changed, seed) in ("pool", "any"):
            return labelled_row(task, "clean" if detail == "almost" else detail, changed, gen)
    return row  # no neighbour in the pool part: an exact copy


# --- test, reference and pretraining rows ---------------------------------------------------------


def heldout_set(
    world: str | WorldSpec, seed: int = 0, *, n_per_task: int | None = None
) -> dict[str, list[dict[str, str]]]:
    """Clean hard rows per task for exact-match evaluation, from the test part of the prompt space."""
    spec = get_spec(world)
    return _clean_rows(spec, seed, n_per_task or spec.test_rows_per_task, "test", offset=1_000_003)


def reference_set(
    world: str | WorldSpec, seed: int = 0, *, n_per_task: int | None = None
) -> dict[str, list[dict[str, str]]]:
    """A small trusted set: clean hard rows per task from the reference part (disjoint from pool and test)."""
    spec = get_spec(world)
    return _clean_rows(spec, seed, n_per_task or spec.reference_rows_per_task, "reference", offset=2_000_003)


def _clean_rows(spec: WorldSpec, seed: int, n: int, part: str, *, offset: int) -> dict[str, list[dict[str, str]]]:
    gen = torch.Generator(device="cpu").manual_seed(offset + seed)
    return {
        task: [_row(task, a, answer(task, a)) for a in (_hard_args(task, spec, gen, seed, part) for _ in range(n))]
        for task in TASKS
    }


def pretraining_corpus(world: str | WorldSpec, seed: int = 0) -> list[dict[str, str]]:
    """The base model's pretraining rows: easy rows of every task (``copy`` at every length), a
    ``pretrain_hard_share`` of clean hard rows, the prior tasks' hard rows (mostly by the other rule) and
    the almost task's hard rows (some mislabelled). Hard prompts come from the pool part only."""
    spec = get_spec(world)
    gen = torch.Generator(device="cpu").manual_seed(3_000_017 + seed)
    n = spec.pretrain_rows
    rows: list[dict[str, str]] = []
    for _ in range(round(spec.pretrain_hard_share * n)):
        task = _choice(gen, TASKS)
        rows.append(labelled_row(task, "clean", _hard_args(task, spec, gen, seed, "pool"), gen))
    for task in spec.prior_tasks:
        for _ in range(round(spec.prior_pretrain_share * n)):
            args = _hard_args(task, spec, gen, seed, "pool")
            prior = float(torch.rand((), generator=gen)) < spec.prior_rule_share
            rows.append(labelled_row(task, "prior-rule" if prior else "clean", args, gen))
    if spec.almost_task is not None:
        for _ in range(round(spec.almost_pretrain_share * n)):
            args = _hard_args(spec.almost_task, spec, gen, seed, "pool")
            wrong = float(torch.rand((), generator=gen)) < spec.almost_pretrain_noise
            rows.append(labelled_row(spec.almost_task, "mislabeled" if wrong else "clean", args, gen))
    while len(rows) < n:
        rows.append(_easy_row(_choice(gen, (*TASKS, *EASY_ONLY_TASKS)), spec, gen))
    order = torch.randperm(len(rows), generator=gen).tolist()
    return [rows[i] for i in order]


# --- the base model -------------------------------------------------------------------------------


def build_base_model(world: str | WorldSpec, seed: int = 0, *, cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """The tokenizer and the world's pretrained base model (no adapter, eval mode).

    With ``cache_dir`` the model is saved under ``cache_dir/base-<key>-seed<seed>/`` (``key`` hashes the fields
    the model depends on, `WorldSpec.model_key`, so worlds that differ only in their pools share one model) and
    loaded from there on the next call.
    """
    from spice_trainer.demo.toy import build_model, build_tokenizer

    spec = get_spec(world)
    tokenizer = build_tokenizer(vocabulary())
    folder = Path(cache_dir) / f"base-{spec.model_key(seed)}-seed{seed}" if cache_dir is not None else None
    if folder is not None and (folder / "config.json").exists():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)
        model.eval()
        return tokenizer, model
    model = build_model(
        tokenizer,
        family="llama",
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=4,
        intermediate_size=4 * spec.hidden_size,
        max_positions=64,
        seed=seed,
    )
    corpus = pretraining_corpus(spec, seed)
    start = time.perf_counter()
    result = demo_world.finetune(
        model,
        tokenizer,
        corpus,
        epochs=spec.pretrain_epochs,
        learning_rate=spec.pretrain_learning_rate,
        batch_size=32,
        seed=seed,
    )
    seconds = time.perf_counter() - start
    logger.info(
        "world %s seed %d: pretrained in %.1f s (%d steps, loss %.3f)",
        spec.name,
        seed,
        seconds,
        result.steps,
        result.final_loss,
    )
    if folder is not None:
        _save_atomically(model, folder, {"world": asdict(spec), "seed": seed, "seconds": seconds})
    model.eval()
    return tokenizer, model


def _save_atomically(model: Any, folder: Path, meta: dict[str, Any]) -> None:
    """Write the model next to ``folder`` and rename it into place, so that a concurrent reader never loads a
    half-written model (when two processes build the same one, the first rename wins)."""
    import os
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    model.save_pretrained(tmp)
    (tmp / "world.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def row_losses(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, str]], *, batch_size: int = 256) -> torch.Tensor:
    """``(n,)`` float64: each row's mean next-token loss over its completion tokens (and end-of-sequence)."""
    was_training = model.training
    model.eval()
    tokenised = demo_world.tokenize_rows(tokenizer, rows)
    out = []
    try:
        for start in range(0, len(tokenised), batch_size):
            batch = demo_world.collate(tokenised[start : start + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
            target = batch["labels"][:, 1:]
            token_loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none"
            ).reshape(target.shape)
            supervised = (target != -100).double()
            out.append((token_loss * supervised).sum(1) / supervised.sum(1))
    finally:
        model.train(was_training)
    return torch.cat(out)


# --- a whole world --------------------------------------------------------------------------------


@dataclass
class World:
    """A world for one seed: the base model, both pools, the test and the reference set.

    Attributes:
        spec: the `WorldSpec`.
        seed: the seed everything was drawn with.
        tokenizer: the word-level tokenizer over `vocabulary`.
        base_model: the pretrained base model (eval mode, no adapter).
        pools: ``scenario -> WorldPool``.
        tests: ``task -> rows``, clean held-out rows.
        reference: ``task -> rows``, the trusted reference set.
    """

    spec: WorldSpec
    seed: int
    tokenizer: Any
    base_model: Any
    pools: dict[str, WorldPool]
    tests: dict[str, list[dict[str, str]]]
    reference: dict[str, list[dict[str, str]]]

    def reference_rows(self) -> list[dict[str, str]]:
        """The reference set as one list (tasks in `TASKS` order)."""
        return [row for task in TASKS for row in self.reference[task]]


def load_world(
    world: str | WorldSpec,
    seed: int = 0,
    *,
    cache_dir: str | Path | None = None,
    scenarios: Sequence[str] = SCENARIO_NAMES,
    pool_size: int | None = None,
    test_rows_per_task: int | None = None,
) -> World:
    """Build (or load from ``cache_dir``) the base model and draw the pools, test and reference sets."""
    spec = get_spec(world)
    tokenizer, model = build_base_model(spec, seed, cache_dir=cache_dir)
    return World(
        spec=spec,
        seed=seed,
        tokenizer=tokenizer,
        base_model=model,
        pools={s: make_pool(spec, s, seed, pool_size=pool_size) for s in scenarios},
        tests=heldout_set(spec, seed, n_per_task=test_rows_per_task),
        reference=reference_set(spec, seed),
    )
