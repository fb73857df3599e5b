"""Everything hf-sparse needs to know about data-parallel and sharded training, in one place.

DDP replicas hold whole weights and must end every step with identical masks (rank 0's are broadcast). FSDP2
shards weights by rows into `DTensor`s: N:M groups run along the input dimension, so each rank computes the masks
of its own rows. FSDP1 flat parameters and DeepSpeed ZeRO-3 partitions are refused with an error that says what to
use instead.
"""

from __future__ import annotations

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / DeepSpeed / `torch.compile` wrappers."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed
        return None
    return DTensor


def local_tensor(tensor: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """The part of a (possibly sharded) parameter that this process holds.

    Plain tensors are returned as they are. FSDP2 / tensor-parallel `DTensor`s are returned as their local shard,
    which is only valid when whole rows are sharded (N:M groups run along the input dimension and must stay whole).
    """
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        from torch.distributed.tensor import Shard

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
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return False
    from torch.distributed.tensor import Shard

    return any(isinstance(p, Shard) for p in tensor.placements)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole (detached) tensor: a `DTensor` is gathered from every rank, a plain tensor returned as it is."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.full_tensor().detach()
    return tensor.detach()


def world_size() -> int:
    """Number of processes in the default group (1 without `torch.distributed`)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def broadcast_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's masks on every rank.

    Under data parallelism every rank computes the same masks from the same weights; broadcasting rank 0's makes
    that a guarantee rather than an assumption about deterministic kernels."""
    if world_size() == 1:
        return masks
    import torch.distributed as dist

    synced = {}
    for name, mask in masks.items():
        as_bytes = mask.to(torch.uint8)
        dist.broadcast(as_bytes, src=0)
        synced[name] = as_bytes.bool()
    return synced


def broadcast_weights_(layers: dict[str, nn.Linear]) -> None:
    """Copies rank 0's weights of `layers` to every data-parallel rank (after SparseGPT changed them), so that
    replicas stay identical even if ranks computed from different calibration batches. No-op without
    `torch.distributed` or for sharded (DTensor) weights, whose ranks hold different rows."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    dtensor = _dtensor_type()
    for layer in layers.values():
        if dtensor is not None and isinstance(layer.weight, dtensor):
            continue
        dist.broadcast(layer.weight.data, src=0)
