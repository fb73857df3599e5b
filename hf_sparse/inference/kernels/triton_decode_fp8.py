"""The Triton decode kernel's weight-only FP8 x 2:4 mode as a kernel of the FP8 swap
(`swap_to_semi_structured_(fp8=...)`): the kept values in e4m3 with a float32 scale per output feature, the activations,
bias and output in the layer's dtype (`TritonDecodeLinear(fp8=True)`). It reads 0.3125x the fp16 dense bytes at decode,
where the weights' bytes set the time; the autotuner times it up to `PREFILL_ROWS` rows, and the FP8 policy weighs it
against cuSPARSELt's e4m3 GEMM over every tuned token count.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import triton_decode
from .base import Config, LayerSpec, Weights
from .triton_decode import TritonDecodeKernel


class TritonDecodeFp8Kernel(TritonDecodeKernel):
    name = "triton_decode_fp8"
    layout = "triton_decode-e4m3"  # triton_decode.compress_fp8: e4m3 values (N, K/2), 2-bit positions, row scales
    label = "Triton e4m3 decode kernel"
    status = "fp8 2:4"
    untuned = "the Triton e4m3 decode kernel's default configuration per token count"
    weights = Weights.E4M3

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, layer: str = "") -> str | None:
        problem = super().unsupported_reason(device, dtype, layer)
        if problem is None:
            from ..fp8 import fp8_support_problem

            problem = fp8_support_problem(torch.device(device), layer)
        return problem

    def weight_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        out_f, in_f = shape
        return out_f * (in_f // 2) + out_f * -(-in_f // 32) * 4 + 4 * out_f  # e4m3 values, positions, scales

    def pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The e4m3 values, positions and row scales, and the float32 weight they stand for: each configuration is
        checked against the same e4m3 values times their scales (the quantization is the format's, not the
        kernel's error)."""
        values, meta, scale = triton_decode.compress_fp8(weight)
        return values, meta, scale, triton_decode.dequantize(values, meta, scale, weight.shape[1])

    def layer(self, spec: LayerSpec) -> nn.Module | None:
        from ..triton_linear import TritonDecodeLinear

        return TritonDecodeLinear(
            spec.weight, spec.bias, runs=spec.runs, fp8=True, name=spec.name, emits_state=spec.emits_state
        )

    def describe(self, config: Config, gelu: bool) -> str:
        return f"Triton e4m3 decode 2:4 ({triton_decode.DecodeConfig(*config).describe()})"


TRITON_DECODE_FP8 = TritonDecodeFp8Kernel()
