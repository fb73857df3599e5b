"""Vectorised post-processing: identical answers to the tutorial's loop (ties, multi-feature examples, v2), known
spans, and clear errors for logits or features that do not fit."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.postprocess import _as_tutorial_offsets, loop_postprocess, synthetic_inputs
from hf_sparse.squad.postprocess import SquadPostprocessor


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_equals_loop_with_ties_and_multi_feature_examples(v2, seed):
    # Every 3rd example has two features; logits on a coarse grid tie often; short sequences and a small n-best
    # make the length and context filters bite.
    examples, features, start, end = synthetic_inputs(num_examples=60, seq_len=40, two_feature_every=3, seed=seed)
    start, end = np.round(start), np.round(end)
    start[5, :] = 1.0  # a feature whose start logits all tie
    tutorial_offsets = _as_tutorial_offsets(features["offset_mapping"])
    feature_example = [int(i[1:]) for i in features["example_id"]]
    for n_best, max_len, threshold in [(20, 30, 0.0), (5, 3, 1.5), (1, 1, -2.0)]:
        fast = _postprocess(
            examples,
            features,
            start,
            end,
            n_best_size=n_best,
            max_answer_length=max_len,
            version_2_with_negative=v2,
            null_score_diff_threshold=threshold,
        ).as_dict()
        slow = loop_postprocess(
            examples["id"],
            examples["context"],
            feature_example,
            tutorial_offsets,
            start,
            end,
            n_best_size=n_best,
            max_answer_length=max_len,
            version_2_with_negative=v2,
            null_score_diff_threshold=threshold,
        )
        assert fast == slow
        if v2 and threshold == 0.0:
            assert any(t == "" for t in fast.values()) and any(t for t in fast.values())


def _postprocess(examples, features, start_logits, end_logits, **kwargs):
    """One-shot post-processing: build the `SquadPostprocessor` and call it once."""
    return SquadPostprocessor(examples, features, **kwargs)(start_logits, end_logits)


def _one_feature(context_words, start_logits, end_logits, question_tokens=2):
    context = " ".join(context_words)
    spans, pos = [], 0
    for w in context_words:
        spans.append([pos, pos + len(w)])
        pos += len(w) + 1
    offsets = [[-1, -1]] * (question_tokens + 2) + spans + [[-1, -1]]
    examples = [{"id": "q", "context": context}]
    features = [{"example_id": "q", "offset_mapping": offsets}]
    return examples, features, np.array([start_logits], np.float32), np.array([end_logits], np.float32)


def test_known_span_and_filters():
    # tokens: CLS q q SEP [the big red dog] SEP
    examples, features, s, e = _one_feature(
        ["the", "big", "red", "dog"],
        [0, 9, 0, 0, 1, 5, 2, 0, 0],  # best start logit is a question token: skipped
        [0, 0, 0, 0, 0, 0, 3, 4, 9],  # best end logit is the final SEP: skipped
    )
    answers = _postprocess(examples, features, s, e)
    assert answers.texts == ["big red dog"] and answers.scores.tolist() == [9.0]
    assert _postprocess(examples, features, s, e, max_answer_length=2).texts == ["big red"]
    # v2: null score 0 + 0 = 0 against 9: answer kept; with a big CLS score the example gets "".
    s[0, 0], e[0, 0] = 10, 10
    v2 = _postprocess(examples, features, s, e, version_2_with_negative=True)
    assert v2.texts == [""] and v2.null_score_diffs.tolist() == [11.0]
    assert v2.metric_inputs() == [{"id": "q", "prediction_text": "", "no_answer_probability": 0.0}]
    kept = _postprocess(examples, features, s, e, version_2_with_negative=True, null_score_diff_threshold=11.0)
    assert kept.texts == ["big red dog"]


def test_tutorial_none_offsets_and_torch_logits_are_accepted():
    torch = pytest.importorskip("torch")
    examples, features, s, e = _one_feature(["a", "b"], [0, 0, 0, 0, 3, 0, 0], [0, 0, 0, 0, 0, 3, 0])
    features[0]["offset_mapping"] = [None if o[0] < 0 else tuple(o) for o in features[0]["offset_mapping"]]
    assert _postprocess(examples, features, torch.from_numpy(s), torch.from_numpy(e)).texts == ["a b"]


def test_postprocessor_reads_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    examples, features, start, end = synthetic_inputs(num_examples=20, seq_len=32, two_feature_every=4, seed=3)
    ds = datasets.Dataset.from_dict(
        {"example_id": features["example_id"], "offset_mapping": features["offset_mapping"].tolist()}
    )
    from_arrow = SquadPostprocessor(datasets.Dataset.from_dict(examples), ds)
    assert np.array_equal(from_arrow.offsets, features["offset_mapping"])
    assert from_arrow(start, end).texts == SquadPostprocessor(examples, features)(start, end).texts
    # A selected (indices-mapped) dataset keeps its row order.
    order = list(range(len(ds)))[::-1]
    reversed_ds = ds.select(order)
    assert np.array_equal(SquadPostprocessor(examples, reversed_ds).offsets, features["offset_mapping"][order])


def test_shorter_logits_from_dynamic_padding_are_fine_when_only_padding_is_cut():
    examples, features, s, e = _one_feature(["a", "b"], [0, 0, 0, 0, 3, 0, 0], [0, 0, 0, 0, 0, 3, 0])
    features[0]["offset_mapping"] = features[0]["offset_mapping"] + [[-1, -1]] * 5  # padded offsets
    assert _postprocess(examples, features, s, e).texts == ["a b"]
    with pytest.raises(ValueError, match="context tokens beyond position 5"):
        _postprocess(examples, features, s[:, :5], e[:, :5])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda ex, ft, s, e: (ex, ft, s[:0], e[:0]), "start_logits has 0 rows but there are 1 features"),
        (lambda ex, ft, s, e: (ex, ft, s[0], e[0]), r"must have shape \(num_features, seq_len\)"),
        (lambda ex, ft, s, e: (ex, ft, s, e[:, :4]), "must have the same shape"),
        (lambda ex, ft, s, e: (ex, ft, np.where(s > 2, np.nan, s), e), "start_logits of feature 0 .* NaN"),
        (lambda ex, ft, s, e: (ex, ft, np.array([["x"] * 7]), e), "must be a numeric array"),
        (
            lambda ex, ft, s, e: (ex, [{"example_id": "other", "offset_mapping": []}], s, e),
            "'other' matches no example",
        ),
        (lambda ex, ft, s, e: (ex + [{"id": "r", "context": "c"}], ft, s, e), "example id 'r' has no feature"),
        (lambda ex, ft, s, e: (ex + ex, ft, s, e), "example id 'q' appears more than once"),
        (lambda ex, ft, s, e: ([{"id": "q"}], ft, s, e), r"examples\[0\] has no 'context' key"),
        (lambda ex, ft, s, e: ([{"id": "q", "context": 5}], ft, s, e), "'context' must be a str"),
        (lambda ex, ft, s, e: (ex, [{"example_id": "q"}], s, e), r"features\[0\] has no 'offset_mapping' key"),
        (
            lambda ex, ft, s, e: (ex, [{"example_id": "q", "offset_mapping": [[0, 99]]}], s, e),
            r"offset_mapping\[0\] = \[0, 99\] is not a span",
        ),
        (
            lambda ex, ft, s, e: (ex, [{"example_id": "q", "offset_mapping": [[0, 1, 2]]}], s, e),
            "must be a \\(start, end\\) pair",
        ),
    ],
)
def test_malformed_inputs_raise_clear_errors(mutate, message):
    examples, features, s, e = _one_feature(["a", "b"], [0, 0, 0, 0, 3, 0, 0], [0, 0, 0, 0, 0, 3, 0])
    args = mutate(examples, features, s, e)
    with pytest.raises(ValueError, match=message):
        _postprocess(*args)


@pytest.mark.parametrize("kwargs", [{"n_best_size": 0}, {"max_answer_length": -1}, {"n_best_size": 2.5}])
def test_bad_settings_raise(kwargs):
    examples, features, _, _ = _one_feature(["a"], [0] * 6, [0] * 6)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SquadPostprocessor(examples, features, **kwargs)
