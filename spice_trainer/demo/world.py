"""A small synthetic instruction world for the demo and the quality benchmark.

The world has four instruction tasks a tiny causal LM can learn on a CPU in seconds:

===========  =======================  ==================  ================================
task         prompt                   completion          easy form (pretraining)
===========  =======================  ==================  ================================
``add``      ``add 3 4 =``            ``2`` ((a+b) mod 5)  ``b = 0``
``reverse``  ``reverse ant cat dog =`` ``dog cat ant``    lists of 1-2 words
``sort``     ``sort dog ant cat =``   ``ant cat dog``     lists of 1-2 words
``wrap``     ``wrap ant cat =``       ``[ ant , cat ]``   lists of 1-2 words
===========  =======================  ==================  ================================

plus ``copy`` (``copy ant cat = ant cat``), which only ever appears in its easy form. The *hard* forms
(``b ≥ 1``, lists of 3 words) are what fine-tuning should teach.

Three kinds of data:

* `pretraining_corpus` — easy rows only; `build_world` pretrains the base model on it so that the
  easy rows are already solved and fine-tuning has something left to add.
* `candidate_pool` — what a user would fine-tune on. Each row carries a hidden ``kind`` (kept in
  `Pool.kinds`, never in the rows the model sees):

  - ``clean``: a correct hard row;
  - ``redundant``: an easy row the base model already solves;
  - ``mislabeled``: a hard prompt with a plausible but wrong answer (a random digit, a shuffled list);
  - ``conflicting``: a hard prompt answered by a consistent *other* rule (subtraction, copy instead
    of reverse, descending sort, a list without commas);
  - ``junk``: random tokens in the prompt and the completion.

  Two scenarios: ``"curated"`` (about 10 % noise) and ``"noisy"`` (about half the pool corrupted).
* `heldout_set` — clean hard rows per task, for exact-match evaluation.

Rows are prompt-completion dicts (``{"prompt": ..., "completion": ...}``), so TRL's
completion-only loss applies. The completion starts with a space and carries no end-of-sequence token:
TRL appends it, and `tokenize_rows` does the same.

Randomness flows only through local ``torch.Generator`` objects seeded from the ``seed`` arguments.
Imports torch at module level, transformers/peft (through `spice_trainer.demo.toy`) on use.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("add", "reverse", "sort", "wrap")
EASY_ONLY_TASKS: tuple[str, ...] = ("copy",)
KINDS: tuple[str, ...] = ("clean", "redundant", "mislabeled", "conflicting", "junk")
CORRUPTED_KINDS: tuple[str, ...] = ("mislabeled", "conflicting", "junk")

MODULUS = 5
DIGITS: tuple[str, ...] = tuple(str(i) for i in range(MODULUS))
WORDS: tuple[str, ...] = ("ant", "bee", "cat", "dog", "elk", "fox", "gnu", "hen")
SYMBOLS: tuple[str, ...] = ("=", "[", "]", ",")

# Share of each kind in a pool, per scenario. Like real instruction mixes, most rows teach the base model
# nothing new (redundant); the rows that do (clean) are about an eighth of the pool. "curated" is a
# hand-checked set (8 % noise); "noisy" is a scraped set where half the rows are corrupted.
SCENARIOS: dict[str, dict[str, float]] = {
    "curated": {"clean": 0.12, "redundant": 0.80, "mislabeled": 0.04, "conflicting": 0.02, "junk": 0.02},
    "noisy": {"clean": 0.12, "redundant": 0.38, "mislabeled": 0.22, "conflicting": 0.08, "junk": 0.20},
}

HARD_LENGTHS: tuple[int, ...] = (3,)
EASY_LENGTHS: tuple[int, ...] = (1, 2)


def vocabulary() -> list[str]:
    """Every word a row of the world can contain (the tokenizer's vocabulary, special tokens aside)."""
    return [*TASKS, *EASY_ONLY_TASKS, *DIGITS, *WORDS, *SYMBOLS]


# --- rows -----------------------------------------------------------------------------------------


@dataclass
class Pool:
    """Rows with their hidden labels.

    Attributes:
        rows: ``{"prompt": str, "completion": str}`` dicts — all a model (or a selector) ever sees.
        tasks: the task of each row (``"junk"`` rows get the task ``"junk"``).
        kinds: the kind of each row, one of `KINDS`.
    """

    rows: list[dict[str, str]] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self) -> dict[str, int]:
        """How many rows of each kind (every kind in `KINDS` is present, possibly with 0)."""
        counter = Counter(self.kinds)
        return {kind: counter.get(kind, 0) for kind in KINDS}

    def kind_shares(self, indices: Sequence[int] | None = None) -> dict[str, float]:
        """Share of each kind among ``indices`` (default: the whole pool)."""
        picked = range(len(self)) if indices is None else indices
        counter = Counter(self.kinds[i] for i in picked)
        total = max(1, sum(counter.values()))
        return {kind: counter.get(kind, 0) / total for kind in KINDS}

    def clean_share(self, indices: Sequence[int]) -> float:
        """Share of ``clean`` rows among ``indices`` (0.0 for an empty selection)."""
        if len(indices) == 0:
            return 0.0
        return sum(self.kinds[i] == "clean" for i in indices) / len(indices)

    def subset(self, indices: Sequence[int]) -> Pool:
        """The rows at ``indices``, in that order."""
        return Pool(
            rows=[self.rows[i] for i in indices],
            tasks=[self.tasks[i] for i in indices],
            kinds=[self.kinds[i] for i in indices],
        )


def _randint(gen: torch.Generator, high: int) -> int:
    """A uniform integer in ``[0, high)``."""
    return int(torch.randint(high, (1,), generator=gen).item())


def _choice(gen: torch.Generator, options: Sequence[Any]) -> Any:
    return options[_randint(gen, len(options))]


def _words(gen: torch.Generator, length: int) -> list[str]:
    """``length`` distinct words in random order."""
    order = torch.randperm(len(WORDS), generator=gen)[:length].tolist()
    return [WORDS[i] for i in order]


def answer(task: str, args: Sequence[str]) -> list[str]:
    """The correct completion tokens of ``task`` on ``args`` (the rules of every synthetic world)."""
    if task == "add":
        return [str((int(args[0]) + int(args[1])) % MODULUS)]
    if task == "reverse":
        return list(reversed(args))
    if task == "sort":
        return sorted(args)
    if task == "wrap":
        return wrapped(args)
    if task == "copy":
        return list(args)
    raise ValueError(f"task must be one of {(*TASKS, *EASY_ONLY_TASKS)!r}, got {task!r}")


def wrapped(words: Sequence[str]) -> list[str]:
    """``words`` as the ``wrap`` task writes them: ``[ a , b , c ]``."""
    out = ["["]
    for i, word in enumerate(words):
        if i:
            out.append(",")
        out.append(word)
    return [*out, "]"]


def other_rule_answer(task: str, args: Sequence[str]) -> list[str]:
    """A consistent *other* rule for ``task`` (what a second, confused labeler would write): subtraction, copy
    instead of reverse, descending sort, no commas. The demo's ``conflicting`` rows carry it."""
    if task == "add":
        return [str((int(args[0]) - int(args[1])) % MODULUS)]
    if task == "reverse":
        return list(args)  # copied instead of reversed
    if task == "sort":
        return sorted(args, reverse=True)
    if task == "wrap":
        return ["[", *args, "]"]  # the commas forgotten
    raise ValueError(f"no other rule for task {task!r}")


def _mislabeled_answer(task: str, args: list[str], gen: torch.Generator) -> list[str]:
    """A plausible but wrong answer: a random other digit, or the list shuffled into a wrong order."""
    correct = answer(task, args)
    if task == "add":
        wrong = [d for d in DIGITS if d != correct[0]]
        return [_choice(gen, wrong)]
    for _ in range(32):
        order = torch.randperm(len(args), generator=gen).tolist()
        candidate = answer("wrap", [args[i] for i in order]) if task == "wrap" else [args[i] for i in order]
        if candidate != correct:
            return candidate
    # Every permutation of ``args`` was the correct one (cannot happen for >= 2 distinct words).
    return [*correct[1:], correct[0]]


def _args(task: str, gen: torch.Generator, *, hard: bool) -> list[str]:
    if task == "add":
        a = _randint(gen, MODULUS)
        b = 1 + _randint(gen, MODULUS - 1) if hard else 0
        return [str(a), str(b)]
    lengths = HARD_LENGTHS if hard else EASY_LENGTHS
    if task == "copy":
        lengths = (*EASY_LENGTHS, *HARD_LENGTHS)  # copying is easy at every length
    return _words(gen, _choice(gen, lengths))


def _row(task: str, args: list[str], answer: list[str]) -> dict[str, str]:
    return {"prompt": " ".join([task, *args, "="]), "completion": " " + " ".join(answer)}


def make_row(task: str, kind: str, gen: torch.Generator) -> dict[str, str]:
    """One prompt-completion row of ``task`` and ``kind`` (see the module docstring).

    ``kind="redundant"`` draws an easy row; ``"clean"``, ``"mislabeled"`` and ``"conflicting"`` a hard
    prompt with the matching answer; ``"junk"`` ignores ``task``.
    """
    if kind == "junk":
        tokens = vocabulary()
        prompt = [_choice(gen, tokens) for _ in range(2 + _randint(gen, 5))]
        completion = [_choice(gen, tokens) for _ in range(1 + _randint(gen, 6))]
        return {"prompt": " ".join([*prompt, "="]), "completion": " " + " ".join(completion)}
    if kind == "redundant":
        args = _args(task, gen, hard=False)
        return _row(task, args, answer(task, args))
    if task not in TASKS:
        raise ValueError(f"a {kind!r} row needs a task in {TASKS!r}, got {task!r}")
    args = _args(task, gen, hard=True)
    if kind == "clean":
        return _row(task, args, answer(task, args))
    if kind == "mislabeled":
        return _row(task, args, _mislabeled_answer(task, args, gen))
    if kind == "conflicting":
        return _row(task, args, other_rule_answer(task, args))
    raise ValueError(f"kind must be one of {KINDS!r}, got {kind!r}")


def pretraining_corpus(n: int, seed: int = 0, *, hard_share: float = 0.0) -> list[dict[str, str]]:
    """``n`` rows for pretraining the base model: easy rows (every task, plus ``copy`` at every length)
    and a ``hard_share`` of clean hard rows of `TASKS`."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tasks = (*TASKS, *EASY_ONLY_TASKS)
    n_hard = round(hard_share * n)
    rows = [make_row(_choice(gen, TASKS), "clean", gen) for _ in range(n_hard)]
    rows += [make_row(_choice(gen, tasks), "redundant", gen) for _ in range(n - n_hard)]
    order = torch.randperm(n, generator=gen).tolist()
    return [rows[i] for i in order]


def candidate_pool(n: int, scenario: str = "noisy", seed: int = 0) -> Pool:
    """A pool of ``n`` candidate rows mixed by ``scenario`` (see `SCENARIOS`), in shuffled order.

    Each kind gets ``round(share · n)`` rows (the rounding remainder goes to ``clean``). Tasks are drawn
    uniformly: from `TASKS` for clean/mislabeled/conflicting rows, from `TASKS` + ``copy`` for redundant.

    Raises:
        ValueError: for an unknown scenario or ``n < 1``.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {tuple(SCENARIOS)!r}, got {scenario!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    shares = SCENARIOS[scenario]
    counts = {kind: round(shares[kind] * n) for kind in KINDS if kind != "clean"}
    counts["clean"] = n - sum(counts.values())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    kinds = [kind for kind in KINDS for _ in range(counts[kind])]
    order = torch.randperm(n, generator=gen).tolist()
    kinds = [kinds[i] for i in order]
    pool = Pool()
    for kind in kinds:
        if kind == "junk":
            task = "junk"
        elif kind == "redundant":
            task = _choice(gen, (*TASKS, *EASY_ONLY_TASKS))
        else:
            task = _choice(gen, TASKS)
        pool.rows.append(make_row(task, kind, gen))
        pool.tasks.append(task)
        pool.kinds.append(kind)
    return pool


def heldout_set(n_per_task: int = 100, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Clean hard rows, ``n_per_task`` per task of `TASKS`, for exact-match evaluation.

    Drawn from its own stream (``seed`` offset), so it never shares a generator with a pool.
    """
    gen = torch.Generator(device="cpu").manual_seed(1_000_003 + seed)
    return {task: [make_row(task, "clean", gen) for _ in range(n_per_task)] for task in TASKS}


# --- tokenisation, batching, evaluation -----------------------------------------------------------


def tokenize_rows(tokenizer: Any, rows: Sequence[Mapping[str, str]]) -> list[dict[str, list[int]]]:
    """Tokenise prompt-completion rows the way TRL's `SFTTrainer` does.

    ``input_ids`` is ``tokenize(prompt + completion + eos)`` and ``completion_mask`` marks the tokens
    after the prompt (the completion and the end-of-sequence token).
    """
    out = []
    for row in rows:
        ids, start = prompt_completion_ids(tokenizer, row)
        out.append({"input_ids": ids, "completion_mask": [0] * start + [1] * (len(ids) - start)})
    return out


def prompt_completion_ids(tokenizer: Any, row: Mapping[str, str]) -> tuple[list[int], int]:
    """``(ids, start)``: ``ids = tokenize(prompt + completion + eos)`` (the end-of-sequence token added unless the
    completion ends with it) and ``start`` the first token after the prompt's own tokens (TRL's split)."""
    eos = tokenizer.eos_token or ""
    completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
    prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    ids = list(tokenizer(row["prompt"] + completion, add_special_tokens=False)["input_ids"])
    start = 0
    while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
        start += 1
    return ids, start


def collate(rows: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenised rows into ``input_ids``, ``attention_mask`` and ``labels`` (``(b, L)`` each).

    ``labels`` is ``input_ids`` on completion tokens and ``-100`` elsewhere (prompt and padding).
    """
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        mask = torch.as_tensor(list(r["completion_mask"]), dtype=torch.bool)
        input_ids[i, : len(ids)] = ids
        attention[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.where(mask, ids, torch.full_like(ids, -100))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


@torch.no_grad()
def exact_match(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, str]], *, batch_size: int = 256) -> float:
    """Share of ``rows`` whose whole completion (and the end-of-sequence token) the model gets right.

    Teacher-forced argmax match: row i counts when ``argmax p(y_t | prompt, y_<t) = y_t`` for every
    completion token ``t``. For exact match this is the same as greedy decoding — greedy decoding
    reproduces ``y`` iff every step's argmax given the correct prefix is the next token of ``y`` — at
    the cost of one forward pass per batch instead of one per generated token.
    """
    if len(rows) == 0:
        raise ValueError("exact_match needs at least one row, got an empty list")
    was_training = model.training
    model.eval()
    tokenised = tokenize_rows(tokenizer, rows)
    correct = 0
    try:
        for start in range(0, len(tokenised), batch_size):
            batch = collate(tokenised[start : start + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            predicted = logits[:, :-1].argmax(dim=-1)  # (b, L-1): prediction for token t+1
            target = batch["labels"][:, 1:]
            supervised = target != -100
            row_ok = ((predicted == target) | ~supervised).all(dim=1) & supervised.any(dim=1)
            correct += int(row_ok.sum())
    finally:
        model.train(was_training)
    return correct / len(tokenised)


def evaluate(model: Any, tokenizer: Any, tests: Mapping[str, Sequence[Mapping[str, str]]]) -> dict[str, float]:
    """Exact match per task, plus ``"mean"`` (the unweighted mean over tasks)."""
    scores = {task: exact_match(model, tokenizer, rows) for task, rows in tests.items()}
    scores["mean"] = sum(scores.values()) / max(1, len(scores))
    return scores


# --- training -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    """What `finetune` did: optimizer steps, wall-clock seconds, mean loss of the last epoch."""

    steps: int
    seconds: float
    final_loss: float


def finetune(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    *,
    epochs: float = 3.0,
    learning_rate: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    warmup_ratio: float = 0.1,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``rows`` with completion-only loss.

    AdamW (weight decay 0), linear warm-up over ``warmup_ratio`` of the steps then linear decay to 0,
    shuffled order from a local generator. ``epochs`` may be fractional; the step count is
    ``ceil(epochs · len(rows) / batch_size)`` (the last partial batch of an epoch is kept).

    Returns:
        `TrainResult`.
    """
    if len(rows) == 0:
        raise ValueError("finetune needs at least one row, got an empty selection")
    tokenised = tokenize_rows(tokenizer, rows)
    n = len(tokenised)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = max(1, math.ceil(epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warmup = max(1, int(warmup_ratio * total_steps))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model.train()
    start = time.perf_counter()
    step = 0
    epoch_losses: list[float] = []
    while step < total_steps:
        order = torch.randperm(n, generator=gen).tolist()
        epoch_losses = []
        for offset in range(0, n, batch_size):
            if step >= total_steps:
                break
            batch = collate([tokenised[i] for i in order[offset : offset + batch_size]], tokenizer.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_losses.append(loss.item())
            if on_step is not None:
                on_step(step, epoch_losses[-1])
            step += 1
    model.eval()
    final = sum(epoch_losses) / max(1, len(epoch_losses))
    return TrainResult(steps=total_steps, seconds=time.perf_counter() - start, final_loss=final)


# --- the world ------------------------------------------------------------------------------------


def build_world(
    seed: int = 0,
    *,
    pretrain_rows: int = 3000,
    pretrain_epochs: float = 4.0,
    pretrain_hard_share: float = 0.03,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> tuple[Any, Any]:
    """The tokenizer and a tiny Llama pretrained on the easy corpus (no adapter).

    The model (``hidden_size`` 64, 2 layers, 4 heads) is trained on all its weights on
    `pretraining_corpus` for ``pretrain_epochs`` passes (about 30 s on 2 CPU cores), so that the easy
    rows are solved and the hard ones are not. Returns the model in eval mode.
    """
    from spice_trainer.demo.toy import build_model, build_tokenizer

    tokenizer = build_tokenizer(vocabulary())
    model = build_model(
        tokenizer,
        family="llama",
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=4,
        intermediate_size=4 * hidden_size,
        max_positions=64,
        seed=seed,
    )
    corpus = pretraining_corpus(pretrain_rows, seed=seed, hard_share=pretrain_hard_share)
    result = finetune(model, tokenizer, corpus, epochs=pretrain_epochs, learning_rate=3e-3, batch_size=32, seed=seed)
    logger.info(
        "pretrained the base model: %d steps in %.1f s, final loss %.3f",
        result.steps,
        result.seconds,
        result.final_loss,
    )
    return tokenizer, model
