"""`TritonDecodeLinear`: a 2:4 layer run by the Triton decode kernel (`triton_decode.py`), fp16 or bf16, with an
optional dense copy for the token counts where dense is faster.

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
        lambda x, values, meta, bias, config: triton_decode.decode_linear(x, values, meta, bias, tuple(config)),
        "(Tensor x, Tensor values, Tensor meta, Tensor? bias, int[] config) -> Tensor",
        lambda x, values, meta, bias, config: x.new_empty((x.shape[0], values.shape[0])),
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonDecodeLinear(SwappedLinear):
    """`x @ W.T + b` for a 2:4 fp16/bf16 weight held in the Triton decode kernel's layout (`triton_decode.compress`:
    the kept values and 2-bit positions, 9/16 of the dense bytes), with an optional dense copy.

    Built by `swap_to_semi_structured_`; `state_dict()` emits the dense `weight` (exactly decompressed) and `bias`, so
    checkpoints stay ordinary.

    Args:
        weight: the dense 2:4 weight, `(out_features, in_features)`, fp16 or bf16 (a CUDA device to run it).
        bias: the bias, or None.
        runs: token-count bucket -> `Run` (this kernel in one configuration, or `"dense"` where the layer keeps a
            dense copy); a bucket not listed runs what the nearest one runs (it is not tuned later: name your token
            counts to the swap); none at all: `triton_decode.default_config`.
        keep_dense: also keep the dense weight, for the buckets where dense is faster.
        name: the layer's name, for messages.
        emits_state: whether `state_dict()` holds this layer's `weight`/`bias` (False for a fused group).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        runs: Mapping[int, Run] | None = None,
        keep_dense: bool = False,
        name: str = "",
        emits_state: bool = True,
    ):
        super().__init__(weight, bias, name=name, emits_state=emits_state)
        weight = weight.detach()
        if weight.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{self.label}: the Triton decode kernel runs float16 or bfloat16 weights, not "
                            f"{dtype_name(weight.dtype)}.")  # fmt: skip
        self.runs: dict[int, Run] = dict(runs or {})
        decode_linear_op()  # registering the op later, while torch.compile traces, would break the graph
        values, meta = triton_decode.compress(weight)
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("meta", meta, persistent=False)
        self.register_buffer("dense_weight", weight.clone().contiguous() if keep_dense else None, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (decompressed on each access when no dense copy is kept: use it sparingly)."""
        if self.dense_weight is not None:
            return self.dense_weight
        return triton_decode.decompress(self.values, self.meta, self.in_features)

    @property
    def weight_bytes(self) -> int:
        tensors = (self.values, self.meta, self.dense_weight)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        kinds = "compressed 2:4 (Triton decode)" + ("+dense" if self.dense_weight is not None else "")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weights={kinds}"
        )

    def _apply(self, fn, recurse=True):
        # The values are weights of the layer's dtype and the metadata int32 positions (which floating-point casts
        # leave alone), so a cast between float16 and bfloat16, or a move, keeps the layout valid; other dtypes are
        # refused here, the layer unchanged.
        problem = self.cast_problem(fn)
        if problem:
            raise TypeError(problem)
        GENERATION[0] += 1  # CUDA graphs captured over this layer read its old tensors
        return super()._apply(fn, recurse)

    def cast_problem(self, fn) -> str | None:
        """Why `model._apply(fn)` would be refused by this layer, or None (see `swap.guard_casts`)."""
        dtype, _ = _probe(fn, self.values)
        if dtype == self.values.dtype or dtype in SUPPORTED_DTYPES:
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
            out = decode_linear_op()(x2.contiguous(), self.values, self.meta, self.bias, list(run.config))
        else:  # eager (or a CUDA graph capture): the kernel directly, no dispatcher round trip
            if self.values.device.type != "cuda" and not _interpreting():
                raise RuntimeError(
                    f"{self.label}: a 2:4 layer on the Triton decode kernel runs on an NVIDIA GPU; its weights are on "
                    f"{self.values.device.type}. Move the model back (model.cuda()), or call "
                    "hf_sparse.restore_dense_(model) first for a dense model."
                )
            out = triton_decode.decode_linear(x2.contiguous(), self.values, self.meta, self.bias, run.config)
        return out.view(*lead, self.out_features)

    def set_weight_(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: slice | None = None) -> None:
        """Replaces the weight (or the rows `rows` of it) with a dense 2:4 tensor, recompressing it."""
        with torch.no_grad():
            weight = new_weight(self, weight, rows, self.values.device, self.dtype, True)
            values, meta = triton_decode.compress(weight)
            self.values.copy_(values)
            self.meta.copy_(meta)
            if self.dense_weight is not None:
                self.dense_weight.copy_(weight)
            copy_bias(self, bias, rows)
