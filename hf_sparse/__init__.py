"""hf-sparse: 2:4 semi-structured sparsity for Hugging Face training, fast sparse inference, shareable checkpoints."""

from .autotune import Autotuner
from .callback import SparsityCallback
from .checkpoint import attach_sparsity_metadata, from_pretrained, save_pretrained
from .config import SparsityConfig
from .criteria import calibration_batches, sparsegpt_prune_, wanda_mask
from .data import (
    load_squad,
    prepare_train_features,
    prepare_validation_features,
    read_squad_json,
    synthetic_squad,
    synthetic_tokenizer,
    tokenize_squad,
)
from .distillation import DistillationLoss, distillation_loss
from .graphs import cuda_graphs, remove_cuda_graphs
from .hub import model_card, push_to_hub, write_model_card
from .inference import (
    SemiStructuredLinear,
    SwapReport,
    fuse_qkv_,
    restore_dense_,
    semi_structured_support,
    swap_to_semi_structured_,
)
from .masks import is_nm, nm_mask, sparsity_report, total_sparsity
from .metrics import squad_compute_metrics, squad_metric, squad_v2_metric
from .postprocess import SquadPostprocessor, postprocess_qa_predictions
from .pruning import prune_
from .selection import select_layers

__version__ = "0.1.0.dev0"

__all__ = [
    # Sparse training and pruning
    "SparsityCallback",
    "SparsityConfig",
    "is_nm",
    "nm_mask",
    "prune_",
    "select_layers",
    "sparsity_report",
    "total_sparsity",
    # Activation-aware criteria and distillation
    "DistillationLoss",
    "calibration_batches",
    "distillation_loss",
    "sparsegpt_prune_",
    "wanda_mask",
    # Checkpoints, model cards and the Hub
    "attach_sparsity_metadata",
    "from_pretrained",
    "model_card",
    "push_to_hub",
    "save_pretrained",
    "write_model_card",
    # SQuAD data, post-processing and metrics
    "load_squad",
    "prepare_train_features",
    "prepare_validation_features",
    "read_squad_json",
    "synthetic_squad",
    "synthetic_tokenizer",
    "tokenize_squad",
    "squad_compute_metrics",
    "squad_metric",
    "squad_v2_metric",
    "SquadPostprocessor",
    "postprocess_qa_predictions",
    # Fast inference on sparse tensor cores
    "Autotuner",
    "SemiStructuredLinear",
    "SwapReport",
    "cuda_graphs",
    "fuse_qkv_",
    "remove_cuda_graphs",
    "restore_dense_",
    "semi_structured_support",
    "swap_to_semi_structured_",
]
