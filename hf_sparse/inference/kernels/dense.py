"""The dense GEMM (`F.linear`, cuBLAS): the baseline every 2:4 kernel is measured against, and what a layer runs
where dense is faster. A single layer kept dense stays the `nn.Linear` it was; a fused q/k/v group kept dense is one
dense `SemiStructuredLinear`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import DENSE_NAME, Config, Gelu, GemmInputs, GemmRequest, LayerSpec, Problem, SweepSettings, Weights


class DenseKernel:
    name = DENSE_NAME
    layout = "dense"  # the model's own weight
    label = "dense"
    status = "dense"
    untuned = "dense"
    weights = Weights.MODEL
    sparse = False
    gelu = Gelu.NONE
    gelu_dtypes: tuple[torch.dtype, ...] = ()
    groups = True
    row_align = 1  # F.linear runs any row count: timed over exactly the request's token rows

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, layer: str = "") -> str | None:
        return None

    def shape_problem(self, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        return None

    def weight_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        return shape[0] * shape[1] * dtype.itemsize

    def version(self) -> str:
        return ""

    def problem(self, request: GemmRequest, inputs: GemmInputs, settings: SweepSettings) -> Problem:
        """One configuration, unchecked: `F.linear`, then GELU (one element-wise kernel, as `torch.compile` runs it)
        for a request with `gelu`."""
        x, w, b = inputs.x, inputs.weight, inputs.bias
        act = F.gelu if request.gelu else (lambda y: y)
        return Problem(configs=[()], call=lambda config: lambda: act(F.linear(x, w, b)))

    def layer(self, spec: LayerSpec) -> nn.Module | None:
        if spec.emits_state:
            return None
        from ..layers import Plan, SemiStructuredLinear

        plans = {bucket: Plan("dense") for bucket in spec.runs}
        return SemiStructuredLinear(
            spec.weight, spec.bias, sparse=False, plans=plans, tuner=spec.tuner, name=spec.name, emits_state=False
        )

    def describe(self, config: Config, gelu: bool) -> str:
        return "dense + GELU" if gelu else "dense"


DENSE = DenseKernel()
