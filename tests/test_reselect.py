"""Cheap reselection: the per-row memory, the shortlist rule, shortlist rounds against full rounds, the callback."""

import copy

import pytest
import torch
import trainer_world as tw
from transformers import Trainer

from spice_trainer import SpiceConfig, SpiceDataCallback, select
from spice_trainer.core.greedy import select_from_features
from spice_trainer.core.guards import candidate_guards
from spice_trainer.features.gradients import compute_gradient_features
from spice_trainer.features.reselect import FeatureCache, shortlist

# Every row eligible: the shortlist is then decided by the remembered norms alone.
OPEN = {"min_loss": None, "max_loss_quantile": None, "proj_dim": 24, "batch_size": 4}


def _cache(sqnorms, selected=(), losses=None, config=None):
    cache = FeatureCache()
    n = len(sqnorms)
    losses = torch.ones(n) if losses is None else torch.as_tensor(losses, dtype=torch.float32)
    config = config or SpiceConfig(**OPEN)
    cache.record(
        None,
        torch.as_tensor(sqnorms, dtype=torch.float64),
        losses,
        torch.ones(n, dtype=torch.long),
        losses,  # one supervised token: the largest token loss is the loss
        list(selected),
        config,
        n,
        vocab_size=100,
    )
    return cache, config


def test_shortlist_keeps_the_selection_then_the_largest_remembered_norms():
    cache, config = _cache([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 9.0, 4.0, 0.5, 6.0], selected=[1, 5])
    config = config.with_changes(reselect_shortlist=0.5, budget=2)
    eligible = torch.ones(10, dtype=torch.bool)
    eligible[4] = False  # norm 7, but not eligible under the remembered losses
    # Size max(ceil(0.5 * 10), 2) = 5: rows 1, 5 (selected), then norms 9 (row 2, then 6: ties by row), 6 (row 9).
    assert shortlist(cache, config, eligible) == [1, 2, 5, 6, 9]
    # mode "grow": the initial rows come first and count towards the size.
    assert shortlist(cache, config, eligible, initial=[8]) == [1, 2, 5, 6, 8]
    # The budget is a floor on the size.
    assert len(shortlist(cache, config.with_changes(reselect_shortlist=0.1, budget=4), eligible)) == 4


def test_shortlist_breaks_equal_norms_by_the_larger_remembered_loss():
    # Unit features: every trusted row remembers the norm 1; the loss (what is left to learn) decides.
    cache, config = _cache([1.0] * 6, selected=[0], losses=[0.2, 0.9, 0.3, 0.9, 1.5, 0.1])
    config = config.with_changes(reselect_shortlist=0.5, budget=1)
    # Size 3: row 0 (selected), then loss 1.5 (row 4), then 0.9 (rows 1 and 3: the lower row).
    assert shortlist(cache, config, torch.ones(6, dtype=torch.bool)) == [0, 1, 4]


def test_shortlist_fills_with_unsolved_rows_just_above_the_guard_and_skips_unmeasurable_ones():
    losses = [0.5, 0.6, 3.0, 0.05, 2.0, 0.7, 1.0]
    cache, config = _cache([1.0, 2.0, 9.0, 9.0, 9.0, float("nan"), 8.0], losses=losses)
    config = config.with_changes(reselect_shortlist=5 / 7, budget=1, min_loss=0.1)
    eligible = torch.tensor([True, True, False, False, False, True, False])
    # Eligible with a finite norm: rows 1, 0 (by norm). Then unsolved ineligible rows by loss: 6 (1.0), 4 (2.0),
    # 2 (3.0); row 3 is solved (0.05 <= min_loss) and row 5 has no finite norm.
    assert shortlist(cache, config, eligible) == [0, 1, 2, 4, 6]  # returned in row order
    assert shortlist(cache, config.with_changes(reselect_shortlist=4 / 7), eligible) == [0, 1, 4, 6]


def test_memory_is_reused_only_for_the_same_pool_and_feature_settings():
    cache, config = _cache([1.0, 2.0, 3.0])
    assert cache.usable(3, config)
    assert cache.usable(3, config.with_changes(budget=2, conflict_weight=0.3))  # greedy settings: fine
    assert not cache.usable(4, config)
    for change in ({"proj_dim": 8}, {"projection": "kronecker"}, {"seed": 1}, {"feature_norm": "none"}):
        assert not cache.usable(3, config.with_changes(**change)), change
    with pytest.raises(ValueError, match="record the whole pool first"):
        FeatureCache().record([0], torch.ones(1), torch.ones(1), torch.ones(1), torch.ones(1), [], config, 3)


def test_memory_round_trips_through_its_state_dict():
    cache, _ = _cache([1.0, float("nan"), 3.0], selected=[2])
    again = FeatureCache.from_state_dict(cache.state_dict())
    for name in ("sqnorms", "losses", "num_tokens", "max_token_losses", "measured_round"):
        assert torch.equal(getattr(again, name).nan_to_num(-1), getattr(cache, name).nan_to_num(-1)), name
    assert (again.vocab_size, again.selected, again.rounds, again.key) == (100, [2], 1, cache.key)


def test_a_shortlist_of_the_whole_pool_is_a_full_round():
    # Every row eligible and a share of 1: the shortlist round measures every row and must pick exactly what a
    # full round picks, gain for gain.
    model, data = tw.model(), tw.rows(24)
    config = SpiceConfig(**OPEN, budget=6, reselect_shortlist=1.0)
    cache = FeatureCache()
    select(model, data, config, show_progress=False, feature_cache=cache)  # round 0 fills the memory
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    cheap = select(model, data, config, show_progress=False, feature_cache=cache)
    full = select(model, data, config.with_changes(reselect_shortlist=None), show_progress=False)
    assert cheap.metadata["reselect"]["shortlist"] == 24
    assert cheap.indices == full.indices
    assert cheap.gains == pytest.approx(full.gains, rel=1e-9, abs=1e-12)
    assert cheap.n_candidates == 24 and cache.rounds == 2


@pytest.mark.parametrize("mode", ["replace", "grow"])
def test_shortlist_round_is_the_greedy_on_fresh_features_of_the_shortlist(mode):
    model, data = tw.model(), tw.rows(32)
    config = SpiceConfig(proj_dim=24, batch_size=4, budget=6, reselect_shortlist=0.4, min_loss=None)
    cache = FeatureCache()
    first = select(model, data, config, show_progress=False, feature_cache=cache)
    stale_losses, stale_tokens = cache.losses.clone(), cache.num_tokens.clone()
    stale_largest = cache.max_token_losses.clone()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    initial = first.selected[:3] if mode == "grow" else None
    before = copy.deepcopy(cache)
    cheap = select(model, data, config, show_progress=False, feature_cache=cache, initial=initial)

    # Independent reference: fresh features of every row, the guards on losses that are fresh on the shortlist
    # and remembered elsewhere, the greedy restricted to the shortlist.
    vocab = fresh_vocab = before.vocab_size

    def _guards(losses, tokens, largest):
        return candidate_guards(losses, tokens, config, max_token_losses=largest, vocab_size=vocab)

    rows = shortlist(before, config, _guards(stale_losses, stale_tokens, stale_largest).eligible, initial)
    assert len(rows) == 13  # ceil(0.4 * 32)
    fresh = compute_gradient_features(model, data, config, show_progress=False)
    assert fresh.vocab_size == fresh_vocab
    losses, tokens, largest = stale_losses.clone(), stale_tokens.clone(), stale_largest.clone()
    losses[rows], tokens[rows] = fresh.losses[rows], fresh.num_tokens[rows]
    largest[rows] = fresh.max_token_losses[rows]
    guards = _guards(losses, tokens, largest)
    position = {r: i for i, r in enumerate(rows)}
    ref = select_from_features(
        guards.scale(fresh.features[rows], torch.tensor(rows)),
        config.with_changes(budget=6),
        eligible=guards.eligible[rows],
        initial=[position[r] for r in initial] if initial else None,
    )
    assert cheap.indices == [rows[i] for i in ref.indices]
    assert cheap.gains == pytest.approx(ref.gains, rel=1e-6)
    assert set(cheap.selected) <= set(rows)
    assert cheap.initial == (initial or [])
    # The memory now holds the fresh numbers of the shortlist and the old ones elsewhere.
    torch.testing.assert_close(cache.losses[rows], fresh.losses[rows])
    others = sorted(set(range(32)) - set(rows))
    torch.testing.assert_close(cache.losses[others], stale_losses[others])
    assert cache.measured_round[rows].tolist() == [1] * len(rows) and cache.selected == cheap.selected


def test_callback_reselects_on_a_shortlist_and_the_dataloader_follows(tmp_path):
    data = tw.dataset(40)
    collator = tw.RecordingCollator()
    config = SpiceConfig(budget=8, proj_dim=24, batch_size=4, reselect_every_steps=2, reselect_shortlist=0.3)
    callback = SpiceDataCallback(config)
    trainer = Trainer(
        model=tw.model(),
        args=tw.args(tmp_path / "run", num_train_epochs=3),
        train_dataset=data,
        data_collator=collator,
        callbacks=[callback],
    )
    trainer.train()
    assert len(callback.rounds) >= 2
    # Every round after the first measured a shortlist of ceil(0.3 * 40) = 12 rows and selected within it.
    last = callback.selection
    assert last is not None and last.metadata["reselect"]["shortlist"] == 12
    assert set(callback.selected) == set(last.selected) and len(last.selected) == 8
    # What the dataloader drew after the last switch comes from the last subset.
    switch = callback.sampler.history[-1]
    start = switch.epoch * callback.sampler.num_samples + switch.position
    drawn = collator.drawn_rows(data)
    assert len(drawn) > start and set(drawn[start:]) <= set(last.selected)
