"""The proxy model: compatibility checks, its own adapter, the online pooled regime, refresh steps, the
agreement report, and rounds through SpiceDataCallback on a real Trainer."""

import copy
import json
import logging
import math
import weakref

import pytest
import torch
import trainer_world as tw
from transformers import Trainer, TrainerCallback

from spice_trainer import SpiceConfig, SpiceDataCallback, select, select_from_features
from spice_trainer.demo.toy import add_lora, build_model, build_tokenizer
from spice_trainer.features.gradients import compute_gradient_features
from spice_trainer.integrations.hub import load_proxy
from spice_trainer.integrations.proxy_rounds import PROXY_STATE_FILE
from spice_trainer.proxy.agreement import proxy_agreement, spearman
from spice_trainer.proxy.model import ProxyModel

TOK = tw.TOK


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine wait at OpenMP barriers with more threads (bench/README.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _target(seed=0, hidden=64):
    return add_lora(build_model(TOK, hidden_size=hidden, seed=seed), r=4, seed=seed)


def _proxy_base(seed=1, family="llama", tok=TOK):
    return build_model(tok, family=family, hidden_size=32, seed=seed)


def _config(**overrides):
    settings = {
        "budget": 16,
        "proj_dim": 32,
        "greedy": "pooled",
        "pool_size": 8,
        "picks_per_pool": 2,
        "proxy_refresh_every_pools": 3,
        "proxy_learning_rate": 5e-2,
        "min_loss": None,
        "max_loss_quantile": None,
        "surprise_threshold": None,  # no guard: the references below run the greedy on bare features
    }
    settings.update(overrides)
    return SpiceConfig(**settings)


def _pool_features(proxy, data, config, begin, end):
    return proxy.features(data, config, indices=list(range(begin, end))).features


class TrainingCollator(tw.RecordingCollator):
    """Records what the dataloader draws; SPICE's gradient pass and the proxy's refresh steps are not training
    (`RecordingCollator` skips every call the library marks with `is_selection_collation`)."""


def _snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the online pooled regime ------------------------------------------------------------------------


def test_online_regime_without_refresh_equals_pooled_greedy_on_the_proxys_features():
    data = tw.dataset(48)
    config = _config(budget=10, proxy_refresh_every_pools=100, stop_rule="ratio", stop_ratio=0.6)
    proxy = ProxyModel(_proxy_base(), config, target=_target(), tokenizer=TOK)
    online = proxy.select_online(data, config)
    # Reference: the library's pooled greedy on the proxy's features, computed pool by pool (same batches).
    features = torch.cat([_pool_features(proxy, data, config, b, min(b + 8, 48)) for b in range(0, 48, 8)])
    reference = select_from_features(features, config)
    assert online.metadata["refresh_steps"] == 0 and proxy.refresh_steps == 0
    assert online.indices == reference.indices
    assert online.stop_reason == reference.stop_reason
    assert online.metadata["pools_stopped_early"] == reference.metadata["pools_stopped_early"]
    assert online.gains == pytest.approx(reference.gains, rel=1e-9)
    assert online.base_gains == pytest.approx(reference.base_gains, rel=1e-9)
    assert online.conflicts == pytest.approx(reference.conflicts, rel=1e-9, abs=1e-12)
    assert online.objective == pytest.approx(reference.objective, rel=1e-9)


def test_online_regime_steps_the_proxy_every_T_pools_and_later_pools_use_the_updated_proxy():
    data = tw.dataset(64)
    config = _config()  # 64 rows, pools of 8 -> 8 pools of 2 picks = the budget of 16; T = 3
    target = _target()
    proxy = ProxyModel(_proxy_base(), config, target=target, tokenizer=TOK)
    replay = copy.deepcopy(proxy)
    selection = proxy.select_online(data, config)
    # Refresh before pools 4 and 7: floor((8 - 1) / 3) = 2 AdamW steps, each on the 6 picks of 3 pools.
    assert selection.metadata["pools_visited"] == 8
    assert selection.metadata["refresh_steps"] == 2 and proxy.refresh_steps == 2
    assert all(int(proxy.optimizer.state[p]["step"]) == 2 for p in proxy.lora_weights if p in proxy.optimizer.state)
    picks = selection.indices
    assert len(picks) == 16 and len(set(picks)) == 16
    # Replay by hand: features of pools 1-3 from the initial proxy, a step on their picks, pools 4-6 from the
    # stepped proxy, another step, pools 7-8; the pooled greedy on those features makes the same picks.
    chunks = []
    for pool in range(8):
        if pool in (3, 6):
            replay.refresh(data, picks[2 * (pool - 3) : 2 * pool])
        chunks.append(_pool_features(replay, data, config, 8 * pool, 8 * pool + 8))
    reference = select_from_features(torch.cat(chunks), config)
    assert picks == reference.indices
    assert selection.gains == pytest.approx(reference.gains, rel=1e-9)
    assert _same(_snapshot(proxy.model), _snapshot(replay.model))
    # The refreshed features differ from the initial proxy's: the steps changed what later pools see.
    fresh = ProxyModel(_proxy_base(), config, target=target, tokenizer=TOK)
    assert not torch.allclose(_pool_features(fresh, data, config, 56, 64), chunks[7])


def test_online_regime_grow_counts_initial_rows_and_never_repicks_them():
    data = tw.dataset(32)
    config = _config(budget=8)
    proxy = ProxyModel(_proxy_base(), config, target=_target(), tokenizer=TOK)
    selection = proxy.select_online(data, config, initial=[3, 17, 30])
    assert selection.initial == [3, 17, 30]
    assert len(selection.indices) == 5 and not set(selection.indices) & {3, 17, 30}
    assert selection.selected[:3] == [3, 17, 30]
    assert selection.metadata["initial_objective"] > 0


def test_static_regimes_select_with_the_proxy_through_the_pipeline():
    data = tw.dataset(32)
    config = _config(greedy="exact", budget=6)
    proxy = ProxyModel(_proxy_base(), config, target=_target(), tokenizer=TOK)
    ours = proxy.select(data, config)
    reference = select(proxy.model, data, config, show_progress=False)
    assert ours.indices == reference.indices


# --- refresh ----------------------------------------------------------------------------------------


def test_refresh_is_one_adamw_step_on_the_mean_token_loss_of_the_adapter_only():
    data = tw.dataset(32)
    config = _config(batch_size=4)
    target = _target()
    proxy = ProxyModel(_proxy_base(), config, target=target, tokenizer=TOK)
    # float64 throughout: Adam's first step is lr · g / (|g| + ε), so on an entry whose gradient is near ε a
    # float32 summation-order difference (3 batches vs 1) moves the step by up to lr/4; in float64 the relative
    # error of g is ~1e-15, and the bound below holds with many orders of magnitude to spare.
    proxy.model.double()  # in place: the optimizer keeps the same Parameter objects
    # lora_B random (PEFT starts it at 0, where ∂L/∂A = 0) so that both A and B move.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in proxy.lora_weights:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.05)
    reference = copy.deepcopy(proxy.model)
    before, target_before = _snapshot(proxy.model), _snapshot(target)
    rows = [0, 5, 9, 12, 20, 21, 22, 30, 31, 2]  # 10 rows: batches of 4, 4 and 2 accumulate into one step
    loss = proxy.refresh(data, rows, tw.RecordingCollator())
    # Reference: the causal-LM token-mean cross-entropy (transformers' loss, computed here in float64 since
    # transformers casts logits to float32) on one padded batch of all 10 rows, torch's AdamW, one step.
    batch = tw.RecordingCollator()([data[i] for i in rows])
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.dtype == torch.float64
    ref_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    lora = [p for n, p in reference.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(lora, lr=config.proxy_learning_rate, weight_decay=0.0)
    ref_loss.backward()
    optimizer.step()
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-12)
    after = _snapshot(proxy.model)
    for name, value in reference.named_parameters():
        # float64 rounding of g (relative ~1e-15 for these few hundred terms) moves a step by at most
        # lr · 1e-15 · |g| / ε-scale quantities, far below 1e-9 · lr.
        torch.testing.assert_close(after[name], value.detach(), rtol=1e-12, atol=1e-9 * config.proxy_learning_rate)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and all("lora_" in n for n in changed)  # the adapter moved, the base weights did not
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert _same(_snapshot(target), target_before)
    assert all(p.grad is None for p in proxy.model.parameters())


def test_proxy_work_leaves_the_target_its_grads_optimizer_and_rng_untouched():
    data = tw.dataset(32)
    config = _config(budget=8)
    target = _target()
    optimizer = torch.optim.AdamW([p for p in target.parameters() if p.requires_grad], lr=1e-2)
    batch = tw.RecordingCollator()([data[i] for i in range(4)])
    target(**batch).loss.backward()
    optimizer.step()
    target(**batch).loss.backward()  # leave .grad populated, as mid-accumulation
    target.train()
    params = _snapshot(target)
    grads = {n: p.grad.clone() for n, p in target.named_parameters() if p.grad is not None}
    state = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()

    proxy = ProxyModel(_proxy_base(), config, target=target, tokenizer=TOK)
    proxy.refresh(data, [1, 2, 3])
    proxy.select_online(data, config)
    agreement = proxy_agreement(proxy, target, data, config, target_optimizer=optimizer)

    assert agreement.k == 8
    assert _same(_snapshot(target), params)
    assert {n: p.grad for n, p in target.named_parameters() if p.grad is not None}.keys() == grads.keys()
    assert all(torch.equal(p.grad, grads[n]) for n, p in target.named_parameters() if p.grad is not None)
    after = optimizer.state_dict()
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(after["state"][key][name]), torch.as_tensor(tensor))
    assert torch.equal(torch.get_rng_state(), rng)
    assert target.training
    assert not {id(p) for p in proxy.model.parameters()} & {id(p) for p in target.parameters()}


# --- construction: adapter, device, compatibility ------------------------------------------------------


def test_the_proxys_adapter_follows_the_targets_and_is_seeded():
    config = _config()
    target = add_lora(build_model(TOK, hidden_size=64), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    proxy = ProxyModel(_proxy_base(), config, target=target, tokenizer=TOK)
    lora = proxy.model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (4, 8, {"q_proj", "v_proj"})
    assert proxy.device == torch.device("cpu")
    assert all("lora_" in n for n, p in proxy.model.named_parameters() if p.requires_grad)
    again = ProxyModel(_proxy_base(), config, target=target, tokenizer=TOK)
    assert _same(_snapshot(proxy.model), _snapshot(again.model))  # lora_A drawn from a seeded stream
    plain = ProxyModel(_proxy_base(), config, target=build_model(TOK, hidden_size=64), tokenizer=TOK)
    assert plain.model.peft_config["default"].r == 8  # the default when the target has no adapter


def test_a_compatible_proxy_loads_from_a_local_path_with_its_tokenizer(tmp_path):
    _proxy_base().save_pretrained(tmp_path / "proxy")
    TOK.save_pretrained(tmp_path / "proxy")
    config = _config(budget=4, proxy_model=str(tmp_path / "proxy"))
    proxy = load_proxy(config.proxy_model, config, target=_target(), tokenizer=TOK)
    assert proxy.tokenizer is not None and proxy.tokenizer.get_vocab() == TOK.get_vocab()
    assert len(proxy.select(tw.dataset(16), config).indices) == 4
    with pytest.raises(ValueError, match="is not a local model directory"):
        load_proxy(str(tmp_path / "missing"), config, target=_target(), tokenizer=TOK)


def test_a_path_loads_outside_deepspeed_zero3_partitioning(tmp_path):
    """While a ZeRO-3 config is alive, transformers partitions every from_pretrained (and, without deepspeed
    installed, fails); the proxy is loaded outside it and the trainer's config is left in place."""
    from transformers.integrations import deepspeed as hf_ds

    class ZeroThreeConfig:  # what transformers reads of an HfDeepSpeedConfig (deepspeed is not installed here)
        def __init__(self):
            self.config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self):
            return True

    _proxy_base().save_pretrained(tmp_path / "proxy")
    alive = ZeroThreeConfig()
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = weakref.ref(alive)
    try:
        assert hf_ds.is_deepspeed_zero3_enabled()
        proxy = load_proxy(str(tmp_path / "proxy"), _config(), target=_target(), tokenizer=TOK)
        assert hf_ds.is_deepspeed_zero3_enabled()  # restored for the trainer
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
    assert all(p.numel() > 0 for p in proxy.model.parameters())


def test_a_built_proxy_can_be_passed_in_the_config(tmp_path):
    target = _target()
    proxy = ProxyModel(_proxy_base(), _config(), target=target, tokenizer=TOK)
    config = _config(budget=8, proxy_model=proxy)
    assert config.to_dict()["proxy_model"] == "<ProxyModel>"
    callback = SpiceDataCallback(config)
    Trainer(
        model=target,
        args=tw.args(tmp_path / "run"),
        train_dataset=tw.dataset(),
        data_collator=tw.RecordingCollator(),
        processing_class=TOK,
        callbacks=[callback],
    )
    assert callback.proxy is proxy
    assert SpiceDataCallback(_config()).proxy is None  # no proxy_model


def test_a_proxy_built_on_another_vocabulary_is_refused(tmp_path):
    target = _target()
    other = build_tokenizer([f"v{i}" for i in range(60)])  # same size, other tokens
    _proxy_base(tok=other).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    config = _config()
    with pytest.raises(ValueError, match=r"vocabulary differs.*'w0' is id 7 in the target and missing"):
        load_proxy(str(tmp_path / "other"), config, target=target, tokenizer=TOK)
    # Without the proxy's tokenizer, its config tells a different vocab_size.
    bigger = build_tokenizer([f"w{i}" for i in range(80)])
    with pytest.raises(ValueError, match=r"vocab_size \(87\) differs from the target's \(67\)"):
        ProxyModel(_proxy_base(tok=bigger), config, target=target, tokenizer=TOK)
    # Same vocabulary, other special tokens or chat template.
    repadded = build_tokenizer([f"w{i}" for i in range(60)])
    repadded.pad_token = "<unk>"
    with pytest.raises(ValueError, match=r"special tokens differ.*pad_token"):
        ProxyModel(_proxy_base(), config, target=target, tokenizer=TOK, proxy_tokenizer=repadded)
    templated = build_tokenizer([f"w{i}" for i in range(60)])
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="chat template differs"):
        ProxyModel(_proxy_base(), config, target=target, tokenizer=TOK, proxy_tokenizer=templated)
    with pytest.raises(ValueError, match="trainer's own model"):
        ProxyModel(target, config, target=target, tokenizer=TOK)


def test_the_callback_refuses_an_incompatible_proxy_when_the_trainer_is_built(tmp_path):
    other = build_tokenizer([f"v{i}" for i in range(60)])
    _proxy_base(tok=other).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    config = _config(proxy_model=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="vocabulary differs"):
        Trainer(
            model=_target(),
            args=tw.args(tmp_path / "run"),
            train_dataset=tw.dataset(),
            data_collator=tw.RecordingCollator(),
            processing_class=TOK,
            callbacks=[SpiceDataCallback(config)],
        )


def test_a_proxy_of_another_family_warns(caplog):
    config = _config(budget=4)
    with caplog.at_level(logging.WARNING, logger="spice_trainer.proxy.model"):
        proxy = ProxyModel(_proxy_base(family="qwen2"), config, target=_target(), tokenizer=TOK)
    assert any("'qwen2' model and the target a 'llama' model" in r.message for r in caplog.records)
    assert len(proxy.select(tw.dataset(16), config).indices) == 4
    caplog.clear()
    # GPT-2 has none of Llama's projection names: the adapter falls back to all-linear, with a warning.
    with caplog.at_level(logging.WARNING, logger="spice_trainer.proxy.model"):
        gpt2 = ProxyModel(_proxy_base(family="gpt2"), config, target=_target(), tokenizer=TOK)
    messages = " ".join(r.message for r in caplog.records)
    assert "'gpt2' model" in messages and "all-linear" in messages
    assert len(gpt2.select(tw.dataset(16), config).indices) == 4
    quiet = caplog.records[:]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spice_trainer.proxy.model"):
        ProxyModel(_proxy_base(), config, target=_target(), tokenizer=TOK)
    assert not caplog.records and quiet


# --- agreement ----------------------------------------------------------------------------------------


def _average_ranks(v):
    """1-based ranks, ties sharing their average rank (the textbook definition, written out as the reference)."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return torch.tensor(ranks, dtype=torch.float64)


def test_spearman_is_the_pearson_correlation_of_average_ranks():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (40,), generator=gen).double()  # many ties
    y = x + torch.randn(40, generator=gen, dtype=torch.float64)
    rx, ry = _average_ranks(x.tolist()), _average_ranks(y.tolist())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    expected = float((rx * ry).sum() / (rx.norm() * ry.norm()))
    assert spearman(x, y) == pytest.approx(expected, rel=1e-12)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.ones(5), x[:5])) and math.isnan(spearman(x[:1], y[:1]))


def test_agreement_of_a_proxy_identical_to_the_target_is_perfect():
    data = tw.dataset(48)
    config = _config(budget=4)
    target = add_lora(build_model(TOK, hidden_size=32, seed=0), r=4, seed=0)  # lora_B random
    proxy = ProxyModel(copy.deepcopy(target), config, target=target, tokenizer=TOK)  # keeps its adapter
    agreement = proxy_agreement(proxy, target, data, config)
    assert len(agreement.probe_rows) == 48 and agreement.k == 12
    assert agreement.rank_corr == pytest.approx(1.0)
    assert agreement.overlap == 1.0 and agreement.jaccard == 1.0
    # A proxy of another size agrees less, but the figures are well defined.
    other = proxy_agreement(ProxyModel(_proxy_base(), config, target=target, tokenizer=TOK), target, data, config)
    assert -1.0 <= other.rank_corr < 1.0 and 0.0 <= other.overlap < 1.0
    # The base gains behind rank_corr are the log(1 + α‖g‖²) of each model's own features.
    feats = compute_gradient_features(target, data, config, indices=agreement.probe_rows, show_progress=False)
    assert sorted(agreement.target_picks) == sorted(
        agreement.probe_rows[i]
        for i in select_from_features(
            feats.features, config.with_changes(budget=12, greedy="exact", stop_rule="none")
        ).indices
    )


# --- through the Trainer ------------------------------------------------------------------------------


@pytest.mark.slow
def test_rounds_select_through_the_proxy_end_to_end_with_a_real_trainer(tmp_path):
    data = tw.dataset(32)
    proxy_base = _proxy_base()
    offline_proxy = copy.deepcopy(proxy_base)
    config = _config(
        budget=8,
        proxy_model=proxy_base,
        proxy_refresh_every_pools=2,
        reselect_every_steps=2,
        mode="replace",
        proxy_learning_rate=1e-2,
    )
    target = _target()
    collator = TrainingCollator()
    callback = SpiceDataCallback(config)
    trainer = Trainer(
        model=target,
        args=tw.args(tmp_path / "run", num_train_epochs=3),
        train_dataset=data,
        data_collator=collator,
        processing_class=TOK,
        callbacks=[callback],
    )
    proxy = callback.proxy  # built and checked when the trainer was built
    assert not {id(p) for p in proxy.model.parameters()} & {id(p) for p in trainer.model.parameters()}
    trainer.train()
    assert not {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} & {
        id(p) for p in proxy.model.parameters()
    }
    # 8 rows / batch 4 = 2 steps per epoch, 3 epochs: rounds at steps 0, 2, 4 (the last step selects nothing).
    assert [r.step for r in callback.rounds] == [0, 2, 4]
    # The first round is what the online proxy regime selects offline from the same starting proxy.
    offline = ProxyModel(offline_proxy, config, target=_target(), tokenizer=TOK).select(
        data, config, tw.RecordingCollator()
    )
    history = callback.sampler.history
    assert history[0].rows == offline.selected
    # The dataloader drew exactly what the recorded subsets assign to each position.
    drawn = collator.drawn_rows(data)
    sampler = callback.sampler
    assert drawn == [sampler.row_at(e, p) for e in range(3) for p in range(len(sampler))]
    # Each later round first refreshed the proxy on the distinct rows drawn since the previous round (from the
    # previous switch's position to this one's), one step per T · picks_per_pool = 4 of them.
    reports = [_read_json(tmp_path / "run" / "_spice" / f"round-{i}.json") for i in range(3)]
    assert reports[0]["metadata"]["proxy"]["trained_rows"] == 0
    for r in (1, 2):
        lo, hi = (history[r - 1].epoch, history[r - 1].position), (history[r].epoch, history[r].position)
        positions = [(e, p) for e in range(3) for p in range(len(sampler)) if lo <= (e, p) < hi]
        expected = len({sampler.row_at(e, p) for e, p in positions})
        meta = reports[r]["metadata"]["proxy"]
        assert expected > 0 and meta["trained_rows"] == expected
        assert meta["refresh_steps_before_round"] == -(-expected // 4)
        assert meta["agreement"]["k"] == 8  # a quarter of the 32-row probe
    assert proxy.refresh_steps == sum(r["metadata"]["proxy"]["refresh_steps_before_round"] for r in reports) + sum(
        r["metadata"]["refresh_steps"] for r in reports
    )
    logged = [e for e in trainer.state.log_history if "spice/round" in e]
    assert len(logged) == 3
    for entry, report in zip(logged, reports, strict=True):
        assert entry["spice/proxy_rank_corr"] == pytest.approx(report["metadata"]["proxy_rank_corr"])
        assert entry["spice/proxy_overlap"] == pytest.approx(report["metadata"]["proxy_overlap"])
        assert -1.0 <= entry["spice/proxy_rank_corr"] <= 1.0 and 0.0 <= entry["spice/proxy_overlap"] <= 1.0


def _read_json(path):
    return json.loads(path.read_text())


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` optimizer steps, like a job killed right after a checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.slow
def test_resume_restores_the_proxy_and_reproduces_the_uninterrupted_rounds(tmp_path):
    data = tw.dataset(32)
    base = _proxy_base()
    common = {"num_train_epochs": 3, "save_strategy": "steps", "save_steps": 2, "learning_rate": 5e-2}

    def run(folder, *, stop_at=None, resume=None):
        config = _config(budget=8, proxy_model=copy.deepcopy(base), proxy_refresh_every_pools=2, reselect_every_steps=3)
        callback = SpiceDataCallback(config)
        trainer = Trainer(
            model=_target(),
            args=tw.args(folder, **common),
            train_dataset=data,
            data_collator=TrainingCollator(),
            processing_class=TOK,
            callbacks=[callback] + ([StopAt(stop_at)] if stop_at else []),
        )
        trainer.train(resume_from_checkpoint=resume)
        return callback

    full = run(tmp_path / "full")
    run(tmp_path / "cut", stop_at=2)
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    assert (checkpoint / PROXY_STATE_FILE).is_file()
    resumed = run(tmp_path / "cut", resume=str(checkpoint))
    # Rounds at steps 0 and 3; the one at step 3 runs after the resume, on a proxy restored from checkpoint-2
    # (adapter, optimizer, position of the last round), so it refreshes and selects as the full run did.
    assert [r.step for r in full.rounds] == [0, 3]
    assert [vars(s) for s in resumed.sampler.history] == [vars(s) for s in full.sampler.history]
    full_proxy, resumed_proxy = full.proxy, resumed.proxy
    assert resumed_proxy.refresh_steps == full_proxy.refresh_steps > 0
    assert _same(_snapshot(resumed_proxy.model), _snapshot(full_proxy.model))
