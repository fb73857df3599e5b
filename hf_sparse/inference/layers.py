"""The layers a swapped model runs: `SwappedLinear` (what every swapped layer shares), `SemiStructuredLinear` (a
2:4 weight compressed for cuSPARSELt, with a dense fallback per token count), `FusedLinearSlice` (one of several
sibling layers fused into one GEMM), `GeluInEpilogue` (where a GELU was whose layer now runs it), and the custom op
that calls the cuSPARSELt kernel. The FP8 and CUTLASS layers are in `fp8.py` and `cutlass_linear.py`.

`swap_to_semi_structured_` (in `swap.py`) decides which layers become these; this module only runs them.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import is_nm
from . import cusparselt
from .cuda_graphs import GENERATION
from .kernels.base import DENSE_NAME, SUPPORTED_DTYPES, GemmRequest, Tuner, dtype_name, token_bucket
from .quantization import E4M3

logger = logging.getLogger(__name__)

KERNEL = "cusparselt"
"""The kernel (`kernels/cusparselt.py`) whose timings a `SemiStructuredLinear` asks for at a token count it meets
after the swap."""

# -- the layers ------------------------------------------------------------------------------------------------------


def _probe(fn, tensor: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    """The dtype and device `fn` (a `Module._apply` function) would give `tensor`, found on an empty tensor like it."""
    out = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
    return out.dtype, out.device


class Plan(NamedTuple):
    """How a `SemiStructuredLinear` or `CutlassSparseLinear` runs one token-count bucket: dense (`F.linear`), or its
    2:4 kernel with these settings (cuSPARSELt: algorithm id and split-k; CUTLASS: `alg_id` is the configuration)."""

    backend: str  # "sparse" or "dense"
    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int = -1

    def describe(self) -> str:
        if self.backend == "dense":
            return "dense"
        extra = f", split-k {self.split_k}/{self.split_k_mode}" if self.split_k != 1 else ""
        return f"sparse (alg {self.alg_id}{extra})"


_DENSE_PLAN = Plan("dense")
_OPS: dict = {}


def custom_op(name: str, fn, schema: str, fake):
    """`fn` registered once as the custom op `hf_sparse::<name>`, so `torch.compile` treats the kernel call as one
    opaque op whose output `fake` describes; `fn` itself where registration fails (other torch versions)."""
    found = _OPS.get(name)
    if found is not None:
        return found

    def run(*args):
        out = fn(*args)
        return out.clone() if out._base is not None else out  # a custom op returns no views of its temporaries

    try:
        op = torch.library.custom_op(f"hf_sparse::{name}", run, mutates_args=(), schema=schema)
        op.register_fake(fake)
    except Exception as err:  # pragma: no cover - registration differs across torch versions
        logger.debug("hf-sparse: custom op %s not registered (%s); calling the kernel directly.", name, err)
        op = run
    _OPS[name] = op
    return op


def _sparse_linear_op():
    """`hf_sparse::sparse_linear`: the cuSPARSELt call as one op of known output shape for `torch.compile` (the
    meta function of `aten::_cslt_sparse_mm` cannot infer it)."""
    return custom_op(
        "sparse_linear",
        _sparse_matmul,
        "(Tensor x, Tensor packed, Tensor? bias, int out_features, int alg_id, int split_k, int split_k_mode) "
        "-> Tensor",
        lambda x, packed, bias, out_features, *settings: x.new_empty((x.shape[0], out_features)),
    )


def _sparse_matmul(x, packed, bias, out_features, alg_id, split_k, split_k_mode, plans=None):
    """`x @ W.T + bias` through a kept cuSPARSELt plan (see `cusparselt`), else through `torch._cslt_sparse_mm`
    (which sets a plan up on every call). `plans`: a layer's own (rows, settings) -> plan dict, to skip the global
    lookup."""
    rows = x.shape[0]
    pad = (-rows) % 8  # cuSPARSELt needs the dense operand's dimensions to be multiples of 8
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    if cusparselt.available():
        key = (x.shape[0], alg_id, split_k, split_k_mode)
        plan = None if plans is None else plans.get(key)
        if plan is None or (bias is not None and plan.key.bias_ptr != bias.data_ptr()):
            plan = cusparselt.plan_for(x, packed, bias, out_features, alg_id, split_k, split_k_mode)
            if plans is not None:
                plans[key] = plan
        out = plan(x, packed)
    else:
        out = cusparselt.cslt_linear(x, packed, bias, alg_id, split_k, split_k_mode)
    return out[:rows] if pad else out


def _compress(weight: torch.Tensor) -> torch.Tensor:
    return torch._cslt_compress(weight.contiguous())


def _decompress(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    # The sparse kernel times an identity matrix: each output is one weight times 1.0 plus exact zeros, so the
    # dense weight comes back bit for bit.
    eye = torch.eye(in_features, dtype=packed.dtype, device=packed.device)
    return torch._cslt_sparse_mm(packed, eye)


def nearest_bucket(table: dict, bucket: int) -> int:
    """The key of `table` (token-count buckets, powers of two) nearest to `bucket` on a log scale."""
    return min(table, key=lambda b: abs(math.log2(b) - math.log2(bucket)))


class SwappedLinear(nn.Module):
    """What every layer the swap installs shares: its shape and name, the bias as a non-persistent buffer, and the
    `state_dict()` hooks that emit (and load) the ordinary dense `weight` and `bias` instead of the layer's own
    buffers, so checkpoints stay ordinary.

    Args:
        weight: the dense weight, `(out_features, in_features)` (only its shape is read here).
        bias: the bias, or None (copied).
        name: the layer's name, for messages.
        emits_state: whether `state_dict()` holds this layer's `weight`/`bias` (False for a fused group, whose
            member layers emit their own slices).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, name: str = "", emits_state: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.name = name
        self.emits_state = emits_state
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.register_state_dict_post_hook(_emit_state)
        self.register_load_state_dict_pre_hook(_load_state)

    @property
    def label(self) -> str:
        """The layer's name, or its class where it has none, to begin messages with."""
        return self.name or type(self).__name__

    def cast_problem(self, fn) -> str | None:
        """Why `model._apply(fn)` (`.to()`, `.float()`, `.cpu()`, ...) would be refused by this layer, or None: asked
        of every swapped layer before a swapped model casts anything (see `swap.guard_casts`)."""
        return None

    def compact_fp8_tensors(self) -> tuple[torch.Tensor, torch.Tensor, float | None] | None:
        """What a compact FP8 checkpoint stores under this layer's name (e4m3 weight, float32 row scales, static input
        scale or None; see `Fp8Linear`), or None: this layer holds no FP8 weight (its dense `weight` is saved)."""
        return None

    def check_input_dtype(self, x: torch.Tensor) -> None:
        if x.dtype != self.dtype:
            raise TypeError(
                f"{self.label}: input is {dtype_name(x.dtype)} but the weights are {dtype_name(self.dtype)}; cast "
                "the inputs (or run under torch.autocast with that dtype)."
            )


class SemiStructuredLinear(SwappedLinear):
    """A linear layer whose 2:4 weight is held compressed for cuSPARSELt, with a per-token-count dense fallback.

    Built by `swap_to_semi_structured_`; not an `nn.Linear` subclass, so pruning code never mistakes it for a
    trainable layer. Every tensor is a non-persistent buffer; `state_dict()` emits the dense `weight` (exactly
    decompressed) and `bias`, so checkpoints stay ordinary.

    Args:
        weight: the dense 2:4 weight, `(out_features, in_features)`, fp16/bf16 on a CUDA device; None for a purely
            dense layer (the fused dense baseline).
        bias: the bias, or None.
        plans: token-count bucket -> `Plan`; buckets not listed are tuned on first use (see `Autotuner`).
        keep_dense: also keep the dense weight, for buckets where dense is faster.
        tuner: the autotuner (`Autotuner`) consulted for new buckets; None runs the nearest known plan.
        name: the layer's name, for messages.
        emits_state: whether `state_dict()` holds this layer's `weight`/`bias` (False for a fused group, whose
            member layers emit their own slices).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        sparse: bool = True,
        plans: dict[int, Plan] | None = None,
        keep_dense: bool = False,
        tuner: Tuner | None = None,
        name: str = "",
        emits_state: bool = True,
    ):
        super().__init__(weight, bias, name=name, emits_state=emits_state)
        weight = weight.detach()
        self.tuner = tuner
        self.plans: dict[int, Plan] = dict(plans or {})
        self._matmul_plans: dict = {}  # (rows, alg_id, split_k, split_k_mode) -> cusparselt.MatmulPlan
        self._eager: dict = {}  # (rows, dtype) -> the kernel that runs them, see forward
        if sparse:
            _sparse_linear_op()  # registering the op later, while torch.compile traces, would break the graph
        self.register_buffer("packed", _compress(weight) if sparse else None, persistent=False)
        self.register_buffer(
            "dense_weight", weight.clone().contiguous() if (keep_dense or not sparse) else None, persistent=False
        )

    def _apply(self, fn, recurse=True):
        # plans and fast paths point at this layer's tensors and device: rebuild them after .to()/.cuda()/.half()
        self._matmul_plans, self._eager = {}, {}
        GENERATION[0] += 1  # CUDA graphs captured over this layer read its old tensors
        packed, before = self.packed, dict(self._buffers)
        result = super()._apply(fn, recurse)
        if packed is not None and self.packed is not None and self.packed.dtype != packed.dtype:
            # A cast converted the compressed bytes as if they were values (the metadata with them): recompress
            # from the exact dense weight instead.
            dtype, device = self.packed.dtype, self.packed.device
            if dtype not in SUPPORTED_DTYPES or device.type != "cuda" or packed.device.type != "cuda":
                self._buffers.update(before)  # this layer stays as it was
                raise TypeError(self.cast_problem(fn))
            self.packed = _compress(_decompress(packed, self.out_features, self.in_features).to(device, dtype))
            self.plans = {}  # tuned for the old dtype: tuned again, lazily, for the new one
        return result

    def cast_problem(self, fn) -> str | None:
        """Why `model._apply(fn)` would be refused by this layer, or None (see `SwappedLinear.cast_problem`)."""
        if self.packed is None:
            return None
        dtype, device = _probe(fn, self.packed)
        if dtype == self.packed.dtype:  # a move keeps the compressed bytes valid (it runs again once back on a GPU)
            return None
        if dtype not in SUPPORTED_DTYPES or device.type != "cuda" or self.packed.device.type != "cuda":
            return (
                f"{self.label}: a swapped layer runs float16 or bfloat16 weights on the "
                f"GPU; cannot make it {dtype_name(dtype)} on {device.type}. Call hf_sparse.restore_dense_(model) "
                "first for a dense model you can cast anywhere."
            )
        return None

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_matmul_plans"], state["_eager"] = {}, {}  # host handles and closures: a copy builds its own
        return state

    @property
    def dtype(self) -> torch.dtype:
        return (self.packed if self.packed is not None else self.dense_weight).dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (decompressed on each access for a sparse-only layer: use it sparingly)."""
        if self.dense_weight is not None:
            return self.dense_weight
        return _decompress(self.packed, self.out_features, self.in_features)

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.dense_weight) if t is not None)

    def extra_repr(self) -> str:
        kinds = [k for k, t in (("compressed 2:4", self.packed), ("dense", self.dense_weight)) if t is not None]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weights={'+'.join(kinds)}"
        )

    def plan(self, tokens: int) -> Plan:
        """How a call with `tokens` rows runs (tuning the bucket first if it is new and tuning is possible)."""
        if self.packed is None:
            return _DENSE_PLAN  # constant: no dict lookups or writes for torch.compile to guard on
        bucket = token_bucket(tokens)
        found = self.plans.get(bucket)
        if found is None:
            found = self._new_plan(bucket, tokens)
        return found

    def _new_plan(self, bucket: int, tokens: int) -> Plan:
        busy = torch.compiler.is_compiling() or (
            torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        )
        if self.tuner is None or busy:
            # No timing inside a capture or a trace: use the plan of the nearest tuned bucket (not stored, so the
            # bucket is tuned properly at the next eager call).
            if not self.plans:
                return Plan("sparse")
            near = self.plans[nearest_bucket(self.plans, bucket)]
            return near if (near.backend == "sparse" or self.dense_weight is not None) else Plan("sparse")
        from .policy import bucket_run

        gemm = GemmRequest(KERNEL, self.out_features, self.in_features, self.dtype, self.bias is not None, tokens)
        dense, own = self.tuner.timings([gemm.on(DENSE_NAME), gemm], self.packed.device)
        run = bucket_run(KERNEL, dense, own, self.tuner.min_speedup, self.dense_weight is not None)
        self.plans[bucket] = Plan("sparse", *run.config) if run.kernel == KERNEL else _DENSE_PLAN
        return self.plans[bucket]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            # Eager calls of a token count seen before: one dict lookup, then the kernel (a dense F.linear or a kept
            # cuSPARSELt plan). An eager model is as fast as its host code, and this is what runs per layer.
            rows = x.numel() // self.in_features
            fast = self._eager.get((rows, x.dtype))
            if fast is not None and x.shape[-1] == self.in_features:
                return fast(x.reshape(rows, self.in_features).contiguous()).view(*x.shape[:-1], self.out_features)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_dtype(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        plan = self.plan(x2.shape[0])
        if plan.backend == "dense" or x2.shape[0] == 0:
            out = F.linear(x2, self.weight, self.bias)
        elif torch.compiler.is_compiling():
            out = _sparse_linear_op()(
                x2, self.packed, self.bias, self.out_features, plan.alg_id, plan.split_k, plan.split_k_mode
            )
        else:  # eager (or a CUDA graph capture): the layer's kept plans, no dispatcher round trip
            out = _sparse_matmul(
                x2,
                self.packed,
                self.bias,
                self.out_features,
                plan.alg_id,
                plan.split_k,
                plan.split_k_mode,
                self._matmul_plans,
            )
            self._remember(x2.shape[0], x.dtype, plan)
        if plan.backend == "dense":
            self._remember(x2.shape[0], x.dtype, plan)
        return out.view(*lead, self.out_features)

    def _remember(self, rows: int, dtype: torch.dtype, plan: Plan) -> None:
        """Keeps the kernel this token count runs, for the eager fast path (only a tuned bucket's settled plan)."""
        if rows == 0 or torch.compiler.is_compiling():
            return
        if self.packed is not None and token_bucket(rows) not in self.plans:
            return
        weight, bias = self.dense_weight, self.bias
        if plan.backend == "dense":
            if weight is not None:
                self._eager[(rows, dtype)] = lambda x: F.linear(x, weight, bias)
            return
        matmul = self._matmul_plans.get((rows, plan.alg_id, plan.split_k, plan.split_k_mode))
        if matmul is not None and rows % 8 == 0:
            packed = self.packed
            self._eager[(rows, dtype)] = lambda x: matmul(x, packed)

    # -- dense weights in and out ----------------------------------------------------------------------------------

    def set_weight_(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: slice | None = None) -> None:
        """Replaces the weight (or the rows `rows` of it) with a dense 2:4 tensor, recompressing it."""
        with torch.no_grad():
            device = (self.packed if self.packed is not None else self.dense_weight).device
            weight = new_weight(self, weight, rows, device, self.dtype, self.packed is not None)
            if self.packed is not None:
                self.packed.copy_(_compress(weight))
            if self.dense_weight is not None:
                self.dense_weight.copy_(weight)
            copy_bias(self, bias, rows)


def new_weight(
    layer, weight: torch.Tensor, rows: slice | None, device, dtype, sparse: bool, current: torch.Tensor | None = None
) -> torch.Tensor:
    """The full dense weight a layer's `set_weight_` installs: `weight` (or the rows `rows` of it, spliced into
    `current`, default the layer's weight) on the layer's device and dtype, checked against the layer's shape (and
    2:4 when the layer runs sparse)."""
    weight = weight.to(device=device, dtype=dtype)
    if rows is not None:
        full = (layer.weight if current is None else current).to(dtype).clone()
        full[rows] = weight
        weight = full
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"{layer.name}: weight of shape {tuple(weight.shape)} does not fit a layer of shape "
            f"({layer.out_features}, {layer.in_features})."
        )
    if sparse and not is_nm(weight, 2, 4):
        raise ValueError(f"{layer.name}: the new weight is not 2:4; prune it first (hf_sparse.prune_).")
    return weight


def copy_bias(layer, bias: torch.Tensor | None, rows: slice | None) -> None:
    if bias is not None and layer.bias is not None:
        target = layer.bias if rows is None else layer.bias[rows]
        target.copy_(bias.to(target))


def _emit_state(module, state_dict, prefix, local_metadata) -> None:
    if isinstance(module, FusedLinearSlice):
        fused, rows = module.fused, module.rows
        state_dict[prefix + "weight"] = fused.weight[rows].detach().clone()
        if fused.bias is not None:
            state_dict[prefix + "bias"] = fused.bias[rows].detach().clone()
        return
    if not module.emits_state:  # a fused group: its member layers emit their slices
        return
    state_dict[prefix + "weight"] = module.weight.detach().clone()
    if module.bias is not None:
        state_dict[prefix + "bias"] = module.bias.detach().clone()


def _load_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    fused = isinstance(module, FusedLinearSlice)
    if not fused and not module.emits_state:
        return
    has_bias = (module.fused.bias if fused else module.bias) is not None
    weight = state_dict.pop(prefix + "weight", None)
    bias = state_dict.pop(prefix + "bias", None) if has_bias else None
    if weight is None:
        missing_keys.append(prefix + "weight")
        return
    if has_bias and bias is None:
        missing_keys.append(prefix + "bias")
    try:
        if fused:
            module.fused.set_weight_(weight, bias, rows=module.rows)
        else:
            module.set_weight_(weight, bias)
    except ValueError as err:
        error_msgs.append(f"{prefix}weight: {err}")


class _FusedGroup:
    """Shares one fused GEMM among sibling layers called on the same input (query, key, value)."""

    def __init__(self, fused: SemiStructuredLinear, names: list[str]):
        self.fused = fused
        self.names = names
        self._input = None
        self._version = -1
        self._output = None
        self._served: set[int] = set()
        self._warned = False

    def output(self, x: torch.Tensor, index: int, rows: slice) -> torch.Tensor:
        # While torch.compile traces, tensor identity is known but a tensor's version is not (it would break the
        # graph): inputs are not modified in place between sibling calls inside a compiled region.
        compiling = torch.compiler.is_compiling()
        changed = self._input is not x or (not compiling and x._version != self._version)
        if changed or index in self._served:
            if self._served and len(self._served) < len(self.names) and not self._warned:
                self._warned = True
                logger.warning(
                    "hf-sparse: fused layers %s were called on different inputs, so each call computes all of "
                    "them; swap with fuse_qkv=False for this model.",
                    self.fused.name,
                )
            self._output = self.fused(x)
            self._version = -1 if compiling else x._version
            self._input, self._served = x, set()
        self._served.add(index)
        out = self._output[..., rows]
        if len(self._served) == len(self.names):
            self._input = self._output = None  # every member served: hold no activations
        return out


class GeluInEpilogue(nn.Module):
    """Stands where a GELU module was, after a layer that applies GELU in its GEMM's epilogue. After an `Fp8Linear`
    it passes that layer's e4m3 output through unchanged and applies the original activation to anything else (so a
    call that does not come from the fused layer stays right); after a `CutlassSparseLinear` (`passes_all`), whose output
    is float16, it passes every input through (the block calls it only on that layer's output). `restore_dense_` puts
    the original back."""

    def __init__(self, original: nn.Module, passes_all: bool = False):
        super().__init__()
        self.original = original
        self.passes_all = passes_all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if (self.passes_all or x.dtype == E4M3) else self.original(x)


class FusedLinearSlice(nn.Module):
    """One of several sibling layers fused into a single GEMM (e.g. `key` of query/key/value).

    Its output is a column slice of the fused output (no copy). `state_dict()` emits its own rows of the fused
    weight and bias under its original `weight`/`bias` keys.
    """

    def __init__(self, group: _FusedGroup, index: int, rows: slice):
        super().__init__()
        object.__setattr__(self, "_group", group)  # not a submodule: the fused layer lives on the parent
        self.index = index
        self.rows = rows
        self.in_features = group.fused.in_features
        self.out_features = rows.stop - rows.start
        self.register_state_dict_post_hook(_emit_state)
        self.register_load_state_dict_pre_hook(_load_state)

    @property
    def fused(self) -> SemiStructuredLinear:
        return self._group.fused

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight[self.rows]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.fused.bias is None else self.fused.bias[self.rows]

    def extra_repr(self) -> str:
        return f"rows {self.rows.start}:{self.rows.stop} of {self.fused.name}"

    def compact_fp8_tensors(self) -> tuple[torch.Tensor, torch.Tensor, float | None] | None:
        """This member's rows of its FP8 fused group's `e4m3_tensors()`, for a compact FP8 checkpoint; None when the
        group is not FP8."""
        whole = getattr(self.fused, "e4m3_tensors", None)
        if whole is None:
            return None
        values, scales, input_scale = whole()
        return values[self.rows], scales[self.rows], input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.output(x, self.index, self.rows)
