"""`save_pretrained` and `from_pretrained` of sparse checkpoints, in either format (`standard`, `compact`)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._distributed import unwrap_model
from ..config import SparsityConfig, parse_pattern
from ..masks import groups_over
from .compact import COMPACT_WEIGHTS_NAME, loaded_metadata, read_compact, write_compact
from .compact_fp8 import fp8_layer_tensors
from .files import install
from .metadata import (
    CONFIG_NAME,
    METADATA_KEY,
    SparseCheckpointError,
    attach_sparsity_metadata,
    check_converted,
    check_meta,
    layer_weights,
    with_module_names,
)
from .standard import DENSE_INDEX_NAME, DENSE_WEIGHTS_NAME, read_standard, weight_files

logger = logging.getLogger(__name__)


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
        config: the `SparsityConfig` the model was pruned with, when it carries no metadata yet (if it does, the
            config must agree with its pattern and criterion).
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
    _check_config_agrees(model, config)
    meta = attach_sparsity_metadata(model, config)
    fp8 = fp8_layer_tensors(model) if compact else {}
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    # Everything is written into a folder beside the checkpoint first and moved in only when complete, as one
    # transaction (see files.install): a failure at any point leaves the folder as it was.
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=".hf_sparse_tmp-") as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp, **kwargs)
        if compact:
            meta = write_compact(tmp, meta, fp8)
        # Old weights of the other format or other shard names would shadow or mix with the new ones.
        stale = [p for p in weight_files(save_directory) + [save_directory / DENSE_INDEX_NAME] if p.exists()]
        stale.append(save_directory / COMPACT_WEIGHTS_NAME)
        install(tmp, save_directory, stale)
    return meta


def _check_config_agrees(model: nn.Module, config: SparsityConfig | None) -> None:
    """Refuses a `config` whose pattern or criterion differs from what the model's metadata records (written when it
    was pruned): saving would record the config's instead, which may not be what happened."""
    recorded = getattr(getattr(model, "config", None), METADATA_KEY, None)
    if config is None or not isinstance(recorded, dict):
        return
    given = {"sparsity_pattern": config.sparsity_pattern, "criterion": config.criterion}
    differ = {k: v for k, v in given.items() if recorded.get(k) is not None and recorded[k] != v}
    if differ:
        field = next(iter(differ))
        raise ValueError(
            f"{type(model).__name__}.config.{METADATA_KEY} records {field}={recorded[field]!r} (how it was pruned) "
            f"but the config passed to save_pretrained says {differ[field]!r}; nothing was saved. Pass no config to "
            "save the recorded metadata, or prune again with this config."
        )


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


def load_state_dict(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads and checks a sparse checkpoint folder (either format) into a dense state dict and its metadata.

    Raises:
        SparseCheckpointError: a sparse layer is missing, not N:M, not finite, changed since saving (compact: its
            checksum) or disagrees with the metadata (the error names the layer and the file), or a file is
            truncated.
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
    n, m, _ = check_meta(meta, config_file)
    meta = with_module_names(meta)
    layers = meta["layers"]
    if meta.get("format", "dense") == "compact":
        fmt = (config_json.get("quantization_config") or {}).get("format")
        state, input_scales = read_compact(folder, config_file, meta, fmt)
        if isinstance(meta.get("fp8"), dict):
            meta["fp8"]["input_scales"] = input_scales
        return state, meta
    return read_standard(folder, n, m, layers), meta


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
    zeros and finite (also after a `dtype` conversion), and a compact layer to match its recorded sha256; a tampered,
    truncated or incomplete file raises `SparseCheckpointError` naming the layer and the file. A `device_map` may
    offload layers (to "cpu" or, with `offload_folder`, to "disk").

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
    _check_loaded(model, meta, state, folder)
    # The model in memory is dense whatever the file was: a plain save_pretrained of it writes a dense checkpoint.
    fp8 = meta.get("fp8")
    model.config.sparsity = loaded_metadata(meta)
    model.eval()
    if fast:
        _swap_fast(model, fp8)
    return model


def _check_loaded(model: nn.Module, meta: dict, state: dict, folder: Path) -> None:
    """Checks that the sparse layers are still N:M and finite in the model built from `state` (a dtype given to
    from_pretrained converts them). Layers offloaded by a `device_map` (their weight on the meta device) are skipped:
    accelerate serves them from the state dict that `load_state_dict` checked."""
    n, m = parse_pattern(meta["sparsity_pattern"])
    for name, weight in layer_weights(model, list(meta["layers"])).items():
        if weight.device.type == "meta":
            continue
        if groups_over(weight, n, m):
            raise SparseCheckpointError(f"layer {name} is not {n}:{m} after loading {folder} (dtype conversion?).")
        check_converted(name, weight, state[f"{name}.weight"].dtype, folder)


def _swap_fast(model: nn.Module, fp8: dict | None) -> None:
    """`fast=True`: the sparse layers swapped to semi-structured kernels, those saved in FP8 to FP8 kernels."""
    try:
        from ..inference import swap_to_semi_structured_
    except ImportError as err:
        raise RuntimeError(
            f"fast=True needs hf_sparse.inference.swap_to_semi_structured_, which cannot be imported: {err}"
        ) from err
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise RuntimeError(
            f"fast=True swaps the sparse layers to GPU kernels, which need their weights in GPU memory, but "
            f"{len(offloaded)} weights (e.g. {offloaded[0]}) were offloaded by the device_map; load with a "
            "device_map that keeps every layer on the GPU, or with fast=False."
        )
    if next(model.parameters()).device.type != "cuda":
        model.to("cuda")
    if next(model.parameters()).dtype == torch.float32:
        # Sparse tensor cores take fp16/bf16; pass dtype=torch.bfloat16 to from_pretrained for bf16.
        model.half()
    if fp8:
        from ..inference.fp8 import Fp8Config, fp8_support_problem

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
