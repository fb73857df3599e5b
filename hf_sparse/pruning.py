"""Computing and applying N:M masks on a model's selected layers, with or without a Trainer."""

from __future__ import annotations

import torch
from torch import nn

from .config import SparsityConfig
from .criteria import CALIBRATED_CRITERIA, calibrated_prune_
from .masks import nm_mask
from .selection import select_layers


def local_tensor(tensor: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """The part of a (possibly sharded) parameter that this process holds.

    Plain tensors are returned as they are. FSDP2 / tensor-parallel `DTensor`s are returned as their local shard,
    which is only valid when whole rows are sharded (N:M groups run along the input dimension and must stay whole).
    """
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch builds without distributed
        return tensor
    if isinstance(tensor, DTensor):
        for placement in tensor.placements:
            if isinstance(placement, Shard) and placement.dim != 0:
                raise NotImplementedError(
                    f"{name} is sharded along dim {placement.dim}; N:M groups run along the input dimension and "
                    "need whole rows. Shard linear weights along dim 0 (FSDP2's default) instead."
                )
        return tensor.to_local()
    if hasattr(tensor, "ds_id"):
        raise NotImplementedError(
            f"{name} is a DeepSpeed ZeRO-3 partitioned parameter, which hf-sparse does not handle yet; "
            "use ZeRO stage 1 or 2, DDP, or FSDP2 (fsdp_version: 2)."
        )
    if getattr(tensor, "_is_flat_param", False):
        raise NotImplementedError(
            f"{name} is an FSDP1 flat parameter, which hf-sparse does not handle; use FSDP2 (fsdp_version: 2)."
        )
    return tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a `DTensor` whose processes hold different parts (FSDP2 / tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover
        return False
    return isinstance(tensor, DTensor) and any(isinstance(p, Shard) for p in tensor.placements)


def compute_masks(layers: dict[str, nn.Linear], config: SparsityConfig) -> dict[str, torch.Tensor]:
    """Magnitude N:M masks of `layers`' weights (local shards under FSDP2).

    The activation-aware criteria ("wanda", "sparsegpt") need the model and calibration data, and prune as they go
    (block by block): they live in `hf_sparse.criteria.calibrated_prune_`, which `prune_` calls.
    """
    if config.criterion != "magnitude":
        raise ValueError(
            f"criterion {config.criterion!r} needs the model and calibration data; use hf_sparse.prune_(model, "
            "config, calibration_data=...) or hf_sparse.criteria.calibrated_prune_."
        )
    return {
        name: nm_mask(local_tensor(layer.weight, f"{name}.weight"), config.n, config.m, name)
        for name, layer in layers.items()
    }


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

    Args:
        model: any module; the layers are chosen as in `SparsityConfig` (default: every `nn.Linear` inside the
            transformer blocks).
        config: the pattern, selection and criterion; default `SparsityConfig()` (2:4, magnitude).
        calibration_data: for criterion "wanda" or "sparsegpt": a DataLoader, a tokenized dataset, or a list of
            batches or examples; its first `config.calibration_samples` sequences are run through the model block
            by block (see `hf_sparse.criteria`). Not used by "magnitude".
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
    if config.criterion in CALIBRATED_CRITERIA:
        return calibrated_prune_(model, layers, config, calibration_data, device)
    masks = compute_masks(layers, config)
    apply_masks_(layers, masks)
    return masks
