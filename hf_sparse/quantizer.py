"""Plain `AutoModel*.from_pretrained` of compact checkpoints, through transformers' quantizer registry.

A compact checkpoint (`hf_sparse.save_pretrained(model, folder, compact=True)`) stores each N:M layer as kept values
plus packed positions in `hf_sparse_model.safetensors`. Its `config.json` carries

- `"quantization_config": {"quant_method": "hf-sparse: install hf-sparse and ...", ...}`: `import hf_sparse` registers
  `HfSparseConfig` and `HfSparseQuantizer` under that name (and the earlier "hf-sparse"), so transformers hands the
  loading to them. Without hf-sparse, transformers' first output is a warning that quotes the name, which is why the
  name is hf-sparse's advice;
- `"transformers_weights"`: the file transformers should read. Without hf-sparse the value is a sentence that says
  to install and import hf-sparse; transformers rejects it (it does not end in `.safetensors`) with a `ValueError`
  that shows it, before it builds any layer: a compact folder never loads with randomly initialised layers. With
  hf-sparse imported, the quantizer points it at `hf_sparse_model.safetensors` before transformers resolves files.

Loading: transformers reads each sparse layer's `weight.nm_values` and `weight.nm_indices` from the file (as
stored, in the file's dtype) and hands them to `_DecodeCompact`, one of transformers' weight conversion operations,
which decodes them, checks the layer (exactly N:M, the zeros the metadata records) and returns the dense `weight`
that transformers then places like any other tensor: on its device, in the requested dtype, or offloaded to disk
with `device_map`. A problem found there is kept and raised, naming the layer and the file, once loading is done
(transformers would otherwise log it and leave the layer randomly initialised). The quantizer then removes itself
(`dequantize=True`), so the model is an ordinary dense model with exact zeros that trains, saves (densely) and pushes
like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint.compact import (
    COMPACT_FORMAT,
    COMPACT_WEIGHTS_NAME,
    LEGACY_QUANT_METHODS,
    QUANT_METHOD,
    loaded_metadata,
    recorded_checksums,
    unlisted_layers_error,
    verify_checksum,
)
from .checkpoint.compact_fp8 import FP8_FORMATS
from .checkpoint.metadata import (
    METADATA_KEY,
    SparseCheckpointError,
    check_converted,
    check_layer,
    check_meta,
    with_module_names,
)
from .checkpoint.packing import INDICES_SUFFIX, VALUES_SUFFIX, compact_decode


class HfSparseConfig(QuantizationConfigMixin):
    """The `quantization_config` of a compact hf-sparse checkpoint (written by `hf_sparse.save_pretrained`).

    Args:
        format: the compact format's version ("compact-nm-v2"; "compact-nm-v1" has no checksums).
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


class _DecodeCompact(ConversionOps):
    """Turns one layer's `nm_values` + `nm_indices`, as stored in the file, into its dense `weight` (checked)."""

    def __init__(self, quantizer: HfSparseQuantizer):
        # The attribute's name is transformers' sign of an op that loads stored tensors itself: they reach it
        # uncast (HfQuantizer.get_new_dtype), as the checksums need.
        self.hf_quantizer = quantizer

    def __deepcopy__(self, memo) -> _DecodeCompact:
        # transformers deep-copies the converter for every layer; all copies report to the one quantizer.
        return type(self)(self.hf_quantizer)

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model=None, **kwargs) -> dict:
        parts = {}  # keyed by the source patterns of get_weight_conversions
        for pattern, tensors in input_dict.items():
            parts[VALUES_SUFFIX if "nm_values" in pattern else INDICES_SUFFIX] = (
                tensors[0] if isinstance(tensors, list) else tensors
            )
        target = model.get_parameter(full_layer_name)
        name = full_layer_name.removesuffix(".weight")
        try:
            weight = self.hf_quantizer.decode(name, parts.get(VALUES_SUFFIX), parts.get(INDICES_SUFFIX), target.dtype)
        except SparseCheckpointError as err:
            # transformers logs an error raised here and leaves the layer randomly initialised: keep it, and raise it
            # once loading is done (_process_model_after_weight_loading). The zeros are never used.
            self.hf_quantizer.errors.append(err)
            weight = torch.zeros(target.shape, dtype=target.dtype)
        return {full_layer_name: weight}

    @property
    def reverse_op(self) -> ConversionOps:
        raise NotImplementedError("a model loaded from a compact checkpoint is dense; it saves as a standard one")


class HfSparseQuantizer(HfQuantizer):
    """Loads compact hf-sparse checkpoints in `PreTrainedModel.from_pretrained` (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: HfSparseConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if getattr(quantization_config, "format", COMPACT_FORMAT) in FP8_FORMATS:
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

    def get_weight_conversions(self) -> list:
        # Every `<layer>.weight.nm_values` / `.nm_indices` pair of the file becomes `<layer>.weight` through
        # _DecodeCompact, which sees them as stored (see get_new_dtype). transformers 5.17 and later call this.
        from transformers.core_model_loading import WeightConverter

        return [
            WeightConverter(
                source_patterns=[rf"weight\{VALUES_SUFFIX}$", rf"weight\{INDICES_SUFFIX}$"],
                target_patterns="weight",
                operations=[_DecodeCompact(self)],
                force_cpu=True,  # decoded on CPU (numpy), then moved to the layer's device by transformers
            )
        ]

    def get_new_dtype(self, converter, param, dtype):
        # transformers >= 5.2x asks which dtype to read each stored tensor in: _DecodeCompact's as stored (the
        # checksums are of the stored bytes; it casts the decoded weight itself). 5.17 keeps a renamed key's dtype.
        if any(isinstance(op, _DecodeCompact) for op in getattr(converter, "operations", ())):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        meta = getattr(model.config, METADATA_KEY, None)
        config_file = Path(str(model.config.name_or_path)) / "config.json"
        if meta is None:
            raise SparseCheckpointError(
                f"config.json has a quantization_config of hf-sparse but no '{METADATA_KEY}' entry listing the "
                "sparse layers; the checkpoint's config.json was edited or truncated. Save it again."
            )
        check_meta(meta, config_file)
        meta = with_module_names(meta)  # names recorded on a torch.compile'd model carry _orig_mod.
        setattr(model.config, METADATA_KEY, meta)
        self.n, self.m, self.layers = check_meta(meta, config_file)
        self.checksums = recorded_checksums(meta, getattr(self.quantization_config, "format", None), config_file)
        self.file = checkpoint_files[0] if checkpoint_files else self.quantization_config.weights
        self.errors: list[SparseCheckpointError] = []
        self.decoded: set[str] = set()
        self.unlisted: list[str] = []
        self.config_file = config_file
        for name in self.layers:
            try:
                model.get_submodule(name).get_parameter("weight")
            except AttributeError:
                raise SparseCheckpointError(
                    f"config.json lists the sparse layer {name}, which {type(model).__name__} does not have (or it "
                    "has no weight); pass the model class the checkpoint was saved from."
                ) from None
        return model

    def decode(
        self, name: str, values: torch.Tensor | None, indices: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """The checked dense weight of layer `name`, in `dtype`, from its tensors as stored in the file (on CPU)."""
        if name not in self.layers:
            self.unlisted.append(name)
            raise unlisted_layers_error(self.file, [name], self.config_file)
        if values is None or indices is None:
            missing = VALUES_SUFFIX if values is None else INDICES_SUFFIX
            raise SparseCheckpointError(
                f"layer {name}: tensor {name}.weight{missing} is missing from {self.file}; the file is incomplete."
            )
        weight = compact_decode(values.cpu(), indices.cpu(), self.n, self.m, name, str(self.file))
        if self.checksums is not None:  # the tensors as stored: transformers keeps the file's dtype for them
            parts = {f".weight{VALUES_SUFFIX}": values, f".weight{INDICES_SUFFIX}": indices}
            verify_checksum(name, parts, self.checksums, self.file)
        check_layer(name, weight, self.n, self.m, self.layers.get(name), self.file)
        converted = weight.to(dtype)
        check_converted(name, converted, weight.dtype, self.file)
        self.decoded.add(name)
        return converted

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.unlisted:
            raise unlisted_layers_error(self.file, self.unlisted, self.config_file)
        if self.errors:
            raise self.errors[0]
        missing = [name for name in self.layers if name not in self.decoded]
        if missing:
            raise SparseCheckpointError(
                f"layers {missing[:5]} are listed as sparse in config.json but {self.file} holds no compact tensors "
                f"for them ({missing[0]}.weight{VALUES_SUFFIX} ...); the file is incomplete. Save it again."
            )
        # Dense in memory: a plain save_pretrained writes a standard checkpoint. transformers 5.17 keeps the
        # conversions a model was loaded with and reverses them when it saves: ours has nothing to reverse.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [
                c
                for c in conversions
                if not any(isinstance(op, _DecodeCompact) for op in getattr(c, "operations", ()))
            ]
        setattr(model.config, METADATA_KEY, loaded_metadata(getattr(model.config, METADATA_KEY)))
        if hasattr(model.config, "transformers_weights"):
            del model.config.transformers_weights
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


for _name in (QUANT_METHOD, *LEGACY_QUANT_METHODS):
    register_quantization_config(_name)(HfSparseConfig)
    register_quantizer(_name)(HfSparseQuantizer)
