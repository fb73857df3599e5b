"""Sparse checkpoints: sparsity metadata in `config.json`, the compact N:M format, and a loader that checks both.

A squashed sparse model is an ordinary `transformers` model whose pruned weights are exact zeros, so
`model.save_pretrained(path)` already writes a checkpoint that plain `AutoModel*.from_pretrained(path)` loads.
This module adds:

- `attach_sparsity_metadata`: records in `model.config.sparsity` (saved in `config.json`) the pattern, the sparse
  layers, the criterion, per-layer and total sparsity and the library version;
- `save_pretrained(model, path, compact=True)`: stores every N:M layer as its kept values plus the positions of
  those values (2 bits each for 2:4), about 56% of the bytes of the fp16 layer, in one safetensors file, with a
  `quantization_config` that lets plain `from_pretrained` read it after `import hf_sparse` (see `quantizer.py`);
- `from_pretrained`: loads either format from a folder or a Hub repo and checks that every layer the metadata
  calls sparse really is N:M, naming the layer and the file when it is not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ._distributed import full_tensor, unwrap_model
from .config import SparsityConfig, parse_pattern
from .masks import group_counts, groups_over

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
DENSE_WEIGHTS_NAME = "model.safetensors"
DENSE_INDEX_NAME = "model.safetensors.index.json"
COMPACT_WEIGHTS_NAME = "hf_sparse_model.safetensors"
"""File of a compact checkpoint: N:M layers as values + packed positions, every other tensor as saved."""
COMPACT_FORMAT = "compact-nm-v1"
COMPACT_FP8_FORMAT = "compact-nm-fp8-v1"
"""Compact checkpoint of a model swapped to FP8 layers: e4m3 kept values, their positions, and float32 scales."""
FP8_SCALE_SUFFIX = ".fp8_scale"
FP8_INPUT_SCALE_SUFFIX = ".fp8_input_scale"
VALUES_SUFFIX = ".nm_values"
INDICES_SUFFIX = ".nm_indices"
QUANT_METHOD = "hf-sparse"
"""`quant_method` of a compact checkpoint's `quantization_config`: `import hf_sparse` registers it with transformers
(`hf_sparse.quantizer`), so plain `AutoModel*.from_pretrained` loads compact checkpoints."""
MISSING_LIBRARY_MESSAGE = (
    "this is a compact N:M sparse checkpoint written by hf-sparse (its sparse layers are stored as values plus "
    "positions in hf_sparse_model.safetensors): install hf-sparse and run `import hf_sparse` before from_pretrained"
)
"""`transformers_weights` of a compact checkpoint's config.json: without hf-sparse, transformers refuses the value
(it does not end in .safetensors) with an error that shows it, before building any layer."""
METADATA_KEY = "sparsity"
"""Attribute of the model's config (and key of `config.json`) that holds the sparsity metadata."""


class SparseCheckpointError(ValueError):
    """A checkpoint whose sparse layers are missing, damaged, or do not match their metadata."""


def _library_version() -> str:
    from . import __version__

    return __version__


def _layer_weights(model: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
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
            layers = list(existing.get("layers", {}))
        else:
            from .selection import select_layers

            layers = list(select_layers(model, config).targets)
    weights = _layer_weights(model, list(layers))
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


# -- compact N:M encoding ---------------------------------------------------------------------------------------


def _index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def compact_encode(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Splits an N:M weight into its kept values (`[rows, cols * n / m]`, the weight's dtype) and their positions
    inside each group of `m`, packed `ceil(log2(m))` bits each (2 bits for 2:4) into a flat uint8 tensor.

    Groups with fewer than `n` nonzeros store zeros at unused positions, so decoding restores the exact weight.
    """
    if weight.dim() != 2 or weight.shape[1] % m:
        raise ValueError(
            f"{name}: a compact N:M layer needs a 2-D weight with columns divisible by {m}; got {tuple(weight.shape)}."
        )
    groups = weight.detach().cpu().reshape(-1, m)
    nonzero = groups != 0
    counts = group_counts(nonzero)
    over = int((counts > n).sum())
    if over:
        raise ValueError(f"{name}: {over} group(s) of {m} hold more than {n} nonzeros; the layer is not {n}:{m}.")
    # Keep every nonzero, and pad groups with fewer than n nonzeros with their first zero positions; boolean
    # indexing then lists the kept positions of each group in ascending order.
    zero = ~nonzero
    missing = (n - counts.to(torch.int32)).unsqueeze(1)
    running, ranks = torch.zeros(groups.shape[0], dtype=torch.int32), []
    for column in zero.unbind(dim=1):  # running count of zeros, column by column (see group_counts)
        running = running + column
        ranks.append(running)
    keep = nonzero | (zero & (torch.stack(ranks, dim=1) <= missing))
    indices = keep.nonzero()[:, 1].reshape(-1, n)
    values = groups[keep].reshape(weight.shape[0], -1).contiguous()
    bits = _index_bits(m)
    index_bits = ((indices.reshape(-1, 1).to(torch.uint8) >> torch.arange(bits, dtype=torch.uint8)) & 1).numpy()
    packed = np.packbits(index_bits.reshape(-1), bitorder="little")
    return values, torch.from_numpy(packed)


def compact_decode(
    values: torch.Tensor, packed: torch.Tensor, n: int, m: int, name: str = "weight", file: str = "?"
) -> torch.Tensor:
    """Inverse of `compact_encode`, checking that the positions are well formed (else `SparseCheckpointError`)."""
    if values.dim() != 2 or values.shape[1] % n:
        raise SparseCheckpointError(
            f"layer {name} in {file}: values of shape {tuple(values.shape)} cannot hold groups of {n} kept weights."
        )
    rows, kept = values.shape
    groups = rows * kept // n
    bits = _index_bits(m)
    expected = math.ceil(groups * n * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise SparseCheckpointError(
            f"layer {name} in {file}: positions hold {packed.numel()} {packed.dtype} values, expected {expected} "
            f"uint8 for a weight of shape {(rows, kept * m // n)}; the file is damaged or not a {n}:{m} checkpoint."
        )
    flat = np.unpackbits(packed.numpy(), count=groups * n * bits, bitorder="little").reshape(-1, bits)
    indices = torch.from_numpy((flat.astype(np.int64) << np.arange(bits)).sum(axis=1)).reshape(groups, n)
    bad = (indices >= m).any(dim=1)
    if n > 1:
        bad |= (indices[:, 1:] <= indices[:, :-1]).any(dim=1)
    if bool(bad.any()):
        group = int(bad.nonzero()[0, 0])
        raise SparseCheckpointError(
            f"layer {name} in {file}: group {group} has positions {indices[group].tolist()}, not {n} distinct "
            f"increasing positions below {m}; the file is damaged."
        )
    dense = torch.zeros(groups, m, dtype=values.dtype)
    dense.scatter_(1, indices, values.reshape(groups, n))
    return dense.reshape(rows, kept * m // n)


# -- saving ------------------------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    index = folder / DENSE_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / DENSE_WEIGHTS_NAME
    return [single] if single.is_file() else []


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    compact: bool = False,
    config: SparsityConfig | None = None,
    **kwargs,
) -> dict[str, Any]:
    """Saves a sparse model with its sparsity metadata, as a standard or a compact checkpoint.

    The standard checkpoint (`compact=False`) is what `model.save_pretrained` writes, with `config.json` carrying
    the sparsity metadata: plain `AutoModel*.from_pretrained` loads it. The compact one stores each N:M layer as
    kept values + packed positions in `hf_sparse_model.safetensors`; `hf_sparse.from_pretrained` loads it, and so
    does plain `AutoModel*.from_pretrained` once `import hf_sparse` has run (`hf_sparse.quantizer`).
    Models swapped to semi-structured layers save their ordinary dense `state_dict`.

    Args:
        model: the sparse model (squashed by `SparsityCallback`, pruned by `prune_`, or loaded by `from_pretrained`).
        save_directory: folder to write (created if needed).
        compact: write the compact format.
        config: the `SparsityConfig` the model was pruned with, when it carries no metadata yet.
        kwargs: passed to `model.save_pretrained` (e.g. `max_shard_size`).

    Returns:
        The metadata written into `config.json`.

    Example:

    ```python
    >>> import hf_sparse
    >>> hf_sparse.save_pretrained(model, "bert-squad-24", compact=True)
    >>> model = hf_sparse.from_pretrained("bert-squad-24")
    ```
    """
    if kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained(push_to_hub=True) is not supported here; use hf_sparse.push_to_hub.")
    model = unwrap_model(model)
    meta = attach_sparsity_metadata(model, config)
    fp8 = _fp8_tensors(model) if compact else {}
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    # Everything is written into a folder beside the checkpoint first and moved in only when complete, as one
    # transaction (see _install): a failure at any point leaves the folder as it was.
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=".hf_sparse_tmp-") as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp, **kwargs)
        if compact:
            _to_compact(tmp, meta, fp8)
        # Old weights of the other format or other shard names would shadow or mix with the new ones.
        stale = [p for p in _weight_files(save_directory) + [save_directory / DENSE_INDEX_NAME] if p.exists()]
        stale.append(save_directory / COMPACT_WEIGHTS_NAME)
        _install(tmp, save_directory, stale)
    return dict(meta, format="compact") if compact else meta


def _fp8_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """Layer name -> (e4m3 weight, float32 row scales, static input scale or None) of every layer the model runs in
    FP8 (`swap_to_semi_structured_(fp8=...)`); fused layers are split back into their members' rows."""
    from .inference.fp8 import Fp8Linear
    from .inference.layers import FusedLinearSlice

    found = {}
    fused_rows: dict[int, list[tuple[str, slice]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FusedLinearSlice) and isinstance(module.fused, Fp8Linear):
            fused_rows.setdefault(id(module.fused), []).append((name, module.rows))
    for name, module in model.named_modules():
        if not isinstance(module, Fp8Linear):
            continue
        values, scales = module.e4m3_weight().cpu(), module.weight_scale.cpu()
        scale = None if module.input_scale is None else float(module.input_scale)
        members = [(name, slice(None))] if module.emits_state else fused_rows.get(id(module), [])
        for member, rows in members:
            found[member] = (values[rows], scales[rows], scale)
    return found


def _to_compact(folder: Path, meta: dict, fp8: dict | None = None) -> None:
    """Turns the standard checkpoint in `folder` into the compact one: N:M layers as values + positions (FP8 layers
    as their e4m3 values + positions + scales, from `fp8`, see `_fp8_tensors`)."""
    fp8 = fp8 or {}
    n, m = parse_pattern(meta["sparsity_pattern"])
    dense_files = _weight_files(folder)
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
            name = sparse_keys[key]
            e4m3, scales, input_scale = fp8[name]
            values, packed = compact_encode(e4m3.float(), n, m, name)  # e4m3 -> float32 -> e4m3 is exact
            out[key + VALUES_SUFFIX] = values.to(e4m3.dtype)
            out[key + INDICES_SUFFIX] = packed
            out[key + FP8_SCALE_SUFFIX] = scales.float().contiguous()
            if input_scale is not None:
                out[name + FP8_INPUT_SCALE_SUFFIX] = torch.tensor(input_scale, dtype=torch.float32)
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
        saved = sorted(fp8)
        static = {fp8[n][2] is not None for n in saved}
        config_json[METADATA_KEY]["fp8"] = {
            "activation_scales": "static" if static == {True} else "dynamic",
            "layers": saved,
        }
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


def _install(source: Path, destination: Path, stale: list[Path]) -> None:
    """Moves every file of `source` into `destination` (`os.replace`, `config.json` last) and removes the `stale`
    files it does not replace, as one transaction: the files replaced or removed are kept aside until the end, and
    put back if anything fails, so the folder holds either the old checkpoint or the new one."""
    aside = Path(tempfile.mkdtemp(dir=destination, prefix=".hf_sparse_old-"))
    done: list[tuple[Path, Path | None]] = []  # (path in destination, its old version kept aside, if any)
    new_names = {p.name for p in source.iterdir()}
    try:
        for item in sorted(source.iterdir(), key=lambda p: p.name == CONFIG_NAME):
            target = destination / item.name
            done.append((target, _set_aside(target, aside)))
            os.replace(item, target)
        for old in stale:
            if old.name not in new_names and old.exists():
                done.append((old, _set_aside(old, aside)))
    except BaseException:
        for target, kept in reversed(done):
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            if kept is not None:
                os.replace(kept, target)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _set_aside(path: Path, aside: Path) -> Path | None:
    if not path.exists():
        return None
    kept = aside / path.name
    os.replace(path, kept)
    return kept


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` to write to; moved onto `path` (atomically) when the block ends without an
    error, removed otherwise. The file at `path`, if any, is never left half written.

    Example:

    ```python
    >>> with atomic_path("out/masks.safetensors") as tmp:
    ...     save_file(tensors, tmp)
    ```
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")  # per process: ranks never share one
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (a run killed while saving it), or None if it looks
    complete: `trainer_state.json` readable and at the folder's step, and model weights whose headers read."""
    folder = Path(folder)
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return "it has no trainer_state.json (the Trainer writes it last)"
    try:
        step = json.loads(state_file.read_text()).get("global_step")
    except (OSError, ValueError, AttributeError) as err:
        return f"{state_file.name} cannot be read ({err})"
    match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    if match and step != int(match.group(1)):
        return f"{state_file.name} records step {step}, not {match.group(1)}"
    files = _weight_files(folder)
    if not files:
        return f"it has neither {DENSE_WEIGHTS_NAME} nor {DENSE_INDEX_NAME}"
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as err:
            return f"{file.name} cannot be read ({type(err).__name__}: {err})"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[str | None, dict[str, str]]:
    """The last Trainer checkpoint of `output_dir` that can be resumed from, and the later ones that cannot (a run
    killed while saving leaves a half-written `checkpoint-N`), each with the reason.

    Example:

    ```python
    >>> last, broken = last_complete_checkpoint("out")
    >>> trainer.train(resume_from_checkpoint=last)
    ```
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None, {}
    folders = [p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    broken: dict[str, str] = {}
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder), broken
        broken[str(folder)] = problem
    return None, broken


# -- loading -----------------------------------------------------------------------------------------------------


def _resolve(path_or_repo_id: str | os.PathLike, **hub_kwargs) -> Path:
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint folder (with config.json) or a Hub repo id.")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            str(path_or_repo_id),
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.md"],
            **{k: v for k, v in hub_kwargs.items() if v is not None},
        )
    except Exception as err:
        raise OSError(
            f"{path_or_repo_id!r} is not a local folder, and downloading it from the Hub failed: {err}"
        ) from err
    return Path(local)


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as err:
        raise SparseCheckpointError(
            f"{file} cannot be read as safetensors ({err}); the file is truncated or damaged: download or save it again."
        ) from err


def _check_meta(meta: Any, config_file: Path) -> tuple[int, int, dict]:
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


def _check_layer(name: str, weight: torch.Tensor, n: int, m: int, info: Any, file: Path) -> None:
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


def load_state_dict(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads and checks a sparse checkpoint folder (either format) into a dense state dict and its metadata.

    Raises:
        SparseCheckpointError: a sparse layer is missing, not N:M, damaged or disagrees with the metadata (the error
            names the layer and the file), or a file is truncated.
    """
    folder = Path(folder)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise SparseCheckpointError(f"{folder} has no {CONFIG_NAME}; it is not a saved model folder.")
    try:
        config_json = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise SparseCheckpointError(
            f"{config_file} is not valid JSON ({err}); the file is truncated or damaged."
        ) from None
    meta = config_json.get(METADATA_KEY)
    if meta is None:
        raise SparseCheckpointError(f"{config_file} has no '{METADATA_KEY}' entry; the checkpoint is not sparse.")
    n, m, layers = _check_meta(meta, config_file)
    if meta.get("format", "dense") == "compact":
        input_scales: dict[str, float] = {}
        state = _read_compact(folder, config_file, n, m, layers, input_scales)
        if isinstance(meta.get("fp8"), dict):
            meta["fp8"]["input_scales"] = input_scales
        return state, meta
    return _read_dense(folder, n, m, layers), meta


def _read_compact(
    folder: Path, config_file: Path, n: int, m: int, layers: dict, input_scales: dict | None = None
) -> dict[str, torch.Tensor]:
    """The dense state dict of a compact checkpoint, every listed layer decoded and checked (FP8 layers
    dequantized; their static input scales, if any, go into `input_scales`)."""
    input_scales = {} if input_scales is None else input_scales
    state: dict[str, torch.Tensor] = {}
    file = folder / COMPACT_WEIGHTS_NAME
    if not file.is_file():
        raise SparseCheckpointError(f"{config_file} describes a compact checkpoint but {file} does not exist.")
    with _open(file) as f:
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
                weight = compact_decode(values.float(), packed, n, m, name, str(file))
                weight = weight * _fp8_scales(f, keys, key, name, weight.shape[0], file)[:, None]
            else:
                weight = compact_decode(values, packed, n, m, name, str(file))
            _check_layer(name, weight, n, m, info, file)
            state[key] = weight
        for key in keys:
            if key.endswith(FP8_INPUT_SCALE_SUFFIX):
                scale = f.get_tensor(key)
                if scale.numel() != 1 or not (math.isfinite(float(scale)) and float(scale) > 0):
                    raise SparseCheckpointError(
                        f"layer {key[: -len(FP8_INPUT_SCALE_SUFFIX)]}: its input scale in {file} is "
                        f"{scale.flatten()[:2].tolist()}, not one finite positive value; the file is damaged."
                    )
                input_scales[key[: -len(FP8_INPUT_SCALE_SUFFIX)]] = float(scale)
            elif not key.endswith((VALUES_SUFFIX, INDICES_SUFFIX, FP8_SCALE_SUFFIX)):
                state[key] = f.get_tensor(key)
    stray = [k for k in keys if k.endswith(VALUES_SUFFIX) and k[: -len(VALUES_SUFFIX)] not in state]
    if stray:
        raise SparseCheckpointError(f"{file} holds compact layers {stray[:5]} that {config_file} does not list.")
    return state


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


def _read_dense(folder: Path, n: int, m: int, layers: dict) -> dict[str, torch.Tensor]:
    """The state dict of an ordinary (dense) checkpoint, sharded or not, every listed layer checked."""
    state: dict[str, torch.Tensor] = {}
    files = _weight_files(folder)
    if not files:
        raise SparseCheckpointError(f"{folder} has neither {DENSE_WEIGHTS_NAME} nor {DENSE_INDEX_NAME}.")
    where: dict[str, Path] = {}
    for file in files:
        if not file.is_file():
            raise SparseCheckpointError(f"{file}, listed in {folder / DENSE_INDEX_NAME}, does not exist.")
        with _open(file) as f:
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
        _check_layer(name, state[key], n, m, info, where[key])
    return state


def _model_class(config, model_class):
    if model_class is not None:
        return model_class
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    model_class: type | None = None,
    *,
    fast: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    **model_kwargs,
) -> nn.Module:
    """Loads a sparse checkpoint (standard or compact) from a folder or a Hub repo, checking every sparse layer.

    Every layer that `config.json`'s sparsity metadata lists is checked to be exactly N:M with the recorded number of
    zeros; a tampered, truncated or incomplete file raises `SparseCheckpointError` naming the layer and the file.

    Args:
        path_or_repo_id: a local folder, or a Hub repo id (downloaded with `huggingface_hub.snapshot_download`).
        model_class: the `transformers` class to build; default: the `architectures` entry of `config.json`.
        fast: swap the sparse layers to semi-structured kernels (`hf_sparse.inference.swap_to_semi_structured_`);
            needs a CUDA GPU of compute capability 8.0 or newer.
        revision, token, cache_dir, local_files_only: as in `huggingface_hub.snapshot_download`.
        model_kwargs: passed to `model_class.from_pretrained` (e.g. `dtype=torch.float16`).

    Example:

    ```python
    >>> import hf_sparse
    >>> model = hf_sparse.from_pretrained("user/bert-squad-2of4", fast=True)   # on a GPU
    ```
    """
    if fast and not torch.cuda.is_available():
        raise RuntimeError(
            "from_pretrained(fast=True) swaps the sparse layers to semi-structured kernels, which need a CUDA GPU "
            "(compute capability 8.0+, e.g. A100/H100); none is available. Load with fast=False to get the "
            "ordinary dense model (same outputs, exact zeros)."
        )
    folder = _resolve(
        path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    from transformers import AutoConfig

    state, meta = load_state_dict(folder)
    config = AutoConfig.from_pretrained(folder)
    # The state dict is dense already: build the model without the compact format's loader (hf_sparse.quantizer).
    for key in ("quantization_config", "transformers_weights"):
        if hasattr(config, key):
            delattr(config, key)
    cls = _model_class(config, model_class)
    model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True, **model_kwargs)
    missing = sorted(info.get("missing_keys", []))
    if missing:
        file = folder / (COMPACT_WEIGHTS_NAME if meta.get("format") == "compact" else DENSE_WEIGHTS_NAME)
        raise SparseCheckpointError(
            f"{file} lacks weights {missing[:5]} that {cls.__name__} needs; the file is incomplete (or pass the "
            "model_class it was saved from)."
        )
    n, m = parse_pattern(meta["sparsity_pattern"])
    for name, weight in _layer_weights(model, list(meta["layers"])).items():
        if groups_over(weight, n, m):
            raise SparseCheckpointError(f"layer {name} is not {n}:{m} after loading {folder} (dtype conversion?).")
    # The model in memory is dense whatever the file was: a plain save_pretrained of it writes a dense checkpoint.
    fp8 = meta.pop("fp8", None)
    model.config.sparsity = dict(meta, format="dense")
    model.eval()
    if fast:
        try:
            from .inference import swap_to_semi_structured_
        except ImportError as err:
            raise RuntimeError(
                f"fast=True needs hf_sparse.inference.swap_to_semi_structured_, which cannot be imported: {err}"
            ) from err
        if next(model.parameters()).device.type != "cuda":
            model.to("cuda")
        if next(model.parameters()).dtype == torch.float32:
            # Sparse tensor cores take fp16/bf16; pass dtype=torch.bfloat16 to from_pretrained for bf16.
            model.half()
        if fp8:
            from .inference.fp8 import Fp8Config, fp8_support_problem

            problem = fp8_support_problem(next(model.parameters()).device)
            if problem:
                logger.warning("hf-sparse: %s Running the checkpoint's FP8 layers on fp16 2:4 kernels.", problem)
                fp8 = None
        if fp8:  # the layers saved in FP8 run in FP8 again, with their saved input scales
            swap_to_semi_structured_(
                model,
                layers=fp8["layers"],
                fp8=Fp8Config(fp8["activation_scales"], input_scales=fp8.get("input_scales") or None),
            )
        else:
            swap_to_semi_structured_(model)
    return model
