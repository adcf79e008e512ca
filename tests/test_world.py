"""The synthetic instruction world: generators, tokenisation, exact match and training."""

from __future__ import annotations

import copy

import pytest
import torch

from spice_trainer.demo import world
from spice_trainer.demo.toy import add_lora, build_model, build_tokenizer


def _solve(task: str, prompt: str) -> str:
    """An independent reference solver of the world's tasks (from the prompt text alone)."""
    words = prompt.split()
    assert words[0] == task and words[-1] == "="
    args = words[1:-1]
    if task == "add":
        return str((int(args[0]) + int(args[1])) % world.MODULUS)
    if task == "reverse":
        return " ".join(args[::-1])
    if task == "sort":
        return " ".join(sorted(args))
    if task == "wrap":
        return "[ " + " , ".join(args) + " ]"
    if task == "copy":
        return " ".join(args)
    raise AssertionError(task)


@pytest.mark.parametrize("scenario", sorted(world.SCENARIOS))
def test_pool_counts_per_kind_follow_the_scenario(scenario: str) -> None:
    n = 1000
    pool = world.candidate_pool(n, scenario, seed=3)
    counts = pool.counts()
    assert sum(counts.values()) == n == len(pool.rows) == len(pool.kinds) == len(pool.tasks)
    for kind, share in world.SCENARIOS[scenario].items():
        assert abs(counts[kind] - share * n) <= 1, (kind, counts)
    corrupted = sum(counts[k] for k in world.CORRUPTED_KINDS) / n
    assert corrupted < 0.15 if scenario == "curated" else 0.4 <= corrupted <= 0.6


def test_rows_match_their_hidden_kind() -> None:
    pool = world.candidate_pool(600, "noisy", seed=1)
    vocab = set(world.vocabulary())
    for row, task, kind in zip(pool.rows, pool.tasks, pool.kinds, strict=True):
        assert set(row) == {"prompt", "completion"}  # the kind never reaches the model
        assert row["completion"].startswith(" ")
        assert set((row["prompt"] + row["completion"]).split()) <= vocab
        if kind == "junk":
            continue
        answer = row["completion"].strip()
        truth = _solve(task, row["prompt"])
        if kind in ("clean", "redundant"):
            assert answer == truth, (kind, row)
        else:
            assert answer != truth, (kind, row)
        n_args = len(row["prompt"].split()) - 2
        if kind == "redundant" and task != "copy":
            assert row["prompt"].split()[2] == "0" if task == "add" else n_args in world.EASY_LENGTHS
        elif kind != "redundant":
            assert row["prompt"].split()[2] != "0" if task == "add" else n_args in world.HARD_LENGTHS


def test_generators_are_deterministic_per_seed() -> None:
    a = world.candidate_pool(300, "noisy", seed=5)
    b = world.candidate_pool(300, "noisy", seed=5)
    c = world.candidate_pool(300, "noisy", seed=6)
    assert a.rows == b.rows and a.kinds == b.kinds
    assert a.rows != c.rows
    assert world.pretraining_corpus(50, seed=2) == world.pretraining_corpus(50, seed=2)
    assert world.heldout_set(20, seed=2) == world.heldout_set(20, seed=2)
    state = torch.random.get_rng_state()
    world.candidate_pool(100, "curated", seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_heldout_set_is_clean_and_hard() -> None:
    tests = world.heldout_set(50, seed=0)
    assert sorted(tests) == sorted(world.TASKS)
    for task, rows in tests.items():
        assert len(rows) == 50
        for row in rows:
            assert row["completion"].strip() == _solve(task, row["prompt"])
    for row in world.pretraining_corpus(200, seed=0):
        task = row["prompt"].split()[0]
        assert row["completion"].strip() == _solve(task, row["prompt"])


def test_tokenize_rows_matches_trl_layout() -> None:
    tok = build_tokenizer(world.vocabulary())
    row = {"prompt": "reverse ant bee cat =", "completion": " cat bee ant"}
    (out,) = world.tokenize_rows(tok, [row])
    tokens = tok.convert_ids_to_tokens(out["input_ids"])
    assert tokens == ["reverse", "ant", "bee", "cat", "=", "cat", "bee", "ant", "</s>"]
    assert out["completion_mask"] == [0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_exact_match_equals_greedy_decoding() -> None:
    tok = build_tokenizer(world.vocabulary())
    model = build_model(tok, hidden_size=32, num_layers=1, seed=0)
    rows = world.pretraining_corpus(40, seed=0)
    world.finetune(model, tok, rows, epochs=30, learning_rate=1e-2, batch_size=8, seed=0)
    got = world.exact_match(model, tok, rows)
    # Reference: greedy decoding token by token with generate().
    hits = 0
    for row in rows:
        ids = tok(row["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        target = world.tokenize_rows(tok, [row])[0]["input_ids"][ids.shape[1] :]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(target), do_sample=False, pad_token_id=tok.pad_token_id)
        hits += out[0, ids.shape[1] :].tolist() == target
    assert got == hits / len(rows)
    assert got > 0.0  # the model learned something, so the comparison is not vacuous


def test_finetune_trains_only_the_adapter_and_is_deterministic() -> None:
    tok = build_tokenizer(world.vocabulary())
    base = build_model(tok, hidden_size=16, num_layers=1, seed=0)
    rows = world.candidate_pool(40, "curated", seed=0).rows
    results = []
    for _ in range(2):
        model = add_lora(copy.deepcopy(base), r=4, init_b_random=False)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        result = world.finetune(model, tok, rows, epochs=2, batch_size=8, seed=1)
        assert result.steps == 10
        for name, param in model.named_parameters():
            if name in frozen:
                assert torch.equal(param, frozen[name])
        results.append(result.final_loss)
    assert results[0] == results[1]
