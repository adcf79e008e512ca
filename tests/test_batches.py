"""Rows and collation (features/batches.py): one bad row is a clear error naming the row and the fix, or a
documented skip with a count, never an opaque failure from deep inside the model."""

import pytest
import torch
import trainer_world as tw
from float_bounds import assert_within, float64_reference

from spice_trainer import SpiceConfig, select
from spice_trainer.demo.toy import add_lora, build_model, build_tokenizer
from spice_trainer.features.batches import PadCollator, RowLimits, prepare_row, row_limits
from spice_trainer.features.gradients import compute_gradient_features

CFG = SpiceConfig(proj_dim=16, max_loss_quantile=None, min_loss=None, batch_size=4)
VOCAB = len(tw.TOK)


def _gradients(rows, model=None, config=CFG):
    return compute_gradient_features(model or tw.model(), rows, config, show_progress=False)


def test_an_empty_row_alone_in_the_last_batch_is_skipped_and_counted():
    # 9 rows, batch 4: longest first puts the empty row alone in the last batch ("cannot reshape a tensor of 0
    # elements" before). It has nothing to learn: skipped like a fully masked row, counted, never picked.
    rows = tw.rows(8)
    rows.insert(5, {"input_ids": [], "labels": []})
    model = tw.model().double()  # float64: the only float32 arithmetic is the pass's own (float_bounds.py)
    grads = _gradients(rows, model)
    assert int(grads.num_tokens[5]) == 0 and torch.isnan(grads.features[5]).all()
    clean_rows = [r for i, r in enumerate(rows) if i != 5]
    clean = _gradients(clean_rows, model)
    keep = [i for i in range(9) if i != 5]
    # The other rows are measured as without the empty one: both within the float32 bound of the exact features.
    assert_within(grads.features[keep], clean.features, 2 * float64_reference(model, clean_rows, CFG).bound)
    sel = select(tw.model(), rows, CFG.with_changes(budget=9), show_progress=False)
    assert 5 not in sel.indices and 5 in sel.skipped
    assert sel.metadata["no_supervised_token_rows"] == 1
    # With the default loss guard the round takes every row's loss from a forward pass first: the same skip.
    guarded = select(tw.model(), rows, SpiceConfig(proj_dim=16, budget=3, batch_size=4), show_progress=False)
    assert 5 not in guarded.indices and guarded.metadata["no_supervised_token_rows"] == 1


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 100, -1])
def test_ids_outside_the_vocabulary_name_the_row(bad_id):
    rows = tw.rows(6)
    rows[4] = {"input_ids": [*rows[4]["input_ids"][:3], bad_id, *rows[4]["input_ids"][4:]]}
    message = rf"dataset row 4: 'input_ids' holds token id {bad_id} \(at token 3\), outside"
    with pytest.raises(ValueError, match=message):
        _gradients(rows)
    with pytest.raises(ValueError, match=message):  # the default loss guard's forward-only pass checks rows too
        select(tw.model(), rows, SpiceConfig(proj_dim=16, budget=2, batch_size=4), show_progress=False)


def test_minus_100_inside_input_ids_names_the_row_and_says_it_belongs_in_labels():
    rows = tw.rows(6)
    rows[2] = {"input_ids": [-100, -100, *rows[2]["input_ids"][2:]], "labels": rows[2]["labels"]}
    with pytest.raises(ValueError, match=r"dataset row 2: 'input_ids' holds -100 \(at token 0\).*'labels' only"):
        _gradients(rows)


@pytest.mark.parametrize("delta", [-1, 1])
def test_labels_of_another_length_name_the_row(delta):
    rows = tw.rows(6)
    labels = rows[3]["labels"]
    rows[3] = {**rows[3], "labels": labels[:delta] if delta < 0 else [*labels, 9]}
    n_ids = len(rows[3]["input_ids"])
    with pytest.raises(
        ValueError, match=rf"dataset row 3: 'labels' has {n_ids + delta} entries but 'input_ids' has {n_ids}"
    ):
        _gradients(rows)
    # A padding collator given such rows directly says the same about its batch row.
    with pytest.raises(ValueError, match="row 3 of the batch: 'labels' has"):
        PadCollator(0)(rows)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_row_longer_than_the_model_positions_says_max_length_fixes_it(family):
    model = add_lora(build_model(tw.TOK, family=family, hidden_size=16, max_positions=8), r=2)
    rows = [{"input_ids": [7 + (i + j) % 20 for j in range(6)]} for i in range(5)]
    rows.insert(2, {"input_ids": [7 + j for j in range(11)]})  # 11 tokens for a model of 8 positions
    field = "max_position_embeddings"  # GPT-2's config maps it to n_positions
    with pytest.raises(ValueError, match=rf"dataset row 2 has 11 tokens.*8 positions \(config.{field}\).*max_length=8"):
        _gradients(rows, model)
    truncated = _gradients(rows, model, CFG.with_changes(max_length=8))  # the fix the message names
    assert torch.isfinite(truncated.features).all()


def test_row_limits_come_from_the_model_and_prepare_row_checks_them():
    limits = row_limits(tw.model())
    assert limits == RowLimits(vocab_size=VOCAB, max_positions=256, positions_field="max_position_embeddings")
    row = {"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "text": "w1 w2", "id": 3}
    assert prepare_row(row, None, index=0, limits=limits) == {"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "id": 3}
    assert prepare_row(row, 2, index=0, limits=limits)["labels"] == [-100, 8]
    with pytest.raises(ValueError, match=r"got \['text'\] in dataset row 7; tokenise"):
        prepare_row({"text": "untokenised"}, None, index=7)


def test_per_example_loss_against_a_token_by_token_float64_reference():
    from spice_trainer.features.batches import per_example_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 11, (4, 6), generator=gen)
    targets[0, :2] = -100
    targets[2, :] = -100  # no supervised token
    targets[3, 4:] = -100
    losses, counts, largest = per_example_loss(logits, targets)
    for i in range(4):
        token_losses = [
            -torch.log_softmax(logits[i, t], dim=-1)[targets[i, t]].item() for t in range(6) if targets[i, t] != -100
        ]
        assert int(counts[i]) == len(token_losses)
        if not token_losses:
            assert torch.isnan(losses[i]) and torch.isnan(largest[i])
            continue
        # float64 throughout: a few ulps of log-softmax and summation separate the two.
        assert float(losses[i]) == pytest.approx(sum(token_losses) / len(token_losses), rel=1e-12)
        assert float(largest[i]) == pytest.approx(max(token_losses), rel=1e-12)


def test_output_vocab_size_reads_the_lm_head():
    from spice_trainer.features.batches import output_vocab_size

    tok = build_tokenizer(["a", "b", "c"])
    model = build_model(tok, hidden_size=16, num_layers=1, num_heads=2)
    assert output_vocab_size(model) == model.get_output_embeddings().weight.shape[0] == len(tok)
    assert output_vocab_size(torch.nn.Linear(2, 2)) is None
