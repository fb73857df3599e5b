"""`CutlassSparseLinear`: an fp16 2:4 layer run by the CUTLASS sm90 kernel, with the GELU after it in the kernel's
epilogue where the layer starts a feed-forward block.

A BERT-family feed-forward block computes `gelu(intermediate.dense(x))`. Swapped to cuSPARSELt, the layer's output
(the widest of the model: 3072 features in BERT-base) is written, then read and written again by a separate GELU
kernel, nearly as slow as the 2:4 GEMM itself (the README has the measurement). With `gelu=True`,
`CutlassSparseLinear` runs `gelu(x @ W.T + b)` as one CUTLASS sm90 2:4 GEMM with the bias and GELU in its epilogue
(`cutlass.py`), and the GELU module after it becomes a `GeluInEpilogue` that passes its input through. Without GELU
it is the same kernel with the bias alone, which beats cuSPARSELt on some shapes. Where dense wins (few tokens) and
the layer keeps a dense copy, that token
count runs `F.linear` (and GELU) instead.

`swap_to_semi_structured_` installs it where the autotuner measures it faster than the cuSPARSELt layer (plus the
separate GELU step; `policy.py`); `kernels/cutlass.py` builds it; this module only runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cutlass
from .cuda_graphs import GENERATION
from .kernels.base import dtype_name, token_bucket
from .layers import Plan, SwappedLinear, _probe, copy_bias, custom_op, nearest_bucket, new_weight


def cutlass_linear_op():
    """`hf_sparse::cutlass_sparse_linear`: the CUTLASS 2:4 GEMM with the bias (and GELU) in its epilogue, as one op of
    known output shape for `torch.compile`."""
    return custom_op(
        "cutlass_sparse_linear",
        cutlass.sparse_linear,
        "(Tensor x, Tensor values, Tensor meta, Tensor? bias, int out_features, int config, bool gelu) -> Tensor",
        lambda x, values, meta, bias, out_features, config, gelu: x.new_empty((x.shape[0], out_features)),
    )


def _decompress(values: torch.Tensor, meta: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    # The kernel times an identity matrix, without GELU: each output is one weight times 1.0 plus exact zeros, so
    # the dense weight comes back bit for bit (transposed: the identity is the activation operand).
    eye = torch.eye(in_features, dtype=values.dtype, device=values.device)
    return cutlass.sparse_linear(eye, values, meta, None, out_features).t().contiguous()


class CutlassSparseLinear(SwappedLinear):
    """`x @ W.T + b` (`gelu=True`: `gelu(x @ W.T + b)`) for a 2:4 fp16 weight in one CUTLASS kernel, with an optional
    dense copy for the token counts where dense is faster.

    Built by `swap_to_semi_structured_` (with `gelu=True` for the first layer of a `GELU_BLOCKS` block);
    `state_dict()` emits the dense `weight` (exactly decompressed) and `bias`, as `SemiStructuredLinear` does, so
    checkpoints stay ordinary.

    Args:
        weight: the dense 2:4 weight, `(out_features, in_features)`, fp16 on an sm_90 GPU.
        bias: the bias, or None.
        gelu: apply the exact GELU to the output (in the kernel's epilogue, or after the dense fallback).
        plans: token-count bucket -> `Plan` ("sparse" with `alg_id` the CUTLASS configuration, or "dense"); a
            bucket not listed runs the plan of the nearest one (it is not tuned later: name your token counts to the
            swap).
        keep_dense: also keep the dense weight, for buckets where dense (the GEMM, then GELU) is faster.
        name: the layer's name, for messages.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        gelu: bool = False,
        plans: dict[int, Plan] | None = None,
        keep_dense: bool = False,
        name: str = "",
    ):
        super().__init__(weight, bias, name=name)
        weight = weight.detach()
        self.gelu = bool(gelu)
        self.plans: dict[int, Plan] = dict(plans or {})
        cutlass_linear_op()  # registering the op later, while torch.compile traces, would break the graph
        values, meta = cutlass.compress(weight)
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
        return _decompress(self.values, self.meta, self.out_features, self.in_features)

    @property
    def weight_bytes(self) -> int:
        tensors = (self.values, self.meta, self.dense_weight)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        kinds = "compressed 2:4 (CUTLASS)" + ("+dense" if self.dense_weight is not None else "")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weights={kinds}{', GELU in the epilogue' if self.gelu else ''}"
        )

    def _apply(self, fn, recurse=True):
        # A cast of this layer alone (not through the swapped model's guard) is refused here, the layer unchanged:
        # the kernel reads its buffers as float16 values and uint8 metadata whatever their dtype says.
        problem = self.cast_problem(fn)
        if problem:
            raise TypeError(problem)
        GENERATION[0] += 1  # CUDA graphs captured over this layer read its old tensors
        return super()._apply(fn, recurse)

    def cast_problem(self, fn) -> str | None:
        """Why `model._apply(fn)` would be refused by this layer, or None (see `swap.guard_casts`): the compressed
        weight stays float16; a move keeps it valid (it runs again once back on an sm_90 GPU)."""
        dtype, _ = _probe(fn, self.values)
        if dtype == self.values.dtype:
            return None
        return (
            f"{self.label}: a 2:4 layer on the CUTLASS kernel runs float16 weights; cannot "
            f"make it {dtype_name(dtype)}. Call hf_sparse.restore_dense_(model) first for a dense model you can cast "
            "anywhere."
        )

    def plan(self, tokens: int) -> Plan:
        """How a call with `tokens` rows runs: the plan of its bucket, else of the nearest tuned bucket."""
        if not self.plans:
            return Plan("sparse")
        bucket = token_bucket(tokens)
        found = self.plans.get(bucket)
        if found is None:
            found = self.plans[nearest_bucket(self.plans, bucket)]
        if found.backend == "dense" and self.dense_weight is None:
            return Plan("sparse")
        return found

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_dtype(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        plan = self.plan(x2.shape[0])
        if plan.backend == "dense" or x2.shape[0] == 0:
            out = F.linear(x2, self.weight, self.bias)
            out = F.gelu(out) if self.gelu else out
        elif torch.compiler.is_compiling():
            out = cutlass_linear_op()(
                x2.contiguous(), self.values, self.meta, self.bias, self.out_features, plan.alg_id, self.gelu
            )
        else:  # eager (or a CUDA graph capture): the kernel directly, no dispatcher round trip
            if self.values.device.type != "cuda":
                raise RuntimeError(
                    f"{self.label}: a 2:4 layer on the CUTLASS kernel runs on an sm_90 GPU "
                    f"(H100, H200); its weights are on {self.values.device.type}. Move the model back (model.cuda()), "
                    "or call hf_sparse.restore_dense_(model) on the GPU first for a dense model."
                )
            try:
                out = cutlass.sparse_linear(
                    x2.contiguous(), self.values, self.meta, self.bias, self.out_features, plan.alg_id, self.gelu
                )
            except (cutlass.CutlassError, ValueError) as err:
                raise type(err)(f"{self.label}: {err}") from err
        return out.view(*lead, self.out_features)

    def set_weight_(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: slice | None = None) -> None:
        """Replaces the weight (or the rows `rows` of it) with a dense 2:4 tensor, recompressing it."""
        with torch.no_grad():
            weight = new_weight(self, weight, rows, self.values.device, self.dtype, True)
            values, meta = cutlass.compress(weight)
            self.values.copy_(values)
            self.meta.copy_(meta)
            if self.dense_weight is not None:
                self.dense_weight.copy_(weight)
            copy_bias(self, bias, rows)
