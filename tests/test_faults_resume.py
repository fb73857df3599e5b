"""Faults around sparse training: resuming with the wrong, damaged or foreign masks file, a mask schedule that never
prunes, tied weights under mask updates, and config values Python would silently coerce. Each error must name the
file and the layer (or the field) at fault."""

import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertForQuestionAnswering, TrainerControl, TrainerState, TrainingArguments

from hf_sparse import SparsityCallback, SparsityConfig
from hf_sparse.callback import MASKS_NAME
from hf_sparse.checkpoint import SparseCheckpointError
from tests.conftest import tiny_bert_config
from tests.test_callback import TARGETS, make_trainer
from tests.test_numerics import DivergeAt

LAYER = TARGETS[0]


def _model(seed=0):
    torch.manual_seed(seed)
    return BertForQuestionAnswering(tiny_bert_config())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of 4 steps with checkpoints at steps 2 and 4: "a" and "b" (another seed, so other masks)."""
    root = tmp_path_factory.mktemp("runs")
    for name, seed in (("a", 0), ("b", 1)):
        trainer = make_trainer(root / name, _model(seed), [SparsityCallback()], max_steps=4, save_strategy="steps",
                               save_steps=2, seed=seed)  # fmt: skip
        trainer.train()
    return root


def _file_masks(path):
    with safe_open(str(path), framework="pt") as f:
        packed = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("pruned_values.")}
    return packed


def _resume(output_dir, checkpoint, config=None, seed=0):
    callback = SparsityCallback(config)
    trainer = make_trainer(output_dir, _model(seed), [callback], max_steps=4, save_strategy="no")
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer, callback


def test_resume_takes_the_masks_of_the_checkpoint_being_resumed_not_output_dirs(runs, tmp_path):
    # output_dir holds run b's checkpoint-2; the run resumes run a's checkpoint-2.
    shutil.copytree(runs / "b", tmp_path / "out")
    trainer, _ = _resume(tmp_path / "out", runs / "a" / "checkpoint-2")
    a_masks = _file_masks(runs / "a" / "checkpoint-2" / MASKS_NAME)
    weight = trainer.model.get_submodule(LAYER).weight.detach()
    bits = np.unpackbits(a_masks[LAYER].numpy())[: weight.numel()].reshape(weight.shape).astype(bool)
    assert torch.equal(weight != 0, torch.from_numpy(bits))  # run a's masks, not run b's


def _damage_other_run(checkpoint, runs):
    shutil.copy(runs / "b" / "checkpoint-2" / MASKS_NAME, checkpoint / MASKS_NAME)


def _damage_all_ones(checkpoint, runs):
    path = checkpoint / MASKS_NAME
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[LAYER] = torch.full_like(tensors[LAYER], 255)
    save_file(tensors, str(path), metadata=meta)


def _damage_truncate(checkpoint, runs):
    path = checkpoint / MASKS_NAME
    path.write_bytes(path.read_bytes()[:100])


def _damage_garbage(checkpoint, runs):
    (checkpoint / MASKS_NAME).write_bytes(b"not a safetensors file at all" * 10)


@pytest.mark.parametrize(
    "damage, expected, names_layer",
    [
        (_damage_other_run, "nonzero where this mask prunes; the masks file belongs to another run", True),
        (_damage_all_ones, "keeps 4 of 4 weights in group 0", True),
        (_damage_truncate, "cannot be read", False),
        (_damage_garbage, "cannot be read", False),
    ],
    ids=["other-run-same-shapes", "all-ones", "truncated", "garbage"],
)
def test_resume_with_a_bad_masks_file_fails_at_train_begin_naming_file_and_layer(
    runs, tmp_path, damage, expected, names_layer
):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(runs / "a" / "checkpoint-2", checkpoint)
    damage(checkpoint, runs)
    with pytest.raises(SparseCheckpointError, match=re.escape(expected)) as err:
        _resume(tmp_path / "out", checkpoint)
    assert str(checkpoint / MASKS_NAME) in str(err.value)
    assert (LAYER in str(err.value)) == names_layer
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("checkpoint-*"))  # no step was taken


def test_resume_with_another_sparsity_pattern_fails_at_train_begin(runs, tmp_path):
    with pytest.raises(SparseCheckpointError, match=r"sparsity_pattern '2:4'.*has '1:4'") as err:
        _resume(tmp_path / "out", runs / "a" / "checkpoint-2", SparsityConfig(sparsity_pattern="1:4"))
    assert str(runs / "a" / "checkpoint-2" / MASKS_NAME) in str(err.value)


def test_resume_from_a_checkpoint_with_non_finite_weights_names_that_not_the_masks_file(runs, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(runs / "a" / "checkpoint-2", checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    weights[f"{LAYER}.weight"] = torch.full_like(weights[f"{LAYER}.weight"], float("nan"))  # as a diverged run saves
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SparseCheckpointError, match=rf"{re.escape(str(checkpoint))} has NaN or inf weights \(layer "
                                                    rf"{re.escape(LAYER)}: .*earlier checkpoint"):  # fmt: skip
        _resume(tmp_path / "out", checkpoint)


@pytest.mark.parametrize("save", [False, True], ids=["logging-only", "saving-every-step"])
def test_sparsity_callback_alone_stops_on_non_finite_weights_naming_layer_step_and_fix(tmp_path, save):
    saving = dict(save_strategy="steps", save_steps=1, save_total_limit=2) if save else {}
    trainer = make_trainer(tmp_path, _model(), [SparsityCallback(), DivergeAt(3, LAYER)], max_steps=8, logging_steps=5,
                           **saving)  # fmt: skip
    step = 3 if save else 5  # the first step whose checkpoint or log would hold the NaN
    expected = rf"layer {re.escape(LAYER)} has \d+ NaN or inf weight\(s\) at step {step}.*learning rate"
    with pytest.raises(FloatingPointError, match=expected + ".*NumericsCallback.*earlier checkpoint"):
        trainer.train()
    assert trainer.state.global_step == step
    if save:  # the checkpoints kept are finite, and every one has its masks
        assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
        for checkpoint in tmp_path.glob("checkpoint-*"):
            assert torch.isfinite(load_file(checkpoint / "model.safetensors")[f"{LAYER}.weight"]).all()
            assert (checkpoint / MASKS_NAME).is_file()


# -- read_masks on its own: every way a masks file can disagree with the model or the config ----------------------


def _layers(model):
    return {name: model.get_submodule(name) for name in TARGETS}


def _packed_file(tmp_path, model, change):
    """A masks file for `model`'s magnitude masks, with `change(tensors)` applied before saving."""
    from hf_sparse.callback import _pack_masks
    from hf_sparse.masks import nm_mask
    from hf_sparse.pruning import apply_masks_

    layers = _layers(model)
    masks = {name: nm_mask(layer.weight) for name, layer in layers.items()}
    apply_masks_(layers, masks)
    tensors = _pack_masks(masks)
    metadata = {"sparsity_pattern": "2:4", "criterion": "magnitude"}
    change(tensors, metadata, masks)
    path = tmp_path / MASKS_NAME
    save_file(tensors, str(path), metadata=metadata)
    return path, layers


def _drop_layer(t, meta, masks):
    del t[LAYER]


def _float_mask(t, meta, masks):
    t[LAYER] = t[LAYER].float()


def _short_mask(t, meta, masks):
    t[LAYER] = t[LAYER][:-8].clone()


def _one_kept(t, meta, masks):
    mask = masks[LAYER].clone()
    mask.reshape(-1, 4)[0] = torch.tensor([True, False, False, False])
    t[LAYER] = torch.from_numpy(np.packbits(mask.numpy().reshape(-1)))


def _bad_pruned_values(t, meta, masks):
    t[f"pruned_values.{LAYER}"] = torch.zeros(3, 3)


def _pattern_in_file(t, meta, masks):
    meta["sparsity_pattern"] = "4:8"


def _no_metadata(t, meta, masks):
    meta.clear()


@pytest.mark.parametrize(
    "change, expected, names_layer",
    [
        (_drop_layer, "has no masks for layers", True),
        (_float_mask, "not 1-D packed uint8", True),
        (_short_mask, "bits, not 4096", True),
        (_one_kept, "keeps 1 of 4 weights in group 0", True),
        (_bad_pruned_values, "pruned values of shape (3, 3)", True),
        (_pattern_in_file, "sparsity_pattern '4:8'", False),
        (_no_metadata, "sparsity_pattern None", False),
    ],
    ids=[
        "missing-layer",
        "float-mask",
        "wrong-size",
        "one-kept",
        "pruned-values-shape",
        "other-pattern",
        "no-metadata",
    ],
)
def test_read_masks_names_file_and_layer(tmp_path, change, expected, names_layer):
    from hf_sparse.callback import read_masks

    path, layers = _packed_file(tmp_path, _model(), change)
    with pytest.raises(SparseCheckpointError, match=re.escape(expected)) as err:
        read_masks(str(path), layers, SparsityConfig())
    assert str(path) in str(err.value)
    assert (LAYER in str(err.value)) == names_layer


def test_read_masks_accepts_its_own_file(tmp_path):
    from hf_sparse.callback import read_masks

    path, layers = _packed_file(tmp_path, _model(), lambda *a: None)
    masks, pruned = read_masks(str(path), layers, SparsityConfig())
    assert set(masks) == set(TARGETS) and pruned == {}


# -- a schedule that never prunes ----------------------------------------------------------------------------------


def test_mask_start_step_after_the_last_step_is_refused_before_training(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(tmp_path, model, [SparsityCallback(SparsityConfig(mask_start_step=7))], max_steps=6)
    with pytest.raises(
        ValueError, match=r"mask_start_step=7 is after the last optimizer step of this run \(max_steps=6\)"
    ):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not one step taken


def test_training_stopped_before_mask_start_step_fails_at_train_end(tmp_path):
    from transformers import TrainerCallback

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    callbacks = [SparsityCallback(SparsityConfig(mask_start_step=4)), StopAt2()]
    trainer = make_trainer(tmp_path, _model(), callbacks, max_steps=6)
    with pytest.raises(RuntimeError, match=r"ended at step 2 before any mask was computed \(mask_start_step=4\)"):
        trainer.train()


# -- tied weights ----------------------------------------------------------------------------------------------------


class TiedBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)})])
        self.layers[0]["b"].weight = self.layers[0]["a"].weight


def test_tied_weights_are_selected_once_and_mask_updates_do_not_multiply_them():
    model = TiedBlocks()
    original = model.layers[0]["a"].weight.detach().clone()
    callback = SparsityCallback(SparsityConfig(mask_update_every=1))
    args = TrainingArguments("unused", report_to="none", use_cpu=True)
    state, control = TrainerState(max_steps=8), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    for step in range(1, 6):  # learning rate 0: only the mask updates touch the weight
        state.global_step = step
        callback.on_step_end(args, state, control, model=model)
    weight = model.layers[0]["a"].weight.detach()
    kept = weight != 0
    assert torch.equal(weight[kept], original[kept])  # every kept weight has its own value, never 2x, 4x, ...
    assert list(callback.layers) == ["layers.0.a"]  # one tensor, one mask


# -- config values that Python would coerce ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("mask_start_step", True),
        ("mask_start_step", 1.0),
        ("mask_update_every", True),
        ("mask_freeze_step", False),
        ("calibration_samples", True),
        ("calibration_batch_size", 16.0),
        ("sparsegpt_block_size", True),
        ("sparsegpt_damping", True),
        ("sparsegpt_admm_steps", True),
        ("sparsegpt_refit", 1),
        ("swap_at_end", "no"),
        ("log_per_layer", 1),
    ],
)
def test_config_refuses_values_of_the_wrong_type_naming_the_field(field, value):
    kwargs = {field: value}
    if field == "mask_freeze_step":
        kwargs["mask_update_every"] = 2
    with pytest.raises(ValueError, match=f"^{field} must be") as err:
        SparsityConfig(**kwargs)
    assert repr(value) in str(err.value)


def test_a_resumed_run_records_who_chose_the_masks_it_resumed_with(tmp_path):
    from tests.test_callback import _sparsegpt_pruned

    model = _model()
    _sparsegpt_pruned(model)
    # Dense until step 1, then magnitude masks of the trained weights: the checkpoint's config.json still carries
    # prune_'s SparseGPT metadata, its masks file says who chose the masks it holds.
    config = SparsityConfig(mask_start_step=1)
    make_trainer(tmp_path / "run", model, [SparsityCallback(config)], max_steps=4, save_strategy="steps",
                 save_steps=2).train()  # fmt: skip
    checkpoint = tmp_path / "run" / "checkpoint-2"
    resumed = BertForQuestionAnswering.from_pretrained(checkpoint)
    assert resumed.config.sparsity["criterion"] == "sparsegpt"  # stale: the masks were chosen again at step 1
    trainer = make_trainer(tmp_path / "resumed", resumed, [SparsityCallback(config)], max_steps=4)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.config.sparsity["criterion"] == model.config.sparsity["criterion"] == "magnitude"


@pytest.mark.parametrize("given_masks", [False, True], ids=["computed", "given"])
def test_a_model_given_with_non_finite_weights_is_refused_before_pruning(tmp_path, given_masks):
    model = _model()
    masks = {name: torch.ones_like(model.get_submodule(name).weight, dtype=torch.bool) for name in TARGETS}
    masks = {name: mask.reshape(-1, 4).index_fill(1, torch.tensor([2, 3]), False).reshape(mask.shape)
             for name, mask in masks.items()} if given_masks else None  # fmt: skip
    with torch.no_grad():
        model.get_submodule(LAYER).weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(tmp_path, model, [SparsityCallback(masks=masks)], max_steps=2)
    with pytest.raises(FloatingPointError, match=rf"layer {re.escape(LAYER)} has 1 NaN .* the model was given"):
        trainer.train()
    after = model.state_dict()
    assert all(torch.equal(after[k].nan_to_num(), v.nan_to_num()) for k, v in before.items())
