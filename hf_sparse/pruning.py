"""Pruning a model to N:M in one shot (`prune_`), applying masks to its layers, and recording which criterion
chose them."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ._distributed import local_tensor, unwrap_model
from .adapters import base_layer_names
from .checkpoint import attach_sparsity_metadata
from .config import SparsityConfig
from .criteria import Masks, compute_masks
from .masks import is_nm
from .selection import select_layers


@torch.no_grad()
def apply_masks_(layers: dict[str, nn.Linear], masks: dict[str, torch.Tensor]) -> None:
    """Zeroes the masked-out weights of `layers` in place."""
    for name, mask in masks.items():
        local_tensor(layers[name].weight).mul_(mask)


WEIGHT_UPDATING_CRITERIA = ("sparsegpt",)
"""Criteria that change the kept weights too: masks they computed are theirs even where they match earlier ones."""


def masks_chosen_before(model: nn.Module, layers: list[str], config: SparsityConfig) -> dict[str, Any] | None:
    """Who chose the masks `model`'s weights already have, from the sparsity metadata it carries.

    Pruning an already pruned model again (`prune_` twice, or `SparsityCallback()` to hold the masks of a one-shot
    SparseGPT `prune_`) picks the same masks whatever the criterion, when it prunes no nonzero weight: the criterion
    and options to record are then the earlier ones. Returns `{"criterion": ..., "criterion_options": ...}` when the
    metadata names a criterion and covers `layers` (as `model` names them) with `config`'s pattern, else None.
    """
    meta = getattr(getattr(model, "config", None), "sparsity", None)
    if (
        not isinstance(meta, dict)
        or not meta.get("criterion")
        or meta.get("sparsity_pattern") != config.sparsity_pattern
    ):
        return None
    if not set(layers) <= set(meta.get("layers", {})):
        return None
    chosen = {"criterion": meta["criterion"]}
    if meta.get("criterion_options"):
        chosen["criterion_options"] = copy.deepcopy(meta["criterion_options"])
    return chosen


def nonzeros_to_compare(
    chosen: dict[str, Any] | None, config: SparsityConfig, layers: dict[str, nn.Linear]
) -> dict[str, torch.Tensor] | None:
    """Where the weights of `layers` are nonzero, taken before `config.criterion` computes masks, when those masks
    may still be the earlier ones (`chosen`, see `masks_chosen_before`): else None, and the masks are `config`'s."""
    if chosen is None or config.criterion in WEIGHT_UPDATING_CRITERIA:
        return None
    with torch.no_grad():
        return {name: local_tensor(layer.weight) != 0 for name, layer in layers.items()}


def chosen_after(
    chosen: dict[str, Any] | None, nonzero: dict[str, torch.Tensor] | None, masks: dict[str, torch.Tensor]
) -> dict[str, Any] | None:
    """`chosen` if `masks` keep every weight that was `nonzero` (they are the earlier masks), else None."""
    if chosen is None or nonzero is None:
        return None
    if any(bool((nonzero[name] & ~mask).any()) for name, mask in masks.items()):
        return None
    return chosen


def record_sparsity_(
    model: nn.Module,
    config: SparsityConfig,
    layers: list[str],
    chosen: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stores the sparsity metadata of `model` in `model.config.sparsity`, naming the criterion (and its options)
    that chose the masks: `chosen` (see `masks_chosen_before`) when given, verbatim, else `config`'s with what its
    calibration used (`calibration`: `Masks.calibration`) over the configured values."""
    if chosen is None:
        return attach_sparsity_metadata(model, config, layers=layers, calibration=calibration)
    # The metadata writer takes the criterion and options of the metadata the model carries when given no config.
    had, previous = hasattr(model.config, "sparsity"), getattr(model.config, "sparsity", None)
    model.config.sparsity = {"sparsity_pattern": config.sparsity_pattern, **copy.deepcopy(chosen)}
    try:
        return attach_sparsity_metadata(model, None, layers=layers)
    except BaseException:
        if had:
            model.config.sparsity = previous
        else:
            del model.config.sparsity
        raise


def prune_(
    model: nn.Module,
    config: SparsityConfig | None = None,
    calibration_data=None,
    device: torch.device | str | None = None,
    masks: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Prunes `model` in place to N:M (one shot, no training) and returns the masks by layer name.

    A `transformers` model also gets the sparsity metadata in `model.config.sparsity` (as after
    `SparsityCallback`), so `hf_sparse.save_pretrained(model, folder, compact=True)` works right after. It names the
    criterion that chose the masks: on a model already pruned (whose metadata covers the selected layers) that
    this pass leaves as it is, the earlier criterion and options.

    Args:
        model: any module; the layers are chosen as in `SparsityConfig` (default: every `nn.Linear` inside the
            transformer blocks).
        config: the pattern, selection and criterion; default `SparsityConfig()` (2:4, magnitude).
        calibration_data: for criterion "wanda" or "sparsegpt": a DataLoader, a tokenized dataset, or a list of
            batches or examples; its first `config.calibration_samples` sequences are run through the model block
            by block (see `hf_sparse.calibration`). Not used by "magnitude".
        device: where the calibration statistics and the SparseGPT solve run; default the model's GPU, else CUDA
            when available, else the CPU.
        masks: masks chosen elsewhere (`hf_sparse.learn_masks`, with `SparsityConfig(criterion="learned")`), by
            layer name, one for every selected layer: applied instead of computed, and recorded under
            `config.criterion`.

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
    model = unwrap_model(model)  # layer names as the model itself (and its checkpoints) has them
    layers = select_layers(model, config).targets
    # compute_masks refuses NaN or inf weights before anything changes.
    target, names = base_layer_names(model, list(layers))
    chosen = masks_chosen_before(target, names, config)
    nonzero = nonzeros_to_compare(chosen, config, layers)  # before Wanda and SparseGPT prune in place
    if masks is not None:
        masks = Masks(checked_masks(masks, layers, config, "prune_(masks=...)"))
    else:
        masks = compute_masks(model, layers, config, calibration_data, device)
    chosen = chosen_after(chosen, nonzero, masks)
    apply_masks_(layers, masks)
    # As at the end of SparsityCallback: the metadata config.json carries, which compact saving needs.
    if getattr(target, "config", None) is not None:
        record_sparsity_(target, config, names, chosen, masks.calibration)
    return masks


def checked_masks(
    masks: dict[str, torch.Tensor], layers: dict[str, nn.Linear], config: SparsityConfig, source: str
) -> dict[str, torch.Tensor]:
    """`masks` chosen elsewhere, as boolean tensors on their layers' devices (each weight's local shard under FSDP2),
    refused (naming `source` and the layer) unless there is exactly one for each of `layers`, of its weight's shape
    and exactly `config`'s N:M."""
    missing, extra = set(layers) - set(masks), set(masks) - set(layers)
    if missing or extra:
        raise ValueError(
            f"{source} must have one mask per selected layer; missing {sorted(missing)[:3]}, not selected "
            f"{sorted(extra)[:3]}. Pass the masks prune_ or learn_masks returned with the same SparsityConfig."
        )
    checked = {}
    for name, layer in layers.items():
        weight = local_tensor(layer.weight, f"{name}.weight")
        if tuple(masks[name].shape) != tuple(weight.shape):
            raise ValueError(f"{source}: the mask of {name} has shape {tuple(masks[name].shape)}, its weight "
                             f"{tuple(weight.shape)}.")  # fmt: skip
        mask = masks[name].to(device=weight.device, dtype=torch.bool)
        if not is_nm(mask, config.n, config.m):
            raise ValueError(f"{source}: the mask of {name} is not {config.sparsity_pattern}; masks keep at most "
                             f"{config.n} of every {config.m} weights along the input dimension.")  # fmt: skip
        checked[name] = mask
    return checked
