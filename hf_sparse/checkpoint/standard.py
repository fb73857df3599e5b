"""The standard format: what `model.save_pretrained` writes (`model.safetensors`, or shards with an index), the
pruned weights stored as exact zeros. Plain `from_pretrained` loads it; this reader also checks every sparse
layer against the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .metadata import SparseCheckpointError, check_layer

DENSE_WEIGHTS_NAME = "model.safetensors"
DENSE_INDEX_NAME = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    index = folder / DENSE_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / DENSE_WEIGHTS_NAME
    return [single] if single.is_file() else []


def open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as err:
        raise SparseCheckpointError(
            f"{file} cannot be read as safetensors ({err}); the file is truncated or damaged: download or save it again."
        ) from err


def read_standard(folder: Path, n: int, m: int, layers: dict) -> dict[str, torch.Tensor]:
    """The state dict of an ordinary (dense) checkpoint, sharded or not, every listed layer checked."""
    state: dict[str, torch.Tensor] = {}
    files = weight_files(folder)
    if not files:
        raise SparseCheckpointError(f"{folder} has neither {DENSE_WEIGHTS_NAME} nor {DENSE_INDEX_NAME}.")
    where: dict[str, Path] = {}
    for file in files:
        if not file.is_file():
            raise SparseCheckpointError(f"{file}, listed in {folder / DENSE_INDEX_NAME}, does not exist.")
        with open_safetensors(file) as f:
            for key in f.keys():
                try:
                    state[key] = f.get_tensor(key)
                except Exception as err:
                    raise SparseCheckpointError(
                        f"tensor {key} in {file} cannot be read ({err}); it is damaged."
                    ) from err
                where[key] = file
    for name, info in layers.items():
        key = f"{name}.weight"
        if key not in state:
            raise SparseCheckpointError(
                f"layer {name}: tensor {key} is missing from {', '.join(str(f) for f in files)}; the checkpoint is "
                "incomplete or the metadata names a layer this model does not have."
            )
        check_layer(name, state[key], n, m, info, where[key])
    return state
