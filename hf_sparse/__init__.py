"""hf-sparse: 2:4 semi-structured sparsity for Hugging Face training, fast sparse inference, shareable checkpoints."""

from .callback import SparsityCallback
from .checkpoint import attach_sparsity_metadata, from_pretrained, save_pretrained
from .config import SparsityConfig
from .hub import model_card, push_to_hub, write_model_card
from .masks import is_nm, nm_mask, sparsity_report
from .pruning import prune_
from .selection import select_layers

__version__ = "0.1.0.dev0"

__all__ = [
    "SparsityCallback",
    "SparsityConfig",
    "attach_sparsity_metadata",
    "from_pretrained",
    "is_nm",
    "model_card",
    "nm_mask",
    "prune_",
    "push_to_hub",
    "save_pretrained",
    "select_layers",
    "sparsity_report",
    "write_model_card",
]
