"""PEFT on sparse models: the callback prunes the base layers and never the adapters; merging keeps N:M."""

from __future__ import annotations

import pytest
import torch
from transformers import BertForQuestionAnswering, Trainer, TrainingArguments

from hf_sparse import SparsityCallback, SparsityConfig, merge_and_unload_sparse, select_layers
from hf_sparse.masks import is_nm
from tests.conftest import RandomQADataset, tiny_bert_config

peft = pytest.importorskip("peft", reason="install the test extra: pip install -e '.[test]'")

BLOCK_LINEARS = (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense",
)  # fmt: skip


def _lora_model(**lora):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"], modules_to_save=["qa_outputs"],
        **lora,
    )  # fmt: skip
    return peft.get_peft_model(model, config)


def _train(model, tmp_path, config=None):
    args = TrainingArguments(
        str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2, report_to="none",
        save_strategy="no", use_cpu=True, logging_steps=3,
    )  # fmt: skip
    trainer = Trainer(model, args, train_dataset=RandomQADataset(48), callbacks=[SparsityCallback(config)])
    trainer.train()
    return trainer


def test_selection_on_a_peft_model_takes_base_layers_and_no_adapter():
    model = _lora_model()
    default = select_layers(model, SparsityConfig()).targets
    assert len(default) == 2 * 6  # every nn.Linear of the 2 blocks, adapted or not
    assert not [n for n in default if "lora_" in n or "modules_to_save" in n or "original_module" in n]
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer" in default
    # A pattern names the layer PEFT wrapped, as on the model without adapters.
    named = select_layers(model, SparsityConfig(target_modules=["query"])).targets
    assert list(named) == [f"base_model.model.bert.encoder.layer.{i}.attention.self.query.base_layer" for i in (0, 1)]


def test_lora_training_keeps_adapters_dense_and_the_masked_merge_is_exactly_2_4(tmp_path):
    model = _lora_model()
    _train(model, tmp_path)
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n}
    assert len(adapters) == 2 * 3 * 2 + 2  # lora_A/lora_B of 3 layers in 2 blocks, qa_outputs' weight and bias
    # Dense: not one zero (lora_B starts at zero in PEFT and trained away from it; pruning would leave 50%).
    assert {n: int((p == 0).sum()) for n, p in adapters.items()} == dict.fromkeys(adapters, 0)
    base = model.get_base_model()
    meta = base.config.sparsity  # written by the callback at train end, under the base model's names
    assert set(meta["layers"]) == {f"bert.encoder.layer.{i}.{s}" for i in (0, 1) for s in BLOCK_LINEARS}

    query = base.bert.encoder.layer[0].attention.self.query
    before = query.get_base_layer().weight.detach().clone()
    delta = query.get_delta_weight("default").detach().clone()
    merged = merge_and_unload_sparse(model)
    assert not [n for n, _ in merged.named_modules() if "lora_" in n]
    weights = {name: merged.get_submodule(name).weight for name in meta["layers"]}
    assert all(is_nm(w) for w in weights.values())
    # Exactly the base weight plus the update where the base weight is kept, and zero where it was pruned.
    expected = before + delta * (before != 0)
    torch.testing.assert_close(merged.bert.encoder.layer[0].attention.self.query.weight, expected)
    assert merged.config.sparsity["layers"].keys() == meta["layers"].keys()


def test_plain_peft_merge_breaks_2_4_which_is_why_the_masked_merge_exists(tmp_path):
    model = _lora_model()
    _train(model, tmp_path)
    merged = model.merge_and_unload()
    assert not is_nm(merged.bert.encoder.layer[0].attention.self.query.weight)
    assert is_nm(merged.bert.encoder.layer[0].attention.self.key.weight)  # not adapted: still 2:4


def test_masked_merge_refuses_a_dense_base_layer():
    model = _lora_model()
    with pytest.raises(ValueError, match="not 2:4 before merging"):
        merge_and_unload_sparse(model, layers=["bert.encoder.layer.0.attention.self.query"])
    with pytest.raises(TypeError, match="peft.PeftModel"):
        merge_and_unload_sparse(model.get_base_model())


def _broken_adapter_model():
    """A pruned base model with LoRA on query and value, whose last adapted layer's adapter holds one NaN: PEFT
    merges layer 0 before it reaches it."""
    from hf_sparse import prune_

    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    prune_(model)
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        peft_model.get_base_model().bert.encoder.layer[1].attention.self.value.lora_B["default"].weight[0, 0] = float(
            "nan"
        )
    return peft_model


@pytest.mark.parametrize("safe_merge", [True, False], ids=["safe_merge", "unsafe_merge"])
def test_a_failing_merge_leaves_the_model_as_it_was_and_names_the_adapter_and_layer(safe_merge):
    model = _broken_adapter_model()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modules_before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(ValueError, match=r"adapter 'default' of layer bert\.encoder\.layer\.1\.attention\.self\.value"
                                         r".*nothing was merged"):  # fmt: skip
        merge_and_unload_sparse(model, safe_merge=safe_merge)
    # Not one layer merged or unwrapped: the same modules, the same values (2:4 base weights, adapters as they were).
    assert {name: type(module) for name, module in model.named_modules()} == modules_before
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    query = model.get_base_model().bert.encoder.layer[0].attention.self.query
    assert query.merged_adapters == [] and is_nm(query.get_base_layer().weight)
    assert model.peft_config  # PEFT deletes it when a merge completes
    # Once the adapter is repaired, the same model merges.
    with torch.no_grad():
        model.get_base_model().bert.encoder.layer[1].attention.self.value.lora_B["default"].weight[0, 0] = 0.0
    merged = merge_and_unload_sparse(model, safe_merge=safe_merge)
    assert is_nm(merged.bert.encoder.layer[1].attention.self.value.weight)


def test_masked_merge_names_a_non_finite_base_weight_not_a_missing_pattern():
    model = _broken_adapter_model()
    with torch.no_grad():
        model.get_base_model().bert.encoder.layer[0].attention.self.key.weight[0, 0] = float("inf")
    with pytest.raises(
        ValueError, match=r"base weight of bert\.encoder\.layer\.0\.attention\.self\.key has NaN or inf"
    ):
        merge_and_unload_sparse(model, layers=["bert.encoder.layer.0.attention.self.key"])


def test_masked_merge_keeps_the_recorded_criterion_and_its_options(tmp_path):
    from tests.test_callback import _sparsegpt_pruned

    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    _, pruned = _sparsegpt_pruned(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    _train(peft_model, tmp_path)
    merged = merge_and_unload_sparse(peft_model)
    meta = merged.config.sparsity
    assert (meta["criterion"], meta["criterion_options"]) == ("sparsegpt", pruned["criterion_options"])
    assert pruned["criterion_options"]["sparsegpt_damping"] == 0.05  # not the default, which the merge wrote
