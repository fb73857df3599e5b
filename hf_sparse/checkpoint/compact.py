"""The compact format (`compact-nm-v2`): one safetensors file in which every N:M layer is its kept values plus
their packed positions (`packing`), about 56% of the bytes of the fp16 layer for 2:4, and every other tensor is
stored as saved. Layers the model runs in FP8 are stored by the FP8 codec (`compact_fp8`) in the same file.

`config.json` records a sha256 of each compact layer's stored tensors (`compact_sha256`), which both loaders verify,
a `quantization_config` that lets plain `from_pretrained` read the file after `import hf_sparse`
(`hf_sparse.quantizer`), and a `transformers_weights` entry that makes transformers without hf-sparse refuse the
folder with a message naming hf-sparse."""

from __future__ import annotations

import hashlib
import json
import logging
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
from .metadata import CONFIG_NAME, METADATA_KEY, SparseCheckpointError, check_layer, check_meta
from .packing import INDICES_SUFFIX, VALUES_SUFFIX, compact_decode, compact_encode
from .standard import DENSE_INDEX_NAME, open_safetensors, weight_files

logger = logging.getLogger(__name__)

COMPACT_WEIGHTS_NAME = "hf_sparse_model.safetensors"
"""File of a compact checkpoint: N:M layers as values + packed positions, every other tensor as saved."""
COMPACT_FORMAT = "compact-nm-v2"
"""Version 2 records a sha256 of every compact layer's stored tensors in `config.json` (`compact_sha256`); version 1
(hf-sparse before these checksums) has none, and loads with a warning."""
LEGACY_FORMATS = ("compact-nm-v1", "compact-nm-fp8-v1")
CHECKSUMS_KEY = "compact_sha256"
"""Key of the sparsity metadata holding layer name -> sha256 of the layer's tensors as stored (`layer_checksum`)."""
QUANT_METHOD = "hf-sparse: install hf-sparse and `import hf_sparse` before from_pretrained"
"""`quant_method` of a compact checkpoint's `quantization_config`: `import hf_sparse` registers it with transformers
(`hf_sparse.quantizer`), so plain `AutoModel*.from_pretrained` loads compact checkpoints. Without hf-sparse,
transformers' first words on such a folder are a warning that quotes this name ("Unknown quantization type, got
<name> ... you can delete the quantization_config"), then the error of `transformers_weights`: the name is the advice,
so that the user reads hf-sparse's before transformers' (deleting quantization_config would not help)."""
LEGACY_QUANT_METHODS = ("hf-sparse",)
"""Earlier names of the `quant_method`, still registered so that folders saved with them load."""
MISSING_LIBRARY_MESSAGE = (
    "this is a compact N:M sparse checkpoint written by hf-sparse (its sparse layers are stored as values plus "
    "positions in hf_sparse_model.safetensors): install hf-sparse and run `import hf_sparse` before from_pretrained"
)
"""`transformers_weights` of a compact checkpoint's config.json: without hf-sparse, transformers refuses the value
(it does not end in .safetensors) with an error that shows it, before building any layer."""


def loaded_metadata(meta: dict) -> dict:
    """The sparsity metadata of a model loaded from a checkpoint: dense in memory whatever the file was, so without
    what described only the compact file (its checksums, its FP8 layers). A plain save_pretrained of the model then
    writes a standard checkpoint whose metadata says so."""
    return {k: v for k, v in meta.items() if k not in (CHECKSUMS_KEY, "fp8")} | {"format": "dense"}


def write_compact(folder: Path, meta: dict, fp8: dict | None = None) -> dict:
    """Turns the standard checkpoint in `folder` into the compact one: N:M layers as values + positions (FP8 layers
    as their e4m3 values + positions + scales, from `fp8`, see `compact_fp8.fp8_layer_tensors`). Returns the sparsity
    metadata written into `config.json` (with the layers' checksums and the FP8 layers)."""
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
    config_json[METADATA_KEY][CHECKSUMS_KEY] = {
        name: layer_checksum(layer_parts(out, out.get, name)) for name in meta["layers"]
    }
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
    return config_json[METADATA_KEY]


def read_compact(folder: Path, config_file: Path, meta: dict, fmt: str | None = None) -> tuple[dict, dict]:
    """The dense state dict of a compact checkpoint and the static input scales of its FP8 layers (layer -> scale).

    Every listed layer is verified against its recorded checksum (`recorded_checksums`: a version 1 folder has none),
    decoded, dequantized if FP8, and checked (`check_layer`).

    Args:
        folder: the checkpoint folder.
        config_file: its `config.json`, for messages.
        meta: the sparsity metadata of `config.json`.
        fmt: the compact format `config.json`'s `quantization_config` names (default: the weights file's header).
    """
    n, m, layers = check_meta(meta, config_file)
    state: dict[str, torch.Tensor] = {}
    file = folder / COMPACT_WEIGHTS_NAME
    if not file.is_file():
        raise SparseCheckpointError(f"{config_file} describes a compact checkpoint but {file} does not exist.")
    with open_safetensors(file) as f:
        keys = set(f.keys())
        checksums = recorded_checksums(meta, fmt or (f.metadata() or {}).get("hf_sparse_format"), config_file)
        input_scales = read_input_scales(f, keys, file)
        for name, info in layers.items():
            key = f"{name}.weight"
            for part in (key + VALUES_SUFFIX, key + INDICES_SUFFIX):
                if part not in keys:
                    raise SparseCheckpointError(
                        f"layer {name}: tensor {part} is missing from {file}; the file is incomplete."
                    )
            try:
                parts = layer_parts(keys, f.get_tensor, name)
            except Exception as err:
                raise SparseCheckpointError(f"layer {name}: {file} cannot be read ({err}); it is damaged.") from err
            values, packed = parts[".weight" + VALUES_SUFFIX], parts[".weight" + INDICES_SUFFIX]
            # Decoding names malformed positions or scales precisely; the checksum then catches any other change;
            # check_layer refuses what a checksum cannot (a NaN saved as such, or checksums recomputed).
            if values.dtype == torch.float8_e4m3fn:  # an FP8 layer: e4m3 values times its row scales
                weight = decode_fp8_layer(f, keys, key, name, values, packed, n, m, file)
            else:
                weight = compact_decode(values, packed, n, m, name, str(file))
            if checksums is not None:
                verify_checksum(name, parts, checksums, file)
            check_layer(name, weight, n, m, info, file)
            state[key] = weight
        for key in keys:
            if not key.endswith((VALUES_SUFFIX, INDICES_SUFFIX, FP8_SCALE_SUFFIX, FP8_INPUT_SCALE_SUFFIX)):
                state[key] = f.get_tensor(key)
    stray = {k.rsplit(".weight.", 1)[0] for k in keys if k.endswith((VALUES_SUFFIX, INDICES_SUFFIX))} - set(layers)
    if stray:
        raise unlisted_layers_error(file, sorted(stray), config_file)
    return state, input_scales


def unlisted_layers_error(file: Path | str, names: list[str], config_file: Path | str) -> SparseCheckpointError:
    """The error for compact layers in the file that the metadata does not list: without it they would load as
    missing weights (randomly initialised) or unchecked."""
    return SparseCheckpointError(
        f"{file} holds compact layers {names[:5]}{' ...' if len(names) > 5 else ''} that {config_file} does not "
        f"list as sparse ('{METADATA_KEY}.layers'); config.json was edited or belongs to another checkpoint. Save "
        "the checkpoint again from the model."
    )


PART_SUFFIXES = (
    ".weight" + VALUES_SUFFIX,
    ".weight" + INDICES_SUFFIX,
    ".weight" + FP8_SCALE_SUFFIX,
    FP8_INPUT_SCALE_SUFFIX,
)
"""What a compact layer stores, after its name: values and positions and, for an FP8 layer, row and input scales."""


def layer_parts(keys, get, name: str) -> dict[str, torch.Tensor]:
    """The stored tensors of compact layer `name`, keyed by their suffix (`PART_SUFFIXES`), from the tensor names
    `keys` of a file or state dict and `get(key)`, which reads one."""
    return {suffix: get(name + suffix) for suffix in PART_SUFFIXES if name + suffix in keys}


def layer_checksum(parts: dict[str, torch.Tensor]) -> str:
    """sha256 of a compact layer's stored tensors (`layer_parts`): each one's suffix, dtype and shape, then its bytes,
    in suffix order. A value, a position or a scale changed after saving changes it."""
    digest = hashlib.sha256()
    for suffix in sorted(parts):
        tensor = parts[suffix].detach().cpu().contiguous()
        digest.update(f"{suffix}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def recorded_checksums(meta: dict, fmt: str | None, config_file: Path) -> dict | None:
    """The layer checksums a compact checkpoint records, or None for a version 1 folder (hf-sparse before checksums),
    which loads with a warning: its layers are still checked to be N:M, finite and to have the recorded zeros, but a
    value or position changed within those bounds cannot be seen.

    Args:
        meta: the sparsity metadata of `config.json`.
        fmt: the compact format `config.json`'s `quantization_config` (or the weights file's header) names.
        config_file: the `config.json`, for messages.
    """
    if fmt is not None and fmt not in (COMPACT_FORMAT, COMPACT_FP8_FORMAT, *LEGACY_FORMATS):
        raise SparseCheckpointError(
            f"{config_file}: the compact format {fmt!r} is not one this hf-sparse reads ({COMPACT_FORMAT}, "
            f"{COMPACT_FP8_FORMAT} and, without checksums, {', '.join(LEGACY_FORMATS)}); upgrade hf-sparse."
        )
    checksums = meta.get(CHECKSUMS_KEY)
    if checksums is None and fmt in (COMPACT_FORMAT, COMPACT_FP8_FORMAT):
        raise SparseCheckpointError(
            f"{config_file}: a {fmt} checkpoint records a checksum of every compact layer in "
            f"'{METADATA_KEY}.{CHECKSUMS_KEY}', which is missing; config.json was edited. Save the checkpoint again."
        )
    if checksums is None:
        logger.warning(
            "hf-sparse: %s is a compact checkpoint of an earlier hf-sparse (%s) without checksums: its layers are "
            "checked to be N:M, finite and to have the recorded zeros, but a value or position changed within those "
            "bounds cannot be detected. Save it again with hf_sparse.save_pretrained(model, folder, compact=True) to "
            "record checksums.",
            config_file,
            fmt or LEGACY_FORMATS[0],
        )
        return None
    if not isinstance(checksums, dict):
        raise SparseCheckpointError(
            f"{config_file}: '{METADATA_KEY}.{CHECKSUMS_KEY}' must be an object; got {checksums!r}."
        )
    return checksums


def verify_checksum(name: str, parts: dict[str, torch.Tensor], checksums: dict, file: Path | str) -> None:
    """Refuses layer `name` if its stored tensors are not those saved (their sha256 differs from the recorded one)."""
    expected = checksums.get(name)
    if expected is None:
        raise SparseCheckpointError(
            f"layer {name}: {CHECKSUMS_KEY} in the config.json beside {file} records no checksum for it; config.json "
            "was edited. Save the checkpoint again."
        )
    found = layer_checksum(parts)
    if found != expected:
        raise SparseCheckpointError(
            f"layer {name} in {file}: its stored values, positions or scales are not those saved (sha256 "
            f"{found[:12]}..., recorded {str(expected)[:12]}...); the file was changed or damaged after saving. "
            "Download or save it again."
        )
