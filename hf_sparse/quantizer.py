"""Plain `AutoModel*.from_pretrained` of compact checkpoints, through transformers' quantizer registry.

A compact checkpoint (`hf_sparse.save_pretrained(model, folder, compact=True)`) stores each N:M layer as kept values
plus packed positions in `hf_sparse_model.safetensors`. Its `config.json` carries

- `"quantization_config": {"quant_method": "hf-sparse", ...}`: `import hf_sparse` registers `HfSparseConfig` and
  `HfSparseQuantizer` under that name, so transformers hands the loading to them;
- `"transformers_weights"`: the file transformers should read. Without hf-sparse the value is a sentence that says
  to install and import hf-sparse; transformers rejects it (it does not end in `.safetensors`) with a `ValueError`
  that shows it, before it builds any layer: a compact folder never loads with randomly initialised layers. With
  hf-sparse imported, the quantizer points it at `hf_sparse_model.safetensors` before transformers resolves files.

Loading: before the weights are read, each sparse `nn.Linear`'s `weight` parameter is replaced by a small module
named `weight` whose buffers `nm_values` and `nm_indices` have the file's key names and shapes, so transformers
fills them like any other tensor (dtype casts, devices, sharded files, missing-key checks included). After
loading, each layer's weight is decoded, checked (exactly N:M, the zeros the metadata records) and put back as a
plain parameter; the quantizer then removes itself (`dequantize=True`), so the model is an ordinary dense model with
exact zeros that trains, saves (densely) and pushes like any other.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint.compact import COMPACT_FORMAT, COMPACT_WEIGHTS_NAME, QUANT_METHOD
from .checkpoint.compact_fp8 import COMPACT_FP8_FORMAT
from .checkpoint.metadata import METADATA_KEY, SparseCheckpointError, check_layer, check_meta
from .checkpoint.packing import compact_decode, index_bits


@register_quantization_config(QUANT_METHOD)
class HfSparseConfig(QuantizationConfigMixin):
    """The `quantization_config` of a compact hf-sparse checkpoint (written by `hf_sparse.save_pretrained`).

    Args:
        format: the compact format's version ("compact-nm-v1").
        sparsity_pattern: "N:M" of the sparse layers.
        weights: the safetensors file holding the weights.
    """

    def __init__(
        self,
        format: str = COMPACT_FORMAT,
        sparsity_pattern: str = "2:4",
        weights: str = COMPACT_WEIGHTS_NAME,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.sparsity_pattern = sparsity_pattern
        self.weights = weights
        # The loaded model is dense: transformers removes the quantizer and this config after loading.
        self.dequantize = True

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "dequantize"}


class _CompactWeight(nn.Module):
    """Stands in for an N:M layer's `weight` while transformers loads the compact tensors into it."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor):
        super().__init__()
        self.register_buffer("nm_values", values)
        self.register_buffer("nm_indices", indices)


@register_quantizer(QUANT_METHOD)
class HfSparseQuantizer(HfQuantizer):
    """Loads compact hf-sparse checkpoints in `PreTrainedModel.from_pretrained` (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: HfSparseConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if getattr(quantization_config, "format", COMPACT_FORMAT) == COMPACT_FP8_FORMAT:
            raise SparseCheckpointError(
                "this compact checkpoint holds FP8 (e4m3) layers with their scales (saved from a model swapped with "
                "fp8=...); load it with hf_sparse.from_pretrained(folder), which dequantizes them (fast=True runs "
                "them in FP8 again on a GPU of compute capability 8.9+)."
            )
        if not self.pre_quantized:
            raise ValueError(
                "HfSparseConfig describes a compact checkpoint to load; it cannot quantize a model. Prune with "
                "hf_sparse.prune_ or SparsityCallback, then hf_sparse.save_pretrained(model, folder, compact=True)."
            )

    def _point_at_weights(self, config):
        # transformers reads `config.transformers_weights` right after building the quantizer; the saved value is a
        # message for installs without hf-sparse.
        config.transformers_weights = self.quantization_config.weights
        return config

    # transformers >= 5.2x calls update_attn_implementation(config), 5.17 update_tp_plan / update_ep_plan, each
    # before it resolves the checkpoint files.
    def update_attn_implementation(self, config):
        config = self._point_at_weights(config)
        parent = getattr(super(), "update_attn_implementation", None)
        return parent(config) if parent else config

    def update_tp_plan(self, config):
        config = self._point_at_weights(config)
        parent = getattr(super(), "update_tp_plan", None)
        return parent(config) if parent else config

    def update_ep_plan(self, config):
        config = self._point_at_weights(config)
        parent = getattr(super(), "update_ep_plan", None)
        return parent(config) if parent else config

    def _sparse_layers(self, model) -> tuple[int, int, dict]:
        meta = getattr(model.config, METADATA_KEY, None)
        if meta is None:
            raise SparseCheckpointError(
                f"config.json has a quantization_config of {QUANT_METHOD} but no '{METADATA_KEY}' entry listing the "
                "sparse layers; the checkpoint's config.json was edited or truncated. Save it again."
            )
        return check_meta(meta, Path(str(model.config.name_or_path)) / "config.json")

    def _process_model_before_weight_loading(self, model, **kwargs):
        n, m, layers = self._sparse_layers(model)
        for name in layers:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise SparseCheckpointError(
                    f"config.json lists the sparse layer {name}, which {type(model).__name__} does not have."
                ) from None
            weight = layer.weight
            rows, cols = weight.shape
            packed = math.ceil(rows * cols // m * n * index_bits(m) / 8)  # n positions per group of m
            del layer.weight
            layer.weight = _CompactWeight(
                torch.empty(rows, cols * n // m, dtype=weight.dtype, device=weight.device),
                torch.empty(packed, dtype=torch.uint8, device=weight.device),
            )
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        n, m, layers = self._sparse_layers(model)
        file = Path(str(model.config.name_or_path)) / self.quantization_config.weights
        for name, info in layers.items():
            layer = model.get_submodule(name)
            compact = layer.weight
            values, indices = compact.nm_values, compact.nm_indices
            weight = compact_decode(values.cpu(), indices.cpu(), n, m, name, str(file))
            check_layer(name, weight, n, m, info, file)
            del layer.weight
            layer.weight = nn.Parameter(weight.to(values.device), requires_grad=values.dtype.is_floating_point)
        # Dense in memory: a plain save_pretrained writes a standard checkpoint.
        setattr(model.config, METADATA_KEY, dict(getattr(model.config, METADATA_KEY), format="dense"))
        if hasattr(model.config, "transformers_weights"):
            del model.config.transformers_weights
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True
