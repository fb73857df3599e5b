"""Faults while pruning: Wanda and SparseGPT prune block by block, so an error (or an interrupt) in a later block must
put every weight back; a failed mask update under the callback must too. Asserts that the model is unchanged."""

import pytest
import torch
from transformers import BertForQuestionAnswering, T5Config, T5ForConditionalGeneration, TrainerControl, TrainerState

import hf_sparse.callback
from hf_sparse import SparsityCallback, SparsityConfig, prune_
from tests.conftest import tiny_bert_config


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _bert():
    torch.manual_seed(0)
    return BertForQuestionAnswering(tiny_bert_config())


DATA = [
    {"input_ids": torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i)).tolist()} for i in range(8)
]


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt], ids=["exception", "keyboard-interrupt"])
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt", "sparsegpt-bias"])
def test_failure_in_a_later_block_leaves_every_block_as_it_was(criterion, error):
    model = _bert()
    before = _state(model)

    def fail(module, args):
        raise error("block 1 failed")

    model.bert.encoder.layer[1].register_forward_pre_hook(fail)
    with pytest.raises(error, match="block 1 failed"):
        options = {"criterion": "sparsegpt", "sparsegpt_update_bias": True} if criterion == "sparsegpt-bias" else {}
        prune_(
            model, SparsityConfig(**{"criterion": criterion, **options}, calibration_samples=8), calibration_data=DATA
        )
    # block 0 had been pruned (and, for SparseGPT, updated, with its biases too) before the failure
    assert _unchanged(model, before)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_encoder_decoder_calibrated_with_encoder_inputs_only_is_left_unpruned(criterion):
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2)
    model = T5ForConditionalGeneration(config)
    before = _state(model)
    data = [{"input_ids": torch.randint(0, 64, (2, 8))}]
    with pytest.raises(
        ValueError, match=r"calibrating decoder\.block\.0 \(decoder\.block\.0\.layer\.0\.SelfAttention"
    ) as err:
        prune_(model, SparsityConfig(criterion=criterion, calibration_samples=2), calibration_data=data)
    assert "decoder_input_ids" in str(err.value) and "keys ['input_ids']" in str(err.value)
    assert _unchanged(model, before)  # the encoder block was pruned before the decoder failed


def test_a_failed_mask_update_under_the_callback_leaves_the_weights_as_they_were(monkeypatch):
    model = _bert()
    callback = SparsityCallback(SparsityConfig(mask_update_every=1))
    args, state, control = None, TrainerState(max_steps=4), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    before = _state(model)  # pruned, with the pruned values kept by the callback for the next update

    def fail(*args, **kwargs):
        raise Boom("criterion failed")

    monkeypatch.setattr(hf_sparse.callback, "compute_masks", fail)
    state.global_step = 1
    with pytest.raises(Boom):
        callback.on_step_end(args, state, control, model=model)
    assert _unchanged(model, before)  # the pruned values added back for scoring are zero again


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_non_finite_weights_are_refused_before_anything_is_pruned(criterion):
    model = _bert()
    layer = "bert.encoder.layer.1.attention.self.value"
    with torch.no_grad():
        model.get_submodule(layer).weight[0, :3] = float("inf")  # three of a group of four: one is pruned, inf * 0
    before = _state(model)
    with pytest.raises(
        ValueError, match=rf"{layer}\.weight holds 3 NaN or inf value\(s\) before pruning.*nothing was pruned"
    ):
        prune_(model, SparsityConfig(criterion=criterion, calibration_samples=8), calibration_data=DATA)
    assert _unchanged(model, before) and not hasattr(model.config, "sparsity")
