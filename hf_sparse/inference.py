"""Fast 2:4 inference: swap a model's 2:4 `nn.Linear` layers for cuSPARSELt kernels, never slower than dense.

`swap_to_semi_structured_` replaces every exactly-2:4 `nn.Linear` with a `SemiStructuredLinear` that holds the
weight compressed by cuSPARSELt (values + metadata: 56% of the fp16/bf16 weight's bytes) and calls
`torch._cslt_sparse_mm` directly: bias fused, output written row-major as the next op reads it, and the
algorithm / split-k setting chosen per token count by the `Autotuner`. Where the dense GEMM is faster (small
token counts, small shapes), the layer runs dense instead, so the sparse model is never slower than its dense
twin. Sibling projections that read the same input (`query`/`key`/`value`) are fused into one GEMM, which is
where the sparse kernel gains most on BERT-sized layers.

`torch._cslt_sparse_mm` spends ~0.2 s of host time per call setting its cuSPARSELt plan up (H200), so run the
swapped model under CUDA graphs (`hf_sparse.cuda_graphs(model)`), or compile it first (`torch.compile(model,
dynamic=False)`, which also fuses the element-wise work between the GEMMs) and then run it under CUDA graphs; give
the dense model you compare against the same treatment.

A swapped model still saves as an ordinary dense checkpoint (`...weight`/`...bias` keys, exact zeros):
`state_dict()` decompresses the weights exactly, and `load_state_dict` recompresses them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .autotune import Autotuner, GemmChoice, cslt_linear, default_tuner, dtype_name, split_k_supported, token_bucket
from .config import SparsityConfig
from .masks import is_nm
from .selection import select_layers

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_FUSE_GROUPS: tuple[tuple[str, ...], ...] = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
"""Sibling `nn.Linear` names fused into one GEMM by default (self-attention projections reading one input)."""
DEFAULT_TOKEN_COUNTS: tuple[int, ...] = (512, 2048, 8192, 32768, 131072)
"""Token counts (batch x sequence length) tuned at swap time when none are given."""
FALLBACKS = ("copy", "none")
_ALIGN = 16  # cuSPARSELt needs both weight dimensions to be multiples of 16 for fp16/bf16


# -- support ---------------------------------------------------------------------------------------------------------


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
    return support_problem(
        "cuda",
        dtype,
        torch.cuda.get_device_capability(device),
        torch.cuda.get_device_name(device),
        torch.backends.cusparselt.is_available(),
        layer,
    )


# -- the report ------------------------------------------------------------------------------------------------------


@dataclass
class LayerSwap:
    """What `swap_to_semi_structured_` did with one layer (or one group of fused layers).

    `status` is "sparse" (compressed weight only), "sparse+dense" (compressed weight plus a dense copy for the
    token counts where dense is faster), "dense" (a 2:4 layer kept dense, see `reason`), or "not 2:4".
    """

    name: str
    shape: tuple[int, int]
    status: str
    reason: str
    dense_bytes: int
    bytes: int
    plans: dict[int, str] = field(default_factory=dict)

    @property
    def memory_ratio(self) -> float:
        return self.bytes / self.dense_bytes if self.dense_bytes else 1.0


class SwapReport(list):
    """Per-layer result of `swap_to_semi_structured_`: a list of `LayerSwap`, with memory totals and a table."""

    def rows(self, *statuses: str) -> list[LayerSwap]:
        return [r for r in self if r.status in statuses]

    @property
    def swapped(self) -> list[LayerSwap]:
        return self.rows("sparse", "sparse+dense")

    @property
    def memory_ratio(self) -> float:
        """Weight bytes of the swapped layers after the swap over their dense fp16/bf16 bytes."""
        rows = self.swapped
        dense = sum(r.dense_bytes for r in rows)
        return sum(r.bytes for r in rows) / dense if dense else 1.0

    @property
    def memory_ratio_2_4(self) -> float:
        """The same over every 2:4 layer, the ones kept dense included (they count 1.0)."""
        rows = self.rows("sparse", "sparse+dense", "dense")
        dense = sum(r.dense_bytes for r in rows)
        return sum(r.bytes for r in rows) / dense if dense else 1.0

    def format(self) -> str:
        if not self:
            return "(no layers)"
        width = max(len(r.name) for r in self)
        lines = [f"{'layer':<{width}}  {'out x in':>11}  {'status':<12}  {'memory':>6}  why"]
        for r in self:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(f"{r.name:<{width}}  {shape:>11}  {r.status:<12}  {r.memory_ratio:6.3f}  {r.reason}")
        lines.append(
            f"{len(self.swapped)} of {len(self.rows('sparse', 'sparse+dense', 'dense'))} 2:4 layer(s) swapped; "
            f"weight memory of the swapped layers: {self.memory_ratio:.3f}x dense "
            f"(all 2:4 layers: {self.memory_ratio_2_4:.3f}x)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# -- the layers ------------------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """How a layer runs at one token-count bucket."""

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
_OP = None


def _sparse_linear_op():
    """`hf_sparse::sparse_linear` as a custom op, so `torch.compile` treats the cuSPARSELt call as one opaque
    kernel with a known output shape (the meta function of `aten::_cslt_sparse_mm` cannot infer it)."""
    global _OP
    if _OP is not None:
        return _OP

    def sparse_linear(x, packed, bias, out_features, alg_id, split_k, split_k_mode):
        rows = x.shape[0]
        pad = (-rows) % 8  # cuSPARSELt needs the dense operand's dimensions to be multiples of 8
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        out = cslt_linear(x, packed, bias, alg_id, split_k, split_k_mode)
        return out[:rows].clone() if pad else out

    try:
        op = torch.library.custom_op(
            "hf_sparse::sparse_linear",
            sparse_linear,
            mutates_args=(),
            schema="(Tensor x, Tensor packed, Tensor? bias, int out_features, int alg_id, int split_k, "
            "int split_k_mode) -> Tensor",
        )

        @op.register_fake
        def _(x, packed, bias, out_features, alg_id, split_k, split_k_mode):
            return x.new_empty((x.shape[0], out_features))

        _OP = op
    except Exception as err:  # pragma: no cover - registration differs across torch versions
        logger.debug("hf-sparse: custom op registration failed (%s); calling cuSPARSELt directly.", err)
        _OP = sparse_linear
    return _OP


def _compress(weight: torch.Tensor) -> torch.Tensor:
    return torch._cslt_compress(weight.contiguous())


def _decompress(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    # The sparse kernel times an identity matrix: each output is one weight times 1.0 plus exact zeros, so the
    # dense weight comes back bit for bit.
    eye = torch.eye(in_features, dtype=packed.dtype, device=packed.device)
    return torch._cslt_sparse_mm(packed, eye)


class SemiStructuredLinear(nn.Module):
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
        tuner: the `Autotuner` consulted for new buckets; None runs the nearest known plan.
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
        tuner: Autotuner | None = None,
        name: str = "",
        emits_state: bool = True,
    ):
        super().__init__()
        weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        self.name = name
        self.tuner = tuner
        self.plans: dict[int, Plan] = dict(plans or {})
        self.emits_state = emits_state
        if sparse:
            _sparse_linear_op()  # registering the op later, while torch.compile traces, would break the graph
        self.register_buffer("packed", _compress(weight) if sparse else None, persistent=False)
        self.register_buffer(
            "dense_weight", weight.clone().contiguous() if (keep_dense or not sparse) else None, persistent=False
        )
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.register_state_dict_post_hook(_emit_state)
        self.register_load_state_dict_pre_hook(_load_state)

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
            nearest = min(self.plans, key=lambda b: abs(math.log2(b) - math.log2(bucket)))
            near = self.plans[nearest]
            return near if (near.backend == "sparse" or self.dense_weight is not None) else Plan("sparse")
        choice = self.tuner.choice(
            self.out_features, self.in_features, self.dtype, self.bias is not None, tokens, self.packed.device
        )
        self.plans[bucket] = _plan_from(choice, self.dense_weight is not None)
        return self.plans[bucket]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(
                f"{self.name or 'SemiStructuredLinear'}: input is {dtype_name(x.dtype)} but the weights are "
                f"{dtype_name(self.dtype)}; cast the inputs (or run under torch.autocast with that dtype)."
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        plan = self.plan(x2.shape[0])
        if plan.backend == "dense" or x2.shape[0] == 0:
            out = F.linear(x2, self.weight, self.bias)
        else:
            out = _sparse_linear_op()(
                x2, self.packed, self.bias, self.out_features, plan.alg_id, plan.split_k, plan.split_k_mode
            )
        return out.view(*lead, self.out_features)

    # -- dense weights in and out ----------------------------------------------------------------------------------

    def set_weight_(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: slice | None = None) -> None:
        """Replaces the weight (or the rows `rows` of it) with a dense 2:4 tensor, recompressing it."""
        with torch.no_grad():
            device = (self.packed if self.packed is not None else self.dense_weight).device
            weight = weight.to(device=device, dtype=self.dtype)
            if rows is not None:
                full = self.weight.clone()
                full[rows] = weight
                weight = full
            if tuple(weight.shape) != (self.out_features, self.in_features):
                raise ValueError(
                    f"{self.name}: weight of shape {tuple(weight.shape)} does not fit a layer of shape "
                    f"({self.out_features}, {self.in_features})."
                )
            if self.packed is not None:
                if not is_nm(weight, 2, 4):
                    raise ValueError(f"{self.name}: the new weight is not 2:4; prune it first (hf_sparse.prune_).")
                self.packed.copy_(_compress(weight))
            if self.dense_weight is not None:
                self.dense_weight.copy_(weight)
            if bias is not None and self.bias is not None:
                target = self.bias if rows is None else self.bias[rows]
                target.copy_(bias.to(target))


def _plan_from(choice: GemmChoice, has_dense: bool) -> Plan:
    if choice.backend == "dense" and (has_dense or choice.sparse_ms is None):
        return Plan("dense")
    return Plan("sparse", choice.alg_id, choice.split_k, choice.split_k_mode)


def _emit_state(module, state_dict, prefix, local_metadata) -> None:
    if isinstance(module, SemiStructuredLinear):
        if not module.emits_state:
            return
        state_dict[prefix + "weight"] = module.weight.detach().clone()
        if module.bias is not None:
            state_dict[prefix + "bias"] = module.bias.detach().clone()
    else:  # FusedLinearSlice
        fused, rows = module.fused, module.rows
        state_dict[prefix + "weight"] = fused.weight[rows].detach().clone()
        if fused.bias is not None:
            state_dict[prefix + "bias"] = fused.bias[rows].detach().clone()


def _load_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    if isinstance(module, SemiStructuredLinear) and not module.emits_state:
        return
    has_bias = (module.bias if isinstance(module, SemiStructuredLinear) else module.fused.bias) is not None
    weight = state_dict.pop(prefix + "weight", None)
    bias = state_dict.pop(prefix + "bias", None) if has_bias else None
    if weight is None:
        missing_keys.append(prefix + "weight")
        return
    if has_bias and bias is None:
        missing_keys.append(prefix + "bias")
    try:
        if isinstance(module, SemiStructuredLinear):
            module.set_weight_(weight, bias)
        else:
            module.fused.set_weight_(weight, bias, rows=module.rows)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.output(x, self.index, self.rows)


# -- choosing what to swap -------------------------------------------------------------------------------------------


@dataclass
class _Unit:
    """One GEMM to decide on: a single layer, or sibling layers fused along the output dimension."""

    parent: nn.Module
    parent_name: str
    attrs: list[str]
    layers: list[nn.Linear]

    @property
    def name(self) -> str:
        base = f"{self.parent_name}." if self.parent_name else ""
        if len(self.attrs) == 1:
            return base + self.attrs[0]
        return base + "{" + ",".join(self.attrs) + "}"

    @property
    def shape(self) -> tuple[int, int]:
        return sum(m.out_features for m in self.layers), self.layers[0].in_features

    @property
    def has_bias(self) -> bool:
        return self.layers[0].bias is not None

    @property
    def weight(self) -> torch.Tensor:
        if len(self.layers) == 1:
            return self.layers[0].weight.detach()
        return torch.cat([m.weight.detach() for m in self.layers], dim=0)

    @property
    def bias(self) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        if len(self.layers) == 1:
            return self.layers[0].bias.detach()
        return torch.cat([m.bias.detach() for m in self.layers], dim=0)

    @property
    def dense_bytes(self) -> int:
        return sum(m.weight.numel() * m.weight.element_size() for m in self.layers)


def _named_linears(model: nn.Module, layers) -> tuple[dict[str, nn.Linear], bool]:
    """The candidate layers, and whether the user named them (then every one must be 2:4)."""
    modules = dict(model.named_modules())
    if layers is None:
        return {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}, False
    if isinstance(layers, SparsityConfig):
        if (layers.n, layers.m) != (2, 4):
            raise ValueError(
                f"semi-structured kernels run 2:4 sparsity only; the config's sparsity_pattern is "
                f"{layers.sparsity_pattern!r}."
            )
        return dict(select_layers(model, layers).targets), True
    if isinstance(layers, str):
        layers = [layers]
    names = list(layers)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing[:5]} in {type(model).__name__}.")
    not_linear = [n for n in names if not isinstance(modules[n], nn.Linear)]
    if not_linear:
        raise ValueError(
            f"modules {not_linear[:5]} are not nn.Linear ({type(modules[not_linear[0]]).__name__}); "
            "only nn.Linear layers can be swapped."
        )
    return {n: modules[n] for n in names}, True


def _split(name: str) -> tuple[str, str]:
    parent, _, attr = name.rpartition(".")
    return parent, attr


def _units(
    model: nn.Module, linears: dict[str, nn.Linear], fuse_groups: Sequence[Sequence[str]]
) -> tuple[list[_Unit], list[_Unit]]:
    """Splits the 2:4 candidates into units (fusing sibling groups) and the layers that are not 2:4."""
    modules = dict(model.named_modules())
    nm = {name: is_nm(layer.weight.detach(), 2, 4) for name, layer in linears.items()}
    taken: set[str] = set()
    units: list[_Unit] = []
    by_parent: dict[str, list[str]] = {}
    for name in linears:
        by_parent.setdefault(_split(name)[0], []).append(name)
    for parent_name, names in by_parent.items():
        parent = modules[parent_name] if parent_name else model
        attrs = {_split(n)[1]: n for n in names}
        if "cross" in type(parent).__name__.lower():
            continue  # cross-attention reads two inputs: query and key/value cannot share one GEMM
        for group in fuse_groups:
            if not all(a in attrs and nm[attrs[a]] for a in group):
                continue
            members = [linears[attrs[a]] for a in group]
            first = members[0]
            same = all(
                m.in_features == first.in_features
                and m.weight.dtype == first.weight.dtype
                and m.weight.device == first.weight.device
                and (m.bias is None) == (first.bias is None)
                for m in members
            )
            if same:
                units.append(_Unit(parent, parent_name, list(group), members))
                taken.update(attrs[a] for a in group)
    for name, layer in linears.items():
        if name in taken or not nm[name]:
            continue
        parent_name, attr = _split(name)
        units.append(_Unit(modules[parent_name] if parent_name else model, parent_name, [attr], [layer]))
    not_nm = [
        _Unit(modules[_split(n)[0]] if _split(n)[0] else model, _split(n)[0], [_split(n)[1]], [layer])
        for n, layer in linears.items()
        if not nm[n]
    ]
    order = {name: i for i, name in enumerate(linears)}

    def position(unit: _Unit) -> int:
        base = f"{unit.parent_name}." if unit.parent_name else ""
        return order[base + unit.attrs[0]]

    return sorted(units, key=position), sorted(not_nm, key=position)


def _fmt_speedups(choices: dict[int, GemmChoice], buckets: list[int]) -> str:
    parts = []
    for b in buckets:
        c = choices[b]
        parts.append(f"{c.tokens}: {c.speedup:.2f}x" if c.speedup else f"{c.tokens}: n/a")
    return ", ".join(parts)


def _decide(
    unit: _Unit, tuner: Autotuner | None, token_counts: Sequence[int], fallback: str
) -> tuple[str, str, dict[int, Plan]]:
    """(status, reason, plans) of one unit."""
    out_f, in_f = unit.shape
    if out_f % _ALIGN or in_f % _ALIGN:
        return (
            "dense",
            f"cuSPARSELt needs both dimensions to be multiples of {_ALIGN}; this GEMM is {out_f}x{in_f}",
            {},
        )
    if tuner is None or not token_counts:
        return "sparse", "not tuned (autotune off): sparse kernel with cuSPARSELt's default algorithm", {}
    dtype, device = unit.layers[0].weight.dtype, unit.layers[0].weight.device
    choices: dict[int, GemmChoice] = {}
    for tokens in token_counts:
        choices.setdefault(token_bucket(tokens), tuner.choice(out_f, in_f, dtype, unit.has_bias, tokens, device))
    buckets = sorted(choices)
    sparse_wins = [b for b in buckets if choices[b].backend == "sparse"]
    dense_wins = [b for b in buckets if choices[b].backend == "dense"]
    speed = f"sparse/dense speed-up by tokens: {_fmt_speedups(choices, buckets)}"
    if not sparse_wins:
        return "dense", f"dense is faster at every tuned token count ({speed})", {b: Plan("dense") for b in buckets}
    keep_dense = bool(dense_wins) and fallback == "copy"
    plans = {b: _plan_from(choices[b], keep_dense) for b in buckets}
    if not dense_wins:
        return "sparse", f"sparse is faster at every tuned token count ({speed})", plans
    if keep_dense:
        return "sparse+dense", f"dense copy kept for the token counts where dense is faster ({speed})", plans
    return (
        "sparse",
        f"compressed weight only (dense_fallback='none'): sparse runs where dense would be faster ({speed})",
        plans,
    )


# -- the public API --------------------------------------------------------------------------------------------------


def swap_to_semi_structured_(
    model: nn.Module,
    layers: SparsityConfig | Iterable[str] | None = None,
    *,
    fuse_qkv: bool | Sequence[Sequence[str]] = True,
    token_counts: Sequence[int] | None = DEFAULT_TOKEN_COUNTS,
    dense_fallback: str = "copy",
    autotune: bool | Autotuner = True,
) -> SwapReport:
    """Swaps a model's 2:4 `nn.Linear` layers for cuSPARSELt 2:4 kernels, in place, and reports what it did.

    Each swapped layer holds the compressed weight (56% of the dense bytes) and runs `torch._cslt_sparse_mm`
    with the bias fused and the output written in the layout the next op reads. For every distinct GEMM shape the
    `Autotuner` times dense against the sparse kernel's algorithms and split-k settings at each of `token_counts`
    (once per GPU and library versions: the results are cached on disk) and each layer uses the faster one per
    token-count bucket. Token counts met later are tuned on their first eager call.

    Nothing is changed when the call fails: named layers that are not exactly 2:4, weights on the CPU, a GPU older
    than compute capability 8.0, a PyTorch without cuSPARSELt, or fp32 weights raise an error that says what to do.

    Run the swapped model under CUDA graphs (`hf_sparse.cuda_graphs`), after `torch.compile(model, dynamic=False)`
    if you like: each eager cuSPARSELt call costs ~0.2 s of host time on an H200.

    Args:
        model: the model, with fp16 or bf16 weights on an NVIDIA GPU of compute capability >= 8.0.
        layers: which layers to swap: a `SparsityConfig` (its selection), or a list of module names; every one of
            them must be exactly 2:4. Default: every `nn.Linear` that is exactly 2:4 (others are reported as
            "not 2:4" and left as they are).
        fuse_qkv: fuse sibling projections that read the same input into one GEMM (`DEFAULT_FUSE_GROUPS`:
            query/key/value, q_proj/k_proj/v_proj), or a list of sibling-name groups. Fused layers keep their
            names and their `state_dict` keys.
        token_counts: token counts (batch size x sequence length) to tune at swap time; give those you will run.
            None or () tunes nothing now (each new bucket is tuned at its first eager call) and keeps no dense
            copies.
        dense_fallback: "copy" keeps a dense copy of the layers where dense is faster at some tuned token counts
            and sparse at others (fastest; those layers then take 1.56x the dense memory); "none" keeps only the
            compressed weights (least memory; the sparse kernel then runs where dense would be a bit faster).
            Layers where dense wins at every tuned token count stay dense either way.
        autotune: True uses the process-wide `Autotuner` (cache in `~/.cache/hf_sparse`), an `Autotuner` instance
            uses that one, False uses cuSPARSELt's default algorithm everywhere (no timing, no dense fallback).

    Returns:
        `SwapReport`: one `LayerSwap` per layer or fused group (status, reason, memory), also logged.

    Example:

    ```python
    >>> model = AutoModelForQuestionAnswering.from_pretrained(path, torch_dtype=torch.float16).cuda().eval()
    >>> report = hf_sparse.swap_to_semi_structured_(model, token_counts=[16 * 384, 64 * 384])
    >>> print(report)
    >>> fast = hf_sparse.cuda_graphs(model)
    >>> outputs = fast(**batch)
    ```
    """
    if dense_fallback not in FALLBACKS:
        raise ValueError(f"dense_fallback must be one of {list(FALLBACKS)}; got {dense_fallback!r}.")
    if fuse_qkv is True:
        fuse_groups: Sequence[Sequence[str]] = DEFAULT_FUSE_GROUPS
    elif fuse_qkv is False or fuse_qkv is None:
        fuse_groups = ()
    else:
        fuse_groups = [tuple(g) for g in fuse_qkv]
    counts = [int(t) for t in (token_counts or ())]
    if any(t < 1 for t in counts):
        raise ValueError(f"token_counts must be positive integers; got {list(token_counts)}.")

    linears, named = _named_linears(model, layers)
    units, not_nm = _units(model, linears, fuse_groups)
    if named and not_nm:
        names = [u.name for u in not_nm]
        raise ValueError(
            f"layers {names[:8]}{' ...' if len(names) > 8 else ''} are not exactly 2:4 (at most 2 nonzeros in every "
            "4 consecutive weights of a row); prune them first (hf_sparse.prune_ or SparsityCallback) or leave "
            "them out of `layers`. The model was not changed."
        )
    if not units:
        raise ValueError(
            f"no exactly-2:4 nn.Linear layer found in {type(model).__name__}; prune the model first "
            "(hf_sparse.prune_ or SparsityCallback). The model was not changed."
        )
    for unit in units:
        weight = unit.layers[0].weight
        problem = semi_structured_support(weight.device, weight.dtype, unit.name)
        if problem:
            raise RuntimeError(f"hf-sparse cannot swap {unit.name}: {problem} The model was not changed.")

    if autotune is False:
        tuner = None
    elif isinstance(autotune, Autotuner):
        tuner = autotune
    else:
        tuner = default_tuner()
    if tuner is not None and not split_k_supported():
        logger.info("hf-sparse: this PyTorch's _cslt_sparse_mm has no split-k arguments; tuning algorithms only.")

    # Decide everything before changing anything, so a failure leaves the model as it was.
    decisions = [_decide(unit, tuner, counts, dense_fallback) for unit in units]

    report = SwapReport()
    for unit, (status, reason, plans) in zip(units, decisions):
        sparse = status != "dense"
        if not sparse and len(unit.layers) == 1:
            report.append(LayerSwap(unit.name, unit.shape, status, reason, unit.dense_bytes, unit.dense_bytes, {}))
            continue
        new = SemiStructuredLinear(
            unit.weight,
            unit.bias,
            sparse=sparse,
            plans=plans,
            keep_dense=status == "sparse+dense",
            tuner=tuner,
            name=unit.name,
            emits_state=len(unit.layers) == 1,
        )
        _install(unit, new)
        described = {b: p.describe() for b, p in sorted(plans.items())}
        report.append(LayerSwap(unit.name, unit.shape, status, reason, unit.dense_bytes, new.weight_bytes, described))
    for unit in not_nm:
        weight = unit.layers[0].weight.detach()
        zeros = float((weight == 0).float().mean())
        report.append(
            LayerSwap(
                unit.name,
                unit.shape,
                "not 2:4",
                f"weight is not 2:4 ({zeros:.1%} zeros); left as nn.Linear",
                unit.dense_bytes,
                unit.dense_bytes,
            )
        )
    logger.info("hf-sparse: semi-structured swap\n%s", report.format())
    return report


def _install(unit: _Unit, new: SemiStructuredLinear) -> None:
    if len(unit.attrs) == 1:
        setattr(unit.parent, unit.attrs[0], new)
        return
    holder = "hf_sparse_fused_" + "_".join(unit.attrs)
    unit.parent.add_module(holder, new)
    group = _FusedGroup(new, unit.attrs)
    start = 0
    for index, (attr, layer) in enumerate(zip(unit.attrs, unit.layers)):
        rows = slice(start, start + layer.out_features)
        setattr(unit.parent, attr, FusedLinearSlice(group, index, rows))
        start += layer.out_features


def fuse_qkv_(model: nn.Module, groups: Sequence[Sequence[str]] = DEFAULT_FUSE_GROUPS) -> list[str]:
    """Fuses sibling projections (query/key/value) into one dense GEMM, in place: the dense baseline to compare
    a fused sparse model against. Returns the names of the fused groups. The `state_dict` keys do not change.

    Example:

    ```python
    >>> fuse_qkv_(dense_model)
    ['bert.encoder.layer.0.attention.self.{query,key,value}', ...]
    ```
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    fused_units = []
    modules = dict(model.named_modules())
    by_parent: dict[str, dict[str, nn.Linear]] = {}
    for name, layer in linears.items():
        parent_name, attr = _split(name)
        by_parent.setdefault(parent_name, {})[attr] = layer
    for parent_name, attrs in by_parent.items():
        parent = modules[parent_name] if parent_name else model
        if "cross" in type(parent).__name__.lower():
            continue
        for group in groups:
            if all(a in attrs for a in group):
                members = [attrs[a] for a in group]
                if len({m.in_features for m in members}) == 1 and len({m.bias is None for m in members}) == 1:
                    fused_units.append(_Unit(parent, parent_name, list(group), members))
    for unit in fused_units:
        new = SemiStructuredLinear(unit.weight, unit.bias, sparse=False, name=unit.name, emits_state=False)
        _install(unit, new)
    return [u.name for u in fused_units]


def restore_dense_(model: nn.Module) -> list[str]:
    """Turns every swapped or fused layer back into a plain `nn.Linear` (exact weights), in place.

    Returns the names of the restored layers.
    """
    restored = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (FusedLinearSlice, SemiStructuredLinear)) and not (
            isinstance(module, SemiStructuredLinear) and not module.emits_state
        ):
            weight, bias = module.weight.detach().clone(), module.bias
            linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
            linear = linear.to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            parent_name, attr = _split(name)
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, linear)
            restored.append(name)
    for name, module in list(model.named_modules()):
        if isinstance(module, SemiStructuredLinear) and not module.emits_state:
            parent_name, attr = _split(name)
            parent = model.get_submodule(parent_name) if parent_name else model
            delattr(parent, attr)
    return restored


def swap_at_train_end(model: nn.Module, config: SparsityConfig) -> SwapReport | None:
    """What `SparsityCallback` does when training ends with `swap_at_end=True`: swaps the trained 2:4 layers and
    routes `model(...)` through CUDA graphs, or logs why it cannot and leaves the model as it is."""
    from .graphs import cuda_graphs

    layers = select_layers(model, config).targets
    for name, layer in layers.items():
        problem = semi_structured_support(layer.weight.device, layer.weight.dtype, name)
        if problem:
            logger.warning("hf-sparse: swap_at_end: the model stays dense: %s", problem)
            return None
    report = swap_to_semi_structured_(model, config)
    cuda_graphs(model, inplace=True)
    logger.info(
        "hf-sparse: swap_at_end: %d layer(s) swapped; model(...) now runs through CUDA graphs.", len(report.swapped)
    )
    return report
