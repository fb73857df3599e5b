"""Faults of recipe reruns and inputs: stages of a run with other arguments are refused (naming the arguments and the
flag that starts over), half-written checkpoints are passed over, train_loss covers the whole run after a resume,
arguments or data that cannot work stop before training, and the distilled recovery is not scaled by the gradient
accumulation."""

import json
import re
import shutil

import pytest
import torch
from transformers import BertForQuestionAnswering

from tests.conftest import RandomQADataset, shared_data, tiny_bert_config
from tests.test_recipe import load_recipe

SMALL = ["--synthetic_train_paragraphs", "12", "--synthetic_eval_paragraphs", "4", "--max_steps", "4",
         "--recovery_max_steps", "2", "--disable_tqdm", "true"]  # fmt: skip


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


def _prepare(recipe, output_dir, *flags):
    return recipe.prepare(*recipe.parse_args(["--output_dir", str(output_dir), *SMALL, *flags]))


@pytest.fixture(scope="module")
def started_once(recipe, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("started")
    run = _prepare(recipe, output_dir)
    for stage in ("dense", "pruned", "sparse"):
        run.begin(stage)
        run.record(stage, {"f1": 50.0, "exact_match": 40.0})
    return output_dir


@pytest.fixture
def started(started_once, tmp_path):
    """An output_dir whose dense, pruned and sparse stages have begun (recorded their arguments) and measured."""
    shutil.copytree(started_once, tmp_path / "out")
    return tmp_path / "out"


CHANGES = {
    "learning_rate": (["--learning_rate", "2e-3"], "dense"),
    "max_steps": (["--max_steps", "7"], "dense"),
    "seed": (["--seed", "3"], "dense"),
    "max_seq_length": (["--max_seq_length", "64"], "dense"),
    "synthetic_train_paragraphs": (["--synthetic_train_paragraphs", "30"], "dense"),
    "weight_decay": (["--weight_decay", "0.0"], "dense"),
    "criterion": (["--criterion", "wanda"], "pruned"),
    "sparsity_pattern": (["--sparsity_pattern", "1:4"], "pruned"),
    "target_modules": (["--target_modules", "query"], "pruned"),
    "recovery_max_steps": (["--recovery_max_steps", "3"], "sparse"),
    "distill": (["--distill", "true"], "sparse"),
    "recovery_learning_rate": (["--recovery_learning_rate", "1e-4"], "sparse"),
    # arguments no list named before every argument was recorded: the rerun exited 0 with the old results
    "neftune_noise_alpha": (["--neftune_noise_alpha", "5"], "dense"),
    "dataloader_drop_last": (["--dataloader_drop_last", "true"], "dense"),
    "lr_scheduler_kwargs": (["--lr_scheduler_kwargs", '{"power": 2.0}'], "dense"),
    "torch_compile": (["--torch_compile", "true"], "dense"),
    "calibration_samples": (["--calibration_samples", "8"], "pruned"),
    "mask_update_every": (["--mask_update_every", "5"], "pruned"),
}


@pytest.mark.parametrize("flags, stage", CHANGES.values(), ids=CHANGES.keys())
def test_rerun_with_other_arguments_is_refused_naming_them_and_how_to_start_over(recipe, started, flags, stage):
    report_before = (started / "report.json").read_bytes()
    with pytest.raises(SystemExit) as err:
        _prepare(recipe, started, *flags)
    message = str(err.value)
    assert f"holds the {stage!r} stage of a run with other arguments" in message
    assert f"{flags[0]} " in message and "--overwrite_output_dir" in message and "new --output_dir" in message
    assert str(started) in message
    assert (started / "report.json").read_bytes() == report_before  # the earlier run's numbers are untouched


def test_rerun_with_the_same_or_irrelevant_arguments_continues(recipe, started):
    # Where output goes, what is logged, checkpointed or pushed, and how batches are loaded; the evaluation batch
    # size matters only from the sparse-kernel stages on (the token count kernels are tuned at).
    run = _prepare(recipe, started, "--logging_steps", "1", "--per_device_eval_batch_size", "3", "--save_steps", "7",
                   "--report_to", "tensorboard", "--dataloader_num_workers", "1", "--hub_model_id", "me/other",
                   "--disable_tqdm", "false", "--log_level", "warning")  # fmt: skip
    assert run.done("dense") and run.done("sparse")


@pytest.mark.parametrize(
    "stage, flags, named",
    [("swapped", ["--per_device_eval_batch_size", "3"], "--per_device_eval_batch_size"),
     ("timing", ["--timing_batch_sizes", "8"], "--timing_batch_sizes"),
     ("timing", ["--timing_tune_seconds", "9"], "--timing_tune_seconds")],
)  # fmt: skip
def test_the_kernel_stages_record_their_own_arguments(recipe, started, stage, flags, named):
    run = _prepare(recipe, started)
    run.begin(stage)
    with pytest.raises(SystemExit, match=f"holds the {stage!r} stage of a run with other arguments \\({named} "):
        _prepare(recipe, started, *flags)


@pytest.mark.parametrize("fact, value, named", [("device", "cuda", "device (--use_cpu) 'cuda' -> 'cpu'"),
                                                ("processes", 2, "processes (accelerate launch --num_processes) 2 -> 1")])  # fmt: skip
def test_a_rerun_on_another_device_or_number_of_processes_is_refused(recipe, started, fact, value, named):
    report = json.loads((started / "report.json").read_text())
    report["stage_arguments"]["dense"][fact] = value  # as a run on a GPU, or launched in two processes, recorded it
    (started / "report.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match=re.escape(named)):
        _prepare(recipe, started)


def test_the_hub_token_is_never_recorded(recipe, tmp_path):
    run = _prepare(recipe, tmp_path, "--hub_token", "hf_secret_123")
    run.begin("dense")
    assert "hf_secret_123" not in (tmp_path / "report.json").read_text()


# What the dense stage recorded before every argument was (an explicit list of the recipe's data and training ones).
_RECORDED_BEFORE = ("model_name_or_path", "config_overrides", "dense_model_name_or_path", "dataset_name", "train_file",
                    "validation_file", "version_2_with_negative", "max_seq_length", "doc_stride", "max_train_samples",
                    "max_eval_samples", "synthetic_train_paragraphs", "synthetic_eval_paragraphs",
                    "synthetic_facts_per_paragraph", "fp16_eval", "learning_rate", "weight_decay", "adam_beta1",
                    "adam_beta2", "adam_epsilon", "max_grad_norm", "num_train_epochs", "max_steps", "lr_scheduler_type",
                    "warmup_ratio", "warmup_steps", "seed", "data_seed", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "fp16", "bf16", "optim", "label_smoothing_factor")  # fmt: skip


def test_a_run_recorded_by_an_older_version_continues_where_the_new_arguments_are_at_their_defaults(recipe, started):
    report = json.loads((started / "report.json").read_text())
    report["stage_arguments"] = {stage: {k: v for k, v in values.items() if k in _RECORDED_BEFORE or stage != "dense"}
                                 for stage, values in report["stage_arguments"].items()}  # fmt: skip
    (started / "report.json").write_text(json.dumps(report))
    assert _prepare(recipe, started).done("sparse")
    with pytest.raises(SystemExit, match=r"'dense' stage of a run with other arguments \(--neftune_noise_alpha None"):
        _prepare(recipe, started, "--neftune_noise_alpha", "5")


def test_overwrite_output_dir_starts_over(recipe, started):
    (started / "dense-training" / "checkpoint-2").mkdir(parents=True)
    run = _prepare(recipe, started, "--learning_rate", "2e-3", "--overwrite_output_dir", "true")
    assert run.report["stages"] == {} and "stage_arguments" not in run.report
    assert not (started / "dense-training").exists()


def test_stages_without_recorded_arguments_are_refused(recipe, tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"stages": {"dense": {"f1": 1.0}}, "skipped": {}}))
    with pytest.raises(SystemExit, match=r"holds stages \['dense'\] of an earlier run that did not record"):
        _prepare(recipe, tmp_path)


@pytest.mark.parametrize(
    "given, missing", [("--train_file", "--validation_file"), ("--validation_file", "--train_file")]
)
def test_one_data_file_without_the_other_is_refused(recipe, tmp_path, given, missing):
    path = str(shared_data("squad", "xquad-en.json"))
    with pytest.raises(SystemExit, match=re.escape(f"{given} was given without {missing}: pass both")):
        _prepare(recipe, tmp_path, given, path)


def test_learned_masks_are_refused_before_anything_runs(recipe, tmp_path):
    with pytest.raises(SystemExit, match="--criterion learned: this recipe has no mask-learning stage"):
        _prepare(recipe, tmp_path, "--criterion", "learned")
    assert not (tmp_path / "report.json").exists()


def test_v2_data_without_the_v2_flag_is_refused_before_training(recipe, tmp_path):
    path = shared_data("squad", "squad-v2-dev-sample.json")
    first = next(
        qa["id"]
        for article in json.loads(path.read_text())["data"]
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
        if not qa["answers"]
    )
    with pytest.raises(ValueError) as err:
        _prepare(recipe, tmp_path, "--train_file", str(path), "--validation_file", str(path))
    message = str(err.value)
    assert f"702 validation question(s) have no answer (first: {first!r})" in message
    assert "--version_2_with_negative" in message
    assert not (tmp_path / "dense").exists() and not (tmp_path / "dense-training").exists()


# -- half-written checkpoints ------------------------------------------------------------------------------------------


def _train_args(recipe, output_dir, **overrides):
    args, sparsity, training = recipe.parse_args(
        [
            "--output_dir",
            str(output_dir),
            "--max_steps",
            "6",
            "--save_steps",
            "2",
            "--save_total_limit",
            "5",
            "--logging_steps",
            "1",
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "1e-3",
            "--warmup_steps",
            "0",
            "--disable_tqdm",
            "true",
            "--use_cpu",
            "true",
        ]  # fmt: skip
    )
    return recipe.Run(training, {"stages": {}, "skipped": {}}, args=args, sparsity=sparsity)


def _model():
    torch.manual_seed(0)
    return BertForQuestionAnswering(tiny_bert_config())


@pytest.fixture(scope="module")
def trained(recipe, tmp_path_factory):
    """A 6-step run with checkpoints at steps 2, 4 and 6, and its train_loss."""
    root = tmp_path_factory.mktemp("trained")
    _, metrics = _train_args(recipe, root).train(_model(), "dense-training", RandomQADataset())
    return root / "dense-training", metrics


def _no_state(folder):
    (folder / "trainer_state.json").unlink()


def _truncated_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:64])


def _no_weights(folder):
    (folder / "model.safetensors").unlink()


def _garbage_state(folder):
    (folder / "trainer_state.json").write_text('{"global_st')


def _state_of_another_step(folder):
    path = folder / "trainer_state.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), global_step=2)))


DAMAGE = {
    "no-trainer_state": (_no_state, "it has no trainer_state.json"),
    "truncated-weights": (_truncated_weights, "model.safetensors cannot be read"),
    "no-weights": (_no_weights, "it has neither model.safetensors nor model.safetensors.index.json"),
    "garbage-trainer_state": (_garbage_state, "trainer_state.json cannot be read"),
    "state-of-another-step": (_state_of_another_step, "trainer_state.json records step 2, not 4"),
}


@pytest.mark.parametrize("damage, reason", DAMAGE.values(), ids=DAMAGE.keys())
def test_last_complete_checkpoint_passes_over_half_written_ones_naming_why(trained, tmp_path, damage, reason):
    from hf_sparse.checkpoint import last_complete_checkpoint

    folder = tmp_path / "out"
    shutil.copytree(trained[0] / "checkpoint-2", folder / "checkpoint-2")
    shutil.copytree(trained[0] / "checkpoint-4", folder / "checkpoint-4")
    damage(folder / "checkpoint-4")
    last, broken = last_complete_checkpoint(folder)
    assert last == str(folder / "checkpoint-2")
    assert list(broken) == [str(folder / "checkpoint-4")] and reason in broken[str(folder / "checkpoint-4")]


def test_a_rerun_resumes_past_a_half_written_checkpoint_and_reports_the_whole_runs_loss(recipe, trained, tmp_path):
    output_dir, uninterrupted = trained
    folder = tmp_path / "dense-training"
    shutil.copytree(output_dir / "checkpoint-2", folder / "checkpoint-2")
    shutil.copytree(output_dir / "checkpoint-4", folder / "checkpoint-4")
    _truncated_weights(folder / "checkpoint-4")  # the run was killed while writing checkpoint-4
    trainer, metrics = _train_args(recipe, tmp_path).train(_model(), "dense-training", RandomQADataset())
    assert trainer.state.global_step == 6 and metrics["train_loss_steps"] == 6 and metrics["resumed_from_step"] == 2
    # Resumed at step 2, the Trainer's own train_loss covers steps 3-6 only; the recipe's covers all 6.
    assert metrics["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-5)
    assert trainer.state.log_history[-1]["train_loss"] != pytest.approx(uninterrupted["train_loss"], rel=1e-5)


# -- the recovery's distillation under gradient accumulation ----------------------------------------------------------


def _recovered(recipe, output_dir, batch, accumulation):
    """Recovery with distillation (2 optimizer steps of 8 features, as `batch` x `accumulation`) from one dense
    model; its trainer state's logs (loss, grad_norm per step) and the report's train_loss."""
    run = _prepare(recipe, output_dir, "--distill", "true", "--per_device_train_batch_size", str(batch),
                   "--gradient_accumulation_steps", str(accumulation), "--logging_steps", "1", "--save_steps", "2",
                   "--config_overrides", "hidden_dropout_prob=0,attention_probs_dropout_prob=0", "--use_cpu", "true",
                   "--warmup_steps", "0")  # fmt: skip
    torch.manual_seed(0)
    dense = recipe.new_model(run.args, run.tokenizer)
    recipe.recover(run, dense, *recipe.prune_zero_shot(run, dense))
    state = json.loads((output_dir / "sparse-training" / "checkpoint-2" / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e], run.report["stages"]["sparse"]["train_loss"]


def test_distilled_recovery_with_gradient_accumulation_matches_the_same_batch_in_one_step(recipe, tmp_path):
    one_logs, one_loss = _recovered(recipe, tmp_path / "one", batch=8, accumulation=1)
    two_logs, two_loss = _recovered(recipe, tmp_path / "two", batch=4, accumulation=2)
    # The same 8 features per step: the loss and gradient norm agree (the KL term averages over each micro-batch's
    # own tokens, hence not to the last digit); with the loss not divided by the accumulation they were doubled.
    assert [e["step"] for e in one_logs] == [e["step"] for e in two_logs] == [1, 2]
    for a, b in zip(one_logs, two_logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=0.05)
    assert two_loss == pytest.approx(one_loss, rel=0.05)


# -- what the report and the card say --------------------------------------------------------------------------------


def test_a_rerun_says_only_what_it_skipped_and_keeps_the_earlier_runs_environment(recipe, started):
    report = json.loads((started / "report.json").read_text())
    report["skipped"] = {"swap and timing": "an earlier run's reason"}
    earlier = {**report["environment"], "torch": "2.0.0"}
    report["environment"] = earlier
    (started / "report.json").write_text(json.dumps(report))
    run = _prepare(recipe, started)
    assert run.report["skipped"] == {} and run.report["earlier_environments"] == [earlier]
    assert run.report["environment"]["torch"] == torch.__version__
    from hf_sparse.run_report import markdown

    assert "Stages kept from an earlier run ran with torch: 2.0.0." in markdown(run.report)


def test_the_calibration_recorded_is_the_one_used(recipe, tmp_path):
    """Wanda asks for 128 calibration samples; the training set has fewer features, and the report, config.json and
    the card say how many calibrated (they said 128)."""
    run = _prepare(recipe, tmp_path, "--criterion", "wanda", "--use_cpu", "true")
    torch.manual_seed(0)
    dense = recipe.new_model(run.args, run.tokenizer)
    recipe.recover(run, dense, *recipe.prune_zero_shot(run, dense))
    used = len(run.features[0])
    assert used < run.sparsity.calibration_samples == 128
    assert run.report["stages"]["pruned"]["calibration_samples"] == used
    saved = json.loads((tmp_path / "sparse" / "config.json").read_text())["sparsity"]
    assert saved["criterion"] == "wanda" and saved["criterion_options"]["calibration_samples"] == used
