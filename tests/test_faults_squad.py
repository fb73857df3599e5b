"""Bad SQuAD inputs: records are checked where they are read (file, question id and field named), tokenizer
failures name the question, and the metric warns on partial predictions and refuses predictions it cannot align."""

import json
import re

import numpy as np
import pytest
from transformers import EvalPrediction

import hf_sparse.squad.data as squad_data
from hf_sparse.squad.data import prepare_train_features, prepare_validation_features, read_squad_json
from hf_sparse.squad.metrics import squad_compute_metrics, squad_metric, squad_v2_metric
from hf_sparse.squad.synthetic import synthetic_tokenizer

CONTEXT = "The capital of Yultosia is Brenmor. The river of Yultosia is the Sallow."


def _qa(**changes):
    qa = {
        "id": "q-bad",
        "question": "What is the capital of Yultosia?",
        "answers": [{"text": "Brenmor", "answer_start": 27}],
    }
    answer = changes.pop("answer", None)
    if answer is not None:
        qa["answers"] = [{**qa["answers"][0], **answer}]
    qa.update(changes)
    return qa


def _file(tmp_path, qa, context=CONTEXT):
    good = {
        "id": "q-good",
        "question": "What is the river of Yultosia?",
        "answers": [{"text": "Sallow", "answer_start": 65}],
    }
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [good, qa]}]}]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(squad))
    return path


BAD_RECORDS = {
    "start-past-the-end": (_qa(answer={"answer_start": 500}), "'answer_start' 500 is outside the context"),
    "start-negative": (_qa(answer={"answer_start": -3}), "'answer_start' -3 is outside the context"),
    "start-bool": (_qa(answer={"answer_start": True}), "'answer_start' must be an int (a character offset); got True"),
    "start-float": (_qa(answer={"answer_start": 27.0}), "'answer_start' must be an int (a character offset); got 27.0"),
    "start-string": (_qa(answer={"answer_start": "27"}), "'answer_start' must be an int (a character offset); got '27'"),
    "start-points-elsewhere": (_qa(answer={"answer_start": 4}), "'answer_start' 4 points at 'capital' in the context"),
    "start-off-by-one": (_qa(answer={"answer_start": 28}), "not at the answer 'Brenmor'; fix the offset (the first occurrence is at 27)"),
    "text-empty": (_qa(answer={"text": ""}), "answers[0] 'text' must be a non-empty str"),
    "text-not-a-string": (_qa(answer={"text": 7}), "answers[0] 'text' must be a non-empty str; got 7"),
    "question-empty": (_qa(question="   "), "'question' is empty"),
    "question-not-a-string": (_qa(question=["What"]), "needs a 'question' string"),
}  # fmt: skip


@pytest.mark.parametrize("qa, expected", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_record_in_a_file_names_file_id_and_field(tmp_path, qa, expected):
    path = _file(tmp_path, qa)
    with pytest.raises(ValueError, match=re.escape(expected)) as err:
        read_squad_json(path)
    assert str(path) in str(err.value) and "question 'q-bad'" in str(err.value)


@pytest.mark.parametrize("context", ["", "   \n"], ids=["empty", "whitespace"])
def test_empty_context_names_file_id_and_field(tmp_path, context):
    qa = _qa(answers=[])
    qa["is_impossible"] = True
    path = _file(tmp_path, qa, context=context)
    with pytest.raises(ValueError, match=re.escape("'context' is empty")) as err:
        read_squad_json(path)
    assert str(path) in str(err.value) and "question 'q-good'" in str(err.value)


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps({"data": [{"paragraphs": [{"context": "Café", "qas": []}]}]}, ensure_ascii=False)
                     .encode("latin-1"))  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(f"{path} is not UTF-8 text (byte ")):
        read_squad_json(path)


# -- the same checks on examples given in memory (a Hub dataset, a list of dicts) ------------------------------------


def _example(**changes):
    example = {"id": "q-mem", "question": "What is the capital of Yultosia?", "context": CONTEXT,
               "answers": {"text": ["Brenmor"], "answer_start": [27]}}  # fmt: skip
    example.update(changes)
    return example


BAD_EXAMPLES = {
    "start-past-the-end": (_example(answers={"text": ["Brenmor"], "answer_start": [90]}), "'answer_start' 90 is outside"),
    "start-bool": (_example(answers={"text": ["Brenmor"], "answer_start": [False]}), "must be an int"),
    "start-points-elsewhere": (_example(answers={"text": ["Brenmor"], "answer_start": [0]}), "points at 'The cap"),
    "lengths-differ": (_example(answers={"text": ["Brenmor"], "answer_start": [27, 30]}), "lists of the same length"),
    "context-empty": (_example(context=""), "'context' is empty"),
    "question-empty": (_example(question=""), "'question' is empty"),
}  # fmt: skip


@pytest.mark.parametrize("prepare", [prepare_train_features, prepare_validation_features], ids=["train", "validation"])
@pytest.mark.parametrize("example, expected", BAD_EXAMPLES.values(), ids=BAD_EXAMPLES.keys())
def test_bad_example_in_memory_names_id_and_field(example, expected, prepare):
    with pytest.raises(ValueError, match=re.escape(expected)) as err:
        prepare([_example(id="q-ok"), example], synthetic_tokenizer(), 48, 16)
    assert "question 'q-mem'" in str(err.value)


# -- tokenizer failures ------------------------------------------------------------------------------------------------


LONG_CONTEXT = " ".join([CONTEXT] * 8)
TOKENIZER_FAULTS = {
    "question-longer-than-max_length": (dict(question="What is " + "the capital " * 30 + "?"), 48, 16),
    "doc_stride-beyond-the-room": (dict(context=LONG_CONTEXT), 48, 40),
    "doc_stride-equals-the-room": (dict(context=LONG_CONTEXT), 48, 38),
}


@pytest.mark.parametrize("prepare", [prepare_train_features, prepare_validation_features], ids=["train", "validation"])
@pytest.mark.parametrize("changes, max_length, doc_stride", TOKENIZER_FAULTS.values(), ids=TOKENIZER_FAULTS.keys())
def test_questions_that_leave_no_room_are_refused_naming_the_question(changes, max_length, doc_stride, prepare):
    tokenizer = synthetic_tokenizer()
    question_tokens = len(tokenizer(_example(**changes)["question"], add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=re.escape(f"question 'q-mem' has {question_tokens} tokens")) as err:
        prepare([_example(id="q-ok", question="Capital?"), _example(**changes)], tokenizer, max_length, doc_stride)
    assert f"max_length={max_length}" in str(err.value) and f"doc_stride={doc_stride}" in str(err.value)


def test_a_tokenizer_panic_names_the_question(monkeypatch):
    monkeypatch.setattr(squad_data, "_check_room", lambda *args: None)  # let the Rust tokenizer see the bad input
    with pytest.raises(
        ValueError, match=r"question 'q-mem' cannot be tokenized with max_length=48, doc_stride=40"
    ) as err:
        prepare_train_features(
            [_example(id="q-ok", question="Capital?"), _example(context=LONG_CONTEXT)], synthetic_tokenizer(), 48, 40
        )
    assert "PanicException" in str(err.value)


# -- the metric ------------------------------------------------------------------------------------------------------


def _refs(n):
    return [{"id": f"q{i}", "answers": {"text": [f"answer {i}"], "answer_start": [0]}} for i in range(n)]


def test_v1_metric_warns_when_some_questions_have_no_prediction():
    predictions = [{"id": f"q{i}", "prediction_text": f"answer {i}"} for i in range(5)]
    with pytest.warns(UserWarning, match=re.escape("5 of 10 questions have no prediction and score 0 (first: ['q5'")):
        result = squad_metric(predictions, _refs(10))
    assert result == {"exact_match": 50.0, "f1": 50.0}  # the official script's numbers


def test_v2_metric_warns_when_some_questions_have_no_prediction():
    predictions = [{"id": "q0", "prediction_text": "answer 0", "no_answer_probability": 0.0}]
    with pytest.warns(UserWarning, match=re.escape("3 of 4 questions have no prediction and score 0 (first: ['q1'")):
        squad_v2_metric(predictions, _refs(4))


def test_predictions_without_label_ids_are_refused():
    from tests.test_qa_trainer import build

    examples, features, _ = build(False)
    compute_metrics = squad_compute_metrics(examples, features)
    n, width = len(features), len(features["input_ids"][0])
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(n, width)).astype(np.float32), rng.normal(size=(n, width)).astype(np.float32))
    shuffled = tuple(x[rng.permutation(n)] for x in logits)
    with pytest.raises(ValueError, match="without label_ids, so it cannot check that they are in the order"):
        compute_metrics(EvalPrediction(predictions=shuffled, label_ids=None))
