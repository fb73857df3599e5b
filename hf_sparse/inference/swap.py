"""Fast 2:4 inference: swap a model's 2:4 `nn.Linear` layers for cuSPARSELt kernels, never slower than dense.

`swap_to_semi_structured_` replaces every exactly-2:4 `nn.Linear` with a `SemiStructuredLinear` that holds the
weight compressed by cuSPARSELt (values + metadata: 56% of the fp16/bf16 weight's bytes) and runs it through a
cuSPARSELt plan kept per token count (`cusparselt.py`): bias fused, output written row-major as the next op reads
it, and the algorithm / split-k setting chosen per token count by the `Autotuner`. Where the dense GEMM is faster
(small token counts, small shapes), the layer runs dense instead, from a dense copy kept as long as the swapped
layers' weights stay within their dense bytes (`dense_fallback="auto"`). Sibling projections that read the same
input (`query`/`key`/`value`) are fused into one GEMM, which is where the sparse kernel gains most on BERT-sized
layers.

A plain eager `model(**batch)` is fast: each layer keeps its cuSPARSELt plans (`torch._cslt_sparse_mm` in PyTorch
2.11 sets its plan up again on every call, ~0.19 s of host time with an algorithm id on an H100), and at inference
the swapped model runs through CUDA graphs per input shape by itself (`EagerGraphs`), since eager PyTorch is bound
by host time at small batches and a sparse call costs more host time than a dense one. `torch.compile(model,
dynamic=False)` traces the layers through a custom op and fuses the element-wise work between the GEMMs.

On an H100 or H200 (sm_90) a layer can run on a CUTLASS 2:4 kernel instead (`CutlassSparseLinear`, compiled on
first use: `cutlass.py`) where the autotuner measures it faster than cuSPARSELt; the first layer of a feed-forward
block followed by the exact GELU (`GELU_BLOCKS`: BERT's `intermediate.dense`, DistilBERT's `lin1`) then runs GELU
in the kernel's epilogue, where that beats its cuSPARSELt GEMM plus the separate GELU step.

With `fp8=...` (compute capability 8.9+) each 2:4 layer becomes an `Fp8Linear` instead (`fp8.py`): e4m3 weights,
2:4-compressed or dense, whichever of those and the fp16 layer the autotuner measures fastest at the named token
counts.

A swapped model still saves as an ordinary dense checkpoint (`...weight`/`...bias` keys, exact zeros):
`state_dict()` decompresses the weights exactly, and `load_state_dict` recompresses them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import SparsityConfig
from ..selection import select_layers
from . import cutlass as cutlass_kernels
from .autotune import Autotuner, GemmChoice, Plan, default_tuner, token_bucket
from .cuda_graphs import GENERATION, CudaGraphModel, EagerGraphs, remove_cuda_graphs
from .cusparselt import split_k_supported
from .cutlass_linear import CutlassSparseLinear
from .fp8 import E4M3, FP8_ALIGN, Fp8Config, Fp8Linear, calibrate_input_scales, fp8_shape_fits, fp8_support_problem
from .layers import ALIGN, FusedLinearSlice, GeluInEpilogue, SemiStructuredLinear, _FusedGroup, semi_structured_support
from .units import (
    DEFAULT_FUSE_GROUPS,
    Unit,
    block_names,
    find_units,
    fusable,
    is_exact_gelu,
    is_gelu,
    named_linears,
    parent_of,
)

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_COUNTS: tuple[int, ...] = (512, 2048, 8192, 32768, 131072)
"""Token counts (batch x sequence length) tuned at swap time when none are given."""
FALLBACKS = ("auto", "copy", "none")
SWAPPED = ("sparse", "sparse+dense", "fp8 2:4", "fp8 dense")
_SWAPPED_TYPES = (SemiStructuredLinear, Fp8Linear, CutlassSparseLinear)  # a layer (or fused group) the swap installed


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
    `eager_graphs` says whether plain `model(...)` calls at inference now run through CUDA graphs."""

    eager_graphs: bool = False

    def rows(self, *statuses: str) -> list[LayerSwap]:
        return [r for r in self if r.status in statuses]

    @property
    def swapped(self) -> list[LayerSwap]:
        return self.rows(*SWAPPED)

    @property
    def memory_ratio(self) -> float:
        """Weight bytes of the swapped layers after the swap over their dense fp16/bf16 bytes."""
        rows = self.swapped
        dense = sum(r.dense_bytes for r in rows)
        return sum(r.bytes for r in rows) / dense if dense else 1.0

    @property
    def memory_ratio_2_4(self) -> float:
        """The same over every 2:4 layer, the ones kept dense included (they count 1.0)."""
        rows = self.rows(*SWAPPED, "dense")
        dense = sum(r.dense_bytes for r in rows)
        return sum(r.bytes for r in rows) / dense if dense else 1.0

    @property
    def token_counts(self) -> list[int]:
        return sorted({t for r in self for t in r.times})

    def gemm_speedup(self, tokens: int) -> float | None:
        """Dense GEMM time over the swapped model's GEMM time at `tokens`, summed over the 2:4 layers (one call
        each), from the autotuner's measurements; None if some layer was not measured there."""
        pairs = [r.times.get(tokens, (None, None)) for r in self.rows(*SWAPPED, "dense")]
        if not pairs or any(not d or not t for d, t in pairs):
            return None
        return sum(d for d, _ in pairs) / sum(t for _, t in pairs)

    def format(self) -> str:
        """The report as a table: per layer its status, memory and speed against dense at each tuned token count
        (from the autotuner's per-GEMM timings), then the totals."""
        if not self:
            return "(no layers)"
        width = max(len(r.name) for r in self)
        counts = self.token_counts
        speed_head = "".join(f"  {f'x@{t}':>9}" for t in counts)
        lines = [f"{'layer':<{width}}  {'out x in':>11}  {'status':<12}  {'memory':>6}{speed_head}  why"]
        for r in self:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            speeds = "".join(f"  {r.time_ratio(t):9.2f}" if r.time_ratio(t) else f"  {'-':>9}" for t in counts)
            lines.append(f"{r.name:<{width}}  {shape:>11}  {r.status:<12}  {r.memory_ratio:6.3f}{speeds}  {r.reason}")
        lines.append(
            f"{len(self.swapped)} of {len(self.rows(*SWAPPED, 'dense'))} 2:4 layer(s) swapped; "
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
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# -- choosing what to swap -------------------------------------------------------------------------------------------


def _fmt_speedups(choices: dict[int, GemmChoice], buckets: list[int]) -> str:
    parts = []
    for b in buckets:
        c = choices[b]
        parts.append(f"{c.tokens}: {c.speedup:.2f}x" if c.speedup else f"{c.tokens}: n/a")
    return ", ".join(parts)


@dataclass
class _Decision:
    status: str
    reason: str
    plans: dict[int, Plan]
    choices: dict[int, GemmChoice] = field(default_factory=dict)
    cutlass: str = ""  # the choices and plans are the CUTLASS kernel's (with GELU where the unit has one): why

    @property
    def mixed(self) -> bool:
        """Sparse wins at some tuned token counts and dense at others."""
        backends = {c.backend for c in self.choices.values()}
        return self.status != "dense" and backends == {"sparse", "dense"}


def _decide(
    unit: Unit, tuner: Autotuner | None, token_counts: Sequence[int], fallback: str, epilogue: str = ""
) -> _Decision:
    """What one unit becomes; with fallback "auto", a mixed unit is settled later by `_budget_dense_copies`.
    `epilogue="gelu"`: from the timings of the GEMM followed by GELU (dense, then GELU; CUTLASS with GELU fused)."""
    out_f, in_f = unit.shape
    if out_f % ALIGN or in_f % ALIGN:
        return _Decision(
            "dense", f"cuSPARSELt needs both dimensions to be multiples of {ALIGN}; this GEMM is {out_f}x{in_f}", {}
        )
    if tuner is None or not token_counts:
        return _Decision("sparse", "not tuned (autotune off): sparse kernel with cuSPARSELt's default algorithm", {})
    dtype, device = unit.layers[0].weight.dtype, unit.layers[0].weight.device
    choices: dict[int, GemmChoice] = {}
    for tokens in token_counts:
        choices.setdefault(
            token_bucket(tokens), tuner.choice(out_f, in_f, dtype, unit.has_bias, tokens, device, epilogue=epilogue)
        )
    buckets = sorted(choices)
    sparse_wins = [b for b in buckets if choices[b].backend == "sparse"]
    dense_wins = [b for b in buckets if choices[b].backend == "dense"]
    speed = _speed_text(choices)
    if not sparse_wins:
        plans = {b: Plan("dense") for b in buckets}
        return _Decision("dense", f"dense is faster at every tuned token count ({speed})", plans, choices)
    if not dense_wins:
        plans = {b: choices[b].plan(False) for b in buckets}
        return _Decision("sparse", f"sparse is faster at every tuned token count ({speed})", plans, choices)
    return _mixed(choices, fallback == "copy", fallback, speed)


def _mixed(choices: dict[int, GemmChoice], keep_dense: bool, fallback: str, speed: str) -> _Decision:
    plans = {b: c.plan(keep_dense) for b, c in choices.items()}
    if keep_dense:
        why = "within the dense weights' bytes" if fallback == "auto" else "dense_fallback='copy'"
        reason = f"dense copy kept for the token counts where dense is faster, {why} ({speed})"
        return _Decision("sparse+dense", reason, plans, choices)
    why = (
        "a dense copy would take the swapped layers over their dense bytes"
        if fallback == "auto"
        else "dense_fallback='none'"
    )
    reason = f"compressed weight only ({why}): sparse runs where dense would be faster ({speed})"
    return _Decision("sparse", reason, plans, choices)


def _speed_text(choices: dict[int, GemmChoice]) -> str:
    return f"sparse/dense speed-up by tokens: {_fmt_speedups(choices, sorted(choices))}"


def _budget_dense_copies(units: list[Unit], decisions: list[_Decision]) -> list[_Decision]:
    """dense_fallback="auto": what each mixed unit holds, with the swapped layers within their dense bytes.

    A mixed unit (sparse faster at some tuned token counts, dense at others) can keep a dense copy (the faster kernel
    everywhere, for 25/16 of its dense bytes), its compressed weight only (9/16: the sparse kernel runs where dense
    would be faster), or stay dense (its dense bytes, and no gain). Each starts with a copy; while the units are over
    their dense bytes (units faster sparse everywhere save 7/16 of theirs), the unit that gives up the least speed per
    byte saved moves to compressed-only or to dense. Speed is the GEMM time saved against dense at each tuned token
    count, relative to the dense GEMM time of all units there, so every named token count weighs the same.
    """
    totals: dict[int, float] = {}
    for decision in decisions:
        for bucket, choice in decision.choices.items():
            totals[bucket] = totals.get(bucket, 0.0) + (choice.dense_ms or 0.0)

    def gain(index: int, holds: str) -> float:
        total = 0.0
        for bucket, c in decisions[index].choices.items():
            if not (c.dense_ms and c.sparse_ms and totals.get(bucket)):
                continue
            ran = {"copy": min(c.dense_ms, c.sparse_ms), "compressed": c.sparse_ms, "dense": c.dense_ms}[holds]
            total += (c.dense_ms - ran) / totals[bucket]
        return total

    def extra_bytes(index: int, holds: str) -> int:
        """Bytes over the unit's dense bytes."""
        compressed = _compressed_bytes(units[index])
        return {"copy": compressed, "compressed": compressed - units[index].dense_bytes, "dense": 0}[holds]

    holds = {i: "copy" for i, d in enumerate(decisions) if d.mixed}
    over = sum(extra_bytes(i, h) for i, h in holds.items())
    over += sum(extra_bytes(i, "compressed") for i, d in enumerate(decisions) if d.status == "sparse" and not d.mixed)
    moved: list[int] = []
    while over > 0:
        moves = [
            ((gain(i, "copy") - gain(i, to)) / saved, i, to, saved)
            for i, h in holds.items()
            if h == "copy"
            for to in ("compressed", "dense")
            if (saved := extra_bytes(i, "copy") - extra_bytes(i, to)) > 0
        ]
        if not moves:
            break
        _, index, to, saved = min(moves)
        holds[index] = to
        over -= saved
        moved.append(index)
    for index in reversed(moved):  # the last moves may have saved more than needed: take back what still fits
        cost = extra_bytes(index, "copy") - extra_bytes(index, holds[index])
        if over + cost <= 0:
            holds[index] = "copy"
            over += cost

    decided = list(decisions)
    for index, held in holds.items():
        decision = decisions[index]
        speed = _speed_text(decision.choices)
        if held == "dense":
            plans = {b: Plan("dense") for b in decision.choices}
            reason = (
                "kept dense: its sparse gains were worth less per byte than other layers' within the dense "
                f"weights' bytes, and sparse alone would be slower at some token counts ({speed})"
            )
            decided[index] = _Decision("dense", reason, plans, decision.choices)
        else:
            decided[index] = _mixed(decision.choices, held == "copy", "auto", speed)
    return decided


def _compressed_bytes(unit: Unit) -> int:
    return unit.dense_bytes * 9 // 16  # cuSPARSELt's compressed fp16/bf16 2:4 weight: values plus metadata


def _times(decision: _Decision) -> dict[int, tuple[float | None, float | None]]:
    """tokens -> (dense ms, ms of what the layer runs) per GEMM call, as the autotuner measured them."""
    times = {}
    for bucket, choice in sorted(decision.choices.items()):
        plan = decision.plans.get(bucket)
        ran = choice.dense_ms if plan is None or plan.backend == "dense" else choice.sparse_ms
        times[choice.tokens] = (choice.dense_ms, ran)
    return times


def _decide_fp8(unit: Unit, tuner: Autotuner | None, token_counts: Sequence[int], config: Fp8Config) -> _Decision:
    """What one unit becomes in FP8: the e4m3 2:4 kernel, the dense FP8 GEMM, or the fp16 layer it was, whichever
    the autotuner measured fastest over the named token counts (each weighed relative to its fp16 time). One weight
    format per layer, so the weights never take more bytes than the fastest choice needs."""
    out_f, in_f = unit.shape
    if not fp8_shape_fits(unit.shape):
        return _Decision("dense", f"the e4m3 kernels need both dimensions to be multiples of {FP8_ALIGN}; this GEMM "
                         f"is {out_f}x{in_f}", {})  # fmt: skip
    if not config.sparse:
        return _Decision("fp8 dense", "dense FP8 for every layer (Fp8Config(sparse=False))", {})
    if tuner is None or not token_counts:
        return _Decision("fp8 2:4", "not tuned (autotune off): e4m3 2:4 kernel, cuSPARSELt's default algorithm", {})
    device = unit.layers[0].weight.device
    choices: dict[int, GemmChoice] = {}
    for tokens in token_counts:
        choices.setdefault(token_bucket(tokens), tuner.choice(out_f, in_f, E4M3, unit.has_bias, tokens, device))
    relative = {"fp8 2:4": 0.0, "fp8 dense": 0.0, "dense": 0.0}
    measured = {b: c for b, c in choices.items() if c.fp16_ms}
    if not measured:  # the tuning process died before timing this shape (see the autotuner's note)
        notes = "; ".join(sorted({c.note for c in choices.values() if c.note})) or "no timings"
        return _Decision("dense", f"left fp16: its FP8 GEMMs were not measured ({notes})", {}, choices)
    for c in measured.values():
        relative["dense"] += 1.0
        relative["fp8 dense"] += (c.dense_ms or float("inf")) / c.fp16_ms
        relative["fp8 2:4"] += (c.sparse_ms or float("inf")) / c.fp16_ms
    margin = tuner.min_speedup
    best = "dense"
    if min(relative["fp8 2:4"], relative["fp8 dense"]) * margin <= relative["dense"]:
        best = "fp8 2:4" if relative["fp8 2:4"] * margin <= relative["fp8 dense"] else "fp8 dense"
    speed = ", ".join(
        f"{c.tokens}: 2:4 {c.fp16_ms / c.sparse_ms:.2f}x, dense fp8 {c.fp16_ms / c.dense_ms:.2f}x"
        if c.fp16_ms and c.sparse_ms and c.dense_ms
        else f"{c.tokens}: n/a"
        for _, c in sorted(choices.items())
    )
    plans = {b: (c.sparse if best == "fp8 2:4" else Plan("dense")) for b, c in choices.items()}
    what = {"fp8 2:4": "e4m3 2:4 is fastest", "fp8 dense": "dense FP8 is fastest", "dense": "fp16 is fastest"}[best]
    return _Decision(best, f"{what} over the tuned token counts (GEMM speed over fp16 by tokens: {speed})", plans,
                     choices)  # fmt: skip


def _fp8_times(decision: _Decision) -> dict[int, tuple[float | None, float | None]]:
    """tokens -> (fp16 dense ms, ms of what the layer runs) per GEMM call, as the autotuner measured them."""
    times = {}
    for _, choice in sorted(decision.choices.items()):
        ran = {"fp8 2:4": choice.sparse_ms, "fp8 dense": choice.dense_ms}.get(decision.status, choice.fp16_ms)
        times[choice.tokens] = (choice.fp16_ms, ran)
    return times


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


@dataclass
class _GeluFusion:
    """A feed-forward block whose first layer (`producer`, a unit index) runs GELU in its epilogue and writes e4m3
    for `consumer`'s GEMM."""

    producer: int
    activation: str
    consumer: int
    choices: dict[int, GemmChoice] = field(default_factory=dict)
    fused: bool = False
    reason: str = ""


def _gelu_blocks(model: nn.Module, units: list[Unit]) -> list[_GeluFusion]:
    """The `GELU_BLOCKS` of the model whose two layers are single-layer fp16 units of shapes the e4m3 kernels take
    (with an e4m3 output, cuSPARSELt reads the bias in the type of C, which must be fp16: bf16 models keep GELU a
    separate step)."""
    index = {u.name: i for i, u in enumerate(units) if len(u.layers) == 1}
    modules = dict(model.named_modules())
    found = []
    for name, i in index.items():
        for activation, second in block_names(name):
            consumer = index.get(second)
            if consumer is None or not is_gelu(modules.get(activation, nn.Identity())):
                continue
            fp16 = units[i].layers[0].weight.dtype == torch.float16  # the fused kernel reads its bias as fp16
            if fp16 and fp8_shape_fits(units[i].shape) and fp8_shape_fits(units[consumer].shape):
                found.append(_GeluFusion(i, activation, consumer))
    return found


def _decide_gelu(
    fusion: _GeluFusion, decisions: list[_Decision], units: list[Unit], tuner: Autotuner | None, counts: list[int]
) -> None:
    """Whether the producer runs GELU in its epilogue: it must be an e4m3 2:4 layer feeding an FP8 layer, and the
    fused kernel (GELU and e4m3 output included) must be measured no slower, over the named token counts, than what
    it replaces: the plain e4m3 2:4 GEMM plus the separate GELU step (timed after the dense FP8 GEMM: the fused
    sweep's dense time less the plain one's)."""
    producer, consumer = decisions[fusion.producer], decisions[fusion.consumer]
    if producer.status != "fp8 2:4" or not consumer.status.startswith("fp8"):
        fusion.reason = "GELU stays a separate step: this layer and the next are not both FP8 with this one 2:4"
        return
    if tuner is None or not counts:
        fusion.fused, fusion.reason = True, "not tuned (autotune off): cuSPARSELt's default algorithm"
        return
    unit = units[fusion.producer]
    device = unit.layers[0].weight.device
    for tokens in counts:
        fusion.choices.setdefault(
            token_bucket(tokens), tuner.choice(*unit.shape, E4M3, unit.has_bias, tokens, device, epilogue="gelu")
        )
    fused = plain = 0.0
    for bucket, choice in fusion.choices.items():
        reference = producer.choices.get(bucket)
        if not (choice.sparse_ms and reference and reference.sparse_ms and reference.fp16_ms):
            fusion.reason = "GELU stays a separate step: the fused kernel was not measured at every token count"
            return
        gelu_ms = max(0.0, (choice.dense_ms or 0.0) - (reference.dense_ms or 0.0))
        fused += choice.sparse_ms / reference.fp16_ms
        plain += (reference.sparse_ms + gelu_ms) / reference.fp16_ms
    speed = ", ".join(
        f"{c.tokens}: {c.fp16_ms / c.sparse_ms:.2f}x" for _, c in sorted(fusion.choices.items()) if c.fp16_ms
    )
    if fused > plain:
        fusion.reason = (
            f"GELU stays a separate step: the fused kernel was slower than the plain one and GELU ({fused / plain:.2f}x "
            "their time)"
        )
        return
    fusion.fused = True
    fusion.reason = f"fp16 GEMM + GELU over this, by tokens: {speed}"


def _cutlass_units(model: nn.Module, units: list[Unit]) -> tuple[dict[int, str], str | None]:
    """The single-layer fp16 units in shapes the CUTLASS kernel takes (unit index -> the name of the exact GELU after
    it when it starts a `GELU_BLOCKS` block, else ""), and why the kernel cannot run here (None when it can: it is
    built now if need be)."""
    modules = dict(model.named_modules())
    found: dict[int, str] = {}
    for index, unit in enumerate(units):
        weight = unit.layers[0].weight
        if len(unit.layers) != 1 or cutlass_kernels.shape_problem(*unit.shape, weight.dtype):
            continue
        found[index] = ""
        for activation, _ in block_names(unit.name):
            if is_exact_gelu(modules.get(activation, nn.Identity())):
                found[index] = activation
    if not found:
        return found, None
    device = units[next(iter(found))].layers[0].weight.device
    problem = cutlass_kernels.device_problem(device)
    if problem is None and not cutlass_kernels.available(device):
        problem = cutlass_kernels.device_problem(device)
    return found, problem


def _decide_cutlass(
    unit: Unit, plain: _Decision, tuner: Autotuner | None, counts: list[int], fallback: str, gelu: bool
) -> _Decision:
    """The unit's decision over the CUTLASS kernel's timings (`gelu`: with GELU in its epilogue, against the dense
    GEMM followed by GELU) when, over the named token counts, it runs at least 1% faster than `plain` (the unit's
    cuSPARSELt decision; `gelu`: plus the separate GELU step, the fused sweep's dense time less the plain one's);
    else `plain` (with a word on why GELU stays a separate step). Both are scored as they would run: with a dense
    copy where dense wins (`dense_fallback="copy"`), compressed only ("none"), and for "auto", whose memory budget
    settles that later, both ways."""
    stays = "; GELU stays a separate step" if gelu else ""

    def keep(why: str) -> _Decision:
        if gelu:
            plain.reason += f"{stays} ({why})"
        return plain

    if tuner is None or not counts:
        return keep("not tuned: autotune off or no token counts")
    cut = _decide(unit, tuner, counts, fallback, epilogue="gelu" if gelu else "cutlass")
    if cut.status == "dense":
        return keep("dense GEMM + GELU beat the CUTLASS kernel with GELU")
    views = {"copy": (True,), "none": (False,)}.get(fallback, (True, False))
    on_cutlass = dict.fromkeys(views, 0.0)
    on_cusparselt = dict.fromkeys(views, 0.0)
    for bucket, choice in cut.choices.items():
        reference = plain.choices.get(bucket)
        if not (choice.dense_ms and choice.sparse_ms and reference and reference.dense_ms):
            return keep("the CUTLASS kernel was not measured at every token count")
        gelu_ms = max(0.0, choice.dense_ms - reference.dense_ms) if gelu else 0.0
        dense_ms = choice.dense_ms if gelu else reference.dense_ms  # one dense timing where both are the same GEMM
        cusparselt_ms = reference.sparse_ms if plain.status != "dense" and reference.sparse_ms else reference.dense_ms
        for with_copy in views:
            on_cutlass[with_copy] += min(dense_ms, choice.sparse_ms) if with_copy else choice.sparse_ms
            on_cusparselt[with_copy] += min(reference.dense_ms, cusparselt_ms) if with_copy else cusparselt_ms
            on_cusparselt[with_copy] += gelu_ms
    ratio = min(on_cusparselt[v] / on_cutlass[v] for v in views)
    if ratio < 1.01:  # a near tie stays on cuSPARSELt
        return keep(f"the CUTLASS kernel with GELU took {1 / ratio:.2f}x the time of this GEMM and GELU")
    what = "with GELU in its epilogue (times and speed-ups include GELU)" if gelu else "(bias in its epilogue)"
    cut.cutlass = (
        f"runs on the CUTLASS kernel {what}: {ratio:.2f}x the cuSPARSELt GEMM{' + GELU' if gelu else ''} over the "
        "tuned token counts"
    )
    cut.reason = f"{cut.reason}; {cut.cutlass}"
    return cut


# -- the public API --------------------------------------------------------------------------------------------------


def swap_to_semi_structured_(
    model: nn.Module,
    layers: SparsityConfig | Iterable[str] | None = None,
    *,
    fuse_qkv: bool | Sequence[Sequence[str]] = True,
    token_counts: Sequence[int] | None = DEFAULT_TOKEN_COUNTS,
    dense_fallback: str = "auto",
    autotune: bool | Autotuner = True,
    eager_graphs: bool = True,
    fp8: bool | Fp8Config = False,
    cutlass: bool = True,
) -> SwapReport:
    """Swaps a model's 2:4 `nn.Linear` layers for 2:4 kernels (cuSPARSELt; CUTLASS on sm_90), in place, and reports
    what it did.

    Each swapped layer holds the compressed weight (56% of the dense bytes) and runs it through a kept cuSPARSELt
    plan, with the bias fused and the output written in the layout the next op reads. For every distinct GEMM shape the
    `Autotuner` times dense against the sparse kernel's algorithms and split-k settings at each of `token_counts`
    (once per GPU and library versions: the results are cached on disk) and each layer uses the faster one per
    token-count bucket. Token counts met later are tuned on their first eager call.

    Nothing is changed when the call fails: named layers that are not exactly 2:4, weights on the CPU, a GPU older
    than compute capability 8.0, a PyTorch without cuSPARSELt, or fp32 weights raise an error that says what to do.

    A plain `model(**batch)` at inference (eval mode, no grad) then runs through CUDA graphs, one per input shape
    (`eager_graphs`, see `EagerGraphs`): eager PyTorch is bound by host time at small batches, and a cuSPARSELt call
    costs more host time than a dense one, so without graphs the swapped model lost there (BERT-base, seq 384, H100:
    0.88x / 0.92x of eager dense at batch 4 / 16). Training-mode calls, calls with gradients, and `torch.compile`
    run the layers as they are (each keeps its cuSPARSELt plans).

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
        dense_fallback: what a layer holds when dense is faster at some tuned token counts and sparse at others.
            "auto" (default): a dense copy for the layers that lose most there, as long as the swapped layers'
            weights stay within their dense bytes; compressed only for the rest (each saves 7/16 of its bytes).
            "copy": a dense copy for every such layer (fastest; 1.56x the dense bytes of those layers). "none":
            compressed weights only (least memory: 0.56x; the sparse kernel then runs where dense would be a bit
            faster). Layers where dense wins at every tuned token count stay dense either way. The report says,
            per layer and in total, what the choice costs in memory and in (measured) GEMM time.
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
    if dense_fallback not in FALLBACKS:
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
    counts = [int(t) for t in (token_counts or ())]
    if any(t < 1 for t in counts):
        raise ValueError(f"token_counts must be positive integers; got {list(token_counts)}.")

    linears, named = named_linears(model, layers)
    units, not_nm = find_units(model, linears, fuse_groups)
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
        if problem is None and fp8_config is not None:
            problem = fp8_support_problem(weight.device, unit.name)
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
    fp8_gelu = (
        fp8_config is not None
        and fp8_config.fuse_gelu
        and fp8_config.sparse
        and fp8_config.activation_scales == "static"
    )
    fusions = _gelu_blocks(model, units) if fp8_gelu else []
    cutlass_units, cutlass_problem = ({}, None)
    if fp8_config is None and cutlass and tuner is not None and counts:
        cutlass_units, cutlass_problem = _cutlass_units(model, units)
    if fp8_config is not None:  # calibration first: bad batches fail before minutes of tuning
        scales = _input_scales(model, units, fp8_config)
    if tuner is not None and counts and not (fp8_config is not None and not fp8_config.sparse):
        device = units[0].layers[0].weight.device
        if fp8_config is not None:  # only the shapes the e4m3 kernels take
            tuned = [(u, E4M3) for u in units if fp8_shape_fits(u.shape)]
        else:
            tuned = [(u, u.layers[0].weight.dtype) for u in units]
        requests = [(*u.shape, dtype, u.has_bias, t) for u, dtype in tuned for t in counts]
        if fp8_gelu:
            requests += [(*units[f.producer].shape, E4M3, units[f.producer].has_bias, t, "gelu")
                         for f in fusions for t in counts]  # fmt: skip
        if cutlass_units and cutlass_problem is None:
            requests += [(*units[i].shape, torch.float16, units[i].has_bias, t, "gelu" if act else "cutlass")
                         for i, act in cutlass_units.items() for t in counts]  # fmt: skip
        tuner.prefetch(requests, device)
    if fp8_config is not None:
        decisions = [_decide_fp8(unit, tuner, counts, fp8_config) for unit in units]
        for fusion in fusions:
            _decide_gelu(fusion, decisions, units, tuner, counts)
    else:
        decisions = [_decide(unit, tuner, counts, dense_fallback) for unit in units]
        for index, activation in cutlass_units.items():
            if cutlass_problem is None:
                decisions[index] = _decide_cutlass(
                    units[index], decisions[index], tuner, counts, dense_fallback, bool(activation)
                )
            elif activation:
                decisions[index].reason += f"; GELU stays a separate step ({cutlass_problem})"
        if dense_fallback == "auto":
            on_cutlass = {i: d.cutlass for i, d in enumerate(decisions) if d.cutlass}
            decisions = _budget_dense_copies(units, decisions)
            for index, why in on_cutlass.items():  # the budget re-decides what the unit holds, not its kernel
                if decisions[index].status != "dense" and not decisions[index].cutlass:
                    decisions[index].cutlass = why
                    decisions[index].reason += f"; {why}"

    report = SwapReport()
    fused_at = {f.producer: f for f in fusions}
    for index, (unit, decision) in enumerate(zip(units, decisions)):
        status, reason, plans = decision.status, decision.reason, decision.plans
        times = _fp8_times(decision) if fp8_config is not None else _times(decision)
        fusion = fused_at.get(index)
        sparse = status != "dense"
        if not sparse and len(unit.layers) == 1:
            dense = unit.dense_bytes
            report.append(LayerSwap(unit.name, unit.shape, status, reason, dense, dense, {}, times))
            continue
        if status.startswith("fp8"):
            new = Fp8Linear(
                unit.weight,
                unit.bias,
                sparse=status == "fp8 2:4",
                input_scale=scales.get(unit.name),
                algorithms={b: p.alg_id for b, p in plans.items() if p.backend == "sparse"},
                name=unit.name,
                emits_state=len(unit.layers) == 1,
            )
            _install(unit, new)
            if fusion is not None and fusion.fused:
                consumer = units[fusion.consumer]
                new.fuse_gelu_(scales[consumer.name], {b: c.sparse.alg_id for b, c in fusion.choices.items()})
                parent, attr = parent_of(model, fusion.activation)
                setattr(parent, attr, GeluInEpilogue(getattr(parent, attr)))
                reason = (
                    f"{reason}; GELU and {consumer.name}'s e4m3 quantization run in its epilogue ({fusion.reason})"
                )
                times = {c.tokens: (c.fp16_ms, c.sparse_ms) for _, c in sorted(fusion.choices.items())} or times
                plans = {b: Plan("sparse", c.sparse.alg_id) for b, c in fusion.choices.items()} or plans
            elif fusion is not None and status == "fp8 2:4":
                reason = f"{reason}; {fusion.reason}"
            gelu = " + GELU -> e4m3" if fusion is not None and fusion.fused else ""
            described = {
                b: ("e4m3 2:4" + gelu if p.backend == "sparse" else "dense FP8") for b, p in sorted(plans.items())
            }
            report.append(
                LayerSwap(unit.name, unit.shape, status, reason, unit.dense_bytes, new.weight_bytes, described, times)
            )
            continue
        if decision.cutlass:
            activation = cutlass_units[index]
            new = CutlassSparseLinear(
                unit.weight,
                unit.bias,
                gelu=bool(activation),
                plans=plans,
                keep_dense=status == "sparse+dense",
                name=unit.name,
            )
            _install(unit, new)
            if activation:
                parent, attr = parent_of(model, activation)
                setattr(parent, attr, GeluInEpilogue(getattr(parent, attr), passes_all=True))
            configs, gelu = cutlass_kernels.library().configs, " + GELU" if activation else ""
            described = {
                b: (f"dense{gelu}" if p.backend == "dense" else f"CUTLASS 2:4{gelu} ({configs[p.alg_id]})")
                for b, p in sorted(plans.items())
            }
            report.append(
                LayerSwap(unit.name, unit.shape, status, reason, unit.dense_bytes, new.weight_bytes, described, times)
            )
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
        report.append(
            LayerSwap(unit.name, unit.shape, status, reason, unit.dense_bytes, new.weight_bytes, described, times)
        )
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


class _CastGuard:
    """A swapped model's `_apply` (an instance attribute, so `nn.Module.to()`, `.float()`, `.half()`, `.cpu()` reach
    it): asks every swapped layer first whether it would refuse the cast (`cast_problem`) and refuses before any
    module is touched. `nn.Module._apply` would otherwise cast every module before the first swapped layer and then
    stop there, leaving the model half cast. Copies and pickles keep the guard, bound to the copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, fn, recurse: bool = True):
        for module in self.model.modules():
            problem = module.cast_problem(fn) if isinstance(module, _SWAPPED_TYPES) else None
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


def _install(unit: Unit, new: SemiStructuredLinear | Fp8Linear) -> None:
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
        if isinstance(module, FusedLinearSlice) or (isinstance(module, _SWAPPED_TYPES) and module.emits_state):
            weight, bias = module.weight.detach().clone(), module.bias
            linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
            linear = linear.to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            setattr(*parent_of(model, name), linear)
            restored.append(name)
    for name, module in list(model.named_modules()):
        if isinstance(module, _SWAPPED_TYPES) and not module.emits_state:
            delattr(*parent_of(model, name))
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
