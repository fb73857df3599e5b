"""`TritonDecodeLinear`: a 2:4 layer run by the Triton decode kernel (`triton_decode.py`), fp16 or bf16, with an
optional dense copy for the token counts where dense is faster; with `fp8=True`, its weight-only FP8 x 2:4 mode (e4m3
values with a float32 scale per output feature, fp16/bf16 activations).

`swap_to_semi_structured_` installs it where the autotuner measures the kernel faster than dense and than the other
2:4 kernels at every tuned token count (`policy.py`); `kernels/triton_decode.py` builds it; this module only runs it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from . import triton_decode
from .cuda_graphs import GENERATION
from .kernels.base import DENSE_NAME, SUPPORTED_DTYPES, Run, dtype_name, token_bucket
from .layers import SwappedLinear, _probe, copy_bias, custom_op, nearest_bucket, new_weight


def decode_linear_op():
    """`hf_sparse::triton_decode_linear`: the Triton decode GEMM as one op of known output shape for
    `torch.compile`."""
    return custom_op(
        "triton_decode_linear",
        lambda x, values, meta, bias, config, scale: triton_decode.decode_linear(
            x, values, meta, bias, tuple(config), scale
        ),
        "(Tensor x, Tensor values, Tensor meta, Tensor? bias, int[] config, Tensor? scale) -> Tensor",
        lambda x, values, meta, bias, config, scale: x.new_empty((x.shape[0], values.shape[0])),
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonDecodeLinear(SwappedLinear):
    """`x @ W.T + b` for a 2:4 fp16/bf16 weight held in the Triton decode kernel's layout (`triton_decode.compress`:
    the kept values and 2-bit positions, 9/16 of the dense bytes), with an optional dense copy.

    With `fp8=True` (weight-only FP8 x 2:4), the kept values are quantized to e4m3 with a float32 scale per output
    feature (`triton_decode.compress_fp8`: 0.3125x the fp16 dense bytes); the activations, bias and output stay in the
    weight's dtype, and the kernel applies the scale in its epilogue: `(x @ Wq.T) * scale + b`.

    Built by `swap_to_semi_structured_` (the fp16/bf16 mode; the FP8 mode is built directly, e.g. `from_linear`);
    `state_dict()` emits the dense `weight` (exactly decompressed; dequantized in the FP8 mode, where loading one
    re-quantizes it) and `bias`, so checkpoints stay ordinary.

    Args:
        weight: the dense 2:4 weight, `(out_features, in_features)`, fp16 or bf16 (a CUDA device to run it).
        bias: the bias, or None.
        runs: token-count bucket -> `Run` (this kernel in one configuration, or `"dense"` where the layer keeps a
            dense copy); a bucket not listed runs what the nearest one runs (it is not tuned later: name your token
            counts to the swap); none at all: `triton_decode.default_config`.
        keep_dense: also keep the dense weight, for the buckets where dense is faster (the dequantized one in the
            FP8 mode).
        fp8: hold the weight as e4m3 values with a float32 scale per output feature (needs a GPU of compute
            capability 8.9 or newer to run).
        name: the layer's name, for messages.
        emits_state: whether `state_dict()` holds this layer's `weight`/`bias` (False for a fused group).

    Example:

    ```python
    layer = TritonDecodeLinear.from_linear(model.model.layers[0].mlp.down_proj, fp8=True, name="down_proj")
    ```
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        runs: Mapping[int, Run] | None = None,
        keep_dense: bool = False,
        fp8: bool = False,
        name: str = "",
        emits_state: bool = True,
    ):
        super().__init__(weight, bias, name=name, emits_state=emits_state)
        weight = weight.detach()
        if weight.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{self.label}: the Triton decode kernel runs float16 or bfloat16 weights, not "
                            f"{dtype_name(weight.dtype)}.")  # fmt: skip
        if fp8 and weight.device.type == "cuda":
            from .fp8 import fp8_support_problem

            problem = fp8_support_problem(weight.device, self.label)
            if problem:
                raise RuntimeError(f"{self.label}: {problem}")
        self.runs: dict[int, Run] = dict(runs or {})
        self.fp8 = fp8
        self._dtype = weight.dtype  # the activations' and the output's (the values' too, unless FP8)
        decode_linear_op()  # registering the op later, while torch.compile traces, would break the graph
        values, meta, scale = self._pack(weight)
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("meta", meta, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("dense_weight", None, persistent=False)
        if keep_dense:
            self.dense_weight = self._unpacked().contiguous()  # FP8: the dequantized weight

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **kwargs) -> TritonDecodeLinear:
        """The layer of an exactly 2:4 `nn.Linear` (fp16/bf16); `kwargs` as the constructor's."""
        return cls(linear.weight, linear.bias, **kwargs)

    def _pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(values, meta, scale)` of a dense 2:4 weight (scale None unless FP8); errors name the layer."""
        try:
            if self.fp8:
                return triton_decode.compress_fp8(weight)
            return (*triton_decode.compress(weight), None)
        except ValueError as err:
            raise ValueError(f"{self.label}: {err}") from None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (decompressed on each access when no dense copy is kept: use it sparingly); in the FP8
        mode the e4m3 values times their scales, in the layer's dtype."""
        if self.dense_weight is not None:
            return self.dense_weight
        return self._unpacked()

    def _unpacked(self) -> torch.Tensor:
        if self.scale is not None:
            return triton_decode.dequantize(self.values, self.meta, self.scale, self.in_features).to(self.dtype)
        return triton_decode.decompress(self.values, self.meta, self.in_features)

    @property
    def weight_bytes(self) -> int:
        """The bytes the weight is held in: 9/16 of the dense bytes (FP8: 5/16 of the fp16 dense bytes, 0.625 a
        weight, plus a 4-byte scale per output feature), plus the dense copy where one is kept."""
        tensors = (self.values, self.meta, self.scale, self.dense_weight)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        kinds = "e4m3 " if self.scale is not None else ""
        kinds += "compressed 2:4 (Triton decode" + (", per-output-feature scales)" if self.fp8 else ")")
        kinds += "+dense" if self.dense_weight is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weights={kinds}"
        )

    def _apply(self, fn, recurse=True):
        # The values are weights of the layer's dtype (FP8: e4m3, with float32 scales) and the metadata int32
        # positions (which floating-point casts leave alone), so a cast between float16 and bfloat16, or a move,
        # keeps the layout valid; other dtypes are refused here, the layer unchanged. FP8 values and scales are only
        # moved: a cast changes the dtype of the layer's activations, bias and output, not its quantized weight.
        problem = self.cast_problem(fn)
        if problem:
            raise TypeError(problem)
        GENERATION[0] += 1  # CUDA graphs captured over this layer read its old tensors
        dtype, device = _probe(fn, self.meta.new_empty(0, dtype=self._dtype))
        quantized = {name: self._buffers[name] for name in ("values", "scale")} if self.fp8 else {}
        self._buffers.update(dict.fromkeys(quantized))  # None: skipped by the cast
        try:
            result = super()._apply(fn, recurse)
        finally:
            self._buffers.update(quantized)
        self._buffers.update({name: tensor.to(device) for name, tensor in quantized.items()})
        self._dtype = dtype
        return result

    def cast_problem(self, fn) -> str | None:
        """Why `model._apply(fn)` would be refused by this layer, or None (see `swap.guard_casts`)."""
        dtype, _ = _probe(fn, self.meta.new_empty(0, dtype=self._dtype))
        if dtype in SUPPORTED_DTYPES:
            return None
        return (
            f"{self.label}: a 2:4 layer on the Triton decode kernel runs float16 or bfloat16 weights; cannot make it "
            f"{dtype_name(dtype)}. Call hf_sparse.restore_dense_(model) first for a dense model you can cast "
            "anywhere."
        )

    def run_for(self, tokens: int) -> Run:
        """What a call with `tokens` rows runs: its bucket's `Run`, else the nearest tuned bucket's (dense only where
        the layer keeps a dense copy), else the kernel's default configuration."""
        bucket = token_bucket(tokens)
        run = self.runs.get(bucket) or (self.runs[nearest_bucket(self.runs, bucket)] if self.runs else None)
        if run is None or (run.kernel == DENSE_NAME and self.dense_weight is None):
            return Run("triton_decode", tuple(triton_decode.default_config(tokens)))
        return run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_dtype(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        run = self.run_for(x2.shape[0])
        if run.kernel == DENSE_NAME or x2.shape[0] == 0:
            out = F.linear(x2, self.weight, self.bias)
        elif torch.compiler.is_compiling():
            out = decode_linear_op()(x2.contiguous(), self.values, self.meta, self.bias, list(run.config), self.scale)
        else:  # eager (or a CUDA graph capture): the kernel directly, no dispatcher round trip
            if self.values.device.type != "cuda" and not _interpreting():
                raise RuntimeError(
                    f"{self.label}: a 2:4 layer on the Triton decode kernel runs on an NVIDIA GPU; its weights are on "
                    f"{self.values.device.type}. Move the model back (model.cuda()), or call "
                    "hf_sparse.restore_dense_(model) first for a dense model."
                )
            out = triton_decode.decode_linear(
                x2.contiguous(), self.values, self.meta, self.bias, run.config, self.scale
            )
        return out.view(*lead, self.out_features)

    def set_weight_(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: slice | None = None) -> None:
        """Replaces the weight (or the rows `rows` of it) with a dense 2:4 tensor, recompressing it (FP8: quantizing
        the replaced rows; the others keep their e4m3 values and scales exactly)."""
        with torch.no_grad():
            dtype = torch.float32 if self.fp8 else self.dtype  # FP8: quantized from the weight as given
            weight = new_weight(self, weight, rows, self.meta.device, dtype, True)
            target = slice(None) if rows is None else rows
            values, meta, scale = self._pack(weight[target])
            self.values[target] = values
            self.meta[target] = meta
            if scale is not None:
                self.scale[target] = scale
            if self.dense_weight is not None:
                self.dense_weight.copy_(self._unpacked())
            copy_bias(self, bias, rows)
