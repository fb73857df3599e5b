"""FP8 (e4m3) x 2:4: where Hopper's sparse tensor cores pay most.

`Fp8Linear` holds a 2:4 weight as e4m3 values with scales per output feature, compressed for cuSPARSELt (values
plus 2:4 metadata: 0.3125x the bytes of the fp16 weight), or, for layers where the dense FP8 GEMM is faster, as a
dense e4m3 weight run by `torch._scaled_mm` (0.5x). Activations are quantized to e4m3 before each GEMM, with one scale
per layer calibrated on data ("static", the default: measured faster at the same accuracy) or one scale per token
computed on the fly ("dynamic").

How the scales are applied is set by what the kernels accept on an H100 (cuSPARSELt 0.8.0, PyTorch 2.11): cuSPARSELt
refuses a per-output-feature alpha vector for e4m3 inputs ("operation not supported"). With static scales the weight
takes one per-tensor scale, so both scales (one host `alpha`) and the bias run in the sparse GEMM's epilogue; in an
fp16 model's feed-forward block, GELU and the next layer's quantization run there too, and the GEMM writes e4m3
(`fuse_gelu_`, `GeluInEpilogue`). With dynamic scales the sparse GEMM writes the unscaled product in bfloat16 (whose
range holds it) and one element-wise step applies the token and feature scales and the bias; under `torch.compile`
that step and the activation quantization fuse into the neighbouring element-wise kernels (LayerNorm, GELU,
residual adds). The dense FP8 GEMM (`torch._scaled_mm`) applies its scales and the bias in its epilogue.

`swap_to_semi_structured_(model, fp8=True)` installs these layers; this module only holds and runs them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import cusparselt
from .cuda_graphs import GENERATION
from .kernels.base import token_bucket
from .layers import SwappedLinear, _probe, copy_bias, custom_op, nearest_bucket, new_weight
from .quantization import _TINY, E4M3, E4M3_MAX, quantize_rows, quantize_static, quantize_weight

logger = logging.getLogger(__name__)

ACTIVATION_SCALES = ("dynamic", "static")
_KEPT = {"packed": E4M3, "weight_fp8": E4M3, "weight_scale": torch.float32, "input_scale": torch.float32,
         "tensor_scale": torch.float32}  # fmt: skip
"""The buffers of an `Fp8Linear` that no cast may change, with their dtypes (they must stay on the GPU too)."""
FP8_CAPABILITY = (8, 9)


# -- configuration ---------------------------------------------------------------------------------------------------


@dataclass
class Fp8Config:
    """How `swap_to_semi_structured_(model, fp8=...)` runs a 2:4 model in FP8.

    Example:

    ```python
    >>> batches = [next(iter(eval_loader)) for _ in range(4)]   # dicts of model inputs on the model's device
    >>> hf_sparse.swap_to_semi_structured_(model, fp8=Fp8Config(calibration=batches), token_counts=[64 * 384])
    ```
    """

    activation_scales: str = field(
        default="static",
        metadata={
            "help": "How activations are scaled to e4m3 before each GEMM: 'static' (default: one scale per layer, "
            "the largest |input| seen on the `calibration` batches; the scales and the bias then run inside the "
            "sparse GEMM's epilogue) or 'dynamic' (one scale per token, computed on every call; no data needed, "
            "but a reduction before and a scaling pass after each GEMM: slower, see the README's FP8 benchmark, "
            "which also compares their F1)."
        },
    )
    calibration: Iterable[dict] | None = field(
        default=None,
        metadata={
            "help": "Batches (dicts of model inputs, e.g. a few batches of your evaluation data) to run through the "
            "model before the swap, for static scales."
        },
    )
    input_scales: dict[str, float] | None = field(
        default=None,
        metadata={
            "help": "Static input scales by layer name (what a saved FP8 checkpoint holds), instead of calibration."
        },
    )
    sparse: bool = field(
        default=True,
        metadata={
            "help": "True: 2:4 e4m3 kernels where they are fastest. False: dense FP8 for every layer (the baseline "
            "the benchmark compares against; the weights need not be 2:4)."
        },
    )
    fuse_gelu: bool = field(
        default=True,
        metadata={
            "help": "With static scales and fp16 weights: a 2:4 layer followed by GELU and another FP8 layer (a "
            "BERT-family feed-forward block: intermediate.dense -> GELU -> output.dense) runs GELU and the next "
            "layer's e4m3 quantization in its sparse GEMM's epilogue and hands the next layer e4m3 directly, where "
            "the autotuner measures that no slower (always, with autotune off). False keeps GELU a separate step "
            "(the comparison the benchmark's 'fp8-unfused' variant runs)."
        },
    )

    def __post_init__(self):
        if self.activation_scales not in ACTIVATION_SCALES:
            raise ValueError(
                f"Fp8Config.activation_scales must be one of {list(ACTIVATION_SCALES)}; got "
                f"{self.activation_scales!r}."
            )
        if self.activation_scales == "static" and self.calibration is None and not self.input_scales:
            raise ValueError(
                "FP8 with static activation scales (the default, the fast one) needs calibration batches to set "
                "each layer's input scale: fp8=Fp8Config(calibration=[batch, ...]) with a few batches of model "
                "inputs (dicts, e.g. from your evaluation DataLoader); or Fp8Config(activation_scales='dynamic'), "
                "which needs no data and runs slower."
            )


def fp8_capability_problem(capability: tuple[int, int], gpu_name: str = "") -> str | None:
    """Why e4m3 kernels cannot run on a GPU of this compute capability, or None when they can (8.9 or newer)."""
    if tuple(capability) < FP8_CAPABILITY:
        name = f"{gpu_name} is " if gpu_name else "this GPU is "
        return (
            f"FP8 (e4m3) kernels need compute capability 8.9 or newer (L4, L40, H100, H200); {name}"
            f"{capability[0]}.{capability[1]}. Swap without fp8 (fp16 2:4 kernels run from 8.0)."
        )
    return None


def fp8_support_problem(device: torch.device | str, layer: str = "") -> str | None:
    """Why e4m3 kernels cannot run on `device`, or None when they can (compute capability 8.9 or newer)."""
    device = torch.device(device)
    where = f" for {layer}" if layer else ""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"FP8 (e4m3) kernels need an NVIDIA GPU of compute capability 8.9 or newer{where}; found {device.type}."
    return fp8_capability_problem(torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))


# -- the sparse e4m3 GEMM --------------------------------------------------------------------------------------------


def fp8_sparse_mm_op():
    """`hf_sparse::fp8_sparse_mm`: the e4m3 2:4 kernel as one op of known output shape for `torch.compile`."""
    return custom_op(
        "fp8_sparse_mm",
        cusparselt.fp8_sparse_linear,
        "(Tensor xq, Tensor packed, Tensor? bias, int out_features, int alg_id, float alpha, ScalarType out_dtype) "
        "-> Tensor",
        lambda xq, packed, bias, out_features, alg_id, alpha, out_dtype: xq.new_empty(
            (xq.shape[0], out_features), dtype=out_dtype
        ),
    )


def fp8_sparse_gelu_op():
    """`hf_sparse::fp8_sparse_gelu`: the e4m3 2:4 kernel with bias, GELU and e4m3 output quantization (scale
    `1 / gelu_scale`) in its epilogue, as one op for `torch.compile`."""
    return custom_op(
        "fp8_sparse_gelu",
        lambda xq, packed, bias, out_features, alg_id, alpha, gelu_scale: cusparselt.fp8_sparse_linear(
            xq, packed, bias, out_features, alg_id, alpha, E4M3, gelu_scale
        ),
        "(Tensor xq, Tensor packed, Tensor? bias, int out_features, int alg_id, float alpha, float gelu_scale) "
        "-> Tensor",
        lambda xq, packed, bias, out_features, alg_id, alpha, gelu_scale: xq.new_empty(
            (xq.shape[0], out_features), dtype=E4M3
        ),
    )


# -- element-wise work in eager calls ---------------------------------------------------------------------------------

_COMPILED: dict = {}


def _fused(fn):
    """`fn` for eager calls compiled once (dynamic shapes) into one fused kernel, instead of several passes with
    float32 temporaries (eager per-token quantization made the FP8 model several times slower than fp16 under CUDA
    graphs). Inside `torch.compile` it is traced as written, so inductor fuses it with its neighbours."""

    def call(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        compiled = _COMPILED.get(fn)
        if compiled is None:
            try:
                compiled = torch.compile(fn, dynamic=True, fullgraph=True)
                compiled(*args)
            except Exception as err:  # pragma: no cover - no triton, or an inductor failure: run it unfused
                logger.warning("hf-sparse: could not compile %s (%s); running it unfused.", fn.__name__, err)
                compiled = fn
            _COMPILED[fn] = compiled
        return compiled(*args)

    return call


def _finish(product, scales, weight_scale, bias, like):
    out = product.float() * (scales * weight_scale)
    if bias is not None:
        out = out + bias
    return out.to(like.dtype)


_quantize_rows = _fused(quantize_rows)
_quantize_static = _fused(quantize_static)
_finish_fused = _fused(_finish)


# -- the layer -------------------------------------------------------------------------------------------------------


class Fp8Linear(SwappedLinear):
    """A linear layer run in FP8: e4m3 weight (2:4 compressed for cuSPARSELt, or dense for `torch._scaled_mm`) with
    per-output-feature scales, activations quantized per token (dynamic) or with a calibrated scale (static).

    Built by `swap_to_semi_structured_(model, fp8=...)`. `state_dict()` emits the dequantized `weight` (in the
    model's dtype, 2:4 zeros exact) and `bias`, so checkpoints stay ordinary; loading one re-quantizes it.

    Args:
        weight: the dense weight, `(out_features, in_features)`, fp16/bf16 on a GPU of compute capability >= 8.9
            (exactly 2:4 when `sparse`).
        bias: the bias, or None.
        sparse: run the 2:4 e4m3 kernel (cuSPARSELt) instead of the dense one (`torch._scaled_mm`).
        input_scale: a calibrated float32 scale for static activation quantization; None quantizes per token.
        algorithms: token-count bucket -> the cuSPARSELt algorithm of the sparse kernel there (see `Autotuner`);
            buckets not listed run the nearest listed one's (cuSPARSELt's default, 0, when none is).
        name: the layer's name, for messages.
        emits_state: whether `state_dict()` holds this layer's `weight`/`bias` (False for a fused group).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        sparse: bool = True,
        input_scale: float | None = None,
        algorithms: dict[int, int] | None = None,
        name: str = "",
        emits_state: bool = True,
    ):
        super().__init__(weight, bias, name=name, emits_state=emits_state)
        weight = weight.detach()
        self.sparse = sparse
        self.algorithms = {int(b): int(a) for b, a in (algorithms or {}).items()}
        self.out_dtype = weight.dtype
        # static: one weight scale too, so both scales and the bias fold into the GEMM's epilogue (alpha); dynamic:
        # one scale per output feature, applied with the per-token scales after the GEMM
        values, scales = quantize_weight(weight, per_tensor=input_scale is not None)
        if sparse:
            fp8_sparse_mm_op()  # registered now, not while torch.compile traces
        self.register_buffer("packed", _compress(values) if sparse else None, persistent=False)
        self.register_buffer("weight_fp8", None if sparse else values.contiguous(), persistent=False)
        self.register_buffer("weight_scale", scales, persistent=False)
        # static: the one weight scale as its own 0-dim tensor (inductor's _scaled_mm lowering refuses a view)
        self.register_buffer("tensor_scale", scales[0].clone() if input_scale is not None else None, persistent=False)
        scale = None if input_scale is None else torch.tensor(float(input_scale), device=weight.device)
        self.register_buffer("input_scale", scale, persistent=False)
        # Static scales: input scale x weight scale, applied in the sparse GEMM's epilogue. A Python float (read
        # once here, not per call), so torch.compile and CUDA graphs bake it in.
        self.alpha = 1.0 if scale is None else float(input_scale) * float(scales[0])
        # set by fuse_gelu_: GELU and the next layer's e4m3 quantization run in the epilogue, output e4m3
        self.gelu_scale: float | None = None

    def _apply(self, fn, recurse=True):
        GENERATION[0] += 1  # CUDA graphs captured over this layer read its old tensors
        before = dict(self._buffers)
        result = super()._apply(fn, recurse)
        changed = [
            n for n, dtype in _KEPT.items() if self._buffers.get(n) is not None and self._buffers[n].dtype != dtype
        ]
        moved_off = any(t is not None and t.device.type != "cuda" for t in self._buffers.values())
        if changed or moved_off:
            self._buffers.update(before)  # this layer stays as it was
            raise TypeError(self._refusal())
        if self.bias is not None:
            self.out_dtype = self.bias.dtype
        return result

    def _refusal(self) -> str:
        return (
            f"{self.label}: an FP8 layer keeps e4m3 weights with float32 scales on the GPU; a cast or a "
            "move off the GPU would destroy them. Call hf_sparse.restore_dense_(model) first for a dense model you "
            "can cast anywhere."
        )

    def cast_problem(self, fn) -> str | None:
        """Why `model._apply(fn)` would be refused by this layer, or None (see `SemiStructuredLinear.cast_problem`)."""
        for name, dtype in _KEPT.items():
            tensor = self._buffers.get(name)
            if tensor is None:
                continue
            new_dtype, new_device = _probe(fn, tensor)
            if new_dtype != dtype or new_device.type != "cuda":
                return self._refusal()
        return None

    @property
    def dtype(self) -> torch.dtype:
        return self.out_dtype

    def e4m3_weight(self) -> torch.Tensor:
        """The dense e4m3 weight values, `(out_features, in_features)` (decompressed exactly for a 2:4 layer)."""
        if self.weight_fp8 is not None:
            return self.weight_fp8
        return _decompress_fp8(self.packed, self.out_features, self.in_features)

    def e4m3_tensors(self) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """What a compact FP8 checkpoint stores of the whole layer, on the CPU: the e4m3 weight, the float32 scale
        of each output feature, and the static input scale (None with dynamic scales)."""
        scale = None if self.input_scale is None else float(self.input_scale)
        return self.e4m3_weight().cpu(), self.weight_scale.cpu(), scale

    def compact_fp8_tensors(self) -> tuple[torch.Tensor, torch.Tensor, float | None] | None:
        """`e4m3_tensors()`, for the compact FP8 checkpoint to store under this layer's name; None for a fused group,
        whose members store their own rows (`FusedLinearSlice.compact_fp8_tensors`)."""
        return self.e4m3_tensors() if self.emits_state else None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized dense weight, in the model's dtype (computed on each access: use it sparingly)."""
        return (self.e4m3_weight().float() * self.weight_scale[:, None]).to(self.out_dtype)

    @property
    def weight_bytes(self) -> int:
        tensors = (self.packed, self.weight_fp8, self.weight_scale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        kind = "e4m3 2:4 (cuSPARSELt)" if self.sparse else "e4m3 dense (torch._scaled_mm)"
        scales = "static" if self.input_scale is not None else "dynamic per token"
        epilogue = f", epilogue=GELU -> e4m3 (scale {1 / self.gelu_scale:.3g})" if self.gelu_scale else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weights={kind}, activation scales={scales}{epilogue}"
        )

    def fuse_gelu_(self, output_scale: float, algorithms: dict[int, int] | None = None) -> None:
        """Runs GELU in this layer's epilogue and writes e4m3 quantized with `output_scale` (the static input scale
        of the FP8 layer that reads this output), so that layer skips its own quantization. `algorithms`: token
        bucket -> cuSPARSELt algorithm of the fused kernel (see `Fp8Linear`). The GELU module after this layer
        must become a `GeluInEpilogue` (`swap_to_semi_structured_` does both)."""
        if not self.sparse or self.input_scale is None or self.out_dtype != torch.float16:
            raise ValueError(
                f"{self.label}: only a 2:4 FP8 layer of an fp16 model with a static input scale can run "
                "GELU in its epilogue (with an e4m3 output cuSPARSELt reads the bias as fp16)."
            )
        if not output_scale > 0:
            raise ValueError(f"{self.label}: output_scale must be > 0; got {output_scale!r}.")
        fp8_sparse_gelu_op()
        self.gelu_scale = 1.0 / float(output_scale)
        if algorithms is not None:
            self.algorithms = {int(b): int(a) for b, a in algorithms.items()}
        GENERATION[0] += 1

    def algorithm(self, tokens: int) -> int:
        """The cuSPARSELt algorithm a call with `tokens` rows runs (a plain int: torch.compile bakes it in)."""
        if not self.algorithms:
            return 0
        bucket = token_bucket(tokens)
        found = self.algorithms.get(bucket)
        if found is None:
            found = self.algorithms[nearest_bucket(self.algorithms, bucket)]
        return found

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if self.input_scale is not None:  # static: one e4m3 GEMM with the scales and bias in its epilogue
            # e4m3 input: the layer before quantized it with this layer's scale (GELU in its epilogue)
            xq = x2 if x2.dtype == E4M3 else _quantize_static(x2, self.input_scale)
            if self.gelu_scale is not None:
                out = fp8_sparse_gelu_op()(
                    xq, self.packed, self.bias, self.out_features, self.algorithm(rows), self.alpha, self.gelu_scale
                )
            elif self.sparse:
                out = fp8_sparse_mm_op()(
                    xq, self.packed, self.bias, self.out_features, self.algorithm(rows), self.alpha, self.out_dtype
                )
            else:
                out = torch._scaled_mm(
                    xq,
                    self.weight_fp8.t(),
                    scale_a=self.input_scale,
                    scale_b=self.tensor_scale,
                    bias=self.bias,
                    out_dtype=self.out_dtype,
                )
            return out.view(*lead, self.out_features)
        if x2.dtype == E4M3:
            raise TypeError(f"{self.label}: e4m3 inputs need a static input scale.")
        xq, scales = _quantize_rows(x2)
        if self.sparse:
            product = fp8_sparse_mm_op()(
                xq, self.packed, None, self.out_features, self.algorithm(rows), 1.0, torch.bfloat16
            )
            out = _finish_fused(product, scales, self.weight_scale, self.bias, x2)
        else:
            out = torch._scaled_mm(
                xq,
                self.weight_fp8.t(),
                scale_a=scales.contiguous(),
                scale_b=self.weight_scale.view(1, -1),
                bias=self.bias,
                out_dtype=self.out_dtype,
            )
        return out.view(*lead, self.out_features)

    def set_weight_(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: slice | None = None) -> None:
        """Replaces the weight (or the rows `rows` of it) with a dense tensor, re-quantizing it.

        Rows not replaced keep their exact values (the e4m3 values times their scales, in float32); with static
        scales they are re-quantized at the new per-tensor scale when the replaced rows change the largest weight
        (a fused q/k/v group loading its members one by one does that)."""
        with torch.no_grad():
            current = None
            if rows is not None:
                current = self.e4m3_weight().float() * self.weight_scale[:, None]
            weight = new_weight(self, weight, rows, self.weight_scale.device, torch.float32, self.sparse, current)
            values, scales = quantize_weight(weight, per_tensor=self.input_scale is not None)
            if self.sparse:
                self.packed.copy_(_compress(values))
            else:
                self.weight_fp8.copy_(values)
            self.weight_scale.copy_(scales)
            if self.tensor_scale is not None:
                self.tensor_scale.copy_(scales[0])
            if self.input_scale is not None:
                self.alpha = float(self.input_scale) * float(scales[0])
            copy_bias(self, bias, rows)
        GENERATION[0] += 1  # a CUDA graph holds the old alpha (a host value baked into the captured launch)


def _compress(values: torch.Tensor) -> torch.Tensor:
    # cuSPARSELt reads the memory as a row-major matrix whatever the strides: a transposed view would be scrambled
    return torch._cslt_compress(values.contiguous())


def _decompress_fp8(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The dense e4m3 values of a compressed weight: the sparse kernel times an identity, exact in bfloat16 (the
    e4m3 kernels take only the layout the layers use, so the identity is the left operand: `I @ Wq.T = Wq.T`)."""
    eye = torch.eye(in_features, device=packed.device, dtype=torch.float16).to(E4M3)
    return (
        cusparselt.fp8_sparse_linear(eye, packed, None, out_features, 0, 1.0, torch.bfloat16).t().contiguous().to(E4M3)
    )


# -- calibration -----------------------------------------------------------------------------------------------------


def calibrate_input_scales(model: nn.Module, names: Iterable[str], batches: Iterable[dict]) -> dict[str, float]:
    """The static e4m3 scale of each named layer's input: the largest |input| over `batches`, divided by 448.

    Runs the model (as it is, before any swap) in eval mode without gradients; raises ValueError naming the layers
    that never ran."""
    names = list(names)
    amax: dict[str, float] = {}
    handles = []

    def record(name):
        def hook(module, args):
            value = float(args[0].detach().abs().max())
            amax[name] = max(amax.get(name, 0.0), value)

        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(record(name)))
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [n for n in names if n not in amax]
    if not seen or missing:
        raise ValueError(
            f"FP8 calibration saw {seen} batch(es) and never ran the layers {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}; pass batches of model inputs (dicts) that reach every layer. "
            "The model was not changed."
        )
    return {n: max(amax[n], _TINY) / E4M3_MAX for n in names}
