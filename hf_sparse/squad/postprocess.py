"""From start/end logits of every feature to one answer text per SQuAD example, vectorised with numpy.

The algorithm is the one of the Hugging Face question-answering tutorial (`run_qa.py`): per feature, the
`n_best_size` highest start logits x the `n_best_size` highest end logits; pairs outside the context, with the end
before the start, or longer than `max_answer_length` tokens are dropped; the answer is the pair with the highest
`start_logit + end_logit` over all features of the example. In SQuAD v2 mode the null answer's score is
`start_logits[0] + end_logits[0]` (the CLS token), minimum over the example's features, and the example gets `""`
when `null_score - best_span_score > null_score_diff_threshold` (or when no valid span exists).

Ties are broken deterministically: among equal logits the earlier token ranks first; among equal pair scores the
pair met first (start rank, then end rank) wins; among features, the earlier feature wins. Instead of Python loops
over features and pairs, all `n_best_size**2` pairs of all features are scored at once, which takes about 1 s for
SQuAD-dev-sized input on one CPU core (`python -m benchmarks.postprocess`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class QAPredictions:
    """Answers of `SquadPostprocessor`, one per example, in the order of the examples.

    Attributes:
        ids (`list[str]`): example ids.
        texts (`list[str]`): predicted answer texts (`""` for "no answer" in v2 mode, or when no valid span exists).
        scores (`np.ndarray`): `start_logit + end_logit` of the best valid span (`-inf` where there is none).
        null_score_diffs (`np.ndarray` or `None`): in v2 mode, `null_score - best span score` per example.
    """

    ids: list[str]
    texts: list[str]
    scores: np.ndarray
    null_score_diffs: np.ndarray | None = None

    def as_dict(self) -> dict[str, str]:
        """`{example id: answer text}`."""
        return dict(zip(self.ids, self.texts))

    def metric_inputs(self, version_2_with_negative: bool | None = None) -> list[dict[str, Any]]:
        """Predictions in the format of `squad_metric` (v1) or `squad_v2_metric` (v2, `no_answer_probability`
        0.0 as in `run_qa.py`: the null decision is already in the text)."""
        v2 = self.null_score_diffs is not None if version_2_with_negative is None else version_2_with_negative
        if v2:
            return [
                {"id": i, "prediction_text": t, "no_answer_probability": 0.0} for i, t in zip(self.ids, self.texts)
            ]
        return [{"id": i, "prediction_text": t} for i, t in zip(self.ids, self.texts)]


def _column(data: Any, name: str, what: str) -> Any:
    """A column of a `datasets.Dataset`, a dict of columns or a list of row dicts."""
    if isinstance(data, Mapping):
        if name not in data:
            raise ValueError(f"{what} has no {name!r} column (columns: {sorted(data)}).")
        return data[name]
    column_names = getattr(data, "column_names", None)
    if column_names is not None:  # datasets.Dataset
        if name not in column_names:
            raise ValueError(f"{what} has no {name!r} column (columns: {column_names}).")
        return data[name]
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        out = []
        for i, row in enumerate(data):
            if not isinstance(row, Mapping) or name not in row:
                raise ValueError(f"{what}[{i}] has no {name!r} key; each row must be a dict with {name!r}.")
            out.append(row[name])
        return out
    raise ValueError(f"{what} must be a datasets.Dataset, a dict of columns or a list of dicts; got {type(data)}.")


def _offsets_array(features: Any) -> np.ndarray:
    """`(num_features, seq_len, 2)` int64 character offsets; -1 marks tokens outside the context."""
    column_names = getattr(features, "column_names", None)
    if column_names is not None and "offset_mapping" in column_names and hasattr(features, "data"):
        # Fast path for datasets.Dataset: read the Arrow buffers instead of building Python lists.
        if getattr(features, "_indices", None) is not None:
            features = features.flatten_indices()
        column = features.data.column("offset_mapping").combine_chunks()
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        inner = column.flatten()
        if column.null_count == 0 and inner.null_count == 0 and len(lengths) and (lengths == lengths[0]).all():
            pairs = inner.value_lengths().to_numpy(zero_copy_only=False)
            values = inner.flatten()
            if (pairs == 2).all() and values.null_count == 0:
                return values.to_numpy(zero_copy_only=False).astype(np.int64).reshape(len(lengths), lengths[0], 2)
    rows = _column(features, "offset_mapping", "features")
    if isinstance(rows, np.ndarray) or hasattr(rows, "numpy"):
        array = np.asarray(rows.numpy() if hasattr(rows, "numpy") else rows)
        if array.ndim == 3 and array.shape[2] == 2 and np.issubdtype(array.dtype, np.integer):
            return array.astype(np.int64)
    rows = list(rows)
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width, 2), -1, dtype=np.int64)
    for f, row in enumerate(rows):
        for t, pair in enumerate(row):
            if pair is None:  # the tutorial's convention for tokens outside the context
                continue
            if len(pair) != 2:
                raise ValueError(
                    f"features[{f}]['offset_mapping'][{t}] must be a (start, end) pair or None; got {pair!r}."
                )
            out[f, t] = pair
    return out


class SquadPostprocessor:
    """Turns start/end logits of all validation features into one answer per example (vectorised).

    Build it once from the examples and their features (this converts the offsets to arrays), then call it
    with the logits of every evaluation.

    Args:
        examples: the validation examples (`datasets.Dataset`, dict of columns or list of dicts) with `id` and
            `context`.
        features: their features from `hf_sparse.squad.data.prepare_validation_features`, with `example_id` and
            `offset_mapping` (character offsets, `[-1, -1]` or `None` outside the context).
        n_best_size (`int`, defaults to 20): start and end candidates per feature.
        max_answer_length (`int`, defaults to 30): longest answer, in tokens.
        version_2_with_negative (`bool`, defaults to `False`): SQuAD v2 mode, with a null answer.
        null_score_diff_threshold (`float`, defaults to 0.0): v2 predicts `""` when
            `null_score - best_span_score` is above it.

    Example:

    ```python
    >>> post = SquadPostprocessor(examples, features)
    >>> answers = post(start_logits, end_logits)   # arrays (num_features, seq_len)
    >>> answers.as_dict()["56be4db0acb8001400a502ec"]
    'Denver Broncos'
    ```
    """

    def __init__(
        self,
        examples: Any,
        features: Any,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        version_2_with_negative: bool = False,
        null_score_diff_threshold: float = 0.0,
    ):
        if not isinstance(n_best_size, int) or n_best_size < 1:
            raise ValueError(f"n_best_size must be a positive int; got {n_best_size!r}.")
        if not isinstance(max_answer_length, int) or max_answer_length < 1:
            raise ValueError(f"max_answer_length must be a positive int; got {max_answer_length!r}.")
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length
        self.version_2_with_negative = bool(version_2_with_negative)
        self.null_score_diff_threshold = float(null_score_diff_threshold)

        self.ids = [str(i) for i in _column(examples, "id", "examples")]
        self.contexts = list(_column(examples, "context", "examples"))
        for i, (qid, context) in enumerate(zip(self.ids, self.contexts)):
            if not isinstance(context, str):
                raise ValueError(f"examples[{i}] (id {qid!r}): 'context' must be a str; got {type(context).__name__}.")
        position = {}
        for i, qid in enumerate(self.ids):
            if qid in position:
                raise ValueError(f"example id {qid!r} appears more than once in examples; ids must be unique.")
            position[qid] = i
        feature_ids = list(_column(features, "example_id", "features"))
        unknown = [fid for fid in feature_ids if fid not in position]
        if unknown:
            raise ValueError(
                f"feature example_id {unknown[0]!r} matches no example id ({len(unknown)} such features); "
                "build the features from these examples."
            )
        self.feature_example = np.fromiter(
            (position[fid] for fid in feature_ids), dtype=np.int64, count=len(feature_ids)
        )
        covered = np.zeros(len(self.ids), dtype=bool)
        covered[self.feature_example] = True
        if not covered.all():
            missing = self.ids[int(np.flatnonzero(~covered)[0])]
            raise ValueError(f"example id {missing!r} has no feature; features must cover every example.")
        self.offsets = _offsets_array(features)
        if len(self.offsets) != len(feature_ids):
            raise ValueError(
                f"features has {len(feature_ids)} example_id values but {len(self.offsets)} offset_mapping rows."
            )
        bad = (self.offsets[..., 0] > self.offsets[..., 1]) | (
            self.offsets[..., 1] > np.array([len(c) for c in self.contexts])[self.feature_example][:, None]
        )
        if bad.any():
            f, t = np.argwhere(bad)[0]
            raise ValueError(
                f"feature {f} (example {feature_ids[f]!r}): offset_mapping[{t}] = {self.offsets[f, t].tolist()} is not "
                "a span of its example's context."
            )

    @property
    def num_features(self) -> int:
        return len(self.feature_example)

    def _check_logits(self, logits: Any, name: str) -> np.ndarray:
        if hasattr(logits, "detach"):  # torch.Tensor
            logits = logits.detach().float().cpu().numpy()
        array = np.asarray(logits)
        if array.dtype == object or not np.issubdtype(array.dtype, np.number):
            raise ValueError(
                f"{name} must be a numeric array of shape (num_features, seq_len); got dtype {array.dtype}."
            )
        if array.ndim != 2:
            raise ValueError(f"{name} must have shape (num_features, seq_len); got shape {array.shape}.")
        if array.shape[0] != self.num_features:
            raise ValueError(
                f"{name} has {array.shape[0]} rows but there are {self.num_features} features; pass one row of "
                "logits per feature, in the order of the features."
            )
        if not np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        finite = np.isfinite(array)
        if not finite.all():
            f = int(np.argwhere(~finite)[0][0])
            raise ValueError(
                f"{name} of feature {f} (example {self.ids[self.feature_example[f]]!r}) contain NaN or inf."
            )
        return array

    def __call__(self, start_logits: Any, end_logits: Any) -> QAPredictions:
        """Answers from logits of shape `(num_features, seq_len)` (numpy arrays or torch tensors)."""
        start = self._check_logits(start_logits, "start_logits")
        end = self._check_logits(end_logits, "end_logits")
        if start.shape != end.shape:
            raise ValueError(
                f"start_logits and end_logits must have the same shape; got {start.shape} and {end.shape}."
            )
        dtype = np.result_type(start.dtype, end.dtype)
        start, end = start.astype(dtype, copy=False), end.astype(dtype, copy=False)
        num_features, seq_len = start.shape
        offsets = self.offsets
        if offsets.shape[1] > seq_len:
            # Logits of dynamically padded batches can be shorter than the offsets: the rest must be padding.
            beyond = (offsets[:, seq_len:, 0] >= 0).any(axis=1)
            if beyond.any():
                f = int(np.flatnonzero(beyond)[0])
                raise ValueError(
                    f"logits have {seq_len} positions but feature {f} has context tokens beyond position {seq_len}; "
                    "the logits do not belong to these features."
                )
            offsets = offsets[:, :seq_len]
        elif offsets.shape[1] < seq_len:
            pad = np.full((num_features, seq_len - offsets.shape[1], 2), -1, dtype=offsets.dtype)
            offsets = np.concatenate([offsets, pad], axis=1)
        in_context = offsets[..., 0] >= 0

        k = min(self.n_best_size, seq_len)
        rows = np.arange(num_features)[:, None]
        start_idx = np.argsort(-start, axis=1, kind="stable")[:, :k]
        end_idx = np.argsort(-end, axis=1, kind="stable")[:, :k]
        pair_scores = start[rows, start_idx][:, :, None] + end[rows, end_idx][:, None, :]
        length = end_idx[:, None, :] - start_idx[:, :, None]
        valid = (
            in_context[rows, start_idx][:, :, None]
            & in_context[rows, end_idx][:, None, :]
            & (length >= 0)
            & (length < self.max_answer_length)
        )
        pair_scores = np.where(valid, pair_scores, -np.inf).reshape(num_features, k * k)
        best_pair = pair_scores.argmax(axis=1)  # first maximum: start rank, then end rank
        feature_score = pair_scores[np.arange(num_features), best_pair]
        feature_has = valid.reshape(num_features, k * k).any(axis=1)
        feature_score = np.where(feature_has, feature_score, -np.inf)

        # Best feature per example: highest score, earliest feature on ties.
        order = np.lexsort((np.arange(num_features), -feature_score, self.feature_example))
        first = np.ones(num_features, dtype=bool)
        first[1:] = self.feature_example[order[1:]] != self.feature_example[order[:-1]]
        best_feature = order[first]  # one per example, in example order (every example has a feature)
        example_score = feature_score[best_feature]
        bf_pair = best_pair[best_feature]
        s_tok = start_idx[best_feature, bf_pair // k]
        e_tok = end_idx[best_feature, bf_pair % k]
        char_start = offsets[best_feature, s_tok, 0]
        char_end = offsets[best_feature, e_tok, 1]
        has_span = feature_has[best_feature]

        diffs = None
        answer = has_span
        if self.version_2_with_negative:
            null = start[:, 0] + end[:, 0]
            example_null = np.full(len(self.ids), np.inf, dtype=null.dtype)
            np.minimum.at(example_null, self.feature_example, null)
            diffs = np.where(has_span, example_null - example_score, np.inf)
            answer = has_span & ~(diffs > self.null_score_diff_threshold)
        texts = [
            self.contexts[i][cs:ce] if ok else ""
            for i, (ok, cs, ce) in enumerate(zip(answer.tolist(), char_start.tolist(), char_end.tolist()))
        ]
        return QAPredictions(ids=list(self.ids), texts=texts, scores=example_score, null_score_diffs=diffs)
