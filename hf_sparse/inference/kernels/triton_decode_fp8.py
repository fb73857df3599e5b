"""The Triton decode kernel's weight-only FP8 x 2:4 mode as a kernel of the FP8 swap
(`swap_to_semi_structured_(fp8=...)`): the kept values in e4m3 with a float32 scale per output feature, the activations,
bias and output in the layer's dtype (`TritonDecodeLinear(fp8=True)`). It reads 0.3125x the fp16 dense bytes at decode,
where the weights' bytes set the time; the autotuner times it up to `PREFILL_ROWS` rows, and the FP8 policy weighs it
against cuSPARSELt's e4m3 GEMM over every tuned token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import triton_decode
from .base import Config, GemmInputs, GemmRequest, LayerSpec, Problem, SweepSettings, Weights
from .triton_decode import PREFILL_ROWS, TritonDecodeKernel, compiled


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

    def problem(self, request: GemmRequest, inputs: GemmInputs, settings: SweepSettings) -> Problem:
        """The configurations of `triton_decode.configs_for` the token rows (none above `PREFILL_ROWS`), each checked
        against `F.linear` in fp32 of the same e4m3 values times their scales (the quantization is the format's, not
        the kernel's error)."""
        x, w, b, rows = inputs.x, inputs.weight, inputs.bias, inputs.rows
        if rows > PREFILL_ROWS:
            return Problem(configs=[], call=lambda config: lambda: None)
        values, meta, scale = triton_decode.compress_fp8(w)
        dequantized = triton_decode.dequantize(values, meta, scale, w.shape[1])
        reference = F.linear(x.float(), dequantized, None if b is None else b.float())
        tolerance = 1e-2 if request.dtype == torch.bfloat16 else 5e-3

        def run(config: Config) -> torch.Tensor:
            return triton_decode.decode_linear(x, values, meta, b, config, scale)

        return Problem(
            configs=compiled(triton_decode.configs_for(rows), run),
            call=lambda config: lambda: run(config),
            reference=reference,
            tolerance=tolerance if settings.tolerance is None else settings.tolerance,
            stop_at_refusal=False,
        )

    def layer(self, spec: LayerSpec) -> nn.Module | None:
        from ..triton_linear import TritonDecodeLinear

        return TritonDecodeLinear(
            spec.weight, spec.bias, runs=spec.runs, fp8=True, name=spec.name, emits_state=spec.emits_state
        )

    def describe(self, config: Config, gelu: bool) -> str:
        return f"Triton e4m3 decode 2:4 ({triton_decode.DecodeConfig(*config).describe()})"


TRITON_DECODE_FP8 = TritonDecodeFp8Kernel()
