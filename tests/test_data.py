"""SQuAD data: official JSON loading, train/validation features (answer positions, offsets, long contexts), the
synthetic generator and its tokenizer."""

from __future__ import annotations

import types

import pytest

from hf_sparse.squad.data import (
    QAFeatures,
    prepare_train_features,
    prepare_validation_features,
    read_squad_json,
    squad_records,
    tokenize_squad,
)
from hf_sparse.squad.synthetic import synthetic_squad, synthetic_tokenizer, synthetic_vocabulary
from tests.conftest import shared_data


def test_read_official_json_files():
    records = read_squad_json(shared_data("squad", "xquad-en.json"))
    assert len(records) == 1190 and len({r["id"] for r in records}) == 1190
    for r in records[:50]:
        (text,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        assert r["context"][start : start + len(text)] == text
    v2 = read_squad_json(shared_data("squad", "squad-v2-dev-sample.json"))
    assert len(v2) == 1407 and sum(1 for r in v2 if not r["answers"]["text"]) == 702


def test_load_squad_from_a_local_file():
    pytest.importorskip("datasets")
    from hf_sparse.squad.data import load_squad

    dataset = load_squad(shared_data("squad", "xquad-en.json"))
    assert dataset.num_rows == 1190 and set(dataset.column_names) == {"id", "title", "context", "question", "answers"}
    with pytest.raises(ValueError, match="does not exist"):
        load_squad("no/such/file.json")


@pytest.mark.parametrize(
    "squad, message",
    [
        ({"version": "1"}, "a dict with a 'data' list"),
        ({"data": [{"title": "t"}]}, r"data\[0\] must be a dict with a 'paragraphs' list"),
        ({"data": [{"paragraphs": [{"qas": []}]}]}, "'context' string"),
        ({"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q"}]}]}]}, "string 'id'"),
        (
            {
                "data": [
                    {"paragraphs": [{"context": "c", "qas": [{"id": "x", "question": "q", "answers": [{"text": 1}]}]}]}
                ]
            },
            "question 'x': each answer must be",
        ),
        (
            {"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "x", "question": "q", "answers": []}]}]}]},
            "'x' has no answers and is not marked 'is_impossible'",
        ),
    ],
)
def test_malformed_squad_json_is_refused(squad, message):
    with pytest.raises(ValueError, match=message):
        squad_records(squad, source="bad.json")


def test_synthetic_is_deterministic_and_consistent():
    a, b = synthetic_squad(20, seed=3), synthetic_squad(20, seed=3)
    assert a == b and a != synthetic_squad(20, seed=4)
    records = squad_records(synthetic_squad(20, unanswerable_fraction=0.5, seed=3))
    assert len(records) == 60
    unanswerable = [r for r in records if not r["answers"]["text"]]
    assert 15 <= len(unanswerable) <= 45
    for r in records:
        if r["answers"]["text"]:
            (text,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
            assert r["context"][start : start + len(text)] == text
    # Every word is one token of the synthetic tokenizer: no [UNK] and the vocabulary stays small.
    tokenizer = synthetic_tokenizer()
    assert len(tokenizer) == len(synthetic_vocabulary()) + 5 < 300
    ids = tokenizer(records[0]["question"], records[0]["context"])["input_ids"]
    assert tokenizer.unk_token_id not in ids


def test_train_features_point_at_the_answer_also_across_windows():
    tokenizer = synthetic_tokenizer()
    examples = squad_records(synthetic_squad(10, unanswerable_fraction=0.3, seed=5))
    features = prepare_train_features(examples, tokenizer, max_length=40, doc_stride=12)
    assert len(features["input_ids"]) > len(examples)  # long contexts became several features
    found = 0
    for ids, s, e in zip(features["input_ids"], features["start_positions"], features["end_positions"]):
        if s == 0:
            assert e == 0
            continue
        found += 1
        span = tokenizer.decode(ids[s : e + 1])
        assert any(span == r["answers"]["text"][0].lower() for r in examples if r["answers"]["text"])
    assert found >= sum(1 for r in examples if r["answers"]["text"])


def test_validation_features_offsets_labels_and_example_ids():
    tokenizer = synthetic_tokenizer()
    examples = squad_records(synthetic_squad(6, seed=2))
    features = prepare_validation_features(examples, tokenizer, max_length=40, doc_stride=12)
    by_id = {r["id"]: r for r in examples}
    assert set(features["example_id"]) == set(by_id)
    for f, example_id in enumerate(features["example_id"]):
        context = by_id[example_id]["context"]
        offsets = features["offset_mapping"][f]
        inside = [o for o in offsets if o != [-1, -1]]
        assert inside and all(
            context[a:b].lower() == tokenizer.decode(tokenizer(context[a:b])["input_ids"][1:-1]) for a, b in inside
        )
        s, e = features["start_positions"][f], features["end_positions"][f]
        if s:
            answer = by_id[example_id]["answers"]["text"][0]
            assert context[offsets[s][0] : offsets[e][1]] == answer
    no_labels = prepare_validation_features(
        [{k: r[k] for k in ("id", "question", "context")} for r in examples], tokenizer
    )
    assert "start_positions" not in no_labels and no_labels["example_id"][0] == examples[0]["id"]


def test_tokenize_squad_on_lists_and_datasets():
    tokenizer = synthetic_tokenizer()
    examples = squad_records(synthetic_squad(4, seed=1))
    features = tokenize_squad(examples, tokenizer, train=False, max_length=48, doc_stride=16)
    assert isinstance(features, QAFeatures) and features[0]["input_ids"].shape == (48,)
    datasets = pytest.importorskip("datasets")
    mapped = tokenize_squad(datasets.Dataset.from_list(examples), tokenizer, train=False, max_length=48, doc_stride=16)
    assert mapped["example_id"] == features["example_id"] and mapped["offset_mapping"] == features["offset_mapping"]


def test_bad_tokenization_inputs_are_refused():
    tokenizer = synthetic_tokenizer()
    examples = squad_records(synthetic_squad(1, seed=1))
    with pytest.raises(ValueError, match="doc_stride"):
        prepare_train_features(examples, tokenizer, max_length=32, doc_stride=32)
    with pytest.raises(ValueError, match="has no 'answers' key"):
        prepare_train_features([{k: examples[0][k] for k in ("id", "question", "context")}], tokenizer)
    with pytest.raises(ValueError, match="'question' must be a str"):
        prepare_train_features([{**examples[0], "question": None}], tokenizer)
    with pytest.raises(ValueError, match="'answers' must be"):
        prepare_train_features([{**examples[0], "answers": ["x"]}], tokenizer)
    with pytest.raises(ValueError, match="not a fast tokenizer"):
        prepare_train_features(examples, types.SimpleNamespace(is_fast=False, padding_side="right"))


def test_inputs_are_checked_against_lengths_tokenizer_and_answers():
    from hf_sparse.squad.data import check_squad_inputs

    tokenizer = synthetic_tokenizer()
    train = squad_records(synthetic_squad(3, 3, seed=0))
    dev = squad_records(synthetic_squad(2, 3, seed=1))
    checked = check_squad_inputs(tokenizer, {"train": train, "validation": dev}, 48, 16, max_position_embeddings=64)
    longest = checked["longest_question_tokens"]
    assert longest == max(len(tokenizer(r["question"], add_special_tokens=False)["input_ids"]) for r in train + dev)
    assert checked["context_tokens_per_feature"] == 48 - longest - 3  # [CLS] question [SEP] context [SEP]
    # No room for more than the stride beside the longest question: refused, naming it and what to change.
    tight = longest + 3 + 16
    with pytest.raises(ValueError, match=r"longest question .* Raise --max_seq_length .* lower --doc_stride"):
        check_squad_inputs(tokenizer, {"train": train, "validation": dev}, tight, 16)
    check_squad_inputs(tokenizer, {"train": train, "validation": dev}, tight + 1, 16)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        check_squad_inputs(tokenizer, {"train": train, "validation": dev}, 128, 16, max_position_embeddings=64)
    unanswerable = [{**dev[0], "answers": {"text": [], "answer_start": []}}, *dev[1:]]
    with pytest.raises(ValueError, match="1 validation question.* --version_2_with_negative"):
        check_squad_inputs(tokenizer, {"train": train, "validation": unanswerable}, 48, 16)
    check_squad_inputs(tokenizer, {"train": train, "validation": unanswerable}, 48, 16, version_2_with_negative=True)
    with pytest.raises(ValueError, match="the validation data has no questions"):
        check_squad_inputs(tokenizer, {"train": train, "validation": []}, 48, 16)


def test_unanswerable_questions_become_features_only_distillation_learns_from():
    from hf_sparse.squad import concatenate_features, distillation_features, split_unanswerable

    tokenizer = synthetic_tokenizer()
    examples = squad_records(synthetic_squad(4, seed=1))
    unanswerable = [dict(r, id=r["id"] + "-x", answers={"text": [], "answer_start": []}) for r in examples[:3]]
    answered, unanswered = split_unanswerable(examples + unanswerable)
    assert (len(answered), [r["id"] for r in unanswered]) == (len(examples), [r["id"] for r in unanswerable])
    labeled = tokenize_squad(answered, tokenizer, train=True, max_length=48, doc_stride=16)
    extra = distillation_features(tokenize_squad(unanswered, tokenizer, train=True, max_length=48, doc_stride=16), 48)
    both = concatenate_features(labeled, extra)
    assert len(both) == len(labeled) + len(extra) and both[0]["start_positions"] == labeled[0]["start_positions"]
    assert {int(both[i]["start_positions"]) for i in range(len(labeled), len(both))} == {48}
    assert {int(both[i]["end_positions"]) for i in range(len(labeled), len(both))} == {48}
    with pytest.raises(ValueError, match="different columns"):
        concatenate_features(labeled, tokenize_squad(unanswered, tokenizer, train=False, max_length=48, doc_stride=16))
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_list(examples + unanswerable)
    answered_ds, unanswered_ds = split_unanswerable(rows)
    assert (len(answered_ds), len(unanswered_ds)) == (len(examples), 3)
    mapped = tokenize_squad(answered_ds, tokenizer, train=True, max_length=48, doc_stride=16)
    extra_ds = distillation_features(tokenize_squad(unanswered_ds, tokenizer, train=True, max_length=48, doc_stride=16),
                                     48)  # fmt: skip
    joined = concatenate_features(mapped, extra_ds)
    assert len(joined) == len(mapped) + len(extra_ds) and set(joined["start_positions"][len(mapped) :]) == {48}
