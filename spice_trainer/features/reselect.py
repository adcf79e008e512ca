"""Cheap reselection: what a round remembers of the pool, and which rows the next round measures again.

A reselection round during training (``SpiceConfig.reselect_every_steps``) normally measures the whole pool
again: one gradient pass, about an epoch of training. With ``SpiceConfig.reselect_shortlist = s`` a round
after the first measures only a shortlist of ``m = ⌈s · n⌉`` rows (at least the budget) and runs the greedy
on their fresh features:

1. `FeatureCache` keeps, per pool row, what the latest measurement of that row found: the squared norm of the
   feature the greedy saw (after normalisation and the guards' trust weight), its loss, its supervised token
   count and its largest token loss (``O(n)`` numbers, no ``n × d`` matrix), plus the rows the previous round
   selected.
2. `shortlist` takes the rows already selected (mode ``"grow"`` needs their fresh features; in mode
   ``"replace"`` they are the previous optimum) and fills the rest with the rows of largest remembered
   gradient norm among those eligible under the remembered losses: a row's base gain
   ``b = log(1 + α‖g‖²)`` is where its greedy score starts, and gradients shrink as the adapter trains, so a
   row that was small when last measured seldom becomes a pick. When the loss guard leaves fewer eligible
   rows than that, the unsolved rows just above its cap come next (training moves the cap).
3. The round measures the shortlist (fresh features, losses, token counts), applies the eligibility rule to
   the pool's losses — fresh on the shortlist, remembered elsewhere — and runs the greedy on the shortlist.
   The cache then holds the fresh numbers of the shortlist; rows outside keep their older ones.

This is an approximation, not exact: a row outside the shortlist cannot be picked, and the loss guard's
quantile mixes fresh and remembered losses. `bench/overhead.py` (section ``reselect``) measures the overlap
with a full round and the ratio of their log-det objectives on fresh features. Cost: ``m / n`` of a gradient
pass plus a greedy over ``m`` rows. Only torch is imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from spice_trainer.config import SpiceConfig

# Settings that change what a feature means: a cache filled under other values is not reused.
_FEATURE_FIELDS = ("proj_dim", "projection", "feature_norm", "seed", "max_length", "fisher_scale")


@dataclass
class FeatureCache:
    """Per-row memory of a run's selection rounds (one instance per training run; see the module docstring).

    Attributes:
        sqnorms: ``(n,)`` float64, ``‖g_i‖²`` of each row's projected gradient when last measured (NaN: never
            finite).
        losses: ``(n,)`` float32, each row's loss when last measured.
        num_tokens: ``(n,)`` int64, supervised tokens per row.
        max_token_losses: ``(n,)`` float32, each row's largest token loss when last measured (the guards' surprise).
        vocab_size: the model's output vocabulary (for ``surprise_threshold="uniform"``).
        measured_round: ``(n,)`` int64, the round that last measured each row.
        selected: the rows the latest round selected (initial rows included).
        rounds: rounds recorded so far.
        key: the feature settings the numbers were computed under.
    """

    sqnorms: torch.Tensor | None = None
    losses: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    max_token_losses: torch.Tensor | None = None
    vocab_size: int | None = None
    measured_round: torch.Tensor | None = None
    selected: list[int] = field(default_factory=list)
    rounds: int = 0
    key: tuple[object, ...] = ()

    def state_dict(self) -> dict[str, object]:
        """The memory as tensors, ints and lists (`torch.save`-able with ``weights_only`` loading)."""
        return {
            "sqnorms": self.sqnorms,
            "losses": self.losses,
            "num_tokens": self.num_tokens,
            "max_token_losses": self.max_token_losses,
            "vocab_size": self.vocab_size,
            "measured_round": self.measured_round,
            "selected": list(self.selected),
            "rounds": self.rounds,
            "key": list(self.key),  # the feature settings: ints, floats, strings, None
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> FeatureCache:
        """The memory `state_dict` wrote.

        Raises:
            KeyError, TypeError, AttributeError: ``state`` is not what `state_dict` writes (the caller names the file).
        """

        def tensor(name: str) -> torch.Tensor:
            value = state[name]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
            return value

        vocab = state["vocab_size"]
        selected = state["selected"]
        key = state["key"]
        if not isinstance(selected, list) or not isinstance(key, list):
            raise TypeError("selected and key must be lists")
        return cls(
            sqnorms=tensor("sqnorms").double(),
            losses=tensor("losses").float(),
            num_tokens=tensor("num_tokens").long(),
            max_token_losses=tensor("max_token_losses").float(),
            vocab_size=int(vocab) if isinstance(vocab, int) else None,
            measured_round=tensor("measured_round").long(),
            selected=[int(r) for r in selected],
            rounds=int(state["rounds"]),  # type: ignore[call-overload]
            key=tuple(key),
        )

    def usable(self, n: int, config: SpiceConfig) -> bool:
        """Whether a round over ``n`` rows under ``config`` may start from this memory."""
        return self.sqnorms is not None and self.sqnorms.numel() == n and self.key == _settings_key(config)

    def record(
        self,
        rows: Sequence[int] | None,
        sqnorms: torch.Tensor,
        losses: torch.Tensor,
        num_tokens: torch.Tensor,
        max_token_losses: torch.Tensor | None,
        selected: Sequence[int],
        config: SpiceConfig,
        n: int,
        *,
        vocab_size: int | None = None,
    ) -> None:
        """Remember a round's measurements of ``rows`` (`None`: every row, and the memory starts afresh).

        Args:
            rows: the pool rows measured, in the order of the other arguments.
            sqnorms: ``(len(rows),)`` squared norms of the features the greedy saw. losses, num_tokens,
                max_token_losses: ``(len(rows),)`` (`None` for the last: not measured, NaN).
            selected: the round's selected rows (initial rows included).
            vocab_size: the model's output vocabulary (kept from an earlier round when `None`).
        """
        if rows is None or not self.usable(n, config):
            if rows is not None:
                raise ValueError("a partial measurement cannot start the memory: record the whole pool first")
            self.sqnorms = torch.full((n,), float("nan"), dtype=torch.float64)
            self.losses = torch.full((n,), float("nan"), dtype=torch.float32)
            self.num_tokens = torch.zeros(n, dtype=torch.int64)
            self.max_token_losses = torch.full((n,), float("nan"), dtype=torch.float32)
            self.measured_round = torch.zeros(n, dtype=torch.int64)
            self.key = _settings_key(config)
            index = torch.arange(n)
        else:
            index = torch.as_tensor(list(rows), dtype=torch.long)
        assert self.sqnorms is not None and self.losses is not None
        assert self.num_tokens is not None and self.measured_round is not None and self.max_token_losses is not None
        self.sqnorms[index] = sqnorms.double()
        self.losses[index] = losses.float()
        self.num_tokens[index] = num_tokens.long()
        self.max_token_losses[index] = max_token_losses.float() if max_token_losses is not None else float("nan")
        if vocab_size is not None:
            self.vocab_size = vocab_size
        self.measured_round[index] = self.rounds
        self.selected = [int(r) for r in selected]
        self.rounds += 1


def shortlist(
    cache: FeatureCache, config: SpiceConfig, eligible: torch.Tensor, initial: Sequence[int] | None = None
) -> list[int]:
    """The rows a cheap round measures again, in increasing row order.

    ``initial`` rows and the previous round's selection first, then the rows of largest remembered
    ``‖g‖²`` among ``eligible`` ones (ties by the larger remembered loss, then by row index), then (when the
    loss guard leaves fewer eligible rows) the unsolved ineligible rows of smallest remembered loss (just
    above the guard's cap), up to ``m = max(⌈reselect_shortlist · n⌉, budget)`` rows in all (fewer when the
    pool has fewer measurable rows).

    Args:
        cache: a usable `FeatureCache`.
        config: uses ``reselect_shortlist`` and ``budget``.
        eligible: ``(n,)`` bool, eligibility under the remembered losses.
        initial: rows already selected (mode ``"grow"``).
    """
    if cache.sqnorms is None or config.reselect_shortlist is None:
        raise ValueError("shortlist needs a filled FeatureCache and SpiceConfig.reselect_shortlist")
    n = cache.sqnorms.numel()
    size = min(n, max(math.ceil(config.reselect_shortlist * n), config.budget_count(n)))
    chosen: dict[int, None] = dict.fromkeys(int(r) for r in (initial or []))
    chosen.update(dict.fromkeys(cache.selected))
    scores = torch.where(eligible & torch.isfinite(cache.sqnorms), cache.sqnorms, torch.full_like(cache.sqnorms, -1.0))
    # Largest norm first; among equal norms (unit features: every trusted row has norm 1) the larger remembered
    # loss first (more left to learn), then the lower row index. Two stable sorts: the secondary key first.
    assert cache.losses is not None
    by_loss = torch.sort(torch.nan_to_num(cache.losses.double(), nan=-1.0), descending=True, stable=True).indices
    order = by_loss[torch.sort(scores[by_loss], descending=True, stable=True).indices]
    for row in order.tolist():
        if len(chosen) >= size or scores[row] < 0:
            break
        chosen.setdefault(int(row), None)
    if len(chosen) < size:
        # Fewer eligible rows than the shortlist holds (the loss guard keeps a share of the pool): the rest are
        # the unsolved rows just above the guard's cap, the ones whose fresh loss may bring them under it.
        assert cache.losses is not None and cache.num_tokens is not None
        losses = cache.losses.double()
        unsolved = ~eligible & torch.isfinite(losses) & (cache.num_tokens > 0)  # a norm is not needed here
        if config.min_loss is not None:
            unsolved &= losses > config.min_loss
        rest = torch.where(unsolved, losses, torch.full_like(losses, float("inf")))
        for row in torch.sort(rest, stable=True).indices.tolist():
            if len(chosen) >= size or not math.isfinite(float(rest[row])):
                break
            chosen.setdefault(int(row), None)
    return sorted(chosen)


def _settings_key(config: SpiceConfig) -> tuple[object, ...]:
    return tuple(getattr(config, name) for name in _FEATURE_FIELDS)
