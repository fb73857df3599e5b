"""SQuAD v2.0 as an `evaluate` module that loads offline; it delegates to `hf_sparse.squad.metrics.squad_v2_metric`.

Usage: `evaluate.load(hf_sparse.squad.metrics.evaluate_module_path("squad_v2"))`, then `compute(predictions=...,
references=...)` with the inputs of the Hub's `squad_v2` metric.
"""

import datasets
import evaluate

from hf_sparse.squad.metrics import squad_v2_metric

_DESCRIPTION = "SQuAD v2.0 exact/F1 with unanswerable questions, identical to the official script (offline copy)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id": str, "prediction_text": str, "no_answer_probability": float}.
    references: list of {"id": str, "answers": {"text": list[str], "answer_start": list[int]}}; an empty
        text list marks an unanswerable question.
    no_answer_threshold: a prediction whose no_answer_probability is above it counts as "no answer" (1.0).
Returns:
    exact, f1, total, HasAns_*, NoAns_*, best_exact, best_exact_thresh, best_f1, best_f1_thresh.
"""
_CITATION = """@inproceedings{rajpurkar-etal-2018-know,
    title = "Know What You Don{'}t Know: Unanswerable Questions for {SQ}u{AD}",
    author = "Rajpurkar, Pranav and Jia, Robin and Liang, Percy",
    booktitle = "Proceedings of ACL 2018",
    year = "2018",
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadV2(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "id": datasets.Value("string"),
                        "prediction_text": datasets.Value("string"),
                        "no_answer_probability": datasets.Value("float32"),
                    },
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.features.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
        )

    def _compute(self, predictions, references, no_answer_threshold=1.0):
        return squad_v2_metric(predictions, references, no_answer_threshold=no_answer_threshold)
