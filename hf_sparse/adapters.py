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
from collections.abc import Callable

import torch
from torch import nn

from .config import SparsityConfig, parse_pattern
from .masks import is_nm, nm_mask
from .numerics import count_non_finite

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
    All or nothing: when merging fails (`safe_merge` finds a NaN, an update of a sparse layer is not finite), the
    model is left exactly as it was, adapters unmerged (this holds a copy of the adapted layers' base weights while
    merging).

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
        ValueError: a named sparse layer is missing, or not N:M (or not finite) before merging; or an adapter holds
            NaN or inf values (naming it and its layer; nothing is merged).

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
    masks = _sparse_layer_masks(base, layers if layers is not None else list(meta.get("layers", {})), n, m)
    tuners = _tuner_layers(base)
    # PEFT merges layer by layer, replacing each merged layer by its base layer: a failure halfway (safe_merge finding
    # a NaN, say) would leave the model half merged, neither N:M nor as it was. All or nothing: put everything back.
    restore = _snapshot_for_merge(base, tuners)
    try:
        merged = model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
        _mask_merged_(merged, masks)
        if getattr(merged, "config", None) is not None and masks:
            from .checkpoint import attach_sparsity_metadata

            # The masks are the base weights' own: the metadata's criterion and options chose them (merging used to
            # record that criterion with default options). Without metadata, they are what magnitude picks on N:M
            # weights (their nonzeros).
            recorded = meta.get("criterion") and meta.get("sparsity_pattern") == f"{n}:{m}"
            config = None if recorded else SparsityConfig(sparsity_pattern=f"{n}:{m}", criterion="magnitude")
            attach_sparsity_metadata(merged, config, layers=list(masks))
    except Exception as err:
        restore()
        broken = _non_finite_adapters(tuners, adapter_names)
        if broken:
            raise ValueError(
                f"merge_and_unload_sparse: NaN or inf values in {', '.join(broken)}; nothing was merged and the model "
                "is as it was (adapters unmerged). Retrain that adapter (a lower learning rate), or merge the others "
                "without it (adapter_names=[...])."
            ) from err
        err.add_note("hf-sparse: nothing was merged; the model is as it was before merge_and_unload_sparse.")
        raise
    return merged


def _sparse_layer_masks(base: nn.Module, layers: list[str], n: int, m: int) -> dict[str, torch.Tensor]:
    """The N:M masks of the base weights of `layers` (default: every adapted layer whose base weight is N:M),
    checked before anything is merged."""
    pattern = f"{n}:{m}"
    if not layers:
        layers = [name for name, t in _tuner_layers(base).items() if is_nm(t.get_base_layer().weight, n, m)]
        logger.info("hf-sparse: %d adapted layer(s) have %s base weights; their merged updates are masked.",
                    len(layers), pattern)  # fmt: skip
    modules = dict(base.named_modules())
    masks = {}
    for name in layers:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the base model {type(base).__name__} has no layer {name!r}; pass its own layer names.")
        weight = module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(
                f"the base weight of {name} has NaN or inf values; merge into a base model from a checkpoint written "
                "before training diverged."
            )
        if not is_nm(weight, n, m):
            raise ValueError(
                f"the base weight of {name} is not {pattern} before merging; prune the base model first "
                "(SparsityCallback or hf_sparse.prune_), or leave this layer out of `layers`."
            )
        masks[name] = nm_mask(weight.detach(), n, m, name)
    return masks


@torch.no_grad()
def _mask_merged_(merged: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Keeps each sparse layer's merged update only where its N:M mask keeps a weight."""
    modules = dict(merged.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        bad = count_non_finite(weight)
        if bad:  # NaN * 0 is NaN: the layer could not be N:M again
            raise ValueError(f"the merged weight of {name} has {bad} NaN or inf value(s).")
        weight.mul_(mask.to(weight.device))


def _snapshot_for_merge(base: nn.Module, tuners: dict[str, nn.Module]) -> Callable[[], None]:
    """Records what PEFT's `merge_and_unload` changes in place and returns a function that puts it back: the module
    tree (each tuner layer is replaced by its base layer), the base layers' parameters (merged into in place), the
    tuner layers' lists of merged adapters, the `peft_config` attribute PEFT deletes and the config entries it or
    the metadata may change. Costs one copy of the adapted layers' base weights."""
    tree = [(parent, name, child) for parent in base.modules() for name, child in parent.named_children()]
    params = [(p, p.detach().clone()) for t in tuners.values() for p in t.get_base_layer().parameters()]
    merged = [
        (t, list(t.merged_adapters)) for t in tuners.values() if isinstance(getattr(t, "merged_adapters", None), list)
    ]
    attributes = [(base, "peft_config")]
    config = getattr(base, "config", None)
    if config is not None:
        attributes += [(config, "tie_word_embeddings"), (config, "sparsity")]
    saved = [(obj, attr, hasattr(obj, attr), getattr(obj, attr, None)) for obj, attr in attributes]

    @torch.no_grad()
    def restore() -> None:
        for parent, name, child in tree:
            setattr(parent, name, child)
        for param, value in params:
            param.data = value
        for tuner, names in merged:
            tuner.merged_adapters[:] = names
        for obj, attr, had, value in saved:
            if had:
                setattr(obj, attr, value)
            elif hasattr(obj, attr):
                delattr(obj, attr)

    return restore


def _non_finite_adapters(tuners: dict[str, nn.Module], adapter_names: list[str] | None) -> list[str]:
    """ "adapter 'a' of layer L" for every adapter (of `adapter_names`, default the active ones) whose update of a
    tuner layer is not finite."""
    found = []
    for name, tuner in tuners.items():
        get_delta_weight = getattr(tuner, "get_delta_weight", None)
        if not callable(get_delta_weight):
            continue
        for adapter in adapter_names or getattr(tuner, "active_adapters", []):
            if not any(adapter in getattr(tuner, attr, {}) for attr in tuner.adapter_layer_names):
                continue
            try:
                finite = bool(torch.isfinite(get_delta_weight(adapter)).all())
            except Exception:  # an adapter type without a weight delta: nothing to say about it
                continue
            if not finite:
                found.append(f"adapter {adapter!r} of layer {name}")
    return found
