"""PEFT adapters on sparse models: which names are the base model's, and merging adapters without losing N:M.

`SparsityCallback` and `prune_` already prune only the base layers of a PEFT model (see `select_layers`); the
adapters (`lora_A`, `lora_B`, `modules_to_save`, ...) train dense. A LoRA update `B @ A` is dense, though, so
PEFT's `merge_and_unload()` turns every 2:4 base weight back into a dense one. `merge_and_unload_sparse` merges
the same way and then keeps, in each sparse layer, only the update at the positions the N:M pattern keeps, so the
merged model is exactly N:M again (at a cost in accuracy that the update's pruned part carried; see the README).

`peft` is imported by none of this: PEFT models are recognised by their attributes.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import SparsityConfig, parse_pattern
from .masks import is_nm, nm_mask

logger = logging.getLogger(__name__)

BASE_LAYER_SUFFIX = ".base_layer"


def is_peft_model(model: nn.Module) -> bool:
    """True for a `peft.PeftModel` (anything with PEFT's `get_base_model` and `peft_config`)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def base_layer_names(model: nn.Module, names: list[str]) -> tuple[nn.Module, list[str]]:
    """The model that carries the config (the base model, for a PEFT model) and `names` as that model calls them.

    `SparsityCallback` on a `PeftModel` selects e.g. `base_model.model.bert.encoder.layer.0.attention.self.query.
    base_layer`; the base model (and the checkpoint merged from it) calls that layer `bert.encoder.layer.0.
    attention.self.query`.
    """
    if not is_peft_model(model):
        return model, list(names)
    base = model.get_base_model()
    prefix = next((f"{n}." for n, module in model.named_modules() if module is base and n), "")
    return base, [name.removeprefix(prefix).removesuffix(BASE_LAYER_SUFFIX) for name in names]


def _tuner_layers(base: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in base.named_modules()
        if isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(module, "adapter_layer_names")
    }


def merge_and_unload_sparse(
    model: nn.Module,
    layers: list[str] | None = None,
    sparsity_pattern: str | None = None,
    safe_merge: bool = False,
    adapter_names: list[str] | None = None,
) -> nn.Module:
    """PEFT's `merge_and_unload()` that keeps the sparse base layers exactly N:M.

    Every adapter is merged as PEFT merges it; then, in each sparse layer, the merged update is kept only where the
    base weight's N:M mask keeps a weight (the weights the pattern prunes stay exact zeros). Adapters on dense
    layers (a task head, say) merge unchanged. The returned model carries the sparsity metadata in
    `model.config.sparsity`, so `hf_sparse.save_pretrained(merged, folder, compact=True)` can store it compactly.

    Args:
        model: a `peft.PeftModel` whose base model was pruned (by `SparsityCallback` or `prune_`).
        layers: the sparse layers, as the base model names them (`bert.encoder.layer.0.attention.self.query`).
            Default: those of the base model's sparsity metadata (`config.sparsity`, written when
            `SparsityCallback` ends training), else every adapted layer whose base weight is exactly N:M.
        sparsity_pattern: "N:M"; default the metadata's pattern, else "2:4".
        safe_merge, adapter_names: as in PEFT's `merge_and_unload`.

    Returns:
        The merged base model (a `transformers` model without PEFT layers).

    Raises:
        TypeError: `model` is not a PEFT model.
        ValueError: a named sparse layer is missing or is not N:M before merging.

    Example:

    ```python
    >>> from peft import LoraConfig, get_peft_model
    >>> peft_model = get_peft_model(model, LoraConfig(target_modules=["query", "value"]))
    >>> Trainer(peft_model, args, train_dataset=train, callbacks=[SparsityCallback()]).train()
    >>> merged = merge_and_unload_sparse(peft_model)   # every pruned layer still exactly 2:4
    ```
    """
    if not is_peft_model(model):
        raise TypeError(
            f"merge_and_unload_sparse takes a peft.PeftModel; got {type(model).__name__}. A model without "
            "adapters has nothing to merge."
        )
    base = model.get_base_model()
    meta = getattr(getattr(base, "config", None), "sparsity", None)
    meta = meta if isinstance(meta, dict) else {}
    pattern = sparsity_pattern or meta.get("sparsity_pattern") or "2:4"
    n, m = parse_pattern(pattern)
    modules = dict(base.named_modules())
    if layers is None:
        layers = list(meta.get("layers", {}))
        if not layers:
            layers = [name for name, t in _tuner_layers(base).items() if is_nm(t.get_base_layer().weight, n, m)]
            logger.info("hf-sparse: %d adapted layer(s) have %s base weights; their merged updates are masked.",
                        len(layers), pattern)  # fmt: skip
    masks = {}
    for name in layers:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the base model {type(base).__name__} has no layer {name!r}; pass its own layer names.")
        weight = module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight
        if not is_nm(weight, n, m):
            raise ValueError(
                f"the base weight of {name} is not {pattern} before merging; prune the base model first "
                "(SparsityCallback or hf_sparse.prune_), or leave this layer out of `layers`."
            )
        masks[name] = nm_mask(weight.detach(), n, m, name)
    merged = model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
    merged_modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            merged_modules[name].weight.mul_(mask.to(merged_modules[name].weight.device))
    if getattr(merged, "config", None) is not None and masks:
        from .checkpoint import attach_sparsity_metadata

        attach_sparsity_metadata(
            merged, SparsityConfig(sparsity_pattern=f"{n}:{m}", criterion=meta.get("criterion", "magnitude")),
            layers=list(masks),
        )  # fmt: skip
    return merged
