"""`squad_compute_metrics` inside an unmodified `Trainer`: `trainer.evaluate()` reports eval_exact_match / eval_f1,
in one process and in two (`accelerate launch`, CPU/gloo), with answers mapped to the right features."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from transformers import EvalPrediction, Trainer, TrainingArguments

from hf_sparse.squad.metrics import squad_compute_metrics, squad_metric, squad_v2_metric
from hf_sparse.squad.postprocess import SquadPostprocessor
from tests.conftest import HANG_TIMEOUT, REPO, subprocess_env
from tests.scripts.squad_eval import build


def _postprocess(examples, features, start_logits, end_logits, **kwargs):
    """One-shot post-processing: build the `SquadPostprocessor` and call it once."""
    return SquadPostprocessor(examples, features, **kwargs)(start_logits, end_logits)


def _direct(examples, features, model, v2):
    """Answers and metrics without the Trainer: one forward pass over all features, in order."""
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(features["input_ids"]),
            attention_mask=torch.tensor(features["attention_mask"]),
            token_type_ids=torch.tensor(features["token_type_ids"]),
        )
    answers = _postprocess(examples, features, out.start_logits, out.end_logits, version_2_with_negative=v2)
    refs = [{"id": e["id"], "answers": e["answers"]} for e in examples]
    metric = squad_v2_metric(answers.metric_inputs(), refs) if v2 else squad_metric(answers.metric_inputs(), refs)
    return answers, metric


def _evaluate(tmp_path, v2=False, **args):
    examples, features, model = build(v2)
    compute_metrics = squad_compute_metrics(examples, features, version_2_with_negative=v2)
    training_args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=4,
        report_to="none",
        use_cpu=True,
        include_for_metrics=["inputs"],  # compute_metrics checks each feature's input ids
        **args,
    )
    trainer = Trainer(model, training_args, eval_dataset=features, compute_metrics=compute_metrics)
    return trainer.evaluate(), compute_metrics.last_predictions, _direct(examples, features, model, v2)


@pytest.mark.parametrize("v2", [False, True])
def test_trainer_evaluate_reports_squad_metrics(tmp_path, v2):
    metrics, answers, (expected_answers, expected) = _evaluate(tmp_path, v2=v2)
    assert answers.as_dict() == expected_answers.as_dict()
    assert np.allclose(answers.scores, expected_answers.scores, atol=1e-5)
    assert metrics["eval_exact_match"] == expected["exact" if v2 else "exact_match"]
    assert metrics["eval_f1"] == expected["f1"]
    assert np.isfinite(metrics["eval_loss"])  # the gold positions are labels: the Trainer computes a loss too
    if v2:
        assert {"eval_HasAns_f1", "eval_NoAns_f1", "eval_best_f1", "eval_best_f1_thresh"} <= set(metrics)
        assert metrics["eval_NoAns_total"] == 5


def test_batch_eval_metrics_and_unconcatenated_batches_give_the_same_result(tmp_path):
    plain, _, _ = _evaluate(tmp_path / "a")
    per_batch, _, _ = _evaluate(tmp_path / "b", batch_eval_metrics=True)
    unconcatenated, _, _ = _evaluate(tmp_path / "c", eval_do_concat_batches=False)
    for metrics in (per_batch, unconcatenated):
        assert (metrics["eval_exact_match"], metrics["eval_f1"]) == (plain["eval_exact_match"], plain["eval_f1"])


def test_predictions_out_of_feature_order_are_refused():
    examples, features, _ = build(False)
    compute_metrics = squad_compute_metrics(examples, features)
    n, width = len(features), len(features["input_ids"][0])
    logits = (np.zeros((n, width), np.float32), np.zeros((n, width), np.float32))
    labels = (np.array(features["start_positions"]), np.array(features["end_positions"]))
    assert set(compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))) == {"exact_match", "f1"}
    order = np.argsort(labels[0], kind="stable")[::-1]
    with pytest.raises(ValueError, match="not in the order of the features"):
        compute_metrics(EvalPrediction(predictions=logits, label_ids=(labels[0][order], labels[1][order])))
    with pytest.raises(ValueError, match=f"got {n - 1} evaluation features but was built from {n}"):
        compute_metrics(EvalPrediction(predictions=logits, label_ids=(labels[0][1:], labels[1][1:])))
    with pytest.raises(ValueError, match=f"start_logits has {n - 1} rows but there are {n} features"):
        compute_metrics(EvalPrediction(predictions=(logits[0][1:], logits[1][1:]), label_ids=None))
    with pytest.raises(ValueError, match="pair \\(start, end\\) of arrays"):
        compute_metrics(EvalPrediction(predictions=(logits[0], logits[1], logits[0]), label_ids=None))


def _reordered_among_shared_labels(features):
    """The features with two of them that share their labels (but not their inputs) swapped."""
    from hf_sparse.squad.data import QAFeatures

    pairs = list(zip(features["start_positions"], features["end_positions"]))
    first = next(i for i, p in enumerate(pairs) if pairs.count(p) > 1)
    second = next(j for j in range(first + 1, len(pairs)) if pairs[j] == pairs[first])
    assert features["input_ids"][first] != features["input_ids"][second]
    order = list(range(len(pairs)))
    order[first], order[second] = second, first
    return QAFeatures({k: [v[i] for i in order] for k, v in features.columns.items()})


@pytest.mark.parametrize("batches", [{}, {"batch_eval_metrics": True}, {"eval_do_concat_batches": False}])
def test_reordering_among_features_that_share_labels_is_refused_with_inputs(tmp_path, batches):
    examples, features, model = build(False)
    swapped = _reordered_among_shared_labels(features)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True,
        include_for_metrics=["inputs"], **batches,
    )  # fmt: skip
    compute_metrics = squad_compute_metrics(examples, features)
    right = Trainer(model, args, eval_dataset=features, compute_metrics=compute_metrics).evaluate()
    assert right["eval_f1"] == _direct(examples, features, model, False)[1]["f1"]
    with pytest.raises(ValueError, match=r"input ids the Trainer gathered do not match the features' at 2 features"):
        Trainer(model, args, eval_dataset=swapped, compute_metrics=compute_metrics).evaluate()


def test_without_inputs_a_reordering_among_shared_labels_cannot_be_checked_and_says_so(tmp_path):
    examples, features, model = build(False)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True)
    compute_metrics = squad_compute_metrics(examples, features)
    trainer = Trainer(
        model, args, eval_dataset=_reordered_among_shared_labels(features), compute_metrics=compute_metrics
    )
    with pytest.warns(UserWarning, match=r"include_for_metrics=\['inputs'\]"):
        trainer.evaluate()


def test_features_without_labels_are_refused_with_a_hint():
    from hf_sparse.squad.data import QAFeatures, prepare_validation_features
    from hf_sparse.squad.synthetic import synthetic_tokenizer

    examples, _, _ = build(False)
    unlabelled = QAFeatures(prepare_validation_features(examples, synthetic_tokenizer(), 40, 12, with_labels=False))
    with pytest.raises(ValueError, match="calls compute_metrics only when the evaluation set has labels"):
        squad_compute_metrics(examples, unlabelled)


@pytest.mark.slow  # two Python processes with torch + transformers start in ~15 s on 2 cores
def test_two_processes_accelerate_launch(tmp_path):
    accelerate = shutil.which("accelerate", path=str(REPO.parent / "venv" / "bin")) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")
    out = tmp_path / "result.json"
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (several CPU processes need
    # mpirun); `--multi_gpu` starts two through torch.distributed.run, and TrainingArguments(use_cpu=True) in the
    # script makes them CPU processes talking over gloo (asserted below).
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [str(REPO / "tests" / "scripts" / "squad_eval.py"), str(out)]
    run = subprocess.run(
        command, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=HANG_TIMEOUT
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    examples, features, model = build(False)
    expected_answers, expected = _direct(examples, features, model, False)
    assert (
        result["world_size"] == 2 and result["backend"] == "gloo" and result["num_features"] == 11
    )  # 11 features, batches of 4 on 2 processes
    assert result["answers"] == expected_answers.as_dict()
    assert np.allclose(result["scores"], expected_answers.scores, atol=1e-5)
    assert result["metrics"]["eval_exact_match"] == expected["exact_match"]
    assert result["metrics"]["eval_f1"] == expected["f1"]
