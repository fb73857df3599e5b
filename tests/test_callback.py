import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForQuestionAnswering, Trainer, TrainerCallback, TrainingArguments

from hf_sparse import SparsityCallback, SparsityConfig, select_layers
from hf_sparse.callback import MASKS_NAME
from hf_sparse.masks import is_nm
from tests.conftest import HANG_TIMEOUT, REPO, RandomQADataset, subprocess_env, torchrun_two_ranks

TARGETS = [f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense",
)]  # fmt: skip


def make_trainer(output_dir, model, callbacks, **overrides):
    values = dict(
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return Trainer(
        model=model,
        args=TrainingArguments(str(output_dir), **values),
        train_dataset=RandomQADataset(),
        callbacks=callbacks,
    )


class NMProbe(TrainerCallback):
    """Records, after every optimizer step (and after SparsityCallback ran), which targeted layers are not N:M."""

    def __init__(self, names, n=2, m=4):
        self.names, self.n, self.m = names, n, m
        self.violations, self.steps_checked = [], 0

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        modules = dict(model.named_modules())
        self.violations += [(state.global_step, n) for n in self.names if not is_nm(modules[n].weight, self.n, self.m)]
        self.steps_checked += 1


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated")
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"gradient_accumulation_steps": 3, "weight_decay": 0.1},
        {"bf16": True},
        {"fp16": True},
        {"gradient_checkpointing": True, "weight_decay": 0.5, "optim": "sgd"},
    ],
    ids=[
        "plain",
        "grad-accumulation+weight-decay",
        "bf16-mixed-precision",
        "fp16-grad-scaler",
        "grad-checkpointing+sgd",
    ],
)
def test_weights_are_exactly_2_4_after_every_optimizer_step(tmp_path, tiny_qa_model, extra):
    head_before = tiny_qa_model.qa_outputs.weight.detach().clone()
    probe = NMProbe(TARGETS)
    trainer = make_trainer(tmp_path, tiny_qa_model, [SparsityCallback(), probe], **extra)
    trainer.train()
    assert probe.steps_checked == 6 and probe.violations == []
    modules = dict(tiny_qa_model.named_modules())
    for name in TARGETS:
        weight = modules[name].weight
        assert is_nm(weight) and (weight == 0).float().mean() == 0.5, name
    # The head trained, but was not pruned.
    assert not torch.equal(tiny_qa_model.qa_outputs.weight, head_before)
    assert (tiny_qa_model.qa_outputs.weight != 0).all()


def test_pruned_weights_get_no_update_and_kept_weights_train(tmp_path, tiny_qa_model):
    callback = SparsityCallback()
    query = tiny_qa_model.bert.encoder.layer[0].attention.self.query
    make_trainer(tmp_path, tiny_qa_model, [callback], max_steps=1).train()
    first_mask = query.weight != 0
    before = query.weight.detach().clone()
    make_trainer(tmp_path, tiny_qa_model, [callback], max_steps=3).train()
    assert torch.equal(query.weight != 0, first_mask)  # the idempotent re-prune found the same mask
    assert (query.weight[first_mask] != before[first_mask]).all()


def test_the_model_is_left_plain_after_training(tmp_path, tiny_qa_model):
    callback = SparsityCallback()
    make_trainer(tmp_path, tiny_qa_model, [callback]).train()
    for module in tiny_qa_model.modules():
        assert not hasattr(module, "parametrizations")
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
        for param in module.parameters(recurse=False):
            assert type(param) is torch.nn.Parameter and not param._backward_hooks
    assert callback.masks == {}
    assert all(not k.endswith(("original", "mask")) for k in tiny_qa_model.state_dict())


def test_save_model_reloads_with_plain_from_pretrained(tmp_path, tiny_qa_model):
    trainer = make_trainer(tmp_path, tiny_qa_model, [SparsityCallback()])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    reloaded, info = AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "final"), output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    original = tiny_qa_model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert all(is_nm(dict(reloaded.named_modules())[name].weight) for name in TARGETS)


def test_mid_training_checkpoints_load_with_plain_from_pretrained(tmp_path, tiny_qa_model):
    make_trainer(tmp_path, tiny_qa_model, [SparsityCallback()], save_strategy="steps", save_steps=2).train()
    for step in (2, 4, 6):
        checkpoint = tmp_path / f"checkpoint-{step}"
        model, info = AutoModelForQuestionAnswering.from_pretrained(str(checkpoint), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        modules = dict(model.named_modules())
        assert all(is_nm(modules[name].weight) for name in TARGETS)
        masks = load_file(str(checkpoint / MASKS_NAME))
        assert set(masks) == set(TARGETS)


class StopAt(TrainerCallback):
    """Interrupts training after `step` optimizer steps, like a job killed right after its checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _final_state(output_dir, config, resume_from=None, stop_at=None):
    from transformers import BertForQuestionAnswering

    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    callbacks = [SparsityCallback(config)] + ([StopAt(stop_at)] if stop_at else [])
    trainer = make_trainer(output_dir, model, callbacks, save_strategy="steps", save_steps=3)
    trainer.train(resume_from_checkpoint=resume_from)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "config",
    [SparsityConfig(), SparsityConfig(mask_start_step=1, mask_update_every=2)],
    ids=["masks-at-start", "masks-recomputed-every-2-steps"],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, config):
    full = _final_state(tmp_path / "full", config)
    # An interrupted run: its checkpoint at step 3 is then resumed by a fresh process-like setup.
    _final_state(tmp_path / "cut", config, stop_at=3)
    assert (tmp_path / "cut" / "checkpoint-3" / MASKS_NAME).exists()
    resumed = _final_state(tmp_path / "cut", config, resume_from=str(tmp_path / "cut" / "checkpoint-3"))
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_schedule_trains_dense_until_the_start_step_then_recomputes(tmp_path, tiny_qa_model):
    config = SparsityConfig(mask_start_step=2, mask_update_every=2, mask_freeze_step=4)
    seen = {}

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            weight = model.bert.encoder.layer[0].intermediate.dense.weight
            seen[state.global_step] = (is_nm(weight), (weight != 0).clone())

    make_trainer(tmp_path, tiny_qa_model, [SparsityCallback(config), Recorder()], learning_rate=0.05).train()
    assert [seen[s][0] for s in range(1, 7)] == [False, True, True, True, True, True]
    # Masks were recomputed at step 4 (frozen after): step 3 and 5 keep the masks of steps 2 and 4.
    assert torch.equal(seen[3][1], seen[2][1]) and torch.equal(seen[5][1], seen[4][1])
    assert not torch.equal(seen[4][1], seen[2][1])


def test_sparsity_is_logged_per_layer_when_masks_change(tmp_path, tiny_qa_model):
    trainer = make_trainer(tmp_path, tiny_qa_model, [SparsityCallback()])
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["sparsity"] == 0.5 for entry in history)
    assert {f"sparsity/{name}" for name in TARGETS} <= set(history[0])
    assert not any(key.startswith("sparsity/") for key in history[1])


def test_sparsity_reaches_the_tensorboard_event_files(tmp_path, tiny_qa_model):
    pytest.importorskip("tensorboard", reason="install the test extra: pip install -e '.[test]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # report_to's callbacks are registered before the user's, and on_log runs in that order.
    config = SparsityConfig(mask_start_step=3, log_per_layer=False)
    make_trainer(tmp_path, tiny_qa_model, [SparsityCallback(config)], report_to="tensorboard").train()
    (event_file,) = tmp_path.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    scalars = {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["train/loss"][0][0] == 1  # the file is the run's, logged from step 1
    # Masks from step 3 on (step 6 twice: the last step's log and the Trainer's summary of the run).
    assert scalars["train/sparsity"] == [(3, 0.5), (4, 0.5), (5, 0.5), (6, 0.5), (6, 0.5)]
    # Per transformer block, when the masks were computed; no per-layer keys with log_per_layer=False.
    groups = {tag: v for tag, v in scalars.items() if tag.startswith("train/sparsity/")}
    assert groups == {f"train/sparsity/bert.encoder.layer.{i}": [(3, 0.5)] for i in range(2)}


def test_skipped_layers_are_listed_in_one_warning(tmp_path, caplog):
    from transformers import BertForQuestionAnswering

    from tests.conftest import tiny_bert_config

    model = BertForQuestionAnswering(tiny_bert_config(intermediate_size=126))  # output.dense: 126 inputs
    config = SparsityConfig(target_modules=["dense", "LayerNorm"])
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        selection = select_layers(model, config)
        make_trainer(tmp_path, model, [SparsityCallback(config)], max_steps=1).train()
    assert "bert.encoder.layer.0.output.dense" in selection.skipped
    assert is_nm(model.bert.encoder.layer[0].intermediate.dense.weight)
    warnings = [r.getMessage() for r in caplog.records if "not pruned" in r.getMessage()]
    assert len(warnings) == 1
    assert re.search(r"bert.encoder.layer.0.output.dense +in_features=126 is not divisible by M=4", warnings[0])
    assert "LayerNorm is not an nn.Linear" in warnings[0]


def test_bad_selection_fails_before_any_training(tmp_path, tiny_qa_model):
    before = {k: v.clone() for k, v in tiny_qa_model.state_dict().items()}
    trainer = make_trainer(tmp_path, tiny_qa_model, [SparsityCallback(SparsityConfig(target_modules="q_proj"))])
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\] matched no module"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in tiny_qa_model.state_dict().items())
    with pytest.raises(TypeError, match="takes a SparsityConfig; got dict"):
        SparsityCallback({"sparsity_pattern": "2:4"})


def test_an_already_2_4_model_trains_unchanged_in_pattern(tmp_path, tiny_qa_model):
    from hf_sparse import prune_

    masks = prune_(tiny_qa_model)
    make_trainer(tmp_path, tiny_qa_model, [SparsityCallback()]).train()
    modules = dict(tiny_qa_model.named_modules())
    for name, mask in masks.items():
        assert torch.equal(modules[name].weight != 0, mask)


def test_two_processes_hold_identical_masks_and_end_exactly_2_4(tmp_path):
    script = REPO / "tests" / "scripts" / "train_ddp.py"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)],
        env=subprocess_env(), capture_output=True, text=True, timeout=HANG_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["mask_digest"] == ranks[1]["mask_digest"]
    assert ranks[0]["weight_digest"] == ranks[1]["weight_digest"]
    assert ranks[0]["all_nm"] and ranks[1]["all_nm"] and ranks[0]["violations"] == []
    assert os.path.exists(tmp_path / "final" / "model.safetensors")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_exact_2_4_through_mixed_precision_training_on_gpu(tmp_path, tiny_qa_model, precision):
    probe = NMProbe(TARGETS)
    trainer = make_trainer(tmp_path, tiny_qa_model, [SparsityCallback(), probe], use_cpu=False, **{precision: True})
    trainer.train()
    assert next(tiny_qa_model.parameters()).is_cuda
    assert probe.steps_checked == 6 and probe.violations == []


def test_fsdp2_row_shards_keep_exact_2_4_and_resume_per_rank(tmp_path):
    for report in torchrun_two_ranks("train_fsdp2.py", tmp_path):
        assert (report["local_rows"], report["full_rows"]) == (32, 64)  # each rank really held half the rows
        assert report["sharded_masks_equal_unsharded"] and report["restored_equal"]
        assert report["full_weights_nm"] and report["full_weights_follow_masks"]
        assert report["mask_files"] == [f"hf_sparse_masks-rank0000{r}-of-00002.safetensors" for r in range(2)]


def test_given_masks_are_held_and_named_by_the_configs_criterion(tmp_path, tiny_qa_model):
    # Masks no magnitude pass would choose (the two smallest |w| of every four), as a calibrated criterion may.
    config = SparsityConfig(criterion="wanda", log_per_layer=False)
    layers = select_layers(tiny_qa_model, config).targets
    masks = {}
    for name, layer in layers.items():
        order = layer.weight.detach().abs().reshape(-1, 4).argsort(dim=1)
        keep = torch.zeros_like(order, dtype=torch.bool).scatter_(1, order[:, :2], True)
        masks[name] = keep.reshape(layer.weight.shape)
    trainer = make_trainer(tmp_path, tiny_qa_model, [SparsityCallback(config, masks=masks)])
    trainer.train()
    for name, layer in layers.items():
        assert torch.equal(layer.weight != 0, masks[name]), name
    assert tiny_qa_model.config.sparsity["criterion"] == "wanda"


def test_given_masks_must_cover_the_selection(tmp_path, tiny_qa_model):
    config = SparsityConfig(log_per_layer=False)
    trainer = make_trainer(tmp_path, tiny_qa_model, [SparsityCallback(config, masks={})])
    with pytest.raises(ValueError, match="one mask per selected layer"):
        trainer.train()


def _sparsegpt_pruned(model):
    """`prune_` with SparseGPT and options other than the defaults, as the README's one-shot example."""
    from hf_sparse import prune_

    config = SparsityConfig(criterion="sparsegpt", calibration_samples=8, sparsegpt_damping=0.05)
    batches = [
        {"input_ids": torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(i))} for i in (0, 1)
    ]
    masks = prune_(model, config, calibration_data=batches)
    return masks, dict(model.config.sparsity)


@pytest.mark.parametrize("held", [False, True], ids=["default-callback", "masks-given-default-config"])
def test_a_callback_after_prune_records_the_criterion_that_chose_the_masks(tmp_path, tiny_qa_model, held):
    from hf_sparse import model_card, save_pretrained

    masks, pruned = _sparsegpt_pruned(tiny_qa_model)
    assert pruned["criterion"] == "sparsegpt" and pruned["criterion_options"]["sparsegpt_damping"] == 0.05
    # The README's order: SparsityCallback() (magnitude by default) to keep the masks while recovering.
    callback = SparsityCallback(masks=masks) if held else SparsityCallback()
    make_trainer(tmp_path, tiny_qa_model, [callback], max_steps=3).train()
    for name, mask in masks.items():
        assert torch.equal(tiny_qa_model.get_submodule(name).weight != 0, mask), name
    meta = tiny_qa_model.config.sparsity
    assert (meta["criterion"], meta["criterion_options"]) == (pruned["criterion"], pruned["criterion_options"])
    save_pretrained(tiny_qa_model, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["sparsity"]
    assert (saved["criterion"], saved["criterion_options"]) == (pruned["criterion"], pruned["criterion_options"])
    card = str(model_card(tmp_path / "saved"))
    assert "sparsegpt" in card and "sparsegpt_damping=0.05" in card and "magnitude" not in card


def test_a_callback_that_chooses_other_masks_records_its_own_criterion(tmp_path, tiny_qa_model):
    _sparsegpt_pruned(tiny_qa_model)
    # Dense training until step 2 moves the pruned weights: the magnitude masks chosen then are the callback's.
    make_trainer(tmp_path, tiny_qa_model, [SparsityCallback(SparsityConfig(mask_start_step=2))], max_steps=3).train()
    assert tiny_qa_model.config.sparsity["criterion"] == "magnitude"
    assert "criterion_options" not in tiny_qa_model.config.sparsity


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_pruning_a_pruned_model_again_keeps_the_criterion_that_chose_its_masks(tiny_qa_model, criterion):
    from hf_sparse import prune_

    masks, pruned = _sparsegpt_pruned(tiny_qa_model)
    batches = [{"input_ids": torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))}]
    again = prune_(tiny_qa_model, SparsityConfig(criterion=criterion, calibration_samples=4), calibration_data=batches)
    assert all(torch.equal(again[name] | ~mask, torch.ones_like(mask)) for name, mask in masks.items())
    meta = tiny_qa_model.config.sparsity
    assert (meta["criterion"], meta["criterion_options"]) == ("sparsegpt", pruned["criterion_options"])


def test_a_compiled_model_records_its_own_layer_names_and_saves_compact(tmp_path, tiny_qa_model):
    import hf_sparse

    compiled = torch.compile(tiny_qa_model, backend="eager")  # the wrapper is what matters, not the compiler
    # The Trainer reads the wrapper's forward(*args, **kwargs): keep the dataset's columns.
    trainer = make_trainer(tmp_path, compiled, [SparsityCallback()], max_steps=2, remove_unused_columns=False)
    trainer.train()
    assert list(tiny_qa_model.config.sparsity["layers"]) == TARGETS
    assert not [k for k in trainer.state.log_history[-1] if "_orig_mod" in k]
    # (Trainer.save_model writes the wrapper's `_orig_mod.` keys, which plain from_pretrained cannot map either.)
    tiny_qa_model.save_pretrained(tmp_path / "final")
    reloaded = hf_sparse.from_pretrained(tmp_path / "final")
    assert torch.equal(reloaded.get_submodule(TARGETS[0]).weight, tiny_qa_model.get_submodule(TARGETS[0]).weight)
    hf_sparse.save_pretrained(tiny_qa_model, tmp_path / "compact", compact=True)
    compact = hf_sparse.from_pretrained(tmp_path / "compact")
    assert torch.equal(compact.get_submodule(TARGETS[-1]).weight, tiny_qa_model.get_submodule(TARGETS[-1]).weight)


def test_prune_on_a_compiled_model_uses_the_models_own_layer_names(tiny_qa_model):
    from hf_sparse import prune_

    masks = prune_(torch.compile(tiny_qa_model, backend="eager"))
    assert list(masks) == list(tiny_qa_model.config.sparsity["layers"]) == TARGETS
