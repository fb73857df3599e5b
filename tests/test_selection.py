import pytest
import torch
from torch import nn

from hf_sparse import SparsityConfig, select_layers


def test_default_selects_every_linear_of_the_blocks_and_no_head(tiny_qa_model):
    selection = select_layers(tiny_qa_model, SparsityConfig())
    assert len(selection.targets) == 2 * 6  # q, k, v, attn out, intermediate, output per layer
    assert all(name.startswith("bert.encoder.layer.") for name in selection.targets)
    assert "qa_outputs" not in selection.targets
    assert selection.skipped == {}


def test_default_never_selects_lm_heads_or_poolers():
    from transformers import BertForMaskedLM, BertForSequenceClassification

    from tests.conftest import tiny_bert_config

    for model in (BertForMaskedLM(tiny_bert_config()), BertForSequenceClassification(tiny_bert_config())):
        names = set(select_layers(model, SparsityConfig()).targets)
        assert names and all(".encoder.layer." in name for name in names)


def test_names_regexes_and_exclusions(tiny_qa_model):
    names = set(select_layers(tiny_qa_model, SparsityConfig(target_modules=["query", "key"])).targets)
    assert names == {f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key")}
    config = SparsityConfig(target_modules=[r".*\.layer\.1\..*"], exclude_modules=["intermediate.dense"])
    names = set(select_layers(tiny_qa_model, config).targets)
    assert "bert.encoder.layer.1.attention.self.query" in names
    assert "bert.encoder.layer.1.intermediate.dense" not in names
    assert not any(".layer.0." in name for name in names)
    # Heads can be pruned when asked for explicitly.
    assert set(select_layers(tiny_qa_model, SparsityConfig(target_modules=["qa_outputs"])).targets) == {"qa_outputs"}


def test_unprunable_matches_are_skipped_with_a_reason():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 8), nn.LayerNorm(8))
    selection = select_layers(model, SparsityConfig(target_modules=[r"\d"]))
    assert set(selection.targets) == {"0", "1"}
    assert selection.skipped == {"2": "in_features=6 is not divisible by M=4", "3": "LayerNorm is not an nn.Linear"}
    assert "2  in_features=6 is not divisible by M=4" in selection.format_skipped()


def test_no_match_raises_naming_patterns_and_existing_modules(tiny_qa_model):
    with pytest.raises(ValueError) as err:
        select_layers(tiny_qa_model, SparsityConfig(target_modules=["q_proj", "v_proj"]))
    message = str(err.value)
    assert "target_modules=['q_proj', 'v_proj'] matched no module in BertForQuestionAnswering" in message
    assert "bert.encoder.layer.0.attention.self.query" in message
    with pytest.raises(ValueError, match="matched only modules that cannot be pruned"):
        select_layers(nn.Sequential(nn.Linear(6, 4)), SparsityConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="the default selection .* matched no module in Sequential"):
        select_layers(nn.Sequential(nn.Linear(8, 4)), SparsityConfig())


def test_selection_does_not_change_the_model(tiny_qa_model):
    before = {k: v.clone() for k, v in tiny_qa_model.state_dict().items()}
    select_layers(tiny_qa_model, SparsityConfig())
    assert all(torch.equal(before[k], v) for k, v in tiny_qa_model.state_dict().items())
