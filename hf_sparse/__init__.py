"""hf-sparse: 2:4 semi-structured sparsity for Hugging Face training, fast sparse inference, shareable checkpoints."""

from .autotune import Autotuner
from .callback import SparsityCallback
from .config import SparsityConfig
from .graphs import cuda_graphs, remove_cuda_graphs
from .inference import (
    SemiStructuredLinear,
    SwapReport,
    fuse_qkv_,
    restore_dense_,
    semi_structured_support,
    swap_to_semi_structured_,
)
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
