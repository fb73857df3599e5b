"""The FP8 (e4m3) 2:4 kernel (cuSPARSELt, compute capability 8.9+; `swap_to_semi_structured_(fp8=...)`): a layer
holds its weight as e4m3 values with their 2:4 positions and runs the e4m3 GEMM with the scales and the bias in its
epilogue (`Fp8Linear`); in a feed-forward block of an fp16 model, GELU and the next layer's e4m3 quantization run
there too. The autotuner sweeps its algorithm ids on the GEMM as the layers run it with static scales."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import cusparselt
from ..quantization import E4M3, E4M3_MAX, quantize_static, quantize_weight
from .base import Config, Gelu, GemmInputs, GemmRequest, LayerSpec, Problem, SweepSettings, Weights
from .cusparselt import last_algorithm, semi_structured_support

FP8_ALIGN = 32  # both dimensions of an e4m3 GEMM's weight are multiples of this


def fp8_problem(device: torch.device, dtype: torch.dtype, layer: str = "") -> str | None:
    """Why the e4m3 kernels cannot run here (cuSPARSELt, and compute capability 8.9 or newer), or None."""
    from ..fp8 import fp8_support_problem

    return semi_structured_support(device, dtype, layer) or fp8_support_problem(device, layer)


def fp8_shape_problem(shape: tuple[int, int]) -> str | None:
    """Why the e4m3 kernels cannot take a weight of this `(out_features, in_features)` shape, or None."""
    if shape[0] % FP8_ALIGN or shape[1] % FP8_ALIGN:
        return (
            f"the e4m3 kernels need both dimensions to be multiples of {FP8_ALIGN}; this GEMM is {shape[0]}x{shape[1]}"
        )
    return None


def quantized(inputs: GemmInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The sweep's GEMM as an FP8 layer with static scales runs it: e4m3 `x` with one scale, the e4m3 weight with
    one per-tensor scale; returns (xq, x_scale, wq, w_scale, alpha = the product of the two scales)."""
    x_scale = (inputs.x.abs().max().float() / E4M3_MAX).reshape(())
    xq = quantize_static(inputs.x, x_scale)
    wq, w_scales = quantize_weight(inputs.weight, per_tensor=True)
    w_scale = w_scales[:1].reshape(())
    return xq, x_scale, wq, w_scale, float(x_scale) * float(w_scale)


class Fp8Kernel:
    name = "fp8"
    layout = "cusparselt-e4m3"  # e4m3 values compressed by torch._cslt_compress, float32 scales
    label = "e4m3 2:4"
    status = "fp8 2:4"
    untuned = "e4m3 2:4 kernel, cuSPARSELt's default algorithm"
    weights = Weights.E4M3
    sparse = True
    gelu = Gelu.ANY
    gelu_dtypes = (torch.float16,)  # with an e4m3 output, cuSPARSELt reads the bias as fp16
    groups = True
    row_align = cusparselt.ROW_ALIGN  # token rows of e4m3 GEMMs are padded to a multiple of 32

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, layer: str = "") -> str | None:
        return fp8_problem(device, dtype, layer)

    def shape_problem(self, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        return fp8_shape_problem(shape)

    def weight_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        return shape[0] * shape[1] * 5 // 8 + 4 * shape[0]  # half the values at one byte, metadata, row scales

    def version(self) -> str:
        return ""

    def problem(self, request: GemmRequest, inputs: GemmInputs, settings: SweepSettings) -> Problem:
        """Algorithm ids as for cuSPARSELt, on e4m3 inputs with the product of the scales as alpha and the bias in
        the epilogue, writing the layer's dtype; each checked against the exact product of the same e4m3 values.
        With `request.gelu`, GELU and the e4m3 quantization of the output for the next layer run in the epilogue
        too (the output is checked dequantized, and on a D full of NaN bytes: C points at D and must not be read)."""
        b, rows, device = inputs.bias, inputs.rows, inputs.x.device
        out_features, in_features = request.shape
        xq, _, wq, _, alpha = quantized(inputs)
        packed = torch._cslt_compress(wq)
        reference = alpha * (xq.float() @ wq.float().t()) + (0.0 if b is None else b.float())
        kernel_out, gelu_scale = request.dtype, None
        if request.gelu:
            reference = F.gelu(reference)
            out_scale = float(reference.abs().max().clamp(min=1e-12)) / E4M3_MAX
            kernel_out, gelu_scale = E4M3, 1.0 / out_scale
        planned = cusparselt.available()
        plans = cusparselt.PlanCache()
        last_id = last_algorithm(settings, out_features, in_features, rows, E4M3, device, b, kernel_out, gelu_scale)

        def call(config: Config):
            if planned:
                bias_ptr = 0 if b is None else b.data_ptr()
                out = None if kernel_out == E4M3 else kernel_out
                key = cusparselt.PlanKey(
                    device.index or 0, out_features, in_features, rows, E4M3, bias_ptr, config[0], 1, -1, out,
                    gelu_scale=gelu_scale,
                )  # fmt: skip
                plan = plans.get(key, b)
                return lambda out=None: plan(xq, packed, out=out, alpha=alpha)
            return lambda: cusparselt.fp8_sparse_linear(
                xq, packed, b, out_features, config[0], alpha, kernel_out, gelu_scale
            )

        sentinel = torch.empty(rows, out_features, dtype=kernel_out, device=device) if gelu_scale else None

        def result(fn) -> torch.Tensor:
            if gelu_scale and planned:
                # the e4m3 output's C matrix points at D and must not be read (beta is 0): fill D with NaN bytes,
                # which any read of C would carry into the result (and fail the check)
                sentinel.view(torch.uint8).fill_(0xFF)
                return fn(sentinel).float() / gelu_scale
            return fn().float() * (1.0 / gelu_scale if gelu_scale else 1.0)  # an e4m3 output dequantized

        # e4m3 output: 3 mantissa bits, ~3% relative error by rounding; else the kernel's product against the exact
        # product of the same e4m3 values
        tolerance = 8e-2 if request.gelu else 1e-2
        return Problem(
            configs=[(alg_id,) for alg_id in range(last_id + 1)],
            call=call,
            reference=reference,
            tolerance=tolerance if settings.tolerance is None else settings.tolerance,
            result=result,
            close=plans.clear,
        )

    def layer(self, spec: LayerSpec) -> nn.Module | None:
        from ..fp8 import Fp8Linear

        algorithms = {b: r.config[0] if r.config else 0 for b, r in spec.runs.items() if r.kernel == self.name}
        layer = Fp8Linear(
            spec.weight,
            spec.bias,
            sparse=True,
            input_scale=spec.input_scale,
            algorithms=algorithms,
            name=spec.name,
            emits_state=spec.emits_state,
        )
        if spec.gelu:
            layer.fuse_gelu_(spec.output_scale, algorithms)
        return layer

    def describe(self, config: Config, gelu: bool) -> str:
        return "e4m3 2:4 + GELU -> e4m3" if gelu else "e4m3 2:4"


FP8 = Fp8Kernel()
