"""The compact format (`compact-nm-v1`): one safetensors file in which every N:M layer is its kept values plus
their packed positions (`packing`), about 56% of the bytes of the fp16 layer for 2:4, and every other tensor is
stored as saved. Layers the model runs in FP8 are stored by the FP8 codec (`compact_fp8`) in the same file.

`config.json` gets a `quantization_config` that lets plain `from_pretrained` read the file after `import
hf_sparse` (`hf_sparse.quantizer`), and a `transformers_weights` entry that makes transformers without hf-sparse
refuse the folder with a message naming hf-sparse."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import parse_pattern
from .compact_fp8 import (
    COMPACT_FP8_FORMAT,
    FP8_INPUT_SCALE_SUFFIX,
    FP8_SCALE_SUFFIX,
    decode_fp8_layer,
    encode_fp8_layer,
    fp8_metadata,
    read_input_scales,
)
from .metadata import CONFIG_NAME, METADATA_KEY, SparseCheckpointError, check_layer
from .packing import INDICES_SUFFIX, VALUES_SUFFIX, compact_decode, compact_encode
from .standard import DENSE_INDEX_NAME, open_safetensors, weight_files

COMPACT_WEIGHTS_NAME = "hf_sparse_model.safetensors"
"""File of a compact checkpoint: N:M layers as values + packed positions, every other tensor as saved."""
COMPACT_FORMAT = "compact-nm-v1"
QUANT_METHOD = "hf-sparse"
"""`quant_method` of a compact checkpoint's `quantization_config`: `import hf_sparse` registers it with transformers
(`hf_sparse.quantizer`), so plain `AutoModel*.from_pretrained` loads compact checkpoints."""
MISSING_LIBRARY_MESSAGE = (
    "this is a compact N:M sparse checkpoint written by hf-sparse (its sparse layers are stored as values plus "
    "positions in hf_sparse_model.safetensors): install hf-sparse and run `import hf_sparse` before from_pretrained"
)
"""`transformers_weights` of a compact checkpoint's config.json: without hf-sparse, transformers refuses the value
(it does not end in .safetensors) with an error that shows it, before building any layer."""


def write_compact(folder: Path, meta: dict, fp8: dict | None = None) -> None:
    """Turns the standard checkpoint in `folder` into the compact one: N:M layers as values + positions (FP8 layers
    as their e4m3 values + positions + scales, from `fp8`, see `compact_fp8.fp8_layer_tensors`)."""
    fp8 = fp8 or {}
    n, m = parse_pattern(meta["sparsity_pattern"])
    dense_files = weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for file in dense_files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    out: dict[str, torch.Tensor] = {}
    sparse_keys = {f"{name}.weight": name for name in meta["layers"]}
    absent = [key for key in sparse_keys if key not in tensors]
    if absent:
        raise ValueError(
            f"the checkpoint written by save_pretrained has no tensors {absent[:5]}; these sparse layers are "
            "saved under other names (tied or renamed weights) and cannot be stored in the compact format."
        )
    for key, tensor in tensors.items():
        if sparse_keys.get(key) in fp8:
            out.update(encode_fp8_layer(key, sparse_keys[key], fp8[sparse_keys[key]], n, m))
        elif key in sparse_keys:
            values, packed = compact_encode(tensor, n, m, sparse_keys[key])
            out[key + VALUES_SUFFIX] = values
            out[key + INDICES_SUFFIX] = packed
        else:
            out[key] = tensor.contiguous()
    fp8 = {n: v for n, v in fp8.items() if f"{n}.weight" in sparse_keys}  # FP8 layers outside the metadata: dense
    fmt = COMPACT_FP8_FORMAT if fp8 else COMPACT_FORMAT
    save_file(
        out,
        str(folder / COMPACT_WEIGHTS_NAME),
        metadata={"format": "pt", "hf_sparse_format": fmt, "sparsity_pattern": f"{n}:{m}"},
    )
    config_json = json.loads((folder / CONFIG_NAME).read_text())
    config_json[METADATA_KEY]["format"] = "compact"
    if fp8:
        config_json[METADATA_KEY]["fp8"] = fp8_metadata(fp8)
    config_json["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format": fmt,
        "sparsity_pattern": f"{n}:{m}",
        "weights": COMPACT_WEIGHTS_NAME,
    }
    config_json["transformers_weights"] = MISSING_LIBRARY_MESSAGE
    (folder / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    for file in dense_files + [folder / DENSE_INDEX_NAME]:
        if file.exists():
            file.unlink()


def read_compact(
    folder: Path, config_file: Path, n: int, m: int, layers: dict, input_scales: dict | None = None
) -> dict[str, torch.Tensor]:
    """The dense state dict of a compact checkpoint, every listed layer decoded and checked (FP8 layers
    dequantized; their static input scales, if any, go into `input_scales`)."""
    input_scales = {} if input_scales is None else input_scales
    state: dict[str, torch.Tensor] = {}
    file = folder / COMPACT_WEIGHTS_NAME
    if not file.is_file():
        raise SparseCheckpointError(f"{config_file} describes a compact checkpoint but {file} does not exist.")
    with open_safetensors(file) as f:
        keys = set(f.keys())
        for name, info in layers.items():
            key = f"{name}.weight"
            for part in (key + VALUES_SUFFIX, key + INDICES_SUFFIX):
                if part not in keys:
                    raise SparseCheckpointError(
                        f"layer {name}: tensor {part} is missing from {file}; the file is incomplete."
                    )
            try:
                values, packed = f.get_tensor(key + VALUES_SUFFIX), f.get_tensor(key + INDICES_SUFFIX)
            except Exception as err:
                raise SparseCheckpointError(f"layer {name}: {file} cannot be read ({err}); it is damaged.") from err
            if values.dtype == torch.float8_e4m3fn:  # an FP8 layer: e4m3 values times its row scales
                weight = decode_fp8_layer(f, keys, key, name, values, packed, n, m, file)
            else:
                weight = compact_decode(values, packed, n, m, name, str(file))
            check_layer(name, weight, n, m, info, file)
            state[key] = weight
        input_scales.update(read_input_scales(f, keys, file))
        for key in keys:
            if not key.endswith((VALUES_SUFFIX, INDICES_SUFFIX, FP8_SCALE_SUFFIX, FP8_INPUT_SCALE_SUFFIX)):
                state[key] = f.get_tensor(key)
    stray = [k for k in keys if k.endswith(VALUES_SUFFIX) and k[: -len(VALUES_SUFFIX)] not in state]
    if stray:
        raise SparseCheckpointError(f"{file} holds compact layers {stray[:5]} that {config_file} does not list.")
    return state
