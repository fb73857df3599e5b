"""hf-sparse: 2:4 semi-structured sparsity for Hugging Face training, fast sparse inference, shareable checkpoints."""

from .callback import SparsityCallback
from .config import SparsityConfig
from .criteria import calibration_batches, sparsegpt_prune_, wanda_mask
from .distillation import DistillationLoss, distillation_loss
from .masks import is_nm, nm_mask, sparsity_report
from .pruning import prune_
from .selection import select_layers

__version__ = "0.1.0.dev0"

__all__ = [
    "SparsityCallback",
    "SparsityConfig",
    "is_nm",
    "nm_mask",
    "prune_",
    "select_layers",
    "sparsity_report",
    "DistillationLoss",
    "calibration_batches",
    "distillation_loss",
    "sparsegpt_prune_",
    "wanda_mask",
]
