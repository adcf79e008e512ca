"""The ``spice-trainer`` command: select / report end to end on tiny saved models, errors, demo smoke."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spice_trainer.cli import main as cli
from spice_trainer.config import SpiceConfig
from spice_trainer.core.selection import Selection
from spice_trainer.demo import world
from spice_trainer.demo.experiment import DEMO_QUICK
from spice_trainer.demo.toy import build_model, build_tokenizer
from spice_trainer.pipeline import select


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny plain Llama and its tokenizer, written with save_pretrained."""
    path = tmp_path_factory.mktemp("model")
    tok = build_tokenizer(world.vocabulary())
    model = build_model(tok, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pool() -> world.Pool:
    return world.candidate_pool(40, "noisy", seed=0)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "select", "report"):
        assert command in text
    with pytest.raises(SystemExit):
        cli.main(["select", "--help"])
    assert "--budget" in capsys.readouterr().out


def test_select_end_to_end_matches_the_library(
    saved_model: Path, pool: world.Pool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_jsonl(tmp_path / "pool.jsonl", pool.rows)
    out = tmp_path / "out"
    argv = ["select", "--model", str(saved_model), "--dataset", str(data), "--budget", "6", "--out", str(out)]
    argv += ["--proj-dim", "32", "--stop-ratio", "none", "--seed", "3", "--quiet"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "added a default LoRA" in printed

    indices = json.loads((out / "indices.json").read_text())
    assert len(indices) == 6 == len(set(indices))
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert selected == [pool.rows[i] for i in indices]
    selection = Selection.load(out / "selection.json")
    assert selection.selected == indices
    assert (out / "selection.png").stat().st_size > 0

    # Reference: the same model, LoRA seed and config through the library directly.
    model, tok, _ = cli.load_model(saved_model, seed=3)
    config = SpiceConfig(budget=6, proj_dim=32, stop_ratio=None, seed=3)
    expected = select(model, world.tokenize_rows(tok, pool.rows), config, show_progress=False)
    assert expected.selected == indices


def test_select_loads_a_peft_adapter_and_csv(saved_model: Path, pool: world.Pool, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.peft_config["default"].base_model_name_or_path = str(saved_model)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)

    import datasets

    csv_path = tmp_path / "pool.csv"
    datasets.Dataset.from_list(pool.rows).to_csv(str(csv_path), index=False)
    out = tmp_path / "out"
    argv = ["select", "--model", str(adapter), "--dataset", str(csv_path), "--budget", "0.25", "--out", str(out)]
    assert cli.main([*argv, "--quiet", "--proj-dim", "16"]) == 0
    indices = json.loads((out / "indices.json").read_text())
    assert 1 <= len(indices) <= 10  # 25% of 40, early stopping may pick fewer
    selected = datasets.Dataset.from_csv(str(out / "selected.csv")).to_list()
    assert selected == [pool.rows[i] for i in indices]

    model, _, note = cli.load_model(adapter)
    assert "PEFT adapter" in note
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any("k_proj" in n for n in names)  # the saved adapter, not a default LoRA


def test_tokenize_for_selection_text_and_messages(saved_model: Path) -> None:
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(saved_model)
    rows = world.candidate_pool(8, "curated", seed=1).rows
    text = cli.tokenize_for_selection(tok, datasets.Dataset.from_list(rows))
    assert text == world.tokenize_rows(tok, rows)

    convo = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in rows
    ]
    (first, *_) = cli.tokenize_for_selection(tok, datasets.Dataset.from_list(convo))
    tokens = tok.convert_ids_to_tokens(first["input_ids"])
    answered = [t for t, m in zip(tokens, first["completion_mask"], strict=True) if m]
    # The template renders "<|assistant|> {content} </s> "; the mask covers the answer and its </s>.
    assert answered == [*rows[0]["completion"].split(), "</s>"]
    assert tokens[: len(tokens) - len(answered)][-1] == "<|assistant|>"


def test_select_errors_name_the_problem(saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")

    def run(dataset: str, model: str = str(saved_model)) -> str:
        assert cli.main(["select", "--model", model, "--dataset", dataset, "--out", out, "--quiet"]) == 2
        return capsys.readouterr().err

    assert "no such file" in run(str(tmp_path / "missing.jsonl"))
    (tmp_path / "rows.txt").write_text("hello\n")
    assert "unknown format '.txt'" in run(str(tmp_path / "rows.txt"))
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    err = run(str(bad))
    assert "['answer', 'question']" in err and "'prompt' and 'completion'" in err and "'messages'" in err
    good = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "add 1 2 =", "completion": " 3"}])
    assert "no such folder" in run(str(good), model=str(tmp_path / "nomodel"))
    assert cli.main(["select", "--model", str(saved_model), "--dataset", str(good), "--out", out, "--budget", "2"]) == 2
    assert "budget=2 exceeds the pool size" in capsys.readouterr().err


def _selection(n_picks: int, seed: int) -> Selection:
    from spice_trainer.core.greedy import select_from_features

    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(30, 8, generator=gen)
    return select_from_features(feats, SpiceConfig(budget=n_picks, stop_ratio=None))


def test_report_renders_rounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rounds = tmp_path / "run" / "spice"
    sels = [_selection(5, 0), _selection(7, 1)]
    for i, sel in enumerate(sels):
        sel.save(rounds / f"round-{i}.json")
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    report = (rounds / "report.md").read_text()
    table_rows = [line for line in report.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert len(table_rows) == 2
    assert "| 5 |" in table_rows[0] and "| 7 |" in table_rows[1]
    assert f"{sels[1].gains[0]:.4g}" in table_rows[1]
    assert (rounds / "round-0.png").exists() and (rounds / "round-1.png").exists()
    assert "report written to" in capsys.readouterr().out

    single = tmp_path / "sel"
    sels[0].save(single / "selection.json")
    path = cli.render_report(single)
    assert path == single / "report.md" and "selection" in path.read_text()

    assert cli.main(["report", str(tmp_path / "empty-does-not-exist")]) == 2
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "found no selection" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for method in ("spice", "random", "full"):
        assert method in printed
    results = json.loads((out / "results.json").read_text())
    by_method = {r["method"]: r for r in results}
    assert by_method["full"]["rows"] == DEMO_QUICK.pool_size
    budget = SpiceConfig(budget=0.1).budget_count(DEMO_QUICK.pool_size)
    assert by_method["random"]["rows"] == budget
    assert 1 <= by_method["spice"]["rows"] <= budget
    # The callback ran inside SFTTrainer and wrote its round; the demo reports the rows it trained on.
    round_file = out / "runs" / "spice" / "spice" / "round-0.json"
    assert by_method["spice"]["rows"] == len(Selection.load(round_file).selected)
    assert (out / "report.md").exists() and (out / "accuracy.png").exists()
