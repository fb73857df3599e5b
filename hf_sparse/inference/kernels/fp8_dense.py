"""The dense FP8 (e4m3) GEMM (`torch._scaled_mm`, compute capability 8.9+): a layer holds its weight as dense e4m3
values with float32 scales (`Fp8Linear(sparse=False)`); the FP8 baseline, and what an FP8 swap runs where it beats
the e4m3 2:4 kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Config, Gelu, GemmInputs, GemmRequest, LayerSpec, Problem, SweepSettings, Weights
from .fp8 import fp8_problem, fp8_shape_problem, quantized


class Fp8DenseKernel:
    name = "fp8-dense"
    layout = "e4m3"  # dense e4m3 values, float32 scales
    label = "dense FP8"
    status = "fp8 dense"
    untuned = "dense FP8"
    weights = Weights.E4M3
    sparse = False
    gelu = Gelu.NONE
    gelu_dtypes: tuple[torch.dtype, ...] = ()
    groups = True
    row_align = 1  # its layer runs torch._scaled_mm over exactly the token rows, unpadded

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, layer: str = "") -> str | None:
        return fp8_problem(device, dtype, layer)

    def shape_problem(self, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        return fp8_shape_problem(shape)

    def weight_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        return shape[0] * shape[1] + 4 * shape[0]  # one byte per value, row scales

    def version(self) -> str:
        return ""

    def problem(self, request: GemmRequest, inputs: GemmInputs, settings: SweepSettings) -> Problem:
        """One configuration, unchecked: `torch._scaled_mm` with both scales and the bias in its epilogue (then GELU
        for a request with `gelu`)."""
        xq, x_scale, wq, w_scale, _ = quantized(inputs)
        b, out_dtype = inputs.bias, request.dtype
        act = F.gelu if request.gelu else (lambda y: y)

        def dense():
            return act(torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, bias=b, out_dtype=out_dtype))

        return Problem(configs=[()], call=lambda config: dense)

    def layer(self, spec: LayerSpec) -> nn.Module | None:
        from ..fp8 import Fp8Linear

        return Fp8Linear(
            spec.weight, spec.bias, sparse=False, input_scale=spec.input_scale, name=spec.name,
            emits_state=spec.emits_state,
        )  # fmt: skip

    def describe(self, config: Config, gelu: bool) -> str:
        return "dense FP8"


FP8_DENSE = Fp8DenseKernel()
