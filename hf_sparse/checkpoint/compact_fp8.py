"""The compact FP8 codec (`compact-nm-fp8-v2`): a layer the model runs in FP8 (`swap_to_semi_structured_(fp8=...)`)
is stored as its e4m3 kept values and their positions (`packing`), its float32 row scales and, with static
activation scales, its input scale. Loading dequantizes it (values times row scales)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .metadata import SparseCheckpointError
from .packing import INDICES_SUFFIX, VALUES_SUFFIX, compact_decode, compact_encode

COMPACT_FP8_FORMAT = "compact-nm-fp8-v2"
"""Compact checkpoint of a model swapped to FP8 layers: e4m3 kept values, their positions, and float32 scales."""
FP8_FORMATS = (COMPACT_FP8_FORMAT, "compact-nm-fp8-v1")
"""Every version of the compact FP8 format (version 1: without checksums)."""
FP8_SCALE_SUFFIX = ".fp8_scale"
FP8_INPUT_SCALE_SUFFIX = ".fp8_input_scale"


Fp8Tensors = tuple[torch.Tensor, torch.Tensor, float | None]
"""What one FP8 layer exports for saving: its e4m3 weight `[rows, cols]`, float32 row scales `[rows]`, and its static
input scale (None with dynamic activation scales)."""


def fp8_layer_tensors(model: nn.Module) -> dict[str, Fp8Tensors]:
    """Layer name -> the tensors of every layer the model runs in FP8 (`swap_to_semi_structured_(fp8=...)`), each
    asked of the layer itself (`layer_fp8_tensors`); a member of a fused q/k/v group gives its own rows."""
    found = {}
    for name, module in model.named_modules():
        tensors = layer_fp8_tensors(module)
        if tensors is not None:
            found[name] = tensors
    return found


def layer_fp8_tensors(module: nn.Module) -> Fp8Tensors | None:
    """The FP8 tensors `module` stores under its own name in a checkpoint, or None if it stores no FP8 weight.

    A layer exports them through a method `compact_fp8_tensors() -> (e4m3 weight, float32 row scales, input scale or
    None) | None`, on CPU: this codec then needs nothing of the layer's internals. Until the inference layers have
    that method, the attribute reads below stand in for it (the only place they are made): an `Fp8Linear` that emits
    its own state gives its weight; a `FusedLinearSlice` of an FP8 fused group gives its rows of the fused weight; the
    fused layer itself (which emits no state) gives nothing.
    """
    export = getattr(module, "compact_fp8_tensors", None)
    if callable(export):
        return export()
    from ..inference.fp8 import Fp8Linear
    from ..inference.layers import FusedLinearSlice

    if isinstance(module, FusedLinearSlice) and isinstance(module.fused, Fp8Linear):
        values, scales, input_scale = _fp8_linear_tensors(module.fused)
        return values[module.rows], scales[module.rows], input_scale
    if isinstance(module, Fp8Linear) and module.emits_state:
        return _fp8_linear_tensors(module)
    return None


def _fp8_linear_tensors(layer) -> Fp8Tensors:
    scale = None if layer.input_scale is None else float(layer.input_scale)
    return layer.e4m3_weight().cpu(), layer.weight_scale.cpu(), scale


def encode_fp8_layer(key: str, name: str, layer: tuple, n: int, m: int) -> dict[str, torch.Tensor]:
    """The tensors of one FP8 layer in the compact file: e4m3 kept values, packed positions, float32 row scales
    and, with static activation scales, the input scale. `layer` is (e4m3 weight, row scales, input scale or None)."""
    e4m3, scales, input_scale = layer
    values, packed = compact_encode(e4m3.float(), n, m, name)  # e4m3 -> float32 -> e4m3 is exact
    out = {key + VALUES_SUFFIX: values.to(e4m3.dtype), key + INDICES_SUFFIX: packed}
    out[key + FP8_SCALE_SUFFIX] = scales.float().contiguous()
    if input_scale is not None:
        out[name + FP8_INPUT_SCALE_SUFFIX] = torch.tensor(input_scale, dtype=torch.float32)
    return out


def fp8_metadata(fp8: dict) -> dict:
    """The `fp8` entry of the sparsity metadata: how the saved FP8 layers scale their inputs, and which they are."""
    saved = sorted(fp8)
    static = {fp8[n][2] is not None for n in saved}
    return {"activation_scales": "static" if static == {True} else "dynamic", "layers": saved}


def decode_fp8_layer(
    f, keys: set, key: str, name: str, values: torch.Tensor, packed: torch.Tensor, n: int, m: int, file: Path
) -> torch.Tensor:
    """The dequantized weight of an FP8 layer: its e4m3 values times its row scales."""
    weight = compact_decode(values.float(), packed, n, m, name, str(file))
    return weight * _fp8_scales(f, keys, key, name, weight.shape[0], file)[:, None]


def _fp8_scales(f, keys: set, key: str, name: str, rows: int, file: Path) -> torch.Tensor:
    """The float32 row scales of an FP8 layer in a compact checkpoint, checked (one finite positive value per row)."""
    if key + FP8_SCALE_SUFFIX not in keys:
        raise SparseCheckpointError(
            f"layer {name}: {file} holds its weight as e4m3 values but no scales ({key + FP8_SCALE_SUFFIX}); the "
            "file is incomplete."
        )
    scales = f.get_tensor(key + FP8_SCALE_SUFFIX)
    if scales.shape != (rows,) or not bool(torch.isfinite(scales).all() and (scales > 0).all()):
        raise SparseCheckpointError(
            f"layer {name}: its e4m3 scales in {file} have shape {tuple(scales.shape)} (expected ({rows},)) or "
            "values that are not finite and positive; the file is damaged."
        )
    return scales.float()


def read_input_scales(f, keys: set, file: Path) -> dict[str, float]:
    """Layer name -> static input scale of every FP8 layer saved with one, checked (one finite positive value)."""
    input_scales = {}
    for key in keys:
        if key.endswith(FP8_INPUT_SCALE_SUFFIX):
            scale = f.get_tensor(key)
            if scale.numel() != 1 or not (math.isfinite(float(scale)) and float(scale) > 0):
                raise SparseCheckpointError(
                    f"layer {key[: -len(FP8_INPUT_SCALE_SUFFIX)]}: its input scale in {file} is "
                    f"{scale.flatten()[:2].tolist()}, not one finite positive value; the file is damaged."
                )
            input_scales[key[: -len(FP8_INPUT_SCALE_SUFFIX)]] = float(scale)
    return input_scales
