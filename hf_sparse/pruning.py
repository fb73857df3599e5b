"""Pruning a model to N:M in one shot (`prune_`), and applying masks to its layers."""

from __future__ import annotations

import torch
from torch import nn

from ._distributed import local_tensor
from .adapters import base_layer_names
from .checkpoint import attach_sparsity_metadata
from .config import SparsityConfig
from .criteria import compute_masks
from .selection import select_layers


@torch.no_grad()
def apply_masks_(layers: dict[str, nn.Linear], masks: dict[str, torch.Tensor]) -> None:
    """Zeroes the masked-out weights of `layers` in place."""
    for name, mask in masks.items():
        local_tensor(layers[name].weight).mul_(mask)


def prune_(
    model: nn.Module,
    config: SparsityConfig | None = None,
    calibration_data=None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Prunes `model` in place to N:M (one shot, no training) and returns the masks by layer name.

    A `transformers` model also gets the sparsity metadata in `model.config.sparsity` (as after
    `SparsityCallback`), so `hf_sparse.save_pretrained(model, folder, compact=True)` works right after.

    Args:
        model: any module; the layers are chosen as in `SparsityConfig` (default: every `nn.Linear` inside the
            transformer blocks).
        config: the pattern, selection and criterion; default `SparsityConfig()` (2:4, magnitude).
        calibration_data: for criterion "wanda" or "sparsegpt": a DataLoader, a tokenized dataset, or a list of
            batches or examples; its first `config.calibration_samples` sequences are run through the model block
            by block (see `hf_sparse.calibration`). Not used by "magnitude".
        device: where the calibration statistics and the SparseGPT solve run; default the model's GPU, else CUDA
            when available, else the CPU.

    Example:

    ```python
    >>> from hf_sparse import prune_, sparsity_report
    >>> masks = prune_(model, SparsityConfig(criterion="wanda"), calibration_data=tokenizer(texts, padding=True,
    ...                                                                                   return_tensors="pt"))
    >>> all(r.is_nm for r in sparsity_report(model, layers=list(masks)))
    True
    ```
    """
    config = config or SparsityConfig()
    layers = select_layers(model, config).targets
    masks = compute_masks(model, layers, config, calibration_data, device)
    apply_masks_(layers, masks)
    # As at the end of SparsityCallback: the metadata config.json carries, which compact saving needs.
    target, names = base_layer_names(model, list(layers))
    if getattr(target, "config", None) is not None:
        attach_sparsity_metadata(target, config, layers=names, calibration=masks.calibration)
    return masks
