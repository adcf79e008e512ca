"""Batched per-example LoRA gradient features against a one-example-at-a-time backward() reference.

Comparisons with the reference run the model in float64, so that the only float32 arithmetic is the gradient
pass's own accumulation and projection, and check every feature against its float32 forward error bound
(`float_bounds.float64_reference`), not against a fixed tolerance.
"""

import copy

import pytest
import torch
from float_bounds import U32, assert_within, float64_reference, gamma

from spice_trainer.config import SpiceConfig
from spice_trainer.core.projection import BlockProjector
from spice_trainer.demo.toy import add_lora, build_model, build_tokenizer
from spice_trainer.features.gradients import (
    adam_or_unit,
    compute_gradient_features,
    find_lora_weights,
    gradient_features,
    has_adam_moments,
)

TOK = build_tokenizer([f"w{i}" for i in range(60)])


def _rows(n=9, seed=0, prompt_masked=2):
    """Rows of random lengths; the first ``prompt_masked`` tokens carry no loss (completion-only)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 14, (1,), generator=g))
        ids = torch.randint(7, len(TOK), (length,), generator=g).tolist()
        labels = [-100] * prompt_masked + ids[prompt_masked:]
        rows.append({"input_ids": ids, "labels": labels, "text": "ignored string column"})
    return rows


def _model(family="llama", dtype=torch.float32):
    return add_lora(build_model(TOK, family=family, hidden_size=32), r=4).to(dtype)


def _projector(module, name, config):
    """The projector the library uses for this weight (same seed, key without the PEFT wrapper prefix)."""
    key = name.split("base_model.model.")[-1]
    return BlockProjector(module.weight.numel(), config.proj_dim, config.projection, config.seed, key)


def _reference(model, rows, config):
    """Independent reference: float64 loss.backward() one example at a time, LoRA .grad projected in float64;
    with the float32 error bound of the batched pass (`float_bounds`)."""
    return float64_reference(model, rows, config)


class LeftPadCollator:
    def __call__(self, rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, width - n :] = torch.tensor(r["input_ids"])
            labels[i, width - n :] = torch.tensor(r["labels"])
            mask[i, width - n :] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.fixture(scope="module")
def llama_case():
    """One model, rows and reference shared by the parametrized comparisons (the reference is the slow part)."""
    model, rows = _model(dtype=torch.float64), _rows()
    config = SpiceConfig(proj_dim=48, feature_norm="none")
    return model, rows, config, _reference(model, rows, config)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_batched_features_equal_the_per_example_backward_loop(llama_case, batch_size, padding):
    model, rows, config, ref = llama_case
    config = config.with_changes(batch_size=batch_size)
    collator = LeftPadCollator() if padding == "left" else None
    got = compute_gradient_features(model, rows, config, collator, show_progress=False)
    assert_within(got.features, ref.features, ref.bound)
    # After the causal shift, label positions 1..L-1 remain; position 1 is a masked prompt token.
    assert got.num_tokens.tolist() == [len(r["input_ids"]) - 2 for r in rows]


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "mistral"])
def test_other_families(family):
    model, rows = _model(family, dtype=torch.float64), _rows(5)
    config = SpiceConfig(proj_dim=32, feature_norm="none", batch_size=4)
    got = gradient_features(model, rows, config)
    assert_within(got, *_reference(model, rows, config))


@pytest.mark.parametrize("projection", ["gaussian", "sparse", "kronecker"])
def test_other_projections_match_the_reference(projection):
    model, rows = _model(dtype=torch.float64), _rows(4)
    config = SpiceConfig(proj_dim=32, feature_norm="none", projection=projection)
    assert_within(gradient_features(model, rows, config), *_reference(model, rows, config))


@pytest.mark.parametrize("proj_dim", [30, 3])
def test_kronecker_features_fold_when_the_rank_does_not_divide_proj_dim(proj_dim):
    # r = 4: d = 30 folds 4 x 8 = 32 coordinates onto 30; d = 3 < r folds every rank row onto 3 coordinates.
    model, rows = _model(dtype=torch.float64), _rows(4)
    config = SpiceConfig(proj_dim=proj_dim, feature_norm="none", projection="kronecker", batch_size=3)
    assert_within(gradient_features(model, rows, config), *_reference(model, rows, config))


def test_losses_match_transformers_loss_and_unit_norm():
    model, rows = _model(dtype=torch.float64), _rows(5)
    got = compute_gradient_features(model, rows, SpiceConfig(proj_dim=32, feature_norm="unit"), show_progress=False)
    model.eval()
    for row, loss in zip(rows, got.losses, strict=True):
        # transformers' causal-LM loss (labels shifted left, -100 ignored, mean over targets), in float64
        # (transformers itself upcasts the logits to float32 only).
        labels = torch.tensor([row["labels"]])
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits
        ref = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
        # Ours is the float64 loss rounded once to float32 (batched and single forwards differ by float64 rounding).
        # (plus 2^-45 relative: the float64 difference of the batched and the single forward).
        assert abs(loss.item() - ref.item()) <= (U32 + 2.0**-45) * abs(ref.item())
    # Unit norm in float32: the norm is a sum of 32 squares and one square root, then one division per entry.
    norms = got.features.double().norm(dim=1)
    assert bool(((norms - 1).abs() <= gamma(32 + 3)).all()), norms


def test_bf16_model_agrees_with_float32():
    model, rows = _model(), _rows(6)
    config = SpiceConfig(proj_dim=64, feature_norm="none")
    f32 = gradient_features(model, rows, config)
    bf16 = gradient_features(copy.deepcopy(model).to(torch.bfloat16), rows, config)
    # bf16 carries ~3 significant digits through 2 layers; a cosine of 0.99 leaves room for that while
    # still failing on any structural error (a wrong module or example gives cosines near 0).
    cos = torch.nn.functional.cosine_similarity(f32, bf16, dim=1)
    assert bool((cos > 0.99).all()), cos


def test_same_seed_same_features_for_any_batch_size_and_seed_matters():
    model, rows = _model(dtype=torch.float64), _rows(7)
    feats = [gradient_features(model, rows, SpiceConfig(proj_dim=16, batch_size=b)) for b in (1, 3, 8)]
    _, bound = _reference(model, rows, SpiceConfig(proj_dim=16))
    assert_within(feats[0], feats[1], 2 * bound)  # each within the bound of the exact features
    assert_within(feats[0], feats[2], 2 * bound)
    other = gradient_features(model, rows, SpiceConfig(proj_dim=16, seed=7))
    assert not torch.allclose(feats[0], other)


def test_indices_compute_a_subset_in_order():
    model, rows = _model(dtype=torch.float64), _rows(6)
    config = SpiceConfig(proj_dim=16)
    full = compute_gradient_features(model, rows, config, show_progress=False)
    part = compute_gradient_features(model, rows, config, indices=[4, 1], show_progress=False)
    _, bound = _reference(model, [rows[4], rows[1]], config)
    assert_within(part.features, full.features[[4, 1]], 2 * bound)


def test_model_grads_modes_optimizer_and_rng_untouched():
    model, rows = _model(), _rows(5)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(input_ids=torch.tensor([rows[0]["input_ids"]]), labels=torch.tensor([rows[0]["labels"]])).loss
    loss.backward()
    optimizer.step()
    grads_before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    modes_before = {n: m.training for n, m in model.named_modules()}
    opt_before = copy.deepcopy(optimizer.state_dict())
    rng_before = torch.get_rng_state()

    compute_gradient_features(model, rows, SpiceConfig(proj_dim=16, feature_norm="adam"), optimizer=optimizer)

    assert torch.equal(torch.get_rng_state(), rng_before)
    assert {n: m.training for n, m in model.named_modules()} == modes_before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n])
        if grads_before[n] is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, grads_before[n])
    after = optimizer.state_dict()
    for key, state in opt_before["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(after["state"][key][name]), torch.as_tensor(value))


def test_adam_normalisation_matches_a_hand_computation():
    model, rows = _model(dtype=torch.float64), _rows(3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    model.train()
    for row in rows:
        optimizer.zero_grad()
        model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    config = SpiceConfig(proj_dim=24, feature_norm="adam")
    got = compute_gradient_features(model, rows, config, optimizer=optimizer, show_progress=False).features

    # By hand, in float64: each gradient entry divided by sqrt(v / (1 - beta2^t)) + eps, then projected.
    denominators = {}
    for name, module in find_lora_weights(model)[1]:
        state = optimizer.state[module.weight]
        v_hat = state["exp_avg_sq"] / (1 - 0.99 ** float(state["step"]))
        denominators[name] = v_hat.sqrt() + 1e-8
    assert_within(got, *float64_reference(model, rows, config, denominators=denominators))


def test_adam_without_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="feature_norm='adam' needs the live optimizer"):
        gradient_features(_model(), _rows(2), SpiceConfig(feature_norm="adam"))


def test_adam_falls_back_to_unit_until_the_optimizer_has_second_moments():
    model, rows = _model(), _rows(2)
    lora = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    adam, unit = SpiceConfig(feature_norm="adam"), SpiceConfig(feature_norm="unit")

    # No optimizer, or one that has not stepped: "unit", every other field kept.
    for before in (None, optimizer):
        assert not has_adam_moments(before)
        assert adam_or_unit(adam, before) == adam.with_changes(feature_norm="unit")
    assert (
        adam_or_unit(unit, None) is unit and adam_or_unit(SpiceConfig(feature_norm="none"), None).feature_norm == "none"
    )

    model.train()
    model(input_ids=torch.tensor([rows[0]["input_ids"]]), labels=torch.tensor([rows[0]["labels"]])).loss.backward()
    optimizer.step()
    assert has_adam_moments(optimizer) and adam_or_unit(adam, optimizer) is adam
    # Restricted to parameters the optimizer never stepped (the proxy asks about its own adapter only).
    outside = [p for p in model.parameters() if not p.requires_grad][:1]
    assert not has_adam_moments(optimizer, outside) and adam_or_unit(adam, optimizer, outside).feature_norm == "unit"
    # What it returns is what the gradient pass accepts: "adam" with the stepped optimizer runs.
    assert (
        compute_gradient_features(model, rows, adam_or_unit(adam, optimizer), optimizer=optimizer).features.shape[0]
        == 2
    )


def test_model_without_lora_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no LoRA adapter.*get_peft_model"):
        gradient_features(build_model(TOK), _rows(2), SpiceConfig())


def test_rows_without_supervised_tokens_or_input_ids():
    rows = _rows(3)
    rows[1]["labels"] = [-100] * len(rows[1]["input_ids"])
    got = compute_gradient_features(_model(), rows, SpiceConfig(proj_dim=8), show_progress=False)
    assert got.num_tokens[1] == 0 and torch.isnan(got.losses[1]) and torch.isnan(got.features[1]).all()
    assert torch.isfinite(got.features[[0, 2]]).all()
    with pytest.raises(ValueError, match="must be a dict with 'input_ids'"):
        gradient_features(_model(), [{"text": "hello"}], SpiceConfig())


def test_several_active_adapters_need_an_explicit_choice():
    from peft import LoraConfig

    model = _model()
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="2 active LoRA adapters"):
        gradient_features(model, _rows(2), SpiceConfig())
    feats = compute_gradient_features(model, _rows(2), SpiceConfig(proj_dim=8), adapter_name="second").features
    assert feats.shape == (2, 8)
    adapter, weights = find_lora_weights(model, "second")  # "second" adapts q_proj only
    assert adapter == "second" and weights and all(".q_proj.lora_" in name for name, _ in weights)

    # select() and the callback take no adapter name: the error says what works from there.
    from spice_trainer.pipeline import select

    config = SpiceConfig(budget=2, proj_dim=8)
    with pytest.raises(ValueError, match=r"2 active LoRA adapters.*model\.set_adapter\(name\)"):
        select(model, _rows(4), config, show_progress=False)
    model.base_model.set_adapter("second")
    assert len(select(model, _rows(4), config, show_progress=False).selected) == 2  # the budget
    alone = compute_gradient_features(model, _rows(2), config, show_progress=False).features
    assert torch.equal(alone, compute_gradient_features(model, _rows(2), config, adapter_name="second").features)


def test_gradient_checkpointing_and_input_require_grads(llama_case):
    # What Trainer(gradient_checkpointing=True) and PEFT's prepare_model_for_kbit_training leave behind.
    model, rows, config, ref = llama_case
    model = copy.deepcopy(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    got = gradient_features(model, rows, config.with_changes(batch_size=4))
    assert_within(got, *ref)
    assert model.is_activation_checkpointing and model.training
    flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert flags and all(flags)


def test_collators_from_transformers_and_trl(llama_case):
    from transformers import DataCollatorWithPadding
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, rows, config, ref = llama_case
    config = config.with_changes(batch_size=4)
    # TRL's collator pads right, labels -100 on padding; rows carry the completion-only labels.
    trl = DataCollatorForLanguageModeling(pad_token_id=TOK.pad_token_id)
    assert_within(gradient_features(model, rows, config, trl), *ref)
    # Rows with a TRL-style completion_mask and no labels through our own collator: the same targets.
    masked = [{"input_ids": r["input_ids"], "completion_mask": [0, 0] + [1] * (len(r["input_ids"]) - 2)} for r in rows]
    assert_within(gradient_features(model, masked, config), *ref)
    # DataCollatorWithPadding gives no labels: every real token is a target, padding is not.
    plain = [{"input_ids": r["input_ids"]} for r in rows[:4]]
    full_labels = [{**r, "labels": r["input_ids"]} for r in plain]
    got = gradient_features(model, plain, config, DataCollatorWithPadding(TOK))
    assert_within(got, *_reference(model, full_labels, config))
    with pytest.raises(ValueError, match="padding-free or packing collators"):
        gradient_features(model, rows, config, DataCollatorForLanguageModeling(TOK.pad_token_id, padding_free=True))


def test_lora_on_the_embedding_is_left_out_with_a_warning(caplog):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_model(TOK, hidden_size=32).double(), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj", "v_proj"])
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so lora_A has a gradient too
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(0))
    rows, config = _rows(4), SpiceConfig(proj_dim=16, feature_norm="none")
    with caplog.at_level("WARNING", logger="spice_trainer.features.gradients"):
        got = gradient_features(model, rows, config)
    assert "left out of the gradient features" in caplog.text and "embed_tokens" in caplog.text
    names = [n for n, _ in find_lora_weights(model)[1]]
    assert len(names) == 8 and not any("embed" in n for n in names)  # q and v of 2 layers, A and B
    assert_within(got, *_reference(model, rows, config))


def test_ddp_wrapped_model_is_measured_inside_and_training_continues(llama_case, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, rows, config, ref = llama_case
    model = copy.deepcopy(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        # find_unused_parameters=True is the reducer mode most sensitive to a forward without a backward.
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        assert_within(gradient_features(ddp, rows, config.with_changes(batch_size=4)), *ref)
        # The pass runs on the wrapped module: the next ordinary DDP step works and yields the plain gradient.
        ddp.train()
        batch = {"input_ids": torch.tensor([rows[0]["input_ids"]]), "labels": torch.tensor([rows[0]["labels"]])}
        ddp(**batch).loss.backward()
        got = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for g, p in zip(got, [p for p in model.parameters() if p.requires_grad], strict=True):
            # The same operations on the same input (a 1-process all-reduce averages over one rank: exact).
            assert torch.equal(g, p.grad)
    finally:
        dist.destroy_process_group()


class _TwiceLM(torch.nn.Module):
    """A toy causal LM whose ``mix`` layer is applied twice per forward and whose ``unused`` layer never runs."""

    def __init__(self, vocab=30, hidden=12):
        super().__init__()
        self.config = type("Config", (), {"pad_token_id": 0})()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.unused = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids, labels=None, **_):
        h = self.embed(input_ids)
        h = h + torch.tanh(self.mix(h))
        h = h + torch.tanh(self.mix(h.cumsum(dim=1) / 4))  # causal: position t sees positions <= t
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return type("Out", (), {"logits": logits, "loss": loss})()


def test_a_lora_layer_called_twice_sums_its_calls_and_an_unused_one_is_zero():
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(_TwiceLM().double(), LoraConfig(r=2, target_modules=["mix", "unused"]))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(1, 30, (6,), generator=g).tolist()), "labels": ids} for _ in range(4)]
    config = SpiceConfig(proj_dim=16, feature_norm="none", batch_size=4)
    got = gradient_features(model, rows, config)
    assert_within(got, *_reference(model, rows, config))
    # The reference sums both calls of `mix` in its .grad and has no .grad for `unused` (a zero gradient);
    # both layers are measured (an uncalled one is not an error).
    _, lora = find_lora_weights(model)
    assert [n.split(".")[-2:] for n, _ in lora] == [
        ["mix", "lora_A"],
        ["mix", "lora_B"],
        ["unused", "lora_A"],
        ["unused", "lora_B"],
    ]


def test_hf_datasets_rows_with_text_messages_ids_and_truncation(llama_case):
    from datasets import Dataset

    model, rows, config, _ = llama_case
    max_length = 8
    table = [
        {**r, "row_id": i, "messages": [{"role": "user", "content": "hi"}], "text": "a b"} for i, r in enumerate(rows)
    ]
    truncated = [{k: r[k][:max_length] for k in ("input_ids", "labels")} for r in rows]
    expected = _reference(model, truncated, config)
    config = config.with_changes(batch_size=4, max_length=max_length)
    ds = Dataset.from_list(table)
    assert_within(gradient_features(model, ds, config), *expected)
    as_torch = ds.with_format("torch", columns=["input_ids", "labels", "row_id"], output_all_columns=True)
    assert_within(gradient_features(model, as_torch, config), *expected)
    as_numpy = ds.with_format("numpy", columns=["input_ids", "labels"])
    assert_within(gradient_features(model, as_numpy, config), *expected)


def test_batches_group_rows_of_similar_length_and_keep_the_output_order(llama_case):
    model, rows, config, ref = llama_case
    widths = []

    def recording(batch_rows):
        widths.append(sorted(len(r["input_ids"]) for r in batch_rows))
        return LeftPadCollator()(batch_rows)

    got = gradient_features(model, rows, config.with_changes(batch_size=3), recording)
    assert_within(got, *ref)  # rows come back in the dataset's order
    lengths = sorted((len(r["input_ids"]) for r in rows), reverse=True)
    assert [w[::-1] for w in widths] == [lengths[i : i + 3] for i in range(0, len(rows), 3)]  # longest first


def test_only_positions_with_a_target_go_through_the_lm_head(llama_case):
    model, rows, config, ref = llama_case
    model = copy.deepcopy(model)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[1]))
    # Every row's first target (position 1) is a masked prompt token, so position 0 never needs logits, and
    # the last position predicts nothing: the longest row's length minus 2 positions remain.
    got = gradient_features(model, rows, config.with_changes(batch_size=len(rows)))
    assert_within(got, *ref)
    assert seen == [max(len(r["input_ids"]) for r in rows) - 2]


def test_thread_count_applies_during_the_pass_and_is_restored():
    model, rows = _model(), _rows(3)
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gradient_features(model, rows, SpiceConfig(proj_dim=8, threads=1, batch_size=2))
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        handle.remove()


def test_forward_only_losses_equal_the_gradient_pass_losses():
    from spice_trainer.features.gradients import compute_losses

    model, rows = _model(), _rows(9)
    rows[3]["labels"] = [-100] * len(rows[3]["labels"])
    config = SpiceConfig(proj_dim=8, batch_size=4)
    full = compute_gradient_features(model, rows, config, show_progress=False)
    model.train()
    losses, tokens, largest = compute_losses(model, rows, config, indices=list(range(9)), show_progress=False)
    assert model.training  # the mode is restored
    assert torch.equal(tokens, full.num_tokens) and torch.isnan(losses[3]) and torch.isnan(largest[3])
    torch.testing.assert_close(losses, full.losses, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(largest, full.max_token_losses, rtol=1e-5, atol=1e-6, equal_nan=True)
