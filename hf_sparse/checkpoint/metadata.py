"""The sparsity metadata (`config.json`'s `sparsity` entry): what it records, and the checks a loader makes
against it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._distributed import full_tensor
from ..config import SparsityConfig, parse_pattern
from ..masks import groups_over

CONFIG_NAME = "config.json"
METADATA_KEY = "sparsity"
"""Attribute of the model's config (and key of `config.json`) that holds the sparsity metadata."""


class SparseCheckpointError(ValueError):
    """A checkpoint whose sparse layers are missing, damaged, or do not match their metadata."""


def _library_version() -> str:
    from .. import __version__

    return __version__


def layer_weights(model: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
    """The dense weight of each named layer, read from the model's ordinary `state_dict()` so that layers swapped
    to semi-structured kernels (which write a dense `weight`) are described like plain `nn.Linear`s."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"no module named {missing[:5]} in {type(model).__name__}; sparse layers must exist.")
    weights = {}
    for name in layers:
        module = modules[name]
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or type(weight) not in (torch.Tensor, nn.Parameter):
            # Tensor subclasses (semi-structured sparse weights) are not plain tensors: ask the module.
            weight = module.state_dict().get("weight")
        if weight is None:
            raise ValueError(f"layer {name} ({type(module).__name__}) has no weight in its state_dict.")
        weights[name] = full_tensor(weight)
    return weights


def sparsity_metadata(
    model: nn.Module,
    config: SparsityConfig | None = None,
    layers: list[str] | None = None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sparsity metadata of `model`, measured from its current weights.

    Args:
        model: a model whose selected layers are exactly N:M (after `SparsityCallback` or `prune_`).
        config: pattern and criterion; default: those of the metadata the model already carries.
        layers: names of the sparse layers; default: the layers of the existing metadata, or `config`'s selection.
        calibration: what the calibration actually used (`Masks.calibration` of `hf_sparse.criteria`), recorded in
            `criterion_options` over the configured values.

    Raises:
        ValueError: if a layer is not N:M (naming it), or there is neither a config nor existing metadata.

    Example:

    ```python
    >>> meta = sparsity_metadata(model, SparsityConfig())
    >>> meta["sparsity_pattern"], round(meta["total_sparsity"], 2)
    ('2:4', 0.5)
    ```
    """
    existing = getattr(getattr(model, "config", None), METADATA_KEY, None)
    if config is None:
        if not isinstance(existing, dict):
            raise ValueError(
                f"{type(model).__name__} carries no sparsity metadata (config.{METADATA_KEY}); pass the "
                "SparsityConfig it was pruned with, e.g. sparsity_metadata(model, SparsityConfig())."
            )
        pattern = existing.get("sparsity_pattern", "2:4")
        criterion, options = existing.get("criterion"), existing.get("criterion_options", {})
    else:
        pattern, criterion, options = config.sparsity_pattern, config.criterion, config.criterion_options()
    options = {**options, **(calibration or {})}
    n, m = parse_pattern(pattern)
    if layers is None:
        if config is None:
            layers = [module_name(name) for name in existing.get("layers", {})]
        else:
            from ..selection import select_layers

            layers = list(select_layers(model, config).targets)
    weights = layer_weights(model, list(layers))
    per_layer, zeros_total, numel_total = {}, 0, 0
    for name, weight in weights.items():
        over = groups_over(weight, n, m)
        if over != 0:
            what = (
                f"{over} group(s) of {m} hold more than {n} nonzeros" if over > 0 else f"shape {tuple(weight.shape)}"
            )
            raise ValueError(
                f"layer {name} is not {n}:{m} sparse ({what}); prune it first (hf_sparse.prune_ or "
                "SparsityCallback) or leave it out of the sparse layers."
            )
        zeros = int((weight == 0).sum())
        per_layer[name] = {
            "shape": list(weight.shape),
            "zeros": zeros,
            "sparsity": round(zeros / weight.numel(), 6),
        }
        zeros_total += zeros
        numel_total += weight.numel()
    all_params = sum(p.numel() for p in model.parameters())
    return {
        "library": "hf-sparse",
        "library_version": _library_version(),
        "format": "dense",
        "sparsity_pattern": f"{n}:{m}",
        "criterion": criterion,
        **({"criterion_options": options} if options else {}),
        "layers": per_layer,
        "sparse_parameters": numel_total,
        "total_sparsity": round(zeros_total / numel_total, 6) if numel_total else 0.0,
        "model_sparsity": round(zeros_total / all_params, 6) if all_params else 0.0,
    }


def attach_sparsity_metadata(
    model: nn.Module,
    config: SparsityConfig | None = None,
    layers: list[str] | None = None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measures the sparsity metadata of `model` and stores it as `model.config.sparsity`, so that
    `save_pretrained` / `Trainer.save_model` write it into `config.json`. Returns the metadata.

    Args:
        model: a `transformers.PreTrainedModel` whose sparse layers are exactly N:M.
        config: pattern and criterion (default: those of the existing metadata).
        layers: sparse layer names (default: the existing metadata's, or `config`'s selection).
        calibration: what the calibration actually used (see `sparsity_metadata`).

    Example:

    ```python
    >>> attach_sparsity_metadata(model, SparsityConfig())
    >>> model.save_pretrained("out")   # out/config.json has a "sparsity" entry
    ```
    """
    if getattr(model, "config", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no `config` to hold the sparsity metadata; use a PreTrainedModel."
        )
    meta = sparsity_metadata(model, config, layers, calibration)
    setattr(model.config, METADATA_KEY, meta)
    if hasattr(model, "add_model_tags"):  # the Trainer's own model card lists these tags
        model.add_model_tags(["hf-sparse", f"{meta['sparsity_pattern']}-sparsity"])
    return meta


COMPILE_WRAPPER = "_orig_mod"
"""The attribute under which a `torch.compile`d module keeps the original one: names taken from a compiled model
(`named_modules()`) carry it as a path component (`_orig_mod.bert.encoder...`); the saved tensors do not."""


def module_name(name: str) -> str:
    """A layer's name as the model itself names it: without the `_orig_mod.` components of `torch.compile`."""
    return ".".join(part for part in name.split(".") if part != COMPILE_WRAPPER)


def with_module_names(meta: dict) -> dict:
    """`meta` (checked by `check_meta`) with every layer name it records as the model itself names it (`module_name`):
    metadata recorded on a `torch.compile`d model names the same layers, under `_orig_mod.`."""
    meta = dict(meta)
    for key in ("layers", "compact_sha256"):
        if isinstance(meta.get(key), dict):
            meta[key] = {module_name(name): value for name, value in meta[key].items()}
    if isinstance(meta.get("fp8"), dict) and isinstance(meta["fp8"].get("layers"), list):
        meta["fp8"] = dict(meta["fp8"], layers=[module_name(name) for name in meta["fp8"]["layers"]])
    return meta


def check_meta(meta: Any, config_file: Path) -> tuple[int, int, dict]:
    if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict):
        raise SparseCheckpointError(
            f"{config_file}: '{METADATA_KEY}' must be an object with a 'layers' object (written by hf_sparse); "
            f"got {str(meta)[:200]}."
        )
    try:
        n, m = parse_pattern(meta.get("sparsity_pattern"))
    except ValueError as err:
        raise SparseCheckpointError(f"{config_file}: {err}") from None
    if meta.get("format", "dense") not in ("dense", "compact"):
        raise SparseCheckpointError(
            f"{config_file}: sparsity format must be 'dense' or 'compact'; got {meta['format']!r}."
        )
    return n, m, meta["layers"]


def check_layer(name: str, weight: torch.Tensor, n: int, m: int, info: Any, file: Path) -> None:
    """Checks a sparse layer as loaded: exactly N:M, the zeros the metadata records, and finite. A NaN or inf weight
    is refused whatever a checksum says: no training run means to save one (`NumericsCallback` stops before)."""
    over = groups_over(weight, n, m)
    if over:
        what = f"{over} group(s) of {m} hold more than {n} nonzeros" if over > 0 else f"shape {tuple(weight.shape)}"
        raise SparseCheckpointError(
            f"layer {name} in {file} is not {n}:{m} sparse ({what}) although the metadata says it is; the "
            "checkpoint was modified after saving. Re-save it from the sparse model."
        )
    expected = info.get("zeros") if isinstance(info, dict) else None
    zeros = int((weight == 0).sum())
    if expected is not None and zeros != expected:
        raise SparseCheckpointError(
            f"layer {name} in {file} has {zeros} zeros but the metadata records {expected}; the weights or the "
            "metadata were changed after saving."
        )
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        where = [int(i) for i in (~finite).nonzero()[0]]
        raise SparseCheckpointError(
            f"layer {name} in {file} holds {int((~finite).sum())} values that are not finite (NaN or inf; the first "
            f"at {where}); the weights diverged before saving or the file was changed. Load an earlier checkpoint, or "
            "re-save from a model whose weights are finite."
        )


def check_converted(name: str, weight: torch.Tensor, stored: torch.dtype, file: Path | str) -> None:
    """Refuses a sparse layer that a dtype conversion at load (`from_pretrained(dtype=...)`) made non-finite: a value
    beyond the new dtype's range (float16: 65504) becomes inf."""
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        raise SparseCheckpointError(
            f"layer {name} in {file}: {int((~finite).sum())} of its values are beyond the range of {weight.dtype} "
            f"and became inf when loaded as {weight.dtype} from {stored}; load with dtype={stored} or torch.float32."
        )
