"""Fast 2:4 inference: swap a model's 2:4 `nn.Linear` layers for 2:4 kernels, never slower than dense.

`swap_to_semi_structured_` is the mechanism: it finds the GEMMs to decide on (`units.py`: single layers, fused
query/key/value groups), checks that a kernel can run them here, has the autotuner time what the policy needs
(`policy.requests`), asks the policy what each unit becomes (`policy.decide`), and installs the layer each unit's
kernel builds (`kernels/`), with the GELU after it replaced where the kernel runs it in its epilogue. It decides
everything before it changes anything, so a failure leaves the model as it was.

A swapped layer keeps its kernel's plans, and at inference the swapped model runs through CUDA graphs per input
shape by itself (`EagerGraphs`), since eager PyTorch is bound by host time at small batches and a sparse call costs
more host time than a dense one. `torch.compile(model, dynamic=False)` traces the layers through custom ops and fuses
the element-wise work between the GEMMs.

A swapped model still saves as an ordinary dense checkpoint (`...weight`/`...bias` keys, exact zeros):
`state_dict()` decompresses the weights exactly, and `load_state_dict` recompresses them; `restore_dense_` turns it
back into plain `nn.Linear` layers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import SparsityConfig
from ..selection import select_layers
from . import fp8_policy, policy
from . import kernels as kernel_registry
from .autotune import Autotuner, default_tuner
from .cuda_graphs import GENERATION, CudaGraphModel, EagerGraphs, remove_cuda_graphs
from .fp8 import Fp8Config, calibrate_input_scales
from .holdings import Workload
from .kernels.base import Kernel, LayerSpec, Weights, token_bucket
from .kernels.cusparselt import semi_structured_support
from .layers import FusedLinearSlice, GeluInEpilogue, SemiStructuredLinear, SwappedLinear, _FusedGroup
from .multi_layout import MultiLayoutLinear
from .units import DEFAULT_FUSE_GROUPS, Unit, find_units, fusable, named_linears, parent_of

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_COUNTS: tuple[int, ...] = (512, 2048, 8192, 32768, 131072)
"""Token counts (batch x sequence length) tuned at swap time when none are given, for a model that does not generate
(an encoder: its calls are whole sequences)."""
GENERATION_TOKEN_COUNTS: tuple[int, ...] = (1, 16, 32, 64, 512)
"""Token counts tuned by default for a decoder LLM (`decoder_lm`): its decode steps at batch 1 to 64 (one new token
per sequence), one per token bucket (`token_bucket`: 1-8, 9-16, 17-32, 33-64; the first timed at 1 row, batch-1
generation), and the prefill of a 512-token prompt at batch 1."""
GENERATION_WORKLOAD = Workload()
"""How a decoder LLM's swap weighs its tuned token counts: a 512-token prompt, then 256 new tokens."""
FALLBACKS = tuple(f.value for f in policy.DenseFallback)


# -- the report ------------------------------------------------------------------------------------------------------


@dataclass
class LayerSwap:
    """What `swap_to_semi_structured_` did with one layer (or one group of fused layers).

    `status` is "sparse" (compressed weight only), "sparse+dense" (compressed weight plus a dense copy for the
    token counts where dense is faster), "dense" (a 2:4 layer kept dense, see `reason`), or "not 2:4"; with
    `fp8`, "fp8 2:4" (e4m3 2:4 kernel) or "fp8 dense" (dense FP8 GEMM), and "dense" for a layer left in fp16.
    """

    name: str
    shape: tuple[int, int]
    status: str
    reason: str
    dense_bytes: int
    bytes: int
    plans: dict[int, str] = field(default_factory=dict)
    times: dict[int, tuple[float | None, float | None]] = field(default_factory=dict)
    """tokens -> (dense ms, ms of the kernel this layer runs) per GEMM call, as the autotuner measured them."""

    @property
    def memory_ratio(self) -> float:
        return self.bytes / self.dense_bytes if self.dense_bytes else 1.0

    def time_ratio(self, tokens: int) -> float | None:
        """Dense time over this layer's time at `tokens` (> 1: faster than dense), if measured."""
        dense, ran = self.times.get(tokens, (None, None))
        return dense / ran if dense and ran else None


class SwapReport(list):
    """Per-layer result of `swap_to_semi_structured_`: a list of `LayerSwap`, with memory totals and a table.
    `eager_graphs` says whether plain `model(...)` calls at inference now run through CUDA graphs; `defaults` names
    the defaults the swap chose for this model (a decoder LLM's token counts, memory rule and workload)."""

    eager_graphs: bool = False
    defaults: str = ""

    def rows(self, *statuses: str) -> list[LayerSwap]:
        return [r for r in self if r.status in statuses]

    @property
    def swapped(self) -> list[LayerSwap]:
        """The layers now on a 2:4 or FP8 kernel."""
        return [r for r in self if r.status not in ("dense", "not 2:4")]

    @property
    def two_four(self) -> list[LayerSwap]:
        """Every 2:4 layer, the ones kept dense included."""
        return [r for r in self if r.status != "not 2:4"]

    @property
    def memory_ratio(self) -> float:
        """Weight bytes of the swapped layers after the swap over their dense fp16/bf16 bytes."""
        rows = self.swapped
        dense = sum(r.dense_bytes for r in rows)
        return sum(r.bytes for r in rows) / dense if dense else 1.0

    @property
    def memory_ratio_2_4(self) -> float:
        """The same over every 2:4 layer, the ones kept dense included (they count 1.0)."""
        rows = self.two_four
        dense = sum(r.dense_bytes for r in rows)
        return sum(r.bytes for r in rows) / dense if dense else 1.0

    @property
    def token_counts(self) -> list[int]:
        return sorted({t for r in self for t in r.times})

    def gemm_speedup(self, tokens: int) -> float | None:
        """Dense GEMM time over the swapped model's GEMM time at `tokens`, summed over the 2:4 layers (one call
        each), from the autotuner's measurements; None if some layer was not measured there."""
        pairs = [r.times.get(tokens, (None, None)) for r in self.two_four]
        if not pairs or any(not d or not t for d, t in pairs):
            return None
        return sum(d for d, _ in pairs) / sum(t for _, t in pairs)

    def format(self) -> str:
        """The report as a table: per layer its status, memory and speed against dense at each tuned token count
        (from the autotuner's per-GEMM timings), then the totals."""
        if not self:
            return "(no layers)"
        width, status = max(len(r.name) for r in self), max(12, *(len(r.status) for r in self))
        counts = self.token_counts
        speed_head = "".join(f"  {f'x@{t}':>9}" for t in counts)
        lines = [f"{'layer':<{width}}  {'out x in':>11}  {'status':<{status}}  {'memory':>6}{speed_head}  why"]
        for r in self:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            speeds = "".join(f"  {r.time_ratio(t):9.2f}" if r.time_ratio(t) else f"  {'-':>9}" for t in counts)
            lines.append(
                f"{r.name:<{width}}  {shape:>11}  {r.status:<{status}}  {r.memory_ratio:6.3f}{speeds}  {r.reason}"
            )
        lines.append(
            f"{len(self.swapped)} of {len(self.two_four)} 2:4 layer(s) swapped; "
            f"weight memory of the swapped layers: {self.memory_ratio:.3f}x dense "
            f"(all 2:4 layers: {self.memory_ratio_2_4:.3f}x)"
        )
        speeds = [(t, self.gemm_speedup(t)) for t in counts]
        if any(x for _, x in speeds):
            lines.append(
                "GEMM time of the 2:4 layers vs dense (autotuner's per-GEMM timings; > 1 is faster): "
                + ", ".join(f"{t} tokens {x:.2f}x" for t, x in speeds if x)
            )
        if self.eager_graphs:
            lines.append("model(...) at inference (no grad, eval mode) runs through CUDA graphs, one per input shape")
        if self.defaults:
            lines.append(self.defaults)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# -- FP8 calibration ---------------------------------------------------------------------------------------------------


def _input_scales(model: nn.Module, units: list[Unit], config: Fp8Config) -> dict[str, float]:
    """Static e4m3 input scales per unit (a fused unit's members read one input: the largest of theirs), given
    (`config.input_scales`) or calibrated."""
    if config.activation_scales != "static":
        return {}
    members = {u.name: [f"{u.parent_name}.{a}" if u.parent_name else a for a in u.attrs] for u in units}
    names = [n for group in members.values() for n in group]
    if config.input_scales:
        missing = [n for n in names if n not in config.input_scales]
        if missing:
            raise ValueError(
                f"Fp8Config.input_scales has no scale for the layers {missing[:6]}; give one per swapped layer, or "
                "calibration batches instead. The model was not changed."
            )
        scales = {n: float(config.input_scales[n]) for n in names}
    else:
        scales = calibrate_input_scales(model, names, config.calibration)
    return {unit: max(scales[n] for n in names) for unit, names in members.items()}


# -- the public API --------------------------------------------------------------------------------------------------


def swap_to_semi_structured_(
    model: nn.Module,
    layers: SparsityConfig | Iterable[str] | None = None,
    *,
    fuse_qkv: bool | Sequence[Sequence[str]] = True,
    token_counts: Sequence[int] | str | None = "auto",
    dense_fallback: str | None = None,
    autotune: bool | Autotuner = True,
    eager_graphs: bool = True,
    fp8: bool | Fp8Config = False,
    cutlass: bool = True,
) -> SwapReport:
    """Swaps a model's 2:4 `nn.Linear` layers for 2:4 kernels (`kernels.KERNELS`: cuSPARSELt; CUTLASS on sm_90; the
    Triton decode kernel, timed at 1-64 tokens; the e4m3 kernels with `fp8`), in place, and reports what it did.

    Each swapped layer holds its weight compressed for its kernel (56% of the dense bytes for cuSPARSELt and CUTLASS)
    and runs it with the bias fused and the output written in the layout the next op reads. For every distinct GEMM
    shape the `Autotuner` times the dense GEMM and each kernel's configurations at each of `token_counts` (once per
    GPU and library versions: the results are cached on disk), and the policy (`policy.py`) picks, per layer, the
    kernel and what runs at each token-count bucket. Token counts met later are tuned on their first eager call
    (cuSPARSELt layers) or run the plan of the nearest tuned one.

    Nothing is changed when the call fails: named layers that are not exactly 2:4, weights on the CPU, a GPU older
    than compute capability 8.0, a PyTorch without cuSPARSELt, or fp32 weights raise an error that says what to do.

    A plain `model(**batch)` at inference (eval mode, no grad) then runs through CUDA graphs, one per input shape
    (`eager_graphs`, see `EagerGraphs`): eager PyTorch is bound by host time at small batches, and a cuSPARSELt call
    costs more host time than a dense one, so without graphs the swapped model loses to eager dense there (see the
    README's benchmark). Training-mode calls, calls with gradients, and `torch.compile` run the layers as they are
    (each keeps its cuSPARSELt plans).

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
            copies. "auto" (default): `GENERATION_TOKEN_COUNTS` (decode steps at batch 1-64 and a 512-token
            prefill) for a decoder LLM (`decoder_lm`), `DEFAULT_TOKEN_COUNTS` for other models. A decoder LLM's
            token counts, given or default, are weighted as a generation runs them (`GENERATION_WORKLOAD`: a decode
            step counts once per new token, a prefill once), so a layer is never left dense, or on a kernel that
            loses there, at decode because a prefill kernel wins at the prompt.
        dense_fallback: what a layer holds when dense is faster at some tuned token counts and sparse at others.
            "auto" (the default for other models than decoder LLMs): a dense copy for the layers that lose most
            there, as long as the swapped layers' weights stay within their dense bytes; compressed only for the
            rest (each saves 7/16 of its bytes). "copy": a dense copy for every such layer (fastest; 1.56x the
            dense bytes of those layers). "none": compressed weights only (least memory: 0.56x; the sparse kernel
            then runs where dense would be a bit faster). "compressed" (the default for decoder LLMs): no dense
            copies either, and a layer whose compressed weight is slower than dense over the (weighted) token counts
            stays dense; the swapped layers hold at most their compressed bytes. Where "auto" and "copy" allow a
            dense copy's bytes, a layer may hold a second 2:4 kernel's compressed weight instead (a decode kernel
            beside a prefill kernel), each token count running the faster. Layers where dense wins at every tuned
            token count stay dense either way. The report says, per layer and in total, what the choice costs in
            memory and in (measured) GEMM time, and which defaults applied.
        autotune: True uses the process-wide `Autotuner` (cache in `~/.cache/hf_sparse`), an `Autotuner` instance
            uses that one, False uses cuSPARSELt's default algorithm everywhere (no timing, no dense fallback).
        eager_graphs: route `model(...)` at inference through CUDA graphs per input shape (each keeps its
            activation memory; at most 8 shapes). False leaves `model.forward` alone.
        fp8: run the layers in FP8 (e4m3, compute capability >= 8.9): True or an `Fp8Config`. Each layer becomes
            whichever of the e4m3 2:4 kernel, the dense FP8 GEMM and its fp16 self the autotuner measures fastest
            at `token_counts` (one weight format per layer; `dense_fallback` does not apply). See `fp8.py`.
        cutlass: fp16 models on an sm_90 GPU (H100, H200): a layer runs on a CUTLASS 2:4 kernel instead of cuSPARSELt
            (`CutlassSparseLinear`, compiled on first use: needs `nvcc` and `pip install nvidia-cutlass`) where the
            autotuner measures that faster; a layer followed by the exact GELU (`GELU_BLOCKS`) then runs GELU in the
            kernel's epilogue. Where it cannot, the report says why. False: cuSPARSELt only, GELU a separate step.
            (FP8: see `Fp8Config.fuse_gelu`.)

    Returns:
        `SwapReport`: one `LayerSwap` per layer or fused group (status, reason, memory, measured time against dense
        per token count), also logged.

    Example:

    ```python
    >>> model = AutoModelForQuestionAnswering.from_pretrained(path, torch_dtype=torch.float16).cuda().eval()
    >>> report = hf_sparse.swap_to_semi_structured_(model, token_counts=[16 * 384, 64 * 384])
    >>> print(report)
    >>> with torch.no_grad():
    ...     outputs = model(**batch)   # first call per shape captures a CUDA graph, later calls replay it
    ```
    """
    fp8_config, fuse_groups = _arguments(dense_fallback, fp8, fuse_qkv, token_counts)
    counts, fallback, workload, defaults = _choices(model, token_counts, dense_fallback, fp8_config)
    linears, named = named_linears(model, layers)
    units, not_nm = find_units(model, linears, fuse_groups)
    _check_2_4(model, units, not_nm, named)
    fp8_options = _fp8_options(fp8_config)
    kernels = policy.Kernels(_in_play(fp8_config, cutlass), _why_not)
    _check_support(units, kernels, fp8_options)
    tuner = None if autotune is False else (autotune if isinstance(autotune, Autotuner) else default_tuner())
    # calibration first: bad batches fail before minutes of tuning
    scales = _input_scales(model, units, fp8_config) if fp8_config is not None else {}
    buckets: dict[int, int] = {}
    for tokens in counts if tuner is not None else ():
        buckets.setdefault(token_bucket(tokens), tokens)
    options = policy.Options(
        fallback, tuner.min_speedup if tuner else policy.MIN_SPEEDUP, buckets, fp8_options, workload
    )
    # Decide everything before changing anything, so a failure leaves the model as it was.
    rules = policy if fp8_options is None else fp8_policy  # an FP8 swap follows its own rules
    needed = rules.requests(units, kernels, options)
    timings = dict(zip(needed, tuner.timings(needed, units[0].device))) if needed else {}
    plans = rules.decide(units, kernels, timings, options)

    report = SwapReport(_install_plan(model, plan, kernels, tuner, scales) for plan in plans)
    report.defaults = defaults
    for unit in not_nm:
        zeros = float((unit.layers[0].weight.detach() == 0).float().mean())
        reason = f"weight is not 2:4 ({zeros:.1%} zeros); left as nn.Linear"
        report.append(LayerSwap(unit.name, unit.shape, "not 2:4", reason, unit.dense_bytes, unit.dense_bytes))
    if report.swapped:
        guard_casts(model)
    if eager_graphs and report.swapped:
        installed = model.__dict__.get("forward")
        if isinstance(installed, CudaGraphModel):
            installed.reset()  # captured over the layers just replaced
        if not isinstance(installed, EagerGraphs):
            model.forward = EagerGraphs(model)  # instance attribute: nn.Module.__call__ reaches it
        report.eager_graphs = True
    logger.info("hf-sparse: semi-structured swap\n%s", report.format())
    return report


def _arguments(dense_fallback, fp8, fuse_qkv, token_counts) -> tuple[Fp8Config | None, Sequence[Sequence[str]]]:
    """The swap's arguments checked: the FP8 config (or None) and the sibling groups to fuse."""
    if dense_fallback is not None and dense_fallback not in FALLBACKS:
        raise ValueError(f"dense_fallback must be one of {list(FALLBACKS)}; got {dense_fallback!r}.")
    fp8_config = Fp8Config() if fp8 is True else (fp8 or None)  # True: static scales, which need calibration
    if fp8_config is not None and not isinstance(fp8_config, Fp8Config):
        raise TypeError(f"fp8 must be True, False or an Fp8Config; got {type(fp8).__name__}.")
    if fuse_qkv is True:
        fuse_groups: Sequence[Sequence[str]] = DEFAULT_FUSE_GROUPS
    elif fuse_qkv is False or fuse_qkv is None:
        fuse_groups = ()
    else:
        fuse_groups = [tuple(g) for g in fuse_qkv]
    if isinstance(token_counts, str) and token_counts != "auto":
        raise ValueError(f"token_counts must be a list of positive integers, None or 'auto'; got {token_counts!r}.")
    if not isinstance(token_counts, str) and any(int(t) < 1 for t in token_counts or ()):
        raise ValueError(f"token_counts must be positive integers; got {list(token_counts)}.")
    return fp8_config, fuse_groups


def decoder_lm(model: nn.Module) -> str | None:
    """Why `model` takes the swap's decoder-LLM defaults, or None when it does not.

    A decoder LLM here is a model that generates (`model.can_generate()`, transformers' own test for `generate()`, true
    of every `*ForCausalLM`) and is not an encoder-decoder (`config.is_encoder_decoder`: its encoder runs whole
    prompts, never decode steps). `config.is_decoder` is no test: causal LMs such as Llama do not set it.
    """
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not callable(can_generate):
        return None
    return f"{type(model).__name__} generates" if can_generate() else None


def _choices(model: nn.Module, token_counts, dense_fallback: str | None, fp8_config: Fp8Config | None):
    """The token counts, the dense fallback and the workload this swap runs with, and a line for the report naming
    the defaults it chose for a decoder LLM. An FP8 swap keeps the defaults of other models."""
    decoder = decoder_lm(model) if fp8_config is None else None
    auto = isinstance(token_counts, str)
    counts = list((GENERATION_TOKEN_COUNTS if decoder else DEFAULT_TOKEN_COUNTS) if auto else (token_counts or ()))
    fallback = policy.DenseFallback(dense_fallback or ("compressed" if decoder else "auto"))
    if decoder is None:
        return [int(t) for t in counts], fallback, None, ""
    chosen = [f"token_counts={list(GENERATION_TOKEN_COUNTS)}"] if auto else []
    if dense_fallback is None:
        chosen.append(
            "dense_fallback='compressed' (no dense copies: the 2:4 layers hold at most their compressed bytes)"
        )
    said = f"{', '.join(chosen)} by default; " if chosen else ""
    defaults = (
        f"decoder LLM ({decoder}): {said}token counts weighted by the workload ({GENERATION_WORKLOAD.describe()})"
    )
    return [int(t) for t in counts], fallback, GENERATION_WORKLOAD, defaults


def _check_2_4(model: nn.Module, units: list[Unit], not_nm: list[Unit], named: bool) -> None:
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


def _fp8_options(config: Fp8Config | None) -> policy.Fp8Options | None:
    if config is None:
        return None
    static = config.activation_scales == "static"  # GELU in the epilogue quantizes to the next layer's input scale
    return policy.Fp8Options(sparse=config.sparse, fuse_gelu=config.fuse_gelu and config.sparse and static)


def _in_play(fp8_config: Fp8Config | None, cutlass: bool) -> tuple[Kernel, ...]:
    """The kernels of `KERNELS` this swap may use: the dense GEMM and the kernels of its weight format (without
    the CUTLASS kernel for `cutlass=False`)."""
    weights = Weights.MODEL if fp8_config is None else Weights.E4M3
    return tuple(
        k
        for k in kernel_registry.KERNELS
        if (k.weights is weights or not k.sparse and k.weights is Weights.MODEL) and (cutlass or k.name != "cutlass")
    )


def _why_not(kernel: Kernel, unit: Unit) -> str | None:
    return kernel.unsupported_reason(unit.device, unit.dtype)


def _check_support(units: list[Unit], kernels: policy.Kernels, fp8: policy.Fp8Options | None) -> None:
    """Refuses, naming the layer, a unit that no kernel of the swap can run here (the first kernel's words)."""
    swapping = kernels.swapping(fp8)
    for unit in units:
        problems = []
        for kernel in swapping:
            problem = kernel.unsupported_reason(unit.device, unit.dtype, unit.name)
            if problem is None:
                break
            problems.append(problem)
        else:
            raise RuntimeError(f"hf-sparse cannot swap {unit.name}: {problems[0]} The model was not changed.")


def _install_plan(
    model: nn.Module, plan: policy.LayerPlan, kernels: policy.Kernels, tuner: Autotuner | None, scales: dict
) -> LayerSwap:
    """Installs the layer `plan`'s kernel builds (none where the unit stays an `nn.Linear`) and says what it did."""
    unit, kernel = plan.unit, plan.kernel
    spec = LayerSpec(
        unit.weight,
        unit.bias,
        unit.name,
        emits_state=unit.single,
        runs=plan.runs,
        keep_dense=plan.keep_dense,
        gelu=plan.gelu,
        input_scale=scales.get(unit.name),
        output_scale=scales.get(unit.gelu.next_layer) if plan.gelu else None,
        tuner=tuner,
    )
    layer = MultiLayoutLinear(plan.layouts, spec) if len(plan.layouts) > 1 else kernel.layer(spec)
    if layer is None:
        return LayerSwap(
            unit.name, unit.shape, plan.status, plan.reason, unit.dense_bytes, unit.dense_bytes, {}, plan.times
        )
    _install(unit, layer)
    if plan.gelu:  # the kernel runs the GELU: the activation passes the layer's output through
        holder, attr = parent_of(model, unit.gelu.activation)
        # an output in the model's dtype is the activation already; an e4m3 one is for the next layer only
        setattr(holder, attr, GeluInEpilogue(getattr(holder, attr), passes_all=kernel.weights is Weights.MODEL))
    by_name = {k.name: k for k in kernels.in_play}
    described = {b: by_name[run.kernel].describe(run.config, plan.gelu) for b, run in sorted(plan.runs.items())}
    return LayerSwap(unit.name, unit.shape, plan.status, plan.reason, unit.dense_bytes, layer.weight_bytes, described,
                     plan.times)  # fmt: skip


class _CastGuard:
    """A swapped model's `_apply` (an instance attribute, so `nn.Module.to()`, `.float()`, `.half()`, `.cpu()` reach
    it): asks every swapped layer first whether it would refuse the cast (`cast_problem`) and refuses before any
    module is touched. `nn.Module._apply` would otherwise cast every module before the first swapped layer and then
    stop there, leaving the model half cast. Copies and pickles keep the guard, bound to the copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, fn, recurse: bool = True):
        for module in self.model.modules():
            problem = module.cast_problem(fn) if isinstance(module, SwappedLinear) else None
            if problem:
                raise TypeError(f"{problem} The model was not changed.")
        return type(self.model)._apply(self.model, fn, recurse)

    def __reduce__(self):
        return _CastGuard, (self.model,)


def guard_casts(model: nn.Module) -> None:
    """Makes `model.to()`, `.float()`, `.half()`, `.cpu()`, ... refuse, with the model unchanged, what a swapped layer
    of it would refuse (installed by `swap_to_semi_structured_`, removed by `restore_dense_`)."""
    if not isinstance(model.__dict__.get("_apply"), _CastGuard):
        model._apply = _CastGuard(model)


def _install(unit: Unit, new: nn.Module) -> None:
    GENERATION[0] += 1  # graphs captured over the layers replaced here are stale
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
    fused_units = fusable(model, linears, groups)
    for unit in fused_units:
        new = SemiStructuredLinear(unit.weight, unit.bias, sparse=False, name=unit.name, emits_state=False)
        _install(unit, new)
    return [u.name for u in fused_units]


def restore_dense_(model: nn.Module) -> list[str]:
    """Turns every swapped or fused layer back into a plain `nn.Linear` (exact weights), in place, and removes the
    automatic CUDA graphs of `model(...)`.

    Returns the names of the restored layers.
    """
    GENERATION[0] += 1  # graphs captured over the swapped layers are stale
    if isinstance(model.__dict__.get("forward"), EagerGraphs):
        remove_cuda_graphs(model)
    if isinstance(model.__dict__.get("_apply"), _CastGuard):
        del model._apply  # the guard of guard_casts: a dense model casts anywhere
    restored = []
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedLinearSlice) or (isinstance(module, SwappedLinear) and module.emits_state):
            weight, bias = module.weight.detach().clone(), module.bias
            linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
            linear = linear.to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            setattr(*parent_of(model, name), linear)
            restored.append(name)
    removed: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(gone + ".") for gone in removed):
            continue  # a layout inside a fused group's layer removed above
        if isinstance(module, SwappedLinear) and not module.emits_state:
            delattr(*parent_of(model, name))
            removed.append(name)
        elif isinstance(module, GeluInEpilogue):  # the GELU a layer ran in its epilogue
            setattr(*parent_of(model, name), module.original)
    return restored


def swap_at_train_end(model: nn.Module, config: SparsityConfig) -> SwapReport | None:
    """What `SparsityCallback` does when training ends with `swap_at_end=True`: swaps the trained 2:4 layers (and
    `model(...)` at inference runs through CUDA graphs), or logs why it cannot and leaves the model as it is."""
    layers = select_layers(model, config).targets
    for name, layer in layers.items():
        problem = semi_structured_support(layer.weight.device, layer.weight.dtype, name)
        if problem:
            logger.warning("hf-sparse: swap_at_end: the model stays dense: %s", problem)
            return None
    report = swap_to_semi_structured_(model, config)
    logger.info(
        "hf-sparse: swap_at_end: %d layer(s) swapped; model(...) now runs through CUDA graphs.", len(report.swapped)
    )
    return report
