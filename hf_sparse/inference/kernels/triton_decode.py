"""The Triton 2:4 decode kernel (fp16, bf16; compute capability 8.0+, Triton): a layer holds its weight in the
kernel's own layout (`inference/triton_decode.py`: the kept values and their 2-bit positions) and runs it with the bias
(`TritonDecodeLinear`). Written for decoding, where a GEMM reads every weight once for a few token rows; it runs
more rows correctly, one block of rows after another. The autotuner sweeps its block sizes, split-K, warps and
pipeline stages (`triton_decode.CONFIGS`) at up to `PREFILL_ROWS` rows: a decoder layer that holds only this layout
(the decoder LLMs' memory default) runs its prompts' prefills on it too, and the policy weighs that time."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import triton_decode
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

OPT_IN_ENV = "HF_SPARSE_TRITON_DECODE"
"""Set to 1 to let the swap time and use the kernel on a GPU. It is opt-in until it has been timed on one: a swap
then spends its compile time (about a second per configuration) only where asked."""

ALIGN = 16
"""Both weight dimensions must be multiples of this (see `TritonDecodeKernel.shape_problem`)."""

PREFILL_ROWS = 8192
"""The most token rows the autotuner times the kernel at: a 512-token prompt at batch 16. Above, each block of rows
re-reads the weights and the sweep would mostly spend its time budget; a layer that tunes such a token count runs
another kernel there, or holds another layout for it."""


def support_problem(
    device_type: str,
    dtype: torch.dtype,
    capability: tuple[int, int] | None = None,
    triton_missing: str | None = None,
    layer: str = "",
) -> str | None:
    """Why the kernel cannot run weights of `dtype` on this device (`triton_missing`: why Triton cannot be
    imported), or None when it can."""
    where = f" ({layer})" if layer else ""
    if device_type != "cuda":
        return (
            f"the Triton 2:4 decode kernel needs an NVIDIA GPU of compute capability 8.0 or newer; the weights{where} "
            f"are on {device_type}. Move the model to the GPU first (model.to('cuda'))."
        )
    if triton_missing:
        return triton_missing
    if capability is not None and tuple(capability) < (8, 0):
        return (
            f"the Triton 2:4 decode kernel needs a GPU of compute capability 8.0 or newer (bfloat16, 16-byte loads); "
            f"found {capability[0]}.{capability[1]}."
        )
    if dtype not in SUPPORTED_DTYPES:
        return (
            f"the Triton 2:4 decode kernel takes float16 or bfloat16 weights; the weights{where} are "
            f"{dtype_name(dtype)}. Convert the model first (model.half() or model.to(torch.bfloat16))."
        )
    return None


@functools.cache
def kernel_version() -> str:
    """The kernel source's hash and Triton's version (read without importing Triton): cached timings of another
    source or Triton are measured again."""
    source = (Path(triton_decode.__file__).parent / "_decode_jit.py").read_bytes()
    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = "none"
    return f"{hashlib.sha256(source).hexdigest()[:12]}-triton{triton_version}"


def compiled(configs: list[triton_decode.DecodeConfig], call) -> list[Config]:
    """The configurations that compile and run once (`call(config)`), in order. Run here, before the sweep's time
    budget starts: Triton compiles a configuration on its first call (about a second each, then cached on disk), and
    a sweep starts no configuration after its budget. One that Triton cannot build for this GPU (too much shared
    memory, too many registers) is left out."""
    kept = []
    for config in configs:
        try:
            call(config)
        except Exception as err:  # Triton's compilation and resource errors have no common base class
            logger.info("hf-sparse: Triton decode configuration %s left out: %s", config.describe(), err)
            continue
        kept.append(tuple(config))
    return kept


class TritonDecodeKernel:
    name = "triton_decode"
    layout = "triton_decode"  # values (N, K/2) and 2-bit positions, 8 groups per int32 (triton_decode.compress)
    label = "Triton decode kernel"
    status = "sparse"
    untuned = "the Triton decode kernel's default configuration per token count"
    weights = Weights.MODEL
    sparse = True
    gelu = Gelu.NONE
    gelu_dtypes: tuple[torch.dtype, ...] = ()
    groups = True
    row_align = 1  # any token count: timed over the rows it will run

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, layer: str = "") -> str | None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            return "the Triton 2:4 decode kernel needs an NVIDIA GPU; no CUDA GPU is visible here."
        if device.type != "cuda":
            return support_problem(device.type, dtype, layer=layer)
        capability = torch.cuda.get_device_capability(device)
        problem = support_problem("cuda", dtype, capability, triton_decode.triton_problem(), layer)
        if problem is None and os.environ.get(OPT_IN_ENV) != "1":
            return (
                f"the Triton 2:4 decode kernel is opt-in until it has been timed on a GPU: set {OPT_IN_ENV}=1 to let "
                "the autotuner time it (a layer runs it only where it measures faster than dense and the other kernels)."
            )
        return problem

    def shape_problem(self, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        """The kernel runs any `in_features` that is a multiple of 4, but takes only the shapes cuSPARSELt takes
        (multiples of 16), so it is never the only 2:4 kernel a layer could hold: the policy compares kernels over
        every tuned token count, and this one is not timed above `PREFILL_ROWS`."""
        out_f, in_f = shape
        if out_f % ALIGN or in_f % ALIGN:
            return (
                f"the Triton decode kernel takes dimensions that are multiples of {ALIGN}; this GEMM is {out_f}x{in_f}"
            )
        return triton_decode.layout_problem(out_f, in_f)

    def weight_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        out_f, in_f = shape
        return out_f * (in_f // 2) * dtype.itemsize + out_f * -(-in_f // 32) * 4

    def version(self) -> str:
        return kernel_version()

    def problem(self, request: GemmRequest, inputs: GemmInputs, settings: SweepSettings) -> Problem:
        """The configurations of `triton_decode.configs_for` the token rows (none above `PREFILL_ROWS`), each checked
        against `F.linear` in fp32."""
        x, w, b, rows = inputs.x, inputs.weight, inputs.bias, inputs.rows
        if rows > PREFILL_ROWS:
            return Problem(configs=[], call=lambda config: lambda: None)
        values, meta, scale, held = self.pack(w)
        reference = F.linear(x.float(), held, None if b is None else b.float())
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

    def pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`(values, meta, scale or None, the float32 weight they hold)` of a dense 2:4 weight, for a sweep."""
        return (*triton_decode.compress(weight), None, weight.float())

    def layer(self, spec: LayerSpec) -> nn.Module | None:
        from ..triton_linear import TritonDecodeLinear

        return TritonDecodeLinear(
            spec.weight,
            spec.bias,
            runs=spec.runs,
            keep_dense=spec.keep_dense,
            name=spec.name,
            emits_state=spec.emits_state,
        )

    def describe(self, config: Config, gelu: bool) -> str:
        return f"Triton decode 2:4 ({triton_decode.DecodeConfig(*config).describe()})"


TRITON_DECODE = TritonDecodeKernel()
