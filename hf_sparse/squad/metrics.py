"""The SQuAD v1.1 / v2.0 metrics, exact to the official evaluation scripts, and a `compute_metrics` for the Trainer.

`squad_metric` and `squad_v2_metric` take the inputs of `evaluate.load("squad")` / `evaluate.load("squad_v2")`
and return the same keys and, to the last digit, the same values as the official scripts (the sums run in the
order of the references, as the scripts do). They need neither the Hub nor `evaluate`; `evaluate_module_path`
gives the path of equivalent `evaluate` modules shipped in this package, for `evaluate.load(path)`.
"""

from __future__ import annotations

import collections
import math
import re
import string
import warnings
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower-cases, removes punctuation, the articles a/an/the and extra whitespace (the official SQuAD rule)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _overlap_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    """Token-overlap F1, computed in the official scripts' order of operations."""
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_tokens)
    recall = 1.0 * num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def _f1_v1(prediction: str, ground_truth: str) -> float:
    return _overlap_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _f1_v2(gold: str, prediction: str) -> float:
    gold_tokens = normalize_answer(gold).split() if gold else []
    pred_tokens = normalize_answer(prediction).split() if prediction else []
    if len(gold_tokens) == 0 or len(pred_tokens) == 0:
        # An empty answer ("no answer") scores 1 only against an empty gold answer.
        return int(gold_tokens == pred_tokens)
    return _overlap_f1(pred_tokens, gold_tokens)


# ----------------------------------------------------------------------------------------------------- validation
def _check_references(references: Sequence[Mapping[str, Any]], allow_empty_answers: bool) -> dict[str, list[str]]:
    """`{id: [gold texts]}` in reference order; raises ValueError naming the reference at fault."""
    if isinstance(references, (str, bytes, Mapping)) or not isinstance(references, Sequence):
        raise ValueError(
            "references must be a list of dicts {'id': str, 'answers': {'text': [...], 'answer_start': [...]}}; "
            f"got {type(references).__name__}."
        )
    golds: dict[str, list[str]] = {}
    for i, ref in enumerate(references):
        if not isinstance(ref, Mapping):
            raise ValueError(f"references[{i}] must be a dict with keys 'id' and 'answers'; got {type(ref).__name__}.")
        for key in ("id", "answers"):
            if key not in ref:
                raise ValueError(
                    f"references[{i}] has no {key!r} key (keys: {sorted(ref)}); expected 'id' and 'answers'."
                )
        qid = ref["id"]
        if not isinstance(qid, str):
            raise ValueError(f"references[{i}]['id'] must be a str; got {type(qid).__name__} ({qid!r}).")
        if qid in golds:
            raise ValueError(f"reference id {qid!r} appears more than once in references; ids must be unique.")
        answers = ref["answers"]
        if not isinstance(answers, Mapping) or "text" not in answers:
            raise ValueError(
                f"references[{i}] (id {qid!r}): 'answers' must be a dict with a 'text' list (and 'answer_start'); "
                f"got {answers!r}."
            )
        texts = answers["text"]
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"reference id {qid!r}: answers['text'] must be a list of str; got {texts!r}.")
        if "answer_start" in answers:
            starts = answers["answer_start"]
            if (
                isinstance(starts, str)
                or not isinstance(starts, Sequence)
                or len(starts) != len(texts)
                or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in starts)
            ):
                raise ValueError(
                    f"reference id {qid!r}: answers['answer_start'] must be a list of int, one per answer text "
                    f"({len(texts)}); got {starts!r}."
                )
        if not texts and not allow_empty_answers:
            raise ValueError(
                f"reference id {qid!r} has no gold answer (answers['text'] is empty). SQuAD v1.1 needs at least one; "
                "use squad_v2_metric for unanswerable questions."
            )
        golds[qid] = list(texts)
    return golds


def _check_predictions(
    predictions: Sequence[Mapping[str, Any]], golds: Mapping[str, Any], with_probability: bool
) -> dict[str, tuple[str, float]]:
    """`{id: (text, no_answer_probability)}` in prediction order; raises ValueError naming the prediction at fault."""
    if isinstance(predictions, (str, bytes, Mapping)) or not isinstance(predictions, Sequence):
        raise ValueError(
            "predictions must be a list of dicts {'id': str, 'prediction_text': str"
            + (", 'no_answer_probability': float}" if with_probability else "}")
            + f"; got {type(predictions).__name__}."
        )
    keys = ("id", "prediction_text", "no_answer_probability") if with_probability else ("id", "prediction_text")
    preds: dict[str, tuple[str, float]] = {}
    for i, pred in enumerate(predictions):
        if not isinstance(pred, Mapping):
            raise ValueError(f"predictions[{i}] must be a dict with keys {list(keys)}; got {type(pred).__name__}.")
        for key in keys:
            if key not in pred:
                raise ValueError(f"predictions[{i}] has no {key!r} key (keys: {sorted(pred)}); expected {list(keys)}.")
        qid, text = pred["id"], pred["prediction_text"]
        if not isinstance(qid, str):
            raise ValueError(f"predictions[{i}]['id'] must be a str; got {type(qid).__name__} ({qid!r}).")
        if not isinstance(text, str):
            raise ValueError(f"prediction for id {qid!r}: 'prediction_text' must be a str; got {type(text).__name__}.")
        if qid in preds:
            raise ValueError(f"prediction id {qid!r} appears more than once in predictions; ids must be unique.")
        if qid not in golds:
            raise ValueError(
                f"prediction id {qid!r} has no reference; every prediction needs a reference with the same 'id'."
            )
        probability = 0.0
        if with_probability:
            probability = pred["no_answer_probability"]
            if isinstance(probability, bool) or not isinstance(probability, Real) or math.isnan(probability):
                raise ValueError(
                    f"prediction for id {qid!r}: 'no_answer_probability' must be a number; got {probability!r}."
                )
        preds[qid] = (text, probability)
    _warn_unanswered(golds, preds)
    return preds


def _warn_unanswered(golds: Mapping[str, Any], preds: Mapping[str, Any]) -> None:
    """Warns, as the official script does ("Unanswered question ... will receive score 0."), when some questions
    have no prediction: they count, with score 0."""
    missing = [qid for qid in golds if qid not in preds]
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(golds)} questions have no prediction and score 0 (first: {missing[:5]}); "
            "pass a prediction for every reference id to score the whole set.",
            UserWarning,
            stacklevel=4,
        )


# ---------------------------------------------------------------------------------------------------------- metrics
def squad_metric(predictions: Sequence[Mapping[str, Any]], references: Sequence[Mapping[str, Any]]) -> dict:
    """SQuAD v1.1 exact match and F1, identical to the official script and to `evaluate.load("squad")`.

    Every question in `references` counts; a question without a prediction scores 0 (with a warning, as the
    official script prints one). Each prediction is scored
    against every gold answer and the best score is kept.

    Args:
        predictions (`list[dict]`): `{"id": str, "prediction_text": str}` per question.
        references (`list[dict]`): `{"id": str, "answers": {"text": list[str], "answer_start": list[int]}}` per
            question, with at least one gold answer each.

    Returns:
        `dict`: `{"exact_match": float, "f1": float}`, in percent.

    Raises:
        ValueError: malformed input, duplicate ids, a reference without answers, or a prediction whose id has
            no reference. The message names the id or field.

    Example:

    ```python
    >>> from hf_sparse.squad.metrics import squad_metric
    >>> refs = [{"id": "q1", "answers": {"text": ["the Eiffel Tower"], "answer_start": [0]}}]
    >>> squad_metric([{"id": "q1", "prediction_text": "Eiffel tower"}], refs)
    {'exact_match': 100.0, 'f1': 100.0}
    ```
    """
    golds = _check_references(references, allow_empty_answers=False)
    preds = _check_predictions(predictions, golds, with_probability=False)
    if not golds:
        raise ValueError("references is empty: there is nothing to score.")
    exact_match = f1 = total = 0
    for qid, gold_texts in golds.items():
        total += 1
        if qid not in preds:
            continue
        prediction = preds[qid][0]
        exact_match += max(normalize_answer(prediction) == normalize_answer(gold) for gold in gold_texts)
        f1 += max(_f1_v1(prediction, gold) for gold in gold_texts)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def _best_threshold(
    order: list[str], raw: dict[str, float], texts: dict[str, str], probs: dict[str, float], has_ans: dict[str, bool]
) -> tuple[float, float]:
    # Start from "every question answered as unanswerable", then add questions one by one in order of increasing
    # no-answer probability, as the official script does. Missing predictions score 0 at every threshold.
    score = best = sum(1 for qid in order if not has_ans[qid])
    best_thresh = 0.0
    for qid in order:
        if has_ans[qid]:
            diff = raw[qid]
        else:
            diff = -1 if texts[qid] else 0
        score += diff
        if score > best:
            best = score
            best_thresh = probs[qid]
    return best, best_thresh


def squad_v2_metric(
    predictions: Sequence[Mapping[str, Any]],
    references: Sequence[Mapping[str, Any]],
    no_answer_threshold: float = 1.0,
) -> dict:
    """SQuAD v2.0 metric, identical to the official script and to `evaluate.load("squad_v2")`.

    A reference with an empty `answers["text"]` is unanswerable: only the empty prediction `""` is right. A
    prediction whose `no_answer_probability` is above `no_answer_threshold` counts as "no answer". The `best_*`
    keys give the scores at the best probability threshold. A question without a prediction scores 0 (the
    official script would fail); with every prediction present the values equal the official ones exactly.

    Args:
        predictions (`list[dict]`): `{"id": str, "prediction_text": str, "no_answer_probability": float}`.
        references (`list[dict]`): `{"id": str, "answers": {"text": list[str], "answer_start": list[int]}}`.
        no_answer_threshold (`float`, defaults to 1.0): as in `evaluate`'s squad_v2.

    Returns:
        `dict`: `exact`, `f1`, `total`, `HasAns_exact`, `HasAns_f1`, `HasAns_total` (when some question has an
        answer), `NoAns_exact`, `NoAns_f1`, `NoAns_total` (when some has none), `best_exact`,
        `best_exact_thresh`, `best_f1`, `best_f1_thresh`.

    Example:

    ```python
    >>> from hf_sparse.squad.metrics import squad_v2_metric
    >>> refs = [{"id": "q1", "answers": {"text": [], "answer_start": []}}]
    >>> squad_v2_metric([{"id": "q1", "prediction_text": "", "no_answer_probability": 0.9}], refs)["exact"]
    100.0
    ```
    """
    golds = _check_references(references, allow_empty_answers=True)
    preds = _check_predictions(predictions, golds, with_probability=True)
    if not golds:
        raise ValueError("references is empty: there is nothing to score.")
    has_ans = {qid: bool(texts) for qid, texts in golds.items()}
    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    for qid, texts in golds.items():
        gold_answers = [t for t in texts if normalize_answer(t)] or [""]
        if qid not in preds:
            continue
        prediction = preds[qid][0]
        exact_raw[qid] = max(int(normalize_answer(g) == normalize_answer(prediction)) for g in gold_answers)
        f1_raw[qid] = max(_f1_v2(g, prediction) for g in gold_answers)

    def thresholded(raw: dict[str, float]) -> dict[str, float]:
        out = {}
        for qid in golds:  # reference order, the order the official script sums in
            if qid not in raw:
                out[qid] = 0
            elif preds[qid][1] > no_answer_threshold:
                out[qid] = float(not has_ans[qid])
            else:
                out[qid] = raw[qid]
        return out

    exact, f1 = thresholded(exact_raw), thresholded(f1_raw)

    def block(qids: list[str]) -> list[tuple[str, float]]:
        total = len(qids)
        return [
            ("exact", 100.0 * sum(exact[q] for q in qids) / total),
            ("f1", 100.0 * sum(f1[q] for q in qids) / total),
            ("total", total),
        ]

    result = dict(block(list(golds)))
    for prefix, qids in (
        ("HasAns", [q for q in golds if has_ans[q]]),
        ("NoAns", [q for q in golds if not has_ans[q]]),
    ):
        if qids:
            result.update({f"{prefix}_{k}": v for k, v in block(qids)})
    probs = {qid: p for qid, (_, p) in preds.items()}
    texts = {qid: t for qid, (t, _) in preds.items()}
    order = sorted(probs, key=lambda q: probs[q])  # stable: ties keep prediction order, as in the official script
    total = len(golds)
    for name, raw in (("exact", exact_raw), ("f1", f1_raw)):
        best, thresh = _best_threshold(order, raw, texts, probs, has_ans)
        result[f"best_{name}"] = 100.0 * best / total
        result[f"best_{name}_thresh"] = thresh
    return result


def evaluate_module_path(name: str = "squad") -> str:
    """Path of the `evaluate` module shipped in this package, for `evaluate.load(path)` without the Hub.

    Args:
        name (`str`, defaults to `"squad"`): `"squad"` or `"squad_v2"`.

    Example:

    ```python
    >>> import evaluate
    >>> from hf_sparse.squad.metrics import evaluate_module_path
    >>> metric = evaluate.load(evaluate_module_path("squad"))  # offline: the module delegates to squad_metric
    ```
    """
    if name not in ("squad", "squad_v2"):
        raise ValueError(f"evaluate_module_path: name must be 'squad' or 'squad_v2'; got {name!r}.")
    return str(Path(__file__).resolve().parent / "evaluate_modules" / name)


# ------------------------------------------------------------------------------------------- Trainer compute_metrics
def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _start_end(predictions: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """`(start, end)` arrays from what the Trainer passes: a pair of arrays, or (with `eval_do_concat_batches=False`
    or `batch_eval_metrics=True`) a list of per-batch pairs."""
    if (
        isinstance(predictions, (tuple, list))
        and len(predictions) == 2
        and all(_numpy(p).ndim == (1 if what == "label_ids" else 2) for p in predictions)
    ):
        return _numpy(predictions[0]), _numpy(predictions[1])
    if (
        isinstance(predictions, (tuple, list))
        and predictions
        and all(isinstance(b, (tuple, list)) and len(b) == 2 for b in predictions)
    ):
        pairs = [_start_end(b, what) for b in predictions]
        if what != "label_ids":
            width = max(p[0].shape[1] for p in pairs)  # batches can differ in length: pad like the Trainer does

            def pad(a):
                return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-100)

            pairs = [(pad(s), pad(e)) for s, e in pairs]
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    raise ValueError(
        f"compute_metrics expected {what} to be a pair (start, end) of arrays, as a question-answering model "
        f"returns; got {type(predictions).__name__}"
        + (f" of {len(predictions)} items" if isinstance(predictions, (tuple, list)) else "")
        + ". Keep the model's outputs to start_logits and end_logits (no output_hidden_states / attentions)."
    )


class SquadComputeMetrics:
    """A `compute_metrics` for `transformers.Trainer` on SQuAD features; see `squad_compute_metrics`."""

    def __init__(
        self,
        examples: Any,
        features: Any,
        version_2_with_negative: bool = False,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        null_score_diff_threshold: float = 0.0,
    ):
        from .postprocess import SquadPostprocessor, _column

        self.version_2_with_negative = bool(version_2_with_negative)
        self.postprocessor = SquadPostprocessor(
            examples,
            features,
            n_best_size=n_best_size,
            max_answer_length=max_answer_length,
            version_2_with_negative=version_2_with_negative,
            null_score_diff_threshold=null_score_diff_threshold,
        )
        answers = _column(examples, "answers", "examples")
        self.references = [{"id": i, "answers": a} for i, a in zip(self.postprocessor.ids, answers)]
        _check_references(self.references, allow_empty_answers=self.version_2_with_negative)
        names = getattr(features, "column_names", None) or (list(features) if isinstance(features, Mapping) else [])
        if not {"start_positions", "end_positions"} <= set(names):
            raise ValueError(
                "features have no start_positions/end_positions: the Trainer calls compute_metrics only when the "
                "evaluation set has labels. Build them with hf_sparse.squad.data.prepare_validation_features(..., "
                "with_labels=True) (the default when the examples have answers)."
            )
        self.labels = (
            np.asarray(list(_column(features, "start_positions", "features")), dtype=np.int64),
            np.asarray(list(_column(features, "end_positions", "features")), dtype=np.int64),
        )
        self.tokens = _feature_tokens(features)
        # Features that share their labels with another can be reordered among themselves unseen by the labels
        self.shared_labels = len(self.labels[0]) - len(set(zip(*(label.tolist() for label in self.labels))))
        self.last_predictions = None
        self._batches: list = []

    def __call__(self, eval_pred: Any, compute_result: bool | None = None) -> dict[str, float]:
        predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
        inputs = getattr(eval_pred, "inputs", None)
        if compute_result is not None:  # TrainingArguments(batch_eval_metrics=True): one call per batch
            self._batches.append(
                (
                    (_numpy(predictions[0]), _numpy(predictions[1])),
                    (_numpy(label_ids[0]), _numpy(label_ids[1])),
                    _batch_input_ids(inputs, len(_numpy(label_ids[0]))),
                )
            )
            if not compute_result:
                return {}
            predictions = [b[0] for b in self._batches]
            label_ids = [b[1] for b in self._batches]
            inputs = None if any(b[2] is None for b in self._batches) else [b[2] for b in self._batches]
            self._batches = []
        start, end = _start_end(predictions, "predictions")
        if label_ids is None and len(start) == len(self.labels[0]):
            raise ValueError(
                "compute_metrics got predictions without label_ids, so it cannot check that they are in the order of "
                "the features it was built from (shuffled or reordered predictions would be scored against the wrong "
                "questions). Evaluate on features with start_positions/end_positions (prepare_validation_features("
                "with_labels=True)) and keep them in the Trainer's label_names."
            )
        if label_ids is not None:
            label_start, label_end = _start_end(label_ids, "label_ids")
            expected = len(self.labels[0])
            if len(label_start) != expected:
                raise ValueError(
                    f"compute_metrics got {len(label_start)} evaluation features but was built from {expected}; pass "
                    "the same features as eval_dataset and to squad_compute_metrics."
                )
            wrong = (label_start != self.labels[0]) | (label_end != self.labels[1])
            if wrong.any():
                f = int(np.flatnonzero(wrong)[0])
                raise ValueError(
                    f"the labels the Trainer gathered do not match the features' at {int(wrong.sum())} positions "
                    f"(first: feature {f}): predictions are not in the order of the features given to "
                    "squad_compute_metrics. Pass the same features as eval_dataset, unshuffled."
                )
            self._check_inputs(inputs)
        answers = self.postprocessor(start, end)
        self.last_predictions = answers
        if self.version_2_with_negative:
            result = squad_v2_metric(answers.metric_inputs(True), self.references)
            return {"exact_match": result["exact"], **result}
        return squad_metric(answers.metric_inputs(False), self.references)

    def _check_inputs(self, inputs: Any) -> None:
        """Checks the input ids the Trainer gathered (`include_for_metrics=["inputs"]`) against the features', row by
        row; without them, warns if the labels alone cannot tell every feature apart."""
        if inputs is None:
            if self.shared_labels:
                warnings.warn(
                    f"{self.shared_labels} of {len(self.labels[0])} evaluation features share their start/end labels "
                    "with another, so compute_metrics cannot check from the labels alone that their predictions are "
                    "in the features' order. Pass TrainingArguments(include_for_metrics=['inputs']) to have each "
                    "feature's input ids checked (with batch_eval_metrics, in one process: the Trainer does not "
                    "gather inputs per batch).",
                    UserWarning,
                    stacklevel=3,
                )
            return
        rows = _padded_rows(inputs if isinstance(inputs, (list, tuple)) else [inputs])
        if len(rows) != len(self.tokens):
            raise ValueError(
                f"compute_metrics got the inputs of {len(rows)} evaluation features but was built from "
                f"{len(self.tokens)}; pass the same features as eval_dataset and to squad_compute_metrics."
            )
        wrong = [f for f, (row, tokens) in enumerate(zip(rows, self.tokens)) if not _holds(row, tokens)]
        if wrong:
            raise ValueError(
                f"the input ids the Trainer gathered do not match the features' at {len(wrong)} features (first: "
                f"feature {wrong[0]}): predictions are not in the order of the features given to "
                "squad_compute_metrics. Pass the same features as eval_dataset, unshuffled."
            )


_PAD = -100
"""What the Trainer pads gathered rows of different lengths with."""


def _batch_input_ids(inputs: Any, rows: int) -> np.ndarray | None:
    """The input ids of one batch under `batch_eval_metrics` (the Trainer passes the batch dict, not gathered across
    processes: `None` when they are not the `rows` the labels are)."""
    if isinstance(inputs, Mapping):
        inputs = inputs.get("input_ids")
    if inputs is None:
        return None
    ids = _numpy(inputs)
    return ids if ids.ndim == 2 and len(ids) == rows else None


def _padded_rows(blocks: Sequence[Any]) -> np.ndarray:
    """Blocks of integer rows of different widths as one 2-D array, right-padded with -100 as the Trainer does."""
    arrays = [np.atleast_2d(_numpy(b)).astype(np.int64) for b in blocks]
    width = max((a.shape[1] for a in arrays), default=0)
    return np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=_PAD) for a in arrays])


def _holds(row: np.ndarray, tokens: np.ndarray) -> bool:
    """Whether a gathered row of input ids is the feature's `tokens`, padded on the right or on the left."""
    row = row[row != _PAD]
    size = len(tokens)
    return len(row) >= size and (np.array_equal(row[:size], tokens) or np.array_equal(row[len(row) - size :], tokens))


def _feature_tokens(features: Any) -> list[np.ndarray]:
    """Each feature's real tokens: those of its `attention_mask`, else all of its `input_ids`."""
    from .postprocess import _column

    ids = [np.asarray(i, dtype=np.int64) for i in _column(features, "input_ids", "features")]
    names = getattr(features, "column_names", None) or (list(features) if isinstance(features, Mapping) else [])
    if "attention_mask" in names:
        masks = _column(features, "attention_mask", "features")
        ids = [i[np.asarray(m, dtype=bool)] for i, m in zip(ids, masks)]
    return ids


def squad_compute_metrics(
    examples: Any,
    features: Any,
    version_2_with_negative: bool = False,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> SquadComputeMetrics:
    """Builds a `compute_metrics` for `transformers.Trainer` that reports SQuAD `exact_match` and `f1`.

    Pass the same `features` as the Trainer's `eval_dataset`. They carry the gold start/end positions as labels
    (`prepare_validation_features` adds them when the examples have answers): that is what makes the Trainer call
    `compute_metrics` at all, gives an `eval_loss`, and lets the callable check that the gathered predictions are
    in the order of the features (also across processes: the Trainer's `gather_for_metrics` drops the samples
    repeated to even out the last batch). Labels cannot tell apart features that share them: with
    `TrainingArguments(include_for_metrics=["inputs"])` each feature's input ids are checked too (else it warns). The callable post-processes the logits (`SquadPostprocessor`) and scores
    the answers with `squad_metric`, or with `squad_v2_metric` in v2 mode (all its keys, plus `exact_match`).
    The answers of the last call stay in `.last_predictions`.

    Args:
        examples: the validation examples (`id`, `context`, `answers`).
        features: their features from `prepare_validation_features`, with labels.
        version_2_with_negative (`bool`, defaults to `False`): SQuAD v2 (null answers).
        n_best_size, max_answer_length, null_score_diff_threshold: see `SquadPostprocessor`.

    Example:

    ```python
    >>> eval_features = tokenize_squad(eval_examples, tokenizer, train=False)
    >>> trainer = Trainer(model, args, eval_dataset=eval_features,
    ...                   compute_metrics=squad_compute_metrics(eval_examples, eval_features))
    >>> trainer.evaluate()["eval_f1"]
    ```
    """
    return SquadComputeMetrics(
        examples,
        features,
        version_2_with_negative=version_2_with_negative,
        n_best_size=n_best_size,
        max_answer_length=max_answer_length,
        null_score_diff_threshold=null_score_diff_threshold,
    )
