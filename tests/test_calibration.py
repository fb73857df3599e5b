"""Calibration: what the activation-aware criteria run through the model, and what they record about it."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

from hf_sparse import SparsityCallback, SparsityConfig, prune_
from hf_sparse.selection import select_layers


def _tiny_seq2seq(kind: str):
    torch.manual_seed(0)
    if kind == "bart":
        config = BartConfig(
            vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        )  # fmt: skip
        return BartForConditionalGeneration(config)
    config = T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


class Seq2SeqData(torch.utils.data.Dataset):
    """Source and target tokens of their own lengths; the targets' padding is -100, as a seq2seq collator leaves it."""

    def __init__(self, size: int = 8, source: int = 12, target: int = 7, padded: int = 2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.source = torch.randint(4, 64, (size, source), generator=g)
        self.labels = torch.randint(4, 64, (size, target), generator=g)
        self.labels[::2, target - padded :] = -100

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return {
            "input_ids": self.source[i],
            "attention_mask": torch.ones_like(self.source[i]),
            "labels": self.labels[i],
        }


def _masks(model, config) -> dict[str, torch.Tensor]:
    return {name: layer.weight != 0 for name, layer in select_layers(model, config).targets.items()}


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert sorted(a) == sorted(b)
    return [name for name in a if not torch.equal(a[name], b[name])]


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_encoder_decoder_under_the_trainer_calibrates_its_decoder_on_the_targets(tmp_path, kind):
    model = _tiny_seq2seq(kind)
    initial = copy.deepcopy(model)
    data = Seq2SeqData()
    config = SparsityConfig(criterion="wanda", calibration_samples=8)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, learning_rate=0.0, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[SparsityCallback(config)]).train()
    trained = _masks(model, config)

    # The same data with the decoder inputs shifted from the labels by hand, and their padding marked
    by_hand = copy.deepcopy(initial)
    targets = {
        "input_ids": data.source,
        "attention_mask": torch.ones_like(data.source),
        "decoder_input_ids": initial.prepare_decoder_input_ids_from_labels(labels=data.labels),
        "decoder_attention_mask": (data.labels != -100).long(),
    }
    prune_(by_hand, config, calibration_data=[targets])
    assert _differ(trained, _masks(by_hand, config)) == []
    decoder = [name for name in trained if name.startswith(("model.decoder", "decoder"))]
    assert len(decoder) == 10  # self-attention, cross-attention, feed-forward
    # The decoder's masks are not those of calibrating it on the source tokens (what Bart did with labels dropped)
    on_source = copy.deepcopy(initial)
    source = dict(targets, decoder_input_ids=initial.prepare_decoder_input_ids_from_labels(labels=data.source))
    source.pop("decoder_attention_mask")
    prune_(on_source, config, calibration_data=[source])
    assert set(_differ(trained, _masks(on_source, config))) & set(decoder)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_decoder_padding_is_left_out_when_the_decoder_has_as_many_tokens_as_the_encoder(criterion):
    # Targets of 5 real tokens padded (-100) to the source's 8: statistics must come from the 5 real ones, as with
    # targets cut to 5. The decoder is causal, so its real positions compute the same either way.
    model = _tiny_seq2seq("bart")
    config = SparsityConfig(criterion=criterion, calibration_samples=4)
    g = torch.Generator().manual_seed(1)
    source, labels = torch.randint(4, 64, (4, 8), generator=g), torch.randint(4, 64, (4, 5), generator=g)
    padded = torch.cat([labels, torch.full((4, 3), -100)], dim=1)
    results = {}
    for name, targets in {"padded": padded, "cut": labels}.items():
        pruned = copy.deepcopy(model)
        prune_(pruned, config, calibration_data=[{"input_ids": source, "labels": targets}])
        results[name] = {n: p.detach() for n, p in pruned.named_parameters()}
    for name, value in results["cut"].items():
        torch.testing.assert_close(results["padded"][name], value, msg=name)


def _bert():
    from transformers import BertForQuestionAnswering

    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    return BertForQuestionAnswering(tiny_bert_config())


def _unchanged(model, before) -> bool:
    return all(torch.allclose(before[k], v, rtol=0, atol=0, equal_nan=True) for k, v in model.state_dict().items())


IDS = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_non_finite_calibration_data_is_named_by_batch_and_key(criterion):
    model = _bert()
    before = copy.deepcopy(model.state_dict())
    embeds = model.bert.embeddings.word_embeddings(IDS[1]).detach()
    embeds[1, 3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"calibration batch 1: 'inputs_embeds' holds 1 NaN or inf value\(s\)"):
        prune_(
            model,
            SparsityConfig(criterion=criterion),
            calibration_data=[{"input_ids": IDS[0]}, {"inputs_embeds": embeds}],
        )
    assert _unchanged(model, before)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_non_finite_activations_name_the_first_layer_and_batch_that_sees_them(criterion):
    # A NaN in a normalisation layer mid-block 1: the feed-forward input is the first selected layer to see NaN
    model = _bert()
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.output.LayerNorm.weight[0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        prune_(model, SparsityConfig(criterion=criterion), calibration_data=[{"input_ids": ids} for ids in IDS])
    assert "calibration inputs of bert.encoder.layer.1.intermediate.dense on calibration batch 0 hold NaN" in str(
        err.value
    )
    assert "the calibration data is finite, so the model produced them" in str(err.value)
    assert _unchanged(model, before)  # block 0 had been pruned


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_named_before_anything_is_pruned(criterion, value):
    model = _bert()
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight[3, 5] = value
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.intermediate\.dense\.weight holds 1 NaN or inf"):
        prune_(model, SparsityConfig(criterion=criterion), calibration_data=[{"input_ids": ids} for ids in IDS])
    assert _unchanged(model, before)


def test_inputs_whose_squares_overflow_float32_are_named():
    from tests.test_criteria import Stack

    x = torch.full((1, 4, 8), 1e20)  # finite, but 1e40 is not a float32
    with pytest.raises(
        ValueError, match=r"inputs of layers\.0\.fc on calibration batch 0 are so large \(up to 1e\+20\)"
    ):
        prune_(Stack([8, 8]), SparsityConfig(criterion="sparsegpt"), calibration_data=[{"x": x}])


def _trainer(model, tmp_path, callback, size=24):
    from tests.conftest import RandomQADataset

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, learning_rate=0.0, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=RandomQADataset(size=size), callbacks=[callback])


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_metadata_records_the_samples_and_tokens_calibration_used_not_the_configured_count(criterion, caplog):
    model = _bert()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0  # 6 padding positions
    with caplog.at_level("WARNING", logger="hf_sparse.criteria"):
        prune_(model, SparsityConfig(criterion=criterion), calibration_data={"input_ids": ids, "attention_mask": mask})
    options = model.config.sparsity["criterion_options"]
    assert (options["calibration_samples"], options["calibration_tokens"]) == (4, 4 * 16 - 6)
    assert "calibration_samples=128, but the calibration data holds 4 sequence(s)" in caplog.text


def test_a_bias_update_is_recorded_only_where_a_layer_had_a_bias(caplog):
    config = SparsityConfig(criterion="sparsegpt", sparsegpt_update_bias=True)
    with_biases = _bert()
    prune_(with_biases, config, calibration_data=[{"input_ids": ids} for ids in IDS])
    assert with_biases.config.sparsity["criterion_options"]["sparsegpt_update_bias"] is True
    without = _tiny_seq2seq("t5")  # T5's linear layers have no bias
    data = Seq2SeqData(size=4)
    with caplog.at_level("WARNING", logger="hf_sparse.criteria"):
        prune_(without, config, calibration_data=[{"input_ids": data.source, "labels": data.labels}])
    assert without.config.sparsity["criterion_options"]["sparsegpt_update_bias"] is False
    assert "sparsegpt_update_bias=True, but none of the 16 selected layers has a bias" in caplog.text


def test_under_the_trainer_the_saved_config_records_the_samples_used(tmp_path):
    import json

    model = _bert()
    config = SparsityConfig(criterion="wanda")  # 128 configured, 24 in the training set
    trainer = _trainer(model, tmp_path, SparsityCallback(config))
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    options = json.loads((tmp_path / "out" / "config.json").read_text())["sparsity"]["criterion_options"]
    assert (options["calibration_samples"], options["calibration_tokens"]) == (24, 24 * 32)


def test_masks_from_prune_keep_their_calibration_record_through_a_recovery(tmp_path):
    model = _bert()
    config = SparsityConfig(criterion="sparsegpt", sparsegpt_update_bias=True)
    masks = prune_(model, config, calibration_data=[{"input_ids": IDS[0]}])  # 2 sequences of 16 tokens
    _trainer(model, tmp_path, SparsityCallback(config, masks=masks)).train()
    options = model.config.sparsity["criterion_options"]
    assert (options["calibration_samples"], options["calibration_tokens"], options["sparsegpt_update_bias"]) == (
        2,
        32,
        True,
    )


def test_a_tokenizer_output_of_lists_is_one_example_per_row():
    # tokenizer(texts) without return_tensors: columns of lists, one sequence per row (here of different lengths)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 128, (length,), generator=g).tolist() for length in (16, 12, 9, 16)]
    columns = {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]}
    padded = {
        "input_ids": torch.tensor([row + [0] * (16 - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (16 - len(row)) for row in rows]),
    }
    config = SparsityConfig(criterion="wanda")
    from_columns, from_tensors = _bert(), _bert()
    prune_(from_columns, config, calibration_data=columns)
    prune_(from_tensors, config, calibration_data=padded)
    assert _differ(_masks(from_columns, config), _masks(from_tensors, config)) == []
    options = from_columns.config.sparsity["criterion_options"]
    assert (options["calibration_samples"], options["calibration_tokens"]) == (4, 53)


def test_keys_the_model_does_not_name_are_reported(caplog):
    mask = torch.ones_like(IDS[0])
    with caplog.at_level("WARNING", logger="hf_sparse.calibration"):
        prune_(
            _bert(), SparsityConfig(criterion="wanda"), calibration_data={"input_ids": IDS[0], "attention_masks": mask}
        )
    assert (
        "calibration batch keys ['attention_masks'] are not named inputs of BertForQuestionAnswering.forward: they are "
        "passed on through its **kwargs, where the model may ignore them" in caplog.text
    )


class Prefixed(torch.nn.Module):
    """Prepends a position to the sequence, as prompt tuning does: no attention mask of the batch fits its layers."""

    def __init__(self):
        from tests.test_criteria import Block

        super().__init__()
        self.layers = torch.nn.ModuleList([Block(8, 8)])

    def forward(self, x, attention_mask=None):
        return self.layers[0](torch.cat([torch.ones_like(x[:, :1]), x], dim=1))


def test_inputs_that_no_attention_mask_fits_are_reported(caplog):
    batch = {"x": torch.randn(2, 4, 8), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    with caplog.at_level("WARNING", logger="hf_sparse.calibration"):
        prune_(Prefixed(), SparsityConfig(criterion="wanda"), calibration_data=batch)
    assert (
        "calibration inputs of ['layers.0.fc'] have as many tokens as none of the batch's attention masks"
        in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_sparse.calibration"):  # no padding: nothing to tell apart
        prune_(Prefixed(), SparsityConfig(criterion="wanda"), calibration_data=dict(batch, attention_mask=None))
    assert "attention masks" not in caplog.text
