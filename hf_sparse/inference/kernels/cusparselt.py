"""The cuSPARSELt 2:4 kernel (fp16, bf16; compute capability 8.0+): a layer holds its weight compressed by
`torch._cslt_compress` and runs it through a cuSPARSELt plan kept per token count (`SemiStructuredLinear`, bound by
`inference/cusparselt.py`); the autotuner sweeps its algorithm ids (and split-k settings, if asked)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .. import cusparselt
from .base import (
    SUPPORTED_DTYPES,
    Config,
    Gelu,
    GemmInputs,
    GemmRequest,
    LayerSpec,
    Problem,
    SweepSettings,
    Weights,
    dtype_name,
)

logger = logging.getLogger(__name__)

ALIGN = 16  # cuSPARSELt needs both weight dimensions to be multiples of 16 for fp16/bf16


def support_problem(
    device_type: str,
    dtype: torch.dtype,
    capability: tuple[int, int] | None = None,
    gpu_name: str = "",
    cusparselt_available: bool = True,
    layer: str = "",
) -> str | None:
    """Why 2:4 kernels cannot run for weights of `dtype` on this device, or None when they can."""
    where = f" ({layer})" if layer else ""
    if device_type != "cuda":
        return (
            f"2:4 semi-structured kernels (cuSPARSELt) need an NVIDIA GPU of compute capability 8.0 or newer; the "
            f"weights{where} are on {device_type}. Move the model to the GPU first (model.to('cuda')), or keep "
            "the dense model."
        )
    if not cusparselt_available:
        return (
            "this PyTorch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False); install a "
            "CUDA build of PyTorch from pytorch.org, or keep the dense model."
        )
    if capability is not None and tuple(capability) < (8, 0):
        return (
            f"2:4 semi-structured kernels need a GPU of compute capability 8.0 or newer; found "
            f"{capability[0]}.{capability[1]}{f' ({gpu_name})' if gpu_name else ''}. Keep the dense model, or run "
            "on an A100/H100/H200-class GPU."
        )
    if dtype not in SUPPORTED_DTYPES:
        return (
            f"2:4 kernels here take float16 or bfloat16 weights; the weights{where} are {dtype_name(dtype)}. "
            "Convert the model first (model.half() or model.to(torch.bfloat16); the zeros stay exact)."
        )
    return None


def semi_structured_support(device: torch.device | str, dtype: torch.dtype, layer: str = "") -> str | None:
    """Why 2:4 kernels cannot run for `dtype` weights on `device`, or None when they can.

    Example:

    ```python
    >>> semi_structured_support("cpu", torch.float16)
    '2:4 semi-structured kernels (cuSPARSELt) need an NVIDIA GPU of compute capability 8.0 or newer; ...'
    ```
    """
    device = torch.device(device)
    if device.type != "cuda":
        return support_problem(device.type, dtype, layer=layer)
    if not torch.cuda.is_available():
        return (
            "2:4 semi-structured kernels (cuSPARSELt) need an NVIDIA GPU of compute capability 8.0 or newer; no "
            "CUDA GPU is visible here. Keep the dense model, or run on a machine with one."
        )
    return support_problem(
        "cuda",
        dtype,
        torch.cuda.get_device_capability(device),
        torch.cuda.get_device_name(device),
        torch.backends.cusparselt.is_available(),
        layer,
    )


def last_algorithm(
    settings: SweepSettings,
    out_features: int,
    in_features: int,
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    gelu_scale: float | None = None,
) -> int:
    """The largest algorithm id a sweep tries: the largest cuSPARSELt offers for this GEMM (read from cuSPARSELt when
    the plan-keeping binding is available, so no id past it is ever set), at most `settings.max_algorithms - 1`."""
    if not cusparselt.available():
        return settings.max_algorithms - 1  # the sweep stops at the first id refused
    last = cusparselt.max_alg_id(
        out_features, in_features, rows, dtype, device, bias, out_dtype, gelu_scale=gelu_scale
    )
    return min(settings.max_algorithms - 1, last)


class CusparseltKernel:
    name = "cusparselt"
    layout = "cusparselt"  # torch._cslt_compress's opaque tensor
    label = "cuSPARSELt"
    status = "sparse"
    untuned = "sparse kernel with cuSPARSELt's default algorithm"
    weights = Weights.MODEL
    sparse = True
    gelu = Gelu.NONE  # cuSPARSELt 0.8 refuses a GELU epilogue for float16 and bfloat16 outputs
    gelu_dtypes: tuple[torch.dtype, ...] = ()
    groups = True
    row_align = 8  # cuSPARSELt needs the dense operand's dimensions to be multiples of 8

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, layer: str = "") -> str | None:
        return semi_structured_support(device, dtype, layer)

    def shape_problem(self, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        out_f, in_f = shape
        if out_f % ALIGN or in_f % ALIGN:
            return f"cuSPARSELt needs both dimensions to be multiples of {ALIGN}; this GEMM is {out_f}x{in_f}"
        return None

    def weight_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        return shape[0] * shape[1] * dtype.itemsize * 9 // 16  # the kept values plus cuSPARSELt's metadata

    def version(self) -> str:
        return ""

    def problem(self, request: GemmRequest, inputs: GemmInputs, settings: SweepSettings) -> Problem:
        """Algorithm ids from 0 up to the largest cuSPARSELt offers for this shape (read from cuSPARSELt when the
        plan-keeping binding is available, so no id past it is ever set; otherwise the sweep stops at the first id
        refused), each checked against `F.linear` in fp32; then, with `settings.split_k`, those split-k settings on
        the two fastest ids."""
        x, w, b, rows = inputs.x, inputs.weight, inputs.bias, inputs.rows
        dtype, device = request.dtype, x.device
        out_features, in_features = request.shape
        packed = torch._cslt_compress(w)
        planned = cusparselt.available()
        plans = cusparselt.PlanCache()
        last_id = last_algorithm(settings, out_features, in_features, rows, dtype, device, b, dtype)

        def call(config: Config):
            alg_id, k, mode = config
            if planned:
                bias_ptr = 0 if b is None else b.data_ptr()
                key = cusparselt.PlanKey(
                    device.index or 0, out_features, in_features, rows, dtype, bias_ptr, alg_id, k, mode, None
                )
                plan = plans.get(key, b)
                return lambda out=None: plan(x, packed, out=out, alpha=1.0)
            return lambda: cusparselt.cslt_linear(x, packed, b, alg_id, k, mode)

        def refine(timings: dict[Config, float]) -> list[Config]:
            if not settings.split_k:
                return []
            if not (planned or cusparselt.split_k_supported()):
                logger.info(
                    "hf-sparse: this PyTorch's _cslt_sparse_mm has no split-k arguments; tuning algorithms only."
                )
                return []
            best = sorted({config[0] for config in timings}, key=lambda a: timings[(a, 1, -1)])[:2]
            return [(a, k, mode) for a in best for k in settings.split_k for mode in settings.split_k_modes]

        reference = F.linear(x.float(), w.float(), None if b is None else b.float())
        tolerance = 1e-2 if dtype == torch.bfloat16 else 5e-3
        return Problem(
            configs=[(alg_id, 1, -1) for alg_id in range(last_id + 1)],
            call=call,
            reference=reference,
            tolerance=tolerance if settings.tolerance is None else settings.tolerance,
            refine=refine,
            close=plans.clear,
        )

    def layer(self, spec: LayerSpec) -> nn.Module | None:
        from ..layers import Plan, SemiStructuredLinear

        plans = {
            b: Plan("sparse", *r.config) if r.kernel == self.name else Plan("dense") for b, r in spec.runs.items()
        }
        return SemiStructuredLinear(
            spec.weight,
            spec.bias,
            sparse=True,
            plans=plans,
            keep_dense=spec.keep_dense,
            tuner=spec.tuner,
            name=spec.name,
            emits_state=spec.emits_state,
        )

    def describe(self, config: Config, gelu: bool) -> str:
        from ..layers import Plan

        return Plan("sparse", *config).describe()


CUSPARSELT = CusparseltKernel()
