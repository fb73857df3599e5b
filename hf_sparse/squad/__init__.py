"""SQuAD for the Trainer: data loading and tokenization, post-processing of logits into answers, and the official
v1.1 / v2.0 metrics as a `compute_metrics` (exact to the official scripts).

- `data.py`: `load_squad`, `read_squad_json`, `tokenize_squad` (train and validation features), and
  `split_unanswerable` / `distillation_features` / `concatenate_features` (unanswerable questions as inputs that
  only distillation learns from).
- `synthetic.py`: `synthetic_squad` and `synthetic_tokenizer`, for tests and the offline demo.
- `postprocess.py`: `SquadPostprocessor`, vectorised n-best answer extraction.
- `metrics.py`: `squad_metric`, `squad_v2_metric`, `squad_compute_metrics`, and offline `evaluate` modules.
"""

from .data import (
    concatenate_features,
    distillation_features,
    load_squad,
    read_squad_json,
    split_unanswerable,
    squad_records,
    tokenize_squad,
)
from .metrics import squad_compute_metrics, squad_metric, squad_v2_metric
from .postprocess import SquadPostprocessor
from .synthetic import synthetic_squad, synthetic_tokenizer

__all__ = [
    "SquadPostprocessor",
    "concatenate_features",
    "distillation_features",
    "load_squad",
    "read_squad_json",
    "squad_compute_metrics",
    "squad_metric",
    "squad_records",
    "split_unanswerable",
    "squad_v2_metric",
    "synthetic_squad",
    "synthetic_tokenizer",
    "tokenize_squad",
]
