"""SQuAD metrics: the official reference values on real data, v2 against an independent re-implementation of the
official v2 script, malformed input, and the offline evaluate modules."""

from __future__ import annotations

import collections
import json
import re
import string
import warnings

import pytest

from hf_sparse.squad.metrics import evaluate_module_path, normalize_answer, squad_metric, squad_v2_metric
from tests.conftest import shared_data

REFERENCE_V1 = {  # ../shared/data/README.md: official SQuAD v1.1 script on xquad-en.json
    "bert-ensemble.json": (74.87394957983193, 86.32474793700983),
    "r-net-plus.json": (72.77310924369748, 83.40802710920572),
    "logistic-regression.json": (34.53781512605042, 45.852334974514676),
}


def _references(path):
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    return [
        {
            "id": qa["id"],
            "answers": {
                "text": [a["text"] for a in qa["answers"]],
                "answer_start": [a["answer_start"] for a in qa["answers"]],
            },
        }
        for article in data
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]


@pytest.mark.parametrize("name", sorted(REFERENCE_V1))
def test_squad_metric_reproduces_official_reference_values(name):
    references = _references(shared_data("squad", "xquad-en.json"))
    answers = json.loads(shared_data("squad", "predictions", name).read_text(encoding="utf-8"))
    # The leaderboard files cover the whole v1.1 dev set; ids absent from a file are missing predictions (score 0).
    predictions = [{"id": r["id"], "prediction_text": answers[r["id"]]} for r in references if r["id"] in answers]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = squad_metric(predictions, references)
    missing = len(references) - len(predictions)
    assert [str(w.message).split(" questions")[0] for w in caught] == ([f"{missing} of 1190"] if missing else [])
    assert (result["exact_match"], result["f1"]) == REFERENCE_V1[name]
    assert set(result) == {"exact_match", "f1"}


# --------------------------------------------------------------------- an independent copy of the official v2 logic
def _official_v2(dataset, preds, na_probs, na_prob_thresh=1.0):
    """The SQuAD v2.0 evaluation script's logic, written out plainly (dataset in the official JSON layout)."""

    def norm(s):
        s = s.lower()
        s = "".join(ch for ch in s if ch not in set(string.punctuation))
        s = re.sub(r"\b(a|an|the)\b", " ", s)
        return " ".join(s.split())

    def get_tokens(s):
        return norm(s).split() if s else []

    def compute_f1(a_gold, a_pred):
        gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
        common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
        num_same = sum(common.values())
        if len(gold_toks) == 0 or len(pred_toks) == 0:
            return int(gold_toks == pred_toks)
        if num_same == 0:
            return 0
        precision = 1.0 * num_same / len(pred_toks)
        recall = 1.0 * num_same / len(gold_toks)
        return (2 * precision * recall) / (precision + recall)

    qid_to_has_ans = {}
    exact_raw, f1_raw = {}, {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid_to_has_ans[qa["id"]] = bool(qa["answers"])
                gold = [a["text"] for a in qa["answers"] if norm(a["text"])] or [""]
                exact_raw[qa["id"]] = max(int(norm(a) == norm(preds[qa["id"]])) for a in gold)
                f1_raw[qa["id"]] = max(compute_f1(a, preds[qa["id"]]) for a in gold)

    def apply(scores):
        return {q: float(not qid_to_has_ans[q]) if na_probs[q] > na_prob_thresh else s for q, s in scores.items()}

    exact_t, f1_t = apply(exact_raw), apply(f1_raw)

    def make(qids):
        return {
            "exact": 100.0 * sum(exact_t[k] for k in qids) / len(qids),
            "f1": 100.0 * sum(f1_t[k] for k in qids) / len(qids),
            "total": len(qids),
        }

    out = {
        "exact": 100.0 * sum(exact_t.values()) / len(exact_t),
        "f1": 100.0 * sum(f1_t.values()) / len(f1_t),
        "total": len(exact_t),
    }
    has = [k for k, v in qid_to_has_ans.items() if v]
    no = [k for k, v in qid_to_has_ans.items() if not v]
    out.update({f"HasAns_{k}": v for k, v in make(has).items()})
    out.update({f"NoAns_{k}": v for k, v in make(no).items()})

    def best(scores):
        cur = best_score = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
        best_thresh = 0.0
        for qid in sorted(na_probs, key=lambda k: na_probs[k]):
            diff = scores[qid] if qid_to_has_ans[qid] else (-1 if preds[qid] else 0)
            cur += diff
            if cur > best_score:
                best_score, best_thresh = cur, na_probs[qid]
        return 100.0 * best_score / len(scores), best_thresh

    out["best_exact"], out["best_exact_thresh"] = best(exact_raw)
    out["best_f1"], out["best_f1_thresh"] = best(f1_raw)
    return out


def test_squad_v2_metric_matches_official_logic_on_real_v2_data():
    path = shared_data("squad", "squad-v2-dev-sample.json")
    dataset = json.loads(path.read_text(encoding="utf-8"))["data"]
    references = _references(path)
    predictions, preds, na_probs = [], {}, {}
    for i, ref in enumerate(references):
        texts = ref["answers"]["text"]
        if i % 4 == 0 and texts:
            text = texts[0]  # right
        elif i % 4 == 1 and texts:
            text = texts[-1].split()[0] + " extra words"  # partly right
        elif i % 4 == 2:
            text = ""  # "no answer"
        else:
            text = "the " + (texts[0] if texts else "invented answer") + "!"  # normalisation must handle it
        probability = ((i * 37) % 11) / 10  # ties on purpose: the threshold search must keep prediction order
        predictions.append({"id": ref["id"], "prediction_text": text, "no_answer_probability": probability})
        preds[ref["id"]], na_probs[ref["id"]] = text, probability
    expected = _official_v2(dataset, preds, na_probs)
    assert squad_v2_metric(predictions, references) == expected
    # A threshold below 1 turns confident "no answer" probabilities into null predictions.
    assert squad_v2_metric(predictions, references, no_answer_threshold=0.45) == _official_v2(
        dataset, preds, na_probs, 0.45
    )
    assert expected["HasAns_total"] == 705 and expected["NoAns_total"] == 702 and expected["total"] == 1407
    assert 0 < expected["f1"] < 100 and expected["best_f1"] >= expected["f1"]


def test_v1_small_cases_exact_values():
    refs = [
        {"id": "a", "answers": {"text": ["The Eiffel Tower", "Eiffel"], "answer_start": [0, 4]}},
        {"id": "b", "answers": {"text": ["New York City"], "answer_start": [3]}},
        {"id": "c", "answers": {"text": ["1912"], "answer_start": [0]}},
    ]
    preds = [
        {"id": "a", "prediction_text": "eiffel tower."},  # exact after normalisation
        {"id": "b", "prediction_text": "York City hall"},  # f1 = 2 * (2/3 * 2/3) / (4/3) = 2/3
    ]  # "c" missing: scores 0
    with pytest.warns(UserWarning, match=r"1 of 3 questions have no prediction and score 0 \(first: \['c'\]\)"):
        result = squad_metric(preds, refs)
    assert result == {"exact_match": 100.0 / 3, "f1": 100.0 * (1 + 2 / 3) / 3}
    assert normalize_answer("  The  (quick) brown-fox, a an  ") == "quick brownfox"


def test_v2_missing_prediction_scores_zero_and_empty_answer_is_right_for_unanswerable():
    refs = [
        {"id": "a", "answers": {"text": ["x y"], "answer_start": [0]}},
        {"id": "b", "answers": {"text": [], "answer_start": []}},
        {"id": "c", "answers": {"text": [], "answer_start": []}},
    ]
    preds = [
        {"id": "a", "prediction_text": "x y", "no_answer_probability": 0.2},
        {"id": "b", "prediction_text": "", "no_answer_probability": 0.9},
    ]
    with pytest.warns(UserWarning, match=r"1 of 3 questions have no prediction"):
        result = squad_v2_metric(preds, refs)
    assert result["exact"] == 100.0 * 2 / 3 and result["total"] == 3
    assert result["HasAns_exact"] == 100.0 and result["NoAns_exact"] == 50.0 and result["NoAns_total"] == 2


@pytest.mark.parametrize(
    "predictions, references, message",
    [
        ([{"id": "zz", "prediction_text": "x"}], None, "prediction id 'zz' has no reference"),
        ([{"id": "a"}], None, "no 'prediction_text' key"),
        ([{"prediction_text": "x"}], None, "no 'id' key"),
        ([{"id": "a", "prediction_text": 3}], None, "'prediction_text' must be a str"),
        ([{"id": 1, "prediction_text": "x"}], None, r"predictions\[0\]\['id'\] must be a str"),
        ([{"id": "a", "prediction_text": "x"}] * 2, None, "prediction id 'a' appears more than once"),
        ({"id": "a", "prediction_text": "x"}, None, "predictions must be a list of dicts"),
        (["a"], None, r"predictions\[0\] must be a dict"),
        ([], [{"id": "a", "answers": {"text": [], "answer_start": []}}], "reference id 'a' has no gold answer"),
        ([], [{"id": "a"}], "no 'answers' key"),
        ([], [{"id": "a", "answers": ["x"]}], "'answers' must be a dict with a 'text' list"),
        ([], [{"id": "a", "answers": {"text": "x", "answer_start": [0]}}], r"answers\['text'\] must be a list of str"),
        ([], [{"id": "a", "answers": {"text": ["x"], "answer_start": []}}], "one per answer text"),
        ([], [{"id": "a", "answers": {"text": ["x"]}}] * 2, "reference id 'a' appears more than once"),
        ([], [], "references is empty"),
    ],
)
def test_v1_malformed_input_raises_naming_the_fault(predictions, references, message):
    if references is None:
        references = [{"id": "a", "answers": {"text": ["x"], "answer_start": [0]}}]
    with pytest.raises(ValueError, match=message):
        squad_metric(predictions, references)


@pytest.mark.parametrize(
    "prediction, message",
    [
        ({"id": "a", "prediction_text": "x"}, "no 'no_answer_probability' key"),
        ({"id": "a", "prediction_text": "x", "no_answer_probability": "high"}, "must be a number"),
        ({"id": "a", "prediction_text": "x", "no_answer_probability": float("nan")}, "must be a number"),
        ({"id": "b", "prediction_text": "x", "no_answer_probability": 0.1}, "prediction id 'b' has no reference"),
    ],
)
def test_v2_malformed_input_raises(prediction, message):
    references = [{"id": "a", "answers": {"text": [], "answer_start": []}}]
    with pytest.raises(ValueError, match=message):
        squad_v2_metric([prediction], references)


@pytest.mark.slow  # importing evaluate + datasets and loading two modules: ~10 s on 2 cores
def test_evaluate_modules_load_offline_and_agree(monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refs = [
        {"id": "a", "answers": {"text": ["the Eiffel Tower", "Eiffel"], "answer_start": [0, 4]}},
        {"id": "b", "answers": {"text": [], "answer_start": []}},
    ]
    v1_preds = [{"id": "a", "prediction_text": "Eiffel tower"}]
    squad = evaluate.load(evaluate_module_path("squad"))
    assert squad.compute(predictions=v1_preds, references=refs[:1]) == squad_metric(v1_preds, refs[:1])
    v2_preds = [
        {"id": "a", "prediction_text": "tower", "no_answer_probability": 0.25},
        {"id": "b", "prediction_text": "", "no_answer_probability": 0.5},
    ]
    squad_v2 = evaluate.load(evaluate_module_path("squad_v2"))
    assert squad_v2.compute(predictions=v2_preds, references=refs) == squad_v2_metric(v2_preds, refs)
    with pytest.raises(ValueError, match="name must be 'squad' or 'squad_v2'"):
        evaluate_module_path("glue")
