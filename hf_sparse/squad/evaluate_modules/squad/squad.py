"""SQuAD v1.1 as an `evaluate` module that loads offline; it delegates to `hf_sparse.squad.metrics.squad_metric`.

Usage: `evaluate.load(hf_sparse.squad.metrics.evaluate_module_path("squad"))`, then `compute(predictions=...,
references=...)` with the inputs of the Hub's `squad` metric.
"""

import datasets
import evaluate

from hf_sparse.squad.metrics import squad_metric

_DESCRIPTION = "SQuAD v1.1 exact match and F1, identical to the official evaluation script (offline copy)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id": str, "prediction_text": str}.
    references: list of {"id": str, "answers": {"text": list[str], "answer_start": list[int]}}.
Returns:
    exact_match and f1, in percent.
"""
_CITATION = """@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "Proceedings of EMNLP 2016",
    year = "2016",
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.features.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
        )

    def _compute(self, predictions, references):
        return squad_metric(predictions, references)
