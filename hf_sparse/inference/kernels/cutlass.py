"""The CUTLASS sm90 2:4 kernel (fp16, H100/H200; `inference/cutlass.py` compiles it on first use from
`csrc/sm90_sparse_gemm.cu`): a layer holds its weight in CUTLASS's compressed layout and runs it with the bias, and
with the exact GELU after it where the layer starts a feed-forward block (`GELU_BLOCKS`), in the kernel's epilogue
(`CutlassSparseLinear`). The autotuner sweeps the compiled tile configurations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import cutlass
from .base import Config, Gelu, GemmInputs, GemmRequest, LayerSpec, Problem, SweepSettings, Weights


class CutlassKernel:
    name = "cutlass"
    layout = "cutlass"  # values and the sm90 kernel's metadata (cutlass.compress)
    label = "CUTLASS kernel"
    status = "sparse"
    untuned = "the CUTLASS kernel's first configuration"
    weights = Weights.MODEL
    sparse = True
    gelu = Gelu.EXACT
    gelu_dtypes = (torch.float16,)
    groups = False
    row_align = 1  # the kernel takes any token count (`cutlass.ALIGN_OUT`), and its layer pads nothing

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, layer: str = "") -> str | None:
        """Why the kernel cannot run here: not an sm_90 GPU, no toolchain, or a build that failed. Builds the kernels
        (once per machine, minutes) when they can run and are not built yet."""
        if dtype != torch.float16:
            return cutlass.shape_problem(cutlass.ALIGN_OUT, cutlass.ALIGN_IN, dtype)  # words the dtype refusal
        problem = cutlass.device_problem(device)
        if problem is None and not cutlass.available(device):
            problem = cutlass.device_problem(device)
        return problem

    def shape_problem(self, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        return cutlass.shape_problem(*shape, dtype)

    def weight_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        return shape[0] * shape[1] * dtype.itemsize * 9 // 16  # half the values plus one metadata byte per 8

    def version(self) -> str:
        return cutlass.kernel_id()

    def problem(self, request: GemmRequest, inputs: GemmInputs, settings: SweepSettings) -> Problem:
        """Every compiled configuration (a configuration that cannot run this shape is skipped, the others are
        tried), each checked against `F.linear` (then GELU) in fp32."""
        x, w, b = inputs.x, inputs.weight, inputs.bias
        out_features, gelu = request.out_features, request.gelu
        act = F.gelu if gelu else (lambda y: y)
        values, meta = cutlass.compress(w)
        reference = act(F.linear(x.float(), w.float(), None if b is None else b.float()))
        return Problem(
            configs=[(config,) for config in range(len(cutlass.library().configs))],
            call=lambda config: lambda: cutlass.sparse_linear(x, values, meta, b, out_features, config[0], gelu),
            reference=reference,
            tolerance=5e-3 if settings.tolerance is None else settings.tolerance,
            stop_at_refusal=False,
        )

    def layer(self, spec: LayerSpec) -> nn.Module | None:
        from ..cutlass_linear import CutlassSparseLinear
        from ..layers import Plan

        plans = {
            b: Plan("sparse", *r.config) if r.kernel == self.name else Plan("dense") for b, r in spec.runs.items()
        }
        return CutlassSparseLinear(
            spec.weight, spec.bias, gelu=spec.gelu, plans=plans, keep_dense=spec.keep_dense, name=spec.name
        )

    def describe(self, config: Config, gelu: bool) -> str:
        return f"CUTLASS 2:4{' + GELU' if gelu else ''} ({cutlass.library().configs[config[0]]})"


CUTLASS = CutlassKernel()
