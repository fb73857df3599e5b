import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_sparse import SparsityCallback, SparsityConfig
from hf_sparse.numerics import NonFiniteLossError, NumericsCallback, check_master_weights, half_precision_parameters
from tests.conftest import RandomQADataset


def _trainer(tmp_path, model, callbacks=None, **overrides):
    values = dict(max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3, report_to="none", use_cpu=True,
                  logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", disable_tqdm=True, seed=0)  # fmt: skip
    values.update(overrides)
    callbacks = callbacks if callbacks is not None else [NumericsCallback()]
    return Trainer(model=model, args=TrainingArguments(str(tmp_path), **values), train_dataset=RandomQADataset(),
                   callbacks=callbacks)  # fmt: skip


def test_half_precision_master_weights_are_refused_before_the_first_step(tmp_path, tiny_qa_model):
    model = tiny_qa_model.half()
    assert half_precision_parameters(model)
    trainer = _trainer(tmp_path, model)
    before = model.qa_outputs.weight.detach().clone()
    with pytest.raises(ValueError, match=r"float16 .*dtype=torch.float32"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert torch.equal(model.qa_outputs.weight, before)


def test_fp32_model_passes_and_trains(tmp_path, tiny_qa_model):
    check_master_weights(tiny_qa_model)
    trainer = _trainer(tmp_path, tiny_qa_model)
    trainer.train()
    assert trainer.state.global_step == 3


def test_nan_loss_stops_training_at_the_first_log(tmp_path, tiny_qa_model):
    with torch.no_grad():
        tiny_qa_model.qa_outputs.weight[0, 0] = float("nan")
    trainer = _trainer(tmp_path, tiny_qa_model)
    with pytest.raises(NonFiniteLossError, match=r"step 1: .*learning_rate"):
        trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("order", ["numerics-first", "sparsity-first", "numerics-added-later"])
@pytest.mark.parametrize("criterion", ["magnitude", "sparsegpt"])
def test_half_precision_is_refused_before_sparsity_callback_changes_any_weight(
    tmp_path, tiny_qa_model, order, criterion
):
    model = tiny_qa_model.half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsity = SparsityCallback(SparsityConfig(criterion=criterion, calibration_samples=8))
    callbacks = {"numerics-first": [NumericsCallback(), sparsity], "sparsity-first": [sparsity, NumericsCallback()],
                 "numerics-added-later": [sparsity]}[order]  # fmt: skip
    trainer = _trainer(tmp_path, model, callbacks)
    if order == "numerics-added-later":
        trainer.add_callback(NumericsCallback())
    with pytest.raises(ValueError, match=r"float16 .*dtype=torch.float32"):
        trainer.train()
    after = model.state_dict()
    assert [k for k in before if not torch.equal(after[k], before[k])] == []  # not one weight pruned or updated


class DivergeAt(TrainerCallback):
    """Puts NaN into the nonzero weights of `layer` after optimizer step `step`, as a diverging update would."""

    def __init__(self, step, layer="qa_outputs"):
        self.step, self.layer = step, layer

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:  # global_step counts the step once it has ended
            with torch.no_grad():
                weight = model.get_submodule(self.layer).weight
                weight[weight != 0] = float("nan")


def test_no_checkpoint_with_non_finite_weights_is_written_and_no_finite_one_rotated_out(tmp_path, tiny_qa_model):
    trainer = _trainer(tmp_path, tiny_qa_model, [NumericsCallback(), DivergeAt(3)], max_steps=8, logging_steps=5,
                       save_strategy="steps", save_steps=1, save_total_limit=2)  # fmt: skip
    with pytest.raises(
        NonFiniteLossError, match=r"step 3: .*qa_outputs\.weight.*stopped before checkpoint-3 was written"
    ):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        weights = load_file(tmp_path / checkpoint / "model.safetensors")
        assert all(bool(torch.isfinite(w).all()) for w in weights.values()), checkpoint


def test_non_finite_weights_between_logs_stop_training_when_it_ends(tmp_path, tiny_qa_model):
    trainer = _trainer(tmp_path, tiny_qa_model, [NumericsCallback(), DivergeAt(4)], max_steps=4, logging_steps=5)
    with pytest.raises(NonFiniteLossError, match=r"step 4: .*qa_outputs\.weight"):
        trainer.train()
