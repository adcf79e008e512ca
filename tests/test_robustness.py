"""Bad input, faults and determinism: every failure users hit is a clear error or a documented outcome.

The table in docs/robustness.md lists each case, its behaviour and the test that shows it (here or in the
other test files).
"""

import errno
import logging
import math

import numpy as np
import pytest
import torch
import trainer_world as tw
from float_bounds import assert_within, float64_reference, gamma
from transformers import Trainer

from spice_trainer import Selection, SpiceConfig, SpiceDataCallback, select, select_from_features
from spice_trainer.demo.toy import add_lora, build_model
from spice_trainer.features.gradients import compute_gradient_features, find_lora_weights

CFG = SpiceConfig(proj_dim=32, max_loss_quantile=None)


def _feats(model, data, config=CFG, **kwargs):
    return compute_gradient_features(model, data, config, show_progress=False, **kwargs)


class Counting:
    """A ``select_fn`` that calls the real `select` and can fail at chosen calls (1-based)."""

    def __init__(self, fail_at=(), error=RuntimeError):
        self.calls, self.fail_at, self.error = 0, set(fail_at), error

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_at:
            raise self.error(f"injected failure in selection call {self.calls}")
        return select(*args, **kwargs)


class Killed(BaseException):
    """Stands for the process being killed (not an ``Exception``: nothing may swallow it)."""


def _trainer(tmp_path, config, *, data=None, model=None, select_fn=None, **arg_overrides):
    data = data if data is not None else tw.dataset()
    collator = tw.RecordingCollator()
    callback = SpiceDataCallback(config, select_fn=select_fn)
    trainer = Trainer(
        model=model if model is not None else tw.model(),
        args=tw.args(tmp_path, **arg_overrides),
        train_dataset=data,
        data_collator=collator,
        callbacks=[callback],
    )
    return trainer, callback, collator, data


def _losses(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


# --- datasets -------------------------------------------------------------------------------------------


def test_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot select from an empty pool"):
        select(tw.model(), [], CFG, show_progress=False)
    counting = Counting()
    trainer, *_ = _trainer(tmp_path, CFG, data=tw.dataset().select([]), select_fn=counting, max_steps=2)
    with pytest.raises(ValueError, match="empty pool"):
        trainer.train()
    assert counting.calls == 0


def test_integer_budget_above_the_pool_fails_before_any_work(tmp_path):
    config = CFG.with_changes(budget=40)
    with pytest.raises(ValueError, match="budget=40 exceeds the pool size n=32"):
        select(tw.model(), tw.rows(32), config, show_progress=False)
    counting = Counting()
    trainer, *_ = _trainer(tmp_path, config, select_fn=counting, max_steps=2)
    with pytest.raises(ValueError, match="budget=40 exceeds the pool size n=32"):
        trainer.train()
    assert counting.calls == 0  # refused before the gradient pass


def test_rows_without_labels_learn_every_token():
    rows = tw.rows(6)
    without = [{"input_ids": r["input_ids"]} for r in rows]
    with_ids = [{"input_ids": r["input_ids"], "labels": list(r["input_ids"])} for r in rows]
    model = tw.model()
    a, b = _feats(model, without), _feats(model, with_ids)
    assert torch.equal(a.features, b.features) and torch.equal(a.losses, b.losses)
    assert a.num_tokens.tolist() == [len(r["input_ids"]) - 1 for r in rows]  # every next token supervised


def test_fully_masked_rows_are_never_picked_counted_and_reported():
    rows = tw.rows(10)
    for i in (2, 7):
        rows[i] = {"input_ids": rows[i]["input_ids"], "labels": [-100] * len(rows[i]["input_ids"])}
    sel = select(tw.model(), rows, CFG.with_changes(budget=10), show_progress=False)
    assert sorted(sel.indices) == [0, 1, 3, 4, 5, 6, 8, 9]  # every other row, then the pool is exhausted
    assert sel.stop_reason == "exhausted"
    assert sel.skipped == [2, 7]
    assert sel.metadata["no_supervised_token_rows"] == 2 and sel.metadata["non_finite_loss_rows"] == 2
    assert "skipped (non-finite features): 2" in sel.summary()


def test_max_length_truncates_the_gradient_pass():
    rows = [{"input_ids": r["input_ids"] * 3, "labels": r["labels"] * 3} for r in tw.rows(6)]
    cut = [{"input_ids": r["input_ids"][:8], "labels": r["labels"][:8]} for r in rows]
    model = tw.model().double()  # float64: the only float32 arithmetic is the pass's own (float_bounds.py)
    truncated = _feats(model, rows, CFG.with_changes(max_length=8))
    reference = _feats(model, cut)  # independent: rows cut by hand
    _, bound = float64_reference(model, cut, CFG)
    assert_within(truncated.features, reference.features, 2 * bound)  # both within the bound of the exact ones
    assert truncated.num_tokens.tolist() == reference.num_tokens.tolist()
    assert not torch.allclose(_feats(model, rows).features, truncated.features)


def test_a_duplicate_row_adds_only_what_its_twin_left_unexplained():
    rows = tw.rows(12)
    data = [*rows, dict(rows[3])]  # row 12 duplicates row 3
    model = tw.model().double()
    feats = _feats(model, data, CFG.with_changes(proj_dim=64)).features.double()
    _, bound = float64_reference(model, [rows[3]], CFG.with_changes(proj_dim=64))
    assert_within(feats[12:13], feats[3:4], 2 * bound)  # the same row, in another batch position
    config = CFG.with_changes(budget=13, proj_dim=64)
    sel = select_from_features(feats, config)
    order = sel.indices
    assert order.index(3) < order.index(12)  # the twin (lower index on ties) always comes first
    # The copy's gain equals the log-det difference it adds (independent reference) and is capped by
    # log(1 + α s / (1 + α s)), s = ‖g‖²: what the twin left unexplained, strictly below the twin's own.
    pos = order.index(12)
    before, after = feats[order[:pos]], feats[order[: pos + 1]]
    eye = torch.eye(feats.shape[1], dtype=torch.float64)
    logdet = lambda g: torch.logdet(eye + g.T @ g)  # noqa: E731
    assert sel.gains[pos] == pytest.approx(float(logdet(after) - logdet(before)), rel=1e-6)
    s = float(feats[3] @ feats[3])
    assert sel.gains[pos] <= math.log(1 + s / (1 + s)) + 1e-9 < sel.gains[order.index(3)]
    # With distinct rows of the same norm in distinct directions, the copy is the very last pick.
    ortho = torch.cat([torch.eye(8, dtype=torch.float64), torch.eye(8, dtype=torch.float64)[:1]])
    assert select_from_features(ortho, SpiceConfig(budget=9)).indices == [*range(8), 8]


# --- models ---------------------------------------------------------------------------------------------


def test_bf16_base_model_selects():
    model = add_lora(build_model(tw.TOK, hidden_size=32), r=4).to(torch.bfloat16)
    sel = select(model, tw.rows(16), CFG.with_changes(budget=4), show_progress=False)
    assert len(sel.indices) == 4 and sel.skipped == [] and all(math.isfinite(g) and g > 0 for g in sel.gains)


def test_frozen_adapter_still_gives_features_and_flags_are_restored():
    data = tw.rows(6)
    model = tw.model()
    expected = _feats(model, data).features
    _, lora = find_lora_weights(model)
    for _, module in lora:
        module.weight.requires_grad_(False)
    got = _feats(model, data).features
    assert torch.equal(got, expected)
    assert all(not m.weight.requires_grad and m.weight.grad is None for _, m in lora)


# --- numerics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_row_with_a_non_finite_loss_is_skipped_counted_and_never_picked(poison):
    # Token 6 ('<|system|>') never occurs in tw.rows; its embedding is poisoned, so only row 4's logits
    # (from that token on) are non-finite, as when a model overflows on one row.
    model = tw.model().double()
    with torch.no_grad():
        model.get_input_embeddings().weight[6] = poison
    rows = tw.rows(10)
    rows[4] = {"input_ids": [*rows[4]["input_ids"][:3], 6, *rows[4]["input_ids"][3:]]}
    sel = select(model, rows, CFG.with_changes(budget=10), show_progress=False)
    assert 4 not in sel.indices and sel.skipped == [4] and sel.stop_reason == "exhausted"
    assert sel.metadata["non_finite_loss_rows"] == 1
    # The other rows' features are those of a pool without the bad row (independent of its presence).
    grads = _feats(model, rows)
    clean = _feats(model, [r for i, r in enumerate(rows) if i != 4])
    keep = [i for i in range(10) if i != 4]
    _, bound = float64_reference(model, [rows[i] for i in keep], CFG)
    assert_within(grads.features[keep], clean.features, 2 * bound)
    assert not torch.isfinite(grads.losses[4]) and torch.isnan(grads.features[4]).all()


@pytest.mark.parametrize("label", [500, -1])
def test_labels_outside_the_vocabulary_name_the_row(label):
    rows = tw.rows(6)
    rows[4] = {"input_ids": rows[4]["input_ids"], "labels": [-100, -100, label, *rows[4]["labels"][3:]]}
    with pytest.raises(ValueError, match=rf"dataset rows \[4\] have labels outside \[0, {len(tw.TOK)}\)"):
        _feats(tw.model(), rows, CFG.with_changes(batch_size=4))


def test_fresh_adapter_with_b_zero_still_has_features():
    # PEFT's default init: B = 0, so ∂L/∂A = Bᵀ δ xᵀ = 0 but ∂L/∂B = δ (A x)ᵀ ≠ 0.
    model = add_lora(build_model(tw.TOK, hidden_size=32), r=4, init_b_random=False)
    rows = tw.rows(12)
    one = {k: torch.tensor([v]) for k, v in rows[0].items()}
    model(**one).loss.backward()  # independent check of the premise with autograd's .grad
    _, lora = find_lora_weights(model)
    assert all(m.weight.grad.abs().max() == 0 for n, m in lora if n.endswith("lora_A"))
    assert all(m.weight.grad.abs().max() > 0 for n, m in lora if n.endswith("lora_B"))
    model.zero_grad(set_to_none=True)
    grads = _feats(model, rows)
    assert (grads.features.norm(dim=1) > 0).all()
    sel = select(model, rows, CFG.with_changes(budget=4), show_progress=False)
    assert len(sel.indices) == 4 and sel.gains[0] > 0


def test_all_zero_features_are_a_clear_error():
    with pytest.raises(ValueError, match="exactly zero"):
        select_from_features(torch.zeros(10, 8), SpiceConfig(budget=3))
    # A real adapter with A = B = 0 gives exactly zero gradients for every row.
    model = add_lora(build_model(tw.TOK, hidden_size=32), r=4, init_b_random=False)
    _, lora = find_lora_weights(model)
    with torch.no_grad():
        for _, m in lora:
            m.weight.zero_()
    with pytest.raises(ValueError, match="gradients carry no signal"):
        select(model, tw.rows(8), CFG.with_changes(budget=3), show_progress=False)


def test_a_huge_gradient_outlier_unit_norm_versus_paper():
    model, rows = tw.model(), tw.rows(16)
    raw = _feats(model, rows, CFG.with_changes(feature_norm="none")).features
    unit = _feats(model, rows, CFG.with_changes(feature_norm="unit")).features
    # "unit" is scale-free: a row scaled ×1e6 normalises to the same unit vector as the original. Both sides
    # normalise the same float32 vector in float32: each within gamma_{d+2} (relative) of the exact unit vector.
    expected = raw / raw.norm(dim=1, keepdim=True)
    assert bool(((unit - expected).abs() <= 2 * gamma(32 + 2) * expected.abs()).all())
    baseline = select_from_features(unit, SpiceConfig(budget=4, stop_rule="none", stop_ratio=None))
    row = next(i for i in range(16) if i not in baseline.indices)  # a row unit norm does not pick
    scaled = raw.clone()
    scaled[row] *= 1e6
    unit_scaled = scaled / scaled.norm(dim=1, keepdim=True)
    assert (
        select_from_features(unit_scaled, SpiceConfig(budget=4, stop_rule="none", stop_ratio=None)).indices
        == baseline.indices
    )
    # The paper preset (raw gradients, no loss guard) takes the outlier first: Δ = log(1 + α‖g‖²) is huge.
    paper = select_from_features(scaled, SpiceConfig.paper(budget=4))
    assert paper.indices[0] == row
    # s = ‖g‖² of the float32 row carries at most gamma_d (relative) of float32 error, so log1p(s) at most gamma_d.
    assert abs(paper.gains[0] - math.log1p(float(scaled[row].double().norm() ** 2))) <= gamma(32 + 1)


# --- messages that name the real cause ------------------------------------------------------------------


def test_when_min_loss_excludes_every_row_the_error_names_min_loss(tmp_path):
    # Every row of a fresh model has a loss far below 100: the guard, not the labels, left nothing to pick.
    trainer, callback, *_ = _trainer(tmp_path, CFG.with_changes(budget=0.25, min_loss=100.0), max_steps=2)
    with pytest.raises(
        ValueError, match=r"none of the 32 rows could be picked \(32 have a loss at or below min_loss=100"
    ):
        trainer.train()
    with pytest.raises(ValueError, match="lower min_loss"):
        trainer.train()
    assert callback.sampler is None and trainer.state.global_step == 0


def test_rows_without_a_target_are_counted_once():
    rows = tw.rows(12)
    for i in (2, 5, 9):
        rows[i] = {**rows[i], "labels": [-100] * len(rows[i]["labels"])}
    sel = select(tw.model(), rows, CFG.with_changes(budget=4, min_loss=None), show_progress=False)
    meta = sel.metadata
    assert meta["no_supervised_token_rows"] == 3 and meta["non_finite_loss_rows"] == 3  # no target, so no loss
    assert meta["loss_guard_excluded"] == 0 and meta["non_finite_gradient_rows"] == 0  # was -3
    # With the guard on: independent count of the rows with a target and a loss at or below min_loss.
    model = tw.model()
    losses = compute_gradient_features(model, rows, CFG, show_progress=False).losses
    floor = float(losses[torch.isfinite(losses)].median())
    guarded = select(model, rows, CFG.with_changes(budget=3, min_loss=floor), show_progress=False).metadata
    assert guarded["loss_guard_excluded"] == int((torch.isfinite(losses) & (losses <= floor)).sum()) >= 4


class _OverflowInBackward(torch.autograd.Function):
    """Identity in the forward; in the backward the gradient of one batch row becomes inf, as when a bf16
    backward exceeds its range for one row while that row's forward (and loss) stay finite."""

    @staticmethod
    def forward(ctx, hidden, row):
        ctx.row = row
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.row] = float("inf")
        return grad, None


def test_rows_with_non_finite_gradients_are_counted_and_never_picked():
    model = tw.model().to(torch.bfloat16)
    rows = tw.rows(10)
    rows[4] = {
        "input_ids": [*rows[4]["input_ids"], 9, 10, 11, 12, 13, 14],
        "labels": [*rows[4]["labels"], 9, 10, 11, 12, 13, 14],
    }
    assert max(len(r["input_ids"]) for i, r in enumerate(rows) if i != 4) < len(rows[4]["input_ids"])
    layer = model.get_base_model().model.layers[0]

    calls = []

    def overflow(module, args, output):
        # Longest first: dataset row 4 is row 0 of the first batch (the first forward of the gradient pass).
        calls.append(1)
        if len(calls) == 1 and torch.is_grad_enabled():
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = _OverflowInBackward.apply(hidden, 0)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return output

    handle = layer.register_forward_hook(overflow)
    try:
        sel = select(model, rows, CFG.with_changes(budget=10, min_loss=None), show_progress=False)
    finally:
        handle.remove()
    assert sel.metadata["non_finite_gradient_rows"] == 1 and sel.metadata["non_finite_loss_rows"] == 0
    assert 4 not in sel.indices and sel.skipped == [4]


def test_feature_norm_adam_with_an_optimizer_without_second_moments_fails_when_the_trainer_is_built(tmp_path):
    for optim in ("sgd", "adafactor"):
        with pytest.raises(ValueError, match=rf"feature_norm='adam' .*optim='{optim}'.*feature_norm='unit'"):
            _trainer(tmp_path, CFG.with_changes(feature_norm="adam", reselect_every_steps=1), optim=optim)
    built, *_ = _trainer(tmp_path, CFG.with_changes(feature_norm="adam", budget=0.25), optim="adamw_torch", max_steps=1)
    built.train()  # an Adam optimizer: fine (the first round uses unit norm, later ones Adam's moments)


def test_drop_last_with_a_subset_smaller_than_a_batch_names_the_subset(tmp_path):
    with pytest.raises(ValueError, match=r"the budget allows at most 3 rows, fewer than one batch .*= 4\)"):
        _trainer(tmp_path, CFG.with_changes(budget=3), dataloader_drop_last=True, max_steps=2)
    # Early stopping can leave fewer rows than the budget: named once the round has run.
    stops_early = CFG.with_changes(budget=8, stop_rule="ratio", stop_ratio=0.999, feature_norm="unit")
    trainer, *_ = _trainer(tmp_path, stops_early, dataloader_drop_last=True, max_steps=2)
    with pytest.raises(ValueError, match=r"SPICE selected [1-3] rows, fewer than one batch"):
        trainer.train()


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        # Fields or values tests/test_config.py does not cover.
        ("budget", True, TypeError, "budget must be a fraction"),
        ("budget", float("inf"), ValueError, "budget must be a fraction"),
        ("fisher_scale", -1.0, ValueError, "fisher_scale must be >= 0.0, got -1.0"),
        ("fisher_scale", float("inf"), ValueError, "fisher_scale must be a finite number"),
        ("conflict_weight", float("nan"), ValueError, "conflict_weight must be a finite number"),
        ("stop_ratio", -0.1, ValueError, "stop_ratio must be >= 0.0, got -0.1"),
        ("proj_dim", 16.0, ValueError, "proj_dim must be a positive int, got 16.0"),
        ("proj_dim", True, ValueError, "proj_dim must be a positive int, got True"),
        ("max_loss_quantile", 1.5, ValueError, r"max_loss_quantile must be in \(0, 1\] or None, got 1.5"),
        ("max_length", 0, ValueError, "max_length must be a positive int, got 0"),
        ("feature_store", "", TypeError, "feature_store must be a directory path"),
        ("seed", True, TypeError, "seed must be an int, got True"),
        ("stochastic_epsilon", 0.0, ValueError, r"stochastic_epsilon must be in \(0, 1\)"),
        ("pool_size", 0, ValueError, "pool_size must be a positive int, got 0"),
        ("picks_per_pool", 0, ValueError, "picks_per_pool must be a positive int, got 0"),
        ("reselect_every_steps", (), TypeError, "non-empty tuple"),
        ("reselect_every_steps", True, TypeError, "reselect_every_steps must be an int"),
        ("reselect_every_steps", (0, 5), ValueError, "entries must be optimizer steps >= 1, got 0"),
        ("reselect_every_steps", (5, 5), ValueError, "strictly increasing without repeats"),
        ("proxy_learning_rate", 0.0, ValueError, "proxy_learning_rate must be > 0"),
        ("proxy_device", 1, TypeError, "proxy_device must be a device string"),
        ("write_reports", "yes", TypeError, "write_reports must be a bool, got 'yes'"),
    ],
)
def test_more_invalid_values_name_the_field_and_the_value(field, value, error, message):
    with pytest.raises(error, match=message):
        SpiceConfig(**{field: value})


def test_pathlib_feature_store_is_refused_with_the_fix(tmp_path):
    with pytest.raises(TypeError, match=r"pass str\(path\)"):
        SpiceConfig(feature_store=tmp_path)  # type: ignore[arg-type]


def test_grow_with_a_full_budget_skips_the_round(tmp_path):
    config = CFG.with_changes(budget=0.25, mode="grow", reselect_every_steps=1)
    counting = Counting()
    trainer, callback, collator, data = _trainer(tmp_path, config, select_fn=counting, max_steps=3)
    trainer.train()
    assert counting.calls == 1  # only the first round: nothing could be added, no gradient pass
    assert len(callback.sampler.history) == 1 and len(callback.rounds) == 1
    assert set(collator.drawn_rows(data)) == set(callback.selected)


def test_resume_with_a_changed_config_is_refused(tmp_path):
    config = CFG.with_changes(budget=0.25)
    trainer, *_ = _trainer(tmp_path, config, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    changed, *_ = _trainer(tmp_path, config.with_changes(conflict_weight=0.3, seed=7), max_steps=4)
    with pytest.raises(ValueError, match=r"SpiceConfig changed since checkpoint .* \(fields: conflict_weight, seed\)"):
        changed.train(resume_from_checkpoint=True)
    # Reporting settings may change: the selected rows do not depend on them.
    same, callback, *_ = _trainer(tmp_path, config.with_changes(write_reports=False), max_steps=4)
    same.train(resume_from_checkpoint=True)
    assert same.state.global_step == 4 and len(callback.rounds) == 1


# --- faults ---------------------------------------------------------------------------------------------


def test_a_failing_first_round_stops_with_the_error(tmp_path):
    trainer, callback, *_ = _trainer(tmp_path, CFG, select_fn=Counting(fail_at={1}), max_steps=2)
    with pytest.raises(RuntimeError, match="injected failure in selection call 1"):
        trainer.train()
    assert callback.sampler is None and trainer.state.global_step == 0


def test_a_failing_later_round_keeps_the_previous_subset(tmp_path, caplog):
    config = CFG.with_changes(budget=0.25, reselect_every_steps=2)
    counting = Counting(fail_at={2})
    trainer, callback, collator, data = _trainer(
        tmp_path, config, select_fn=counting, num_train_epochs=3, learning_rate=5e-2
    )
    with caplog.at_level(logging.ERROR, logger="spice_trainer.integrations.trainer"):
        trainer.train()
    assert trainer.state.global_step == 6 and callback.failed_rounds == 1
    assert "selection round at step 2 failed" in caplog.text
    assert [e["spice/failed_rounds"] for e in trainer.state.log_history if "spice/failed_rounds" in e] == [1.0]
    # The step-2 round left no trace in the sampler; step 4's round switched it as usual.
    assert [r.step for r in callback.rounds] == [0, 4]
    history = callback.sampler.history
    assert len(history) == 2 and history[1].round == 1
    drawn = collator.drawn_rows(data)
    first_switch = history[1].epoch * len(callback.sampler) + history[1].position
    assert first_switch == 16  # 8 rows, batch 4: four steps drawn before the step-4 round
    assert set(drawn[:first_switch]) == set(history[0].rows)
    assert drawn == [callback.sampler.row_at(e, p) for e in range(3) for p in range(len(callback.sampler))]


@pytest.mark.slow
def test_killed_inside_a_round_resumes_like_the_uninterrupted_run(tmp_path):
    config = CFG.with_changes(budget=0.25, reselect_every_steps=3)
    common = {"num_train_epochs": 3, "save_strategy": "steps", "save_steps": 2, "learning_rate": 5e-2}
    full, full_callback, full_collator, data = _trainer(tmp_path / "full", config, **common)
    full.train()

    cut, *_ = _trainer(tmp_path / "cut", config, data=data, select_fn=Counting(fail_at={2}, error=Killed), **common)
    with pytest.raises(Killed):
        cut.train()  # killed inside the step-3 round; checkpoint-2 is the last one on disk
    assert cut.state.global_step == 3

    resumed, callback, collator, _ = _trainer(tmp_path / "cut", config, data=data, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    full_losses, resumed_losses = _losses(full), _losses(resumed)  # the resumed history starts with steps 1-2
    assert sorted(resumed_losses) == sorted(full_losses) == [1, 2, 3, 4, 5, 6]
    assert resumed_losses == full_losses
    assert collator.batches == full_collator.batches[2:]
    assert [s.rows for s in callback.sampler.history] == [s.rows for s in full_callback.sampler.history]


@pytest.mark.parametrize("fault", ["spice_is_a_file", "enospc"])
def test_reports_that_cannot_be_written_do_not_stop_training(tmp_path, monkeypatch, caplog, fault):
    if fault == "spice_is_a_file":
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / "_spice").write_text("not a folder")
    else:

        def full_disk(self, path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(Selection, "save", full_disk)
    config = CFG.with_changes(budget=0.25, reselect_every_steps=1)
    trainer, callback, *_ = _trainer(tmp_path, config, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="spice_trainer.integrations.trainer"):
        trainer.train()
    assert trainer.state.global_step == 2 and len(callback.rounds) == 2
    assert caplog.text.count("could not write the round-") == 2
    assert all(math.isfinite(loss) for loss in _losses(trainer).values())


# --- determinism ----------------------------------------------------------------------------------------


def test_same_seed_same_selection_across_runs_and_batch_sizes():
    rows = tw.rows(16)
    config = CFG.with_changes(budget=5)
    runs = [select(tw.model(), rows, config.with_changes(batch_size=b), show_progress=False) for b in (8, 8, 1)]
    assert runs[0].indices == runs[1].indices and runs[0].gains == runs[1].gains  # bit-identical reruns
    assert runs[2].indices == runs[0].indices  # batch size changes only float rounding
    # ... within the float32 bound of the pass (float64 model: float_bounds.py), whatever the batch size.
    model = tw.model().double()
    by_size = [_feats(model, rows, config.with_changes(batch_size=b)).features for b in (8, 1)]
    assert_within(by_size[0], by_size[1], 2 * float64_reference(model, rows, config).bound)
    other = select(tw.model(), rows, config.with_changes(seed=7), show_progress=False)
    assert other.indices != runs[0].indices or other.gains != runs[0].gains  # the seed is used


@pytest.mark.parametrize("greedy", ["exact", "stochastic"])
def test_select_never_moves_the_global_rng(greedy):
    model, rows = tw.model(dropout=0.1), tw.rows(16)
    torch.manual_seed(123)
    np.random.seed(123)
    before_torch, before_np = torch.get_rng_state(), np.random.get_state()[1].copy()
    select(model, rows, CFG.with_changes(budget=4, greedy=greedy), show_progress=False)
    assert torch.equal(torch.get_rng_state(), before_torch)
    assert np.array_equal(np.random.get_state()[1], before_np)
