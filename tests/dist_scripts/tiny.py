"""The tiny model and data every launched script shares (built in-process, identical on every rank).

A 1-layer Llama (hidden 16) with a LoRA adapter (r = 2) and ``n`` rows of 8 tokens: the first 3
tokens are the prompt (labels -100), the rest the completion. All rows have the same length, so the
Trainer's default collator needs no padding. Rows are distinct (exactly repeated rows would tie in the
greedy, and a tie may break either way under different float summation orders).
"""

from __future__ import annotations

from typing import Any

import torch

WORDS = [f"w{i}" for i in range(24)]
SEQ = 8
PROMPT = 3


def build(seed: int = 0) -> tuple[Any, Any]:
    """(tokenizer, LoRA model)."""
    from spice_trainer.demo.toy import add_lora, build_model, build_tokenizer

    tok = build_tokenizer(WORDS)
    model = build_model(tok, hidden_size=16, num_layers=1, num_heads=2, seed=seed)
    return tok, add_lora(model, r=2, seed=seed)


def rows(tok: Any, n: int = 48, seed: int = 1) -> list[dict[str, list[int]]]:
    """``n`` rows of ``input_ids``, ``attention_mask`` and ``labels`` (prompt masked with -100)."""
    gen = torch.Generator().manual_seed(seed)
    first = tok.convert_tokens_to_ids(WORDS[0])
    out = []
    for _ in range(n):
        ids = (first + torch.randint(len(WORDS), (SEQ,), generator=gen)).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * SEQ, "labels": [-100] * PROMPT + ids[PROMPT:]})
    return out


def hf_dataset(tok: Any, n: int = 48, seed: int = 1) -> Any:
    from datasets import Dataset

    data = rows(tok, n, seed)
    return Dataset.from_dict({key: [r[key] for r in data] for key in data[0]})
