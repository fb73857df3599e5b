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
    """The user's model inside DDP / DataParallel / DeepSpeed / `torch.compile` wrappers.

    A compiled model (`torch.compile`'s `OptimizedModule`) is unwrapped too: its modules are named `_orig_mod.*`,
    names that neither the saved checkpoint nor the model's own `named_modules()` know.
    """
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


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


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """What this process holds of `tensor`: a `DTensor`'s local shard, any other tensor as it is. Unlike
    `local_tensor`, it accepts every kind of sharding (for checks that read every element, like finiteness)."""
    dtensor = _dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


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


def _broadcast_(tensor: torch.Tensor, src: int = 0) -> None:
    """`dist.broadcast` in place, through this rank's GPU when the backend is NCCL and `tensor` is on the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.broadcast(on_gpu, src=src)
        tensor.copy_(on_gpu)
    else:
        dist.broadcast(tensor, src=src)


def broadcast_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's masks on every rank (each rank passes masks of the same names and shapes; only rank 0's values
    matter)."""
    if world_size() == 1:
        return masks
    synced = {}
    for name, mask in masks.items():
        as_bytes = mask.to(torch.uint8)
        _broadcast_(as_bytes)
        synced[name] = as_bytes.bool()
    return synced


def broadcast_weights_(layers: dict[str, nn.Linear]) -> None:
    """Copies rank 0's weights and biases of `layers` to every data-parallel rank (after SparseGPT changed them).
    No-op without `torch.distributed` or for sharded (DTensor) weights, whose ranks hold different rows."""
    if world_size() == 1:
        return
    dtensor = _dtensor_type()
    for layer in layers.values():
        if dtensor is not None and isinstance(layer.weight, dtensor):
            continue
        _broadcast_(layer.weight.data)
        if layer.bias is not None:
            _broadcast_(layer.bias.data)


def gather_object(value) -> list:
    """`value` of every rank, in rank order (`[value]` without `torch.distributed`)."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def masks_digest(masks: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of `masks` (names and bits), to compare the masks of ranks without moving them."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(np.packbits(masks[name].detach().cpu().numpy().reshape(-1)).tobytes())
    return digest.hexdigest()[:16]


def check_replicas_agree(masks: dict[str, torch.Tensor], where: str) -> list[str]:
    """The masks' digest on every rank; raises if data-parallel replicas hold different masks.

    Every rank must call it (it gathers). Under FSDP2, ranks hold different rows by design: call it only for
    replicated weights."""
    digests = gather_object(masks_digest(masks))
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"hf-sparse: the data-parallel ranks hold different masks {where} (digests by rank: {digests}); "
            "replicas must start from identical weights, which DDP and this library's broadcasts guarantee."
        )
    return digests


def shard_like_(module: nn.Module, reference: nn.Module) -> bool:
    """Shards `module` with FSDP2 as `reference` (an FSDP2-sharded copy of the same architecture) is: every
    submodule whose counterpart in `reference` is an `FSDPModule` gets `fully_shard` on the same device mesh,
    innermost first. Returns False (and does nothing) when `reference` is not sharded with FSDP2.

    Used for a distillation teacher: it then holds 1/world of its weights on each rank and gathers one block at a
    time in its forward pass, instead of a full replica per rank."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    sharded = [name for name, sub in reference.named_modules() if isinstance(sub, FSDPModule)]
    mesh = next((p.device_mesh for p in reference.parameters() if is_sharded(p)), None)
    if not sharded or mesh is None:
        return False
    modules = dict(module.named_modules())
    missing = [name for name in sharded if name not in modules]
    if missing:
        raise ValueError(f"cannot shard the teacher like the student: it has no submodules {missing[:5]}.")
    for name in sorted(sharded, key=lambda n: n.count(".") + (n != ""), reverse=True):
        fully_shard(modules[name], mesh=mesh, reshard_after_forward=True)
    return True


def shut_down() -> None:
    """Waits for every process and tears the default process group down, if there is one. Call it at the end of a
    multi-process script: a gloo group left to the interpreter's exit sometimes aborts a rank there ("terminate
    called without an active exception"), failing a run that did all its work."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
