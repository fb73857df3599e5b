"""hf-sparse: 2:4 semi-structured sparsity for Hugging Face training, fast sparse inference, shareable checkpoints.

The names below are the public API. Building blocks stay importable from their modules: the criteria
(`hf_sparse.criteria`), fast inference (`hf_sparse.inference`: layers, autotuner, benchmark) and SQuAD
(`hf_sparse.squad`: data, post-processing, metrics).
"""

from .adapters import merge_and_unload_sparse
from .callback import SparsityCallback
from .checkpoint import SparseCheckpointError, from_pretrained, save_pretrained
from .config import SparsityConfig
from .distillation import DistillationLoss
from .hub import HubPushError, model_card, push_to_hub
from .inference import SwapReport, cuda_graphs, restore_dense_, swap_to_semi_structured_
from .learned_masks import learn_masks
from .masks import sparsity_report
from .pruning import prune_
from .quantizer import HfSparseConfig as _HfSparseConfig  # noqa: F401 - registers compact checkpoints with transformers
from .selection import select_layers

__version__ = "0.1.0.dev0"

__all__ = [
    # Sparse training and pruning
    "SparsityCallback",
    "SparsityConfig",
    "prune_",
    "learn_masks",
    "select_layers",
    "sparsity_report",
    "DistillationLoss",
    "merge_and_unload_sparse",
    # Checkpoints, model cards and the Hub
    "save_pretrained",
    "from_pretrained",
    "SparseCheckpointError",
    "model_card",
    "push_to_hub",
    "HubPushError",
    # Fast inference on sparse tensor cores
    "swap_to_semi_structured_",
    "restore_dense_",
    "cuda_graphs",
    "SwapReport",
]
