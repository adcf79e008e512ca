"""`spice_trainer.demo.compare`: every method through one Trainer loop, SPICE through the callback."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from spice_trainer.config import SpiceConfig
from spice_trainer.demo import compare, worlds
from spice_trainer.demo.toy import build_model, build_tokenizer
from spice_trainer.pipeline import select

SETTINGS = compare.TrainSettings(epochs=2.0, batch_size=4, lora_r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def setup() -> tuple[object, compare.Candidates, worlds.WorldPool]:
    tokenizer = build_tokenizer(worlds.vocabulary())
    base = build_model(tokenizer, hidden_size=16, num_layers=1, seed=0)
    pool = worlds.make_pool("mixed", "noisy", seed=0, pool_size=60)
    reference = [r for rows in worlds.reference_set("mixed", 0, n_per_task=2).values() for r in rows]
    candidates = compare.Candidates(
        dataset=datasets.Dataset.from_list(compare.tokenize_prompt_completion(tokenizer, pool.rows)),
        collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        clean_rows=pool.indices_of("clean"),
        reference=datasets.Dataset.from_list(compare.tokenize_prompt_completion(tokenizer, reference)),
    )
    return base, candidates, pool


def test_tokenize_prompt_completion_supervises_the_completion_and_eos() -> None:
    tokenizer = build_tokenizer(worlds.vocabulary())
    (row,) = compare.tokenize_prompt_completion(tokenizer, [{"prompt": "sort cat ant =", "completion": " ant cat"}])
    assert tokenizer.convert_ids_to_tokens(row["input_ids"]) == ["sort", "cat", "ant", "=", "ant", "cat", "</s>"]
    assert row["labels"] == [-100] * 4 + row["input_ids"][4:]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "random", "random-clean", "small-loss", "grad-norm", "less"])
def test_fixed_row_methods_train_on_their_rows(setup, method: str) -> None:  # type: ignore[no-untyped-def]
    base, candidates, pool = setup
    run = compare.run_method(base, candidates, method, budget=0.1, seed=1, settings=SETTINGS)
    k = 60 if method == "full" else 6
    assert len(run.rows) == len(set(run.rows)) == k
    assert run.steps == math.ceil(k / SETTINGS.batch_size) * SETTINGS.epochs  # epochs over its own rows
    if method == "random-clean":
        assert all(pool.details[i] == "clean" for i in run.rows)
    if method == "small-loss":
        # Reference: the losses of the gradient pass (the public function, on the same fresh adapter and rows),
        # sorted in Python.
        from spice_trainer.features.gradients import compute_gradient_features

        model = compare.fresh_adapter(base, SETTINGS, 1)
        grads = compute_gradient_features(model, candidates.dataset, SpiceConfig(), candidates.collator)
        losses = grads.losses.tolist()
        expected = sorted((v, i) for i, v in enumerate(losses) if v > compare.SMALL_LOSS_FLOOR)[:k]
        assert run.rows == [i for _, i in expected]


@pytest.mark.slow
def test_defaults_select_through_the_callback_like_an_offline_select(setup) -> None:  # type: ignore[no-untyped-def]
    base, candidates, _ = setup
    run = compare.run_method(base, candidates, "defaults", budget=0.1, seed=2, settings=SETTINGS)
    assert run.selection is not None and run.selection.stop_reason
    # Reference: the library's offline select() on the same fresh adapter, the same rows and collator.
    offline = select(
        compare.fresh_adapter(base, SETTINGS, 2), candidates.dataset, SpiceConfig(budget=0.1), candidates.collator
    )
    assert run.rows == offline.selected
    assert run.steps == math.ceil(len(run.rows) / SETTINGS.batch_size) * SETTINGS.epochs


def test_method_configs() -> None:
    assert compare.method_config("defaults", 0.1, {}) == SpiceConfig(budget=0.1)
    assert compare.method_config("paper", 0.1, {}) == SpiceConfig.paper(budget=0.1)
    fisher = compare.method_config("fisher", 0.1, {})
    assert fisher is not None and fisher.conflict_weight == 0 and fisher.stop_ratio is None
    nostop = compare.method_config("paper-nostop", 0.1, {})
    assert nostop == SpiceConfig.paper(budget=0.1, stop_rule="none", stop_ratio=None)
    name, fields = compare.parse_variant("q=max_loss_quantile:none,feature_norm:none,conflict_weight:0.5,proj_dim:64")
    assert name == "q" and fields == {
        "max_loss_quantile": None,
        "feature_norm": "none",
        "conflict_weight": 0.5,
        "proj_dim": 64,
    }
    assert compare.method_config("q", 0.2, {name: fields}) == SpiceConfig(budget=0.2, **fields)
    assert compare.method_config("random", 0.1, {}) is None
    with pytest.raises(ValueError, match="stop_ratio"):
        compare.parse_variant("bad=stop_ratio:2")
    with pytest.raises(ValueError, match="not_a_field"):
        compare.parse_variant("bad=not_a_field:1")
    with pytest.raises(ValueError, match="built-in method"):
        compare.parse_variant("random=stop_ratio:0.5")


def test_paired_difference_and_tables() -> None:
    records = [
        {"method": "random", "seed": 0, "accuracy": 0.2},
        {"method": "random", "seed": 1, "accuracy": 0.4},
        {"method": "x", "seed": 0, "accuracy": 0.3},
        {"method": "x", "seed": 1, "accuracy": 0.6},
    ]
    mean, sd = compare.paired_difference(records, "x") or (math.nan, math.nan)
    assert mean == pytest.approx(0.15) and sd == pytest.approx(math.sqrt(2) * 0.05)
    assert compare.paired_difference(records, "y") is None
    assert compare.format_pm((0.15, 0.0707), signed=True) == "+0.150 ± 0.071"
    assert compare.markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert torch.__version__  # torch is importable next to the module (it imports it lazily)


def test_tokenize_rows_formats() -> None:
    tokenizer = build_tokenizer(worlds.vocabulary())
    text, fmt = compare.tokenize_rows(tokenizer, [{"text": "copy ant = ant"}])
    assert fmt == "text" and text[0]["labels"] == text[0]["input_ids"]
    assert tokenizer.convert_ids_to_tokens(text[0]["input_ids"])[-1] == "</s>"
    messages = [{"role": "user", "content": "sort cat ant ="}, {"role": "assistant", "content": "ant cat"}]
    (chat,), fmt = compare.tokenize_rows(tokenizer, [{"messages": messages}])
    assert fmt == "messages"
    supervised = [t for t, label in zip(chat["input_ids"], chat["labels"], strict=True) if label != -100]
    assert tokenizer.convert_ids_to_tokens(supervised) == ["ant", "cat", "</s>"]
    (cut,), _ = compare.tokenize_rows(tokenizer, [{"prompt": "sort cat ant =", "completion": " ant cat"}], max_length=5)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 5
    with pytest.raises(ValueError, match="compare needs"):
        compare.tokenize_rows(tokenizer, [{"question": "x"}])


def test_heldout_metrics_match_exact_match_and_a_loss_loop() -> None:
    from spice_trainer.demo import world as demo_world

    tokenizer = build_tokenizer(worlds.vocabulary())
    model = build_model(tokenizer, hidden_size=16, num_layers=1, seed=3)
    rows = worlds.pretraining_corpus("base", 0)[:40]
    demo_world.finetune(model, tokenizer, rows, epochs=20, learning_rate=1e-2, batch_size=8, seed=0)
    tokenised, _ = compare.tokenize_rows(tokenizer, rows)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    got = compare.heldout_metrics(model, datasets.Dataset.from_list(tokenised), collator, batch_size=7)
    assert got["exact_match"] == demo_world.exact_match(model, tokenizer, rows)  # independent implementation
    assert 0 < got["exact_match"] < 1
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in tokenised:  # one row at a time, float64 sums
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].double()
            labels = torch.tensor(row["labels"][1:])
            mask = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            tokens += int(mask.sum())
    # float32 logits summed over ~200 tokens: relative error well under 1e-5
    assert got["loss"] == pytest.approx(total / tokens, rel=1e-5)


@pytest.mark.slow
def test_compare_on_a_local_dataset_and_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys
    from pathlib import Path

    tokenizer = build_tokenizer(worlds.vocabulary())
    model = build_model(tokenizer, hidden_size=16, num_layers=1, seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    pool = worlds.make_pool("base", "noisy", seed=0, pool_size=50)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool.rows), encoding="utf-8")
    held = worlds.heldout_set("base", 0, n_per_task=3)
    (tmp_path / "eval.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for rows in held.values() for r in rows), encoding="utf-8"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [
            sys.executable,
            str(root / "bench" / "quality.py"),
            "--dataset",
            str(tmp_path / "rows.jsonl"),
            "--eval-dataset",
            str(tmp_path / "eval.jsonl"),
            "--model",
            str(tmp_path / "model"),
            "--methods",
            "random,defaults,grad-norm",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| defaults | 5 |" in result.stdout and "| grad-norm | 5 |" in result.stdout
    records = json.loads((tmp_path / "out" / "dataset.json").read_text())["records"]
    assert [r["method"] for r in records] == ["random", "defaults", "grad-norm"]
    assert all(len(r["selected"]) == 5 and all(0 <= i < 50 for i in r["selected"]) for r in records)
    assert all(math.isfinite(r["loss"]) and 0 <= r["exact_match"] <= 1 for r in records)


def test_cli_compare_errors_are_one_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from spice_trainer.cli.main import main

    assert main(["compare", "--dataset", str(tmp_path / "rows.jsonl")]) == 2
    assert "compare needs --dataset and --model" in capsys.readouterr().err
    (tmp_path / "rows.jsonl").write_text('{"question": "x"}\n' * 10, encoding="utf-8")
    tokenizer = build_tokenizer(worlds.vocabulary())
    build_model(tokenizer, hidden_size=16, num_layers=1).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    args = ["compare", "--dataset", str(tmp_path / "rows.jsonl"), "--model", str(tmp_path / "m")]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "compare needs 'prompt' and 'completion'" in capsys.readouterr().err
    assert main([*args, "--variant", "v=stop_ratio:3", "--out", str(tmp_path / "o")]) == 2
    assert "stop_ratio" in capsys.readouterr().err
