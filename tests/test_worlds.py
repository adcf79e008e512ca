"""The benchmark worlds (`spice_trainer.demo.worlds`): what makes each world what it is.

Row labels are checked against an independent solver written from the task definitions; the base models'
losses per kind are measured with a plain forward pass (`torch.nn.functional.cross_entropy`).
"""

from __future__ import annotations

import statistics
from collections import Counter

import pytest
import torch

from spice_trainer.demo import world as demo_world
from spice_trainer.demo import worlds

SOLVED_FLOOR = 0.1  # nats/token: the loss the library's min_loss calls "solved"


def _solve(task: str, args: list[str]) -> list[str]:
    """Independent reference solver (the task definitions, written again)."""
    if task == "add":
        return [str((int(args[0]) + int(args[1])) % 5)]
    if task == "reverse":
        return args[::-1]
    if task == "sort":
        return sorted(args)
    if task == "wrap":
        return ["[", *" , ".join(args).split(), "]"]
    if task == "copy":
        return list(args)
    raise AssertionError(task)


def _other(task: str, args: list[str]) -> list[str]:
    """Independent other rules: subtraction, copy, descending sort, brackets without commas."""
    return {
        "add": lambda: [str((int(args[0]) - int(args[1])) % 5)],
        "reverse": lambda: list(args),
        "sort": lambda: sorted(args)[::-1],
        "wrap": lambda: ["[", *args, "]"],
    }[task]()


def _near(task: str, args: list[str]) -> list[str]:
    items = {"reverse": args[::-1], "sort": sorted(args), "wrap": list(args)}[task]
    items = [*items[:-2], items[-1], items[-2]]
    return ["[", *" , ".join(items).split(), "]"] if task == "wrap" else items


def _parse(row: dict[str, str]) -> tuple[str, list[str], list[str]]:
    words = row["prompt"].split()
    assert words[-1] == "="
    return words[0], words[1:-1], row["completion"].split()


def _check_label(task: str, detail: str, row: dict[str, str]) -> None:
    name, args, got = _parse(row)
    assert name == task, (task, row)
    if detail in ("clean", "almost", "solved"):
        assert got == _solve(task, args), (detail, row)
    elif detail in ("other-rule", "prior-rule"):
        assert got == _other(task, args), (detail, row)
    elif detail == "near-miss":
        assert got == _near(task, args) and got != _solve(task, args), row
    elif detail == "mislabeled":
        assert got != _solve(task, args) and got != _other(task, args), row
        if task != "add":
            assert got != _near(task, args), row
    else:
        raise AssertionError(detail)


# --- pools, without a model -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(worlds.WORLDS))
def test_noise_shares_per_scenario(name: str) -> None:
    spec = worlds.WORLDS[name]
    for scenario, (low, high) in (("curated", (0.08, 0.10)), ("noisy", (0.45, 0.50))):
        pool = worlds.make_pool(name, scenario, seed=0, pool_size=2000)
        assert len(pool) == 2000 == len(pool.details) == len(pool.tasks) == len(pool.wrong) == len(pool.sources)
        wrong = statistics.fmean(pool.wrong)
        # wrong = the rows whose label is not the task's correct answer (an independent check below)
        assert low - 0.005 <= wrong <= high + 0.005, (name, scenario, wrong)
        counts = Counter(pool.details)
        for detail, share in spec.scenario(scenario).items():
            if detail != "clean":
                assert counts[detail] == round(share * 2000), (detail, counts)


@pytest.mark.parametrize("name", sorted(worlds.WORLDS))
def test_rows_match_their_hidden_detail(name: str) -> None:
    spec = worlds.WORLDS[name]
    vocab = set(worlds.vocabulary())
    pool = worlds.make_pool(name, "noisy", seed=1, pool_size=1500)
    for row, task, detail, source, wrong in zip(
        pool.rows, pool.tasks, pool.details, pool.sources, pool.wrong, strict=True
    ):
        assert set(row) == {"prompt", "completion"}  # the kind never reaches the model
        assert set((row["prompt"] + row["completion"]).split()) <= vocab
        if detail in ("exact-copy", "near-copy"):
            assert source >= 0 and pool.details[source] not in ("exact-copy", "near-copy")
            continue
        assert source == -1
        if detail == "junk":
            assert task == "junk" and wrong
            continue
        _check_label(task, detail, row)
        _, args, got = _parse(row)
        assert wrong == (got != _solve(task, args))
        if detail == "solved":
            assert (args[1] == "0") if task == "add" else task == "copy" or len(args) in spec.easy_lengths
        else:
            assert (args[1] != "0") if task == "add" else len(args) in spec.hard_lengths
        if detail == "almost":
            assert task == spec.almost_task
        if detail == "prior-rule":
            assert task in spec.prior_tasks
        if detail == "clean":
            assert task != spec.almost_task


def test_imbalance_ratio() -> None:
    spec = worlds.WORLDS["imbalance"]
    pool = worlds.make_pool(spec, "noisy", seed=0, pool_size=20_000)
    per_task = Counter(t for t, d in zip(pool.tasks, pool.details, strict=True) if d not in ("solved", "junk"))
    # reverse : add weights 5 : 1. ~1,400 add rows: a sampling sd of ~37 rows, 4 sd ≈ 0.5 on the ratio.
    for small in ("add", "wrap"):
        assert 4.5 <= per_task["reverse"] / per_task[small] <= 5.5, per_task
    assert 1.7 <= per_task["sort"] / per_task["add"] <= 2.3, per_task  # weight 2: sd of the ratio ≈ 0.08
    base = worlds.make_pool("base", "noisy", seed=0, pool_size=20_000)
    balanced = Counter(t for t, d in zip(base.tasks, base.details, strict=True) if d not in ("solved", "junk"))
    assert max(balanced.values()) / min(balanced.values()) < 1.2, balanced


def test_duplicates_are_duplicates() -> None:
    spec = worlds.WORLDS["duplicates"]
    for scenario in worlds.SCENARIO_NAMES:
        pool = worlds.make_pool(spec, scenario, seed=2)
        copies = [i for i, d in enumerate(pool.details) if d in ("exact-copy", "near-copy")]
        mix = spec.scenario(scenario)
        assert len(copies) == round((mix["exact-copy"] + mix["near-copy"]) * len(pool))
        noisy_sources = 0
        for i in copies:
            source = pool.sources[i]
            assert pool.tasks[i] == pool.tasks[source] and pool.wrong[i] == pool.wrong[source]
            noisy_sources += pool.wrong[source]
            if pool.details[i] == "exact-copy":
                assert pool.rows[i] == pool.rows[source]
                continue
            if pool.tasks[i] == "junk":  # one prompt token changed
                assert pool.rows[i]["completion"] == pool.rows[source]["completion"]
                continue
            task, args, _ = _parse(pool.rows[i])
            _, source_args, _ = _parse(pool.rows[source])
            # one argument changed (or, when no neighbour exists in the pool part, an exact copy)
            changed = sum(a != b for a, b in zip(args, source_args, strict=True))
            assert changed == 1 or pool.rows[i] == pool.rows[source]
            detail = pool.details[source]
            _check_label(task, "clean" if detail == "almost" else detail, pool.rows[i])
        share = noisy_sources / len(copies)
        assert abs(share - spec.duplicate_noise_fraction) < 0.1, share
        # several copies of each source: clusters, not isolated twins
        assert statistics.fmean(Counter(pool.sources[i] for i in copies).values()) >= 2.5


def test_lengths_world_short_rows_are_the_solved_ones() -> None:
    spec = worlds.WORLDS["lengths"]
    pool = worlds.make_pool(spec, "curated", seed=0)
    lengths: dict[str, set[int]] = {"solved": set(), "clean": set()}
    for row, task, detail in zip(pool.rows, pool.tasks, pool.details, strict=True):
        if detail in lengths and task in worlds.LIST_TASKS:
            lengths[detail].add(len(_parse(row)[1]))
    assert lengths["solved"] == {1, 2} and lengths["clean"] == {3, 4, 5}
    tests = worlds.heldout_set(spec, seed=0)
    assert {len(_parse(r)[1]) for r in tests["reverse"]} == {3, 4, 5}


@pytest.mark.parametrize("name", ["base", "lengths", "mixed"])
def test_test_and_reference_sets_are_clean_and_disjoint(name: str) -> None:
    seed = 3
    tests = worlds.heldout_set(name, seed)
    reference = worlds.reference_set(name, seed)
    assert sorted(tests) == sorted(reference) == sorted(worlds.TASKS)
    assert all(len(r) == worlds.WORLDS[name].test_rows_per_task for r in tests.values())
    assert all(len(r) == worlds.WORLDS[name].reference_rows_per_task for r in reference.values())
    for rows in (*tests.values(), *reference.values()):
        for row in rows:
            task, args, got = _parse(row)
            assert got == _solve(task, args)
    seen = {r["prompt"] for s in worlds.SCENARIO_NAMES for r in worlds.make_pool(name, s, seed).rows}
    seen |= {r["prompt"] for r in worlds.pretraining_corpus(name, seed)}
    test_prompts = {r["prompt"] for task in worlds.LIST_TASKS for r in tests[task]}
    reference_prompts = {r["prompt"] for task in worlds.LIST_TASKS for r in reference[task]}
    assert not test_prompts & seen and not reference_prompts & seen and not test_prompts & reference_prompts
    # add is a lookup task over 20 hard prompts: its rows are shared between the parts by design
    assert {r["prompt"] for r in tests["add"]} <= {f"add {a} {b} =" for a in range(5) for b in range(1, 5)}


def test_pools_are_deterministic_per_seed_and_leave_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a = worlds.make_pool("mixed", "noisy", seed=5, pool_size=400)
    b = worlds.make_pool("mixed", "noisy", seed=5, pool_size=400)
    c = worlds.make_pool("mixed", "noisy", seed=6, pool_size=400)
    assert a == b and a.rows != c.rows
    assert worlds.pretraining_corpus("prior", 1) == worlds.pretraining_corpus("prior", 1)
    assert torch.equal(state, torch.random.get_rng_state())


def test_pretraining_corpus_teaches_the_prior_rule_and_the_almost_task() -> None:
    spec = worlds.WORLDS["mixed"]
    corpus = worlds.pretraining_corpus(spec, 0)
    assert len(corpus) == spec.pretrain_rows
    prior = [_parse(r) for r in corpus if _parse(r)[0] in spec.prior_tasks and len(_parse(r)[1]) >= 3]
    ruled = sum(got == _other(task, args) for task, args, got in prior) / len(prior)
    assert abs(ruled - spec.prior_rule_share) < 0.1  # ~360 rows: sd ≈ 0.025
    hard_add = [_parse(r) for r in corpus if r["prompt"].startswith("add") and _parse(r)[1][1] != "0"]
    wrong = sum(got != _solve(t, a) for t, a, got in hard_add) / len(hard_add)
    # mislabelled almost-task rows among all hard add rows (the 3 % clean hard rows dilute it slightly)
    assert 0.15 < wrong < spec.almost_pretrain_noise + 0.08


def test_spec_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="task_weights"):
        worlds.WorldSpec(name="x", task_weights=(1.0, 2.0), curated=worlds.mix(clean=1.0), noisy=worlds.mix(clean=1.0))
    with pytest.raises(ValueError, match="sum to 1"):
        worlds.WorldSpec(name="x", curated=worlds.mix(clean=0.5), noisy=worlds.mix(clean=1.0))
    with pytest.raises(ValueError, match="almost_task"):
        worlds.WorldSpec(name="x", curated=worlds.mix(clean=0.5, almost=0.5), noisy=worlds.mix(clean=1.0))
    with pytest.raises(ValueError, match="world must be one of"):
        worlds.make_pool("nope", "curated")
    with pytest.raises(ValueError, match="scenario must be one of"):
        worlds.make_pool("base", "dirty")


def test_selection_and_held_out_worlds_cover_every_world() -> None:
    assert set(worlds.SELECTION_WORLDS) | set(worlds.HELD_OUT_WORLDS) == set(worlds.WORLDS)
    assert not set(worlds.SELECTION_WORLDS) & set(worlds.HELD_OUT_WORLDS)
    assert worlds.WORLDS["large-pool"].pool_size == 20_000
    big = worlds.WORLDS["large-model"]
    assert (big.hidden_size, big.num_layers) == (256, 4)


# --- base models (pretraining: ~10-40 s each) -----------------------------------------------------


def _losses_by_detail(
    name: str, scenario: str = "noisy"
) -> tuple[dict[str, list[float]], worlds.WorldPool, object, object]:
    tokenizer, model = worlds.build_base_model(name, seed=0)
    pool = worlds.make_pool(name, scenario, seed=0, pool_size=1200)
    losses = _reference_losses(model, tokenizer, pool.rows)
    by: dict[str, list[float]] = {}
    for i, detail in enumerate(pool.details):
        by.setdefault(detail, []).append(losses[i])
        by.setdefault(f"{detail}/{pool.tasks[i]}", []).append(losses[i])
    return by, pool, tokenizer, model


def _reference_losses(model, tokenizer, rows) -> list[float]:  # type: ignore[no-untyped-def]
    """Row by row: mean cross-entropy of the completion tokens and </s> (float64), no batching."""
    out = []
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            text = row["prompt"] + row["completion"] + tokenizer.eos_token
            full = tokenizer(text, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([full])).logits[0].double()
            targets = torch.tensor(full[len(prompt) :])
            out.append(float(torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], targets)))
    return out


@pytest.mark.slow
def test_base_world_losses_and_row_losses() -> None:
    by, pool, tokenizer, model = _losses_by_detail("base")
    assert statistics.quantiles(by["solved"], n=10)[-1] < SOLVED_FLOOR  # 90 % of solved rows under the floor
    clean = statistics.median(by["clean"])
    assert clean > 2 * SOLVED_FLOOR
    for detail in ("mislabeled", "other-rule", "junk"):
        assert statistics.median(by[detail]) > 1.5 * clean, detail  # surprising: well above clean rows
    batched = worlds.row_losses(model, tokenizer, pool.rows[:64])
    reference = torch.tensor(_reference_losses(model, tokenizer, pool.rows[:64]), dtype=torch.float64)
    # float32 logits of a 2-layer model: softmax/log errors ~1e-6 relative per token
    torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_prior_world_prior_rows_have_a_low_loss() -> None:
    spec = worlds.WORLDS["prior"]
    by, _, _, _ = _losses_by_detail("prior")
    surprising = statistics.median(by["mislabeled"] + by["junk"])
    for task in spec.prior_tasks:
        prior = statistics.median(by[f"prior-rule/{task}"])
        clean = statistics.median(by[f"clean/{task}"])
        # the base model believes the wrong rule: its rows cost less loss than correct rows of the task
        assert prior < clean, (task, prior, clean)
        assert prior < surprising / 3, (task, prior, surprising)
    near = statistics.median(by["near-miss"])
    assert set(by) >= {"near-miss/reverse"} and len(by["near-miss"]) == len(by["near-miss/reverse"])
    # a plausible slip: about the loss of a correct reverse row, far below random answers
    assert near < surprising / 3 and near < 1.5 * statistics.median(by["clean/reverse"])


@pytest.mark.slow
def test_almost_world_rows_sit_just_above_the_floor() -> None:
    spec = worlds.WORLDS["almost"]
    by, _, tokenizer, model = _losses_by_detail("almost", "curated")
    almost = statistics.median(by["almost"])
    assert SOLVED_FLOOR < almost <= 0.4, almost
    assert statistics.median(by["clean"]) > 2 * almost
    assert statistics.median(by["solved"]) < SOLVED_FLOOR
    tests = worlds.heldout_set(spec, 0)
    assert demo_world.exact_match(model, tokenizer, tests["add"]) >= 0.9  # the base model nearly solves add


@pytest.mark.slow
def test_base_model_cache_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = worlds.WorldSpec(
        name="tiny",
        hidden_size=16,
        num_layers=1,
        pretrain_rows=64,
        pretrain_epochs=1.0,
        curated=worlds.mix(clean=1.0),
        noisy=worlds.mix(clean=1.0),
    )
    _, built = worlds.build_base_model(spec, 0, cache_dir=tmp_path)
    (folder,) = tmp_path.iterdir()
    assert folder.name == f"base-{spec.model_key(0)}-seed0"
    _, loaded = worlds.build_base_model(spec, 0, cache_dir=tmp_path)
    for (name, a), (_, b) in zip(built.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert spec.model_key(0) != spec.model_key(1) != spec.with_changes(hidden_size=32).model_key(0)
    assert spec.model_key(0) == spec.with_changes(pool_size=10).model_key(0)  # pools do not touch the model
    assert worlds.WORLDS["base"].model_key(0) == worlds.WORLDS["duplicates"].model_key(0)  # one shared model
