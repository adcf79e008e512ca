"""SpiceConfig: defaults, the paper preset, and errors that name the field, the value and the fix."""

import dataclasses

import pytest

from spice_trainer import SpiceConfig


def test_defaults_are_valid_and_frozen():
    cfg = SpiceConfig()
    assert cfg.budget == 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.budget = 0.2  # type: ignore[misc]


def test_paper_preset_matches_the_paper_and_accepts_overrides():
    cfg = SpiceConfig.paper(budget=0.05)
    # The paper's settings (docs/concepts.md): raw gradients, α = 1, λ = 0.1, ω = 0.5, watching the information gain.
    assert (cfg.fisher_scale, cfg.conflict_weight, cfg.stop_ratio, cfg.stop_on) == (1.0, 0.1, 0.5, "gain")
    assert cfg.feature_norm == "none" and cfg.max_loss_quantile is None and cfg.min_loss is None
    assert cfg.stop_rule == "ratio" and cfg.surprise_threshold is None
    assert cfg.budget == 0.05


def test_defaults_are_the_ones_chosen_on_the_quality_suite():
    # docs/quality.md: unit features, the solved floor, surprise weights at log V, the plateau rule on the score.
    cfg = SpiceConfig()
    assert (cfg.feature_norm, cfg.min_loss, cfg.surprise_threshold, cfg.max_loss_quantile) == (
        "unit",
        0.1,
        "uniform",
        None,
    )
    assert (cfg.stop_rule, cfg.plateau_ratio, cfg.stop_ratio, cfg.stop_on) == ("plateau", 0.2, None, "score")
    assert (cfg.fisher_scale, cfg.conflict_weight) == (1.0, 0.1)


def test_the_stopping_fields_must_agree():
    with pytest.raises(ValueError, match=r"stop_rule='ratio' needs stop_ratio \(ω\)"):
        SpiceConfig(stop_rule="ratio")
    with pytest.raises(ValueError, match=r"stop_ratio=0.5 is read only by stop_rule='ratio'.*pass stop_rule='ratio'"):
        SpiceConfig(stop_ratio=0.5)
    with pytest.raises(ValueError, match="stop_rule must be one of 'plateau', 'ratio', 'none', got 'knee'"):
        SpiceConfig(stop_rule="knee")  # type: ignore[arg-type]
    for bad in (0.0, 1.0, -0.2, float("nan")):
        with pytest.raises(ValueError, match="plateau_ratio"):
            SpiceConfig(plateau_ratio=bad)
    assert SpiceConfig(stop_rule="ratio", stop_ratio=0.0).stop_ratio == 0.0


@pytest.mark.parametrize(
    ("n", "budget", "expected"),
    [(100, 0.1, 10), (101, 0.1, 11), (5, 0.01, 1), (7, 1.0, 7), (50, 20, 20), (50, 50, 50)],
)
def test_budget_count(n, budget, expected):
    assert SpiceConfig(budget=budget).budget_count(n) == expected


def test_budget_count_rejects_counts_above_the_pool_and_empty_pools():
    with pytest.raises(ValueError, match=r"budget=60 exceeds the pool size n=50"):
        SpiceConfig(budget=60).budget_count(50)
    with pytest.raises(ValueError, match="empty pool"):
        SpiceConfig().budget_count(0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("budget", 0, r"budget must be a fraction in \(0, 1\] or a count >= 1, got 0"),
        ("budget", 1.5, r"budget must be a fraction .* got 1.5"),
        ("budget", -0.1, "budget must be a fraction"),
        ("budget", float("nan"), "budget must be a fraction"),
        ("fisher_scale", 0.0, "fisher_scale must be > 0, got 0.0"),
        ("conflict_weight", -1.0, "conflict_weight must be >= 0.0, got -1.0"),
        ("stop_ratio", 1.0, r"stop_ratio must be in \[0, 1\) or None, got 1.0; use stop_rule='none'"),
        ("stop_on", "loss", "stop_on must be one of 'gain', 'score', got 'loss'"),
        ("proj_dim", 0, "proj_dim must be a positive int, got 0"),
        ("projection", "dense", "projection must be one of"),
        ("feature_norm", "l2", "feature_norm must be one of"),
        ("max_loss_quantile", 0.0, r"max_loss_quantile must be in \(0, 1\]"),
        ("batch_size", -2, "batch_size must be a positive int, got -2"),
        ("greedy", "lazy", "greedy must be one of 'exact', 'stochastic', 'pooled', got 'lazy'"),
        ("stochastic_epsilon", 1.0, r"stochastic_epsilon must be in \(0, 1\)"),
        ("mode", "append", "mode must be one of 'grow', 'replace', got 'append'"),
        ("reselect_every_steps", 0, "reselect_every_steps must be a positive int, got 0"),
        ("reselect_every_steps", (10, 5), "strictly increasing"),
        ("proxy_refresh_every_pools", 0, "proxy_refresh_every_pools must be a positive int"),
    ],
)
def test_invalid_values_name_the_field_and_the_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        SpiceConfig(**{field: value})


def test_type_errors():
    with pytest.raises(TypeError, match="budget must be"):
        SpiceConfig(budget="10%")
    with pytest.raises(TypeError, match=r"pass tuple\(\[10, 20\]\)"):
        SpiceConfig(reselect_every_steps=[10, 20])
    with pytest.raises(TypeError, match="proxy_model must be a model object, a local path"):
        SpiceConfig(proxy_model=3)
    with pytest.raises(TypeError, match="seed must be an int"):
        SpiceConfig(seed=1.5)


def test_picks_per_pool_cannot_exceed_pool_size():
    with pytest.raises(ValueError, match=r"picks_per_pool \(20\) must not exceed pool_size \(10\)"):
        SpiceConfig(pool_size=10, picks_per_pool=20)


def test_to_dict_is_json_friendly():
    import json

    cfg = SpiceConfig(reselect_every_steps=(5, 10))
    assert json.loads(json.dumps(cfg.to_dict()))["reselect_every_steps"] == [5, 10]
