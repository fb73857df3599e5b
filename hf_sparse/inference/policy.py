"""Which kernel each 2:4 layer runs at each token count, what it holds, and why: decisions from measured timings.

Everything here is a pure function of the units (`units.py`), the kernels in play (their facts, `kernels/base.py`),
the autotuner's timings and the options: nothing is imported from a kernel binding, nothing is timed or changed.
`swap_to_semi_structured_` asks `requests` what to time, times it, and installs what `decide` returns: one
`LayerPlan` per unit (the kernels it holds, a `Run` per token-count bucket, GELU in its epilogue or not, a status
and the reason the report prints).

The rules, for a swap in the model's dtype (fp16, bf16):
- A 2:4 kernel runs at a bucket where it beats the dense GEMM by `min_speedup`. A layer where it wins at some tuned
  token counts and loses at others (mixed) keeps a dense copy for those (`DenseFallback.COPY`), holds the compressed
  weight only (`NONE`), or, with `AUTO`, keeps copies for the layers that lose most per byte as long as the swapped
  layers stay within their dense bytes (`budget_dense_copies`).
- The first 2:4 kernel of `KERNELS` that can take a layer is its kernel; each later one replaces it where it runs the
  layer at least 1% faster, compared as the layer would run (with a dense copy, compressed only, or, for `AUTO`,
  both ways). A kernel that can run the GELU after the layer in its epilogue is timed and compared with it, against
  the others plus the separate GELU step.
- Where a dense copy's bytes are allowed (`COPY`, `AUTO`), a layer may spend them on a second compressed layout
  instead (`Holds.TWO`, `holdings.py`): each bucket then runs the faster of two 2:4 kernels (a decode kernel at 1-64
  tokens, a GEMM kernel at prefill). It does where that runs the tuned token counts at least as fast as the copy
  would, or faster than the kernel alone for a layer that never needs dense. `COMPRESSED` (the decoder LLMs'
  default) holds one compressed layout and no copy: a layer whose kernel loses somewhere stays dense unless its
  compressed weight is faster over the weighted token counts.
- Token counts weigh the same, except for a decoder LLM's swap (`Options.workload`): a decode step counts as often as
  a generation runs it (`holdings.Workload`), so a prefill kernel that loses at decode does not choose the layout.

An FP8 swap follows the rules of `fp8_policy.py`, with the types and helpers of this module.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .holdings import Workload, best_second, pair_kernel, pair_ms, weighted
from .kernels.base import DENSE_NAME, Gelu, GemmRequest, Kernel, Run, Timing, Weights
from .units import Unit

MIN_SPEEDUP = 1.03
"""The margin a 2:4 kernel must beat the dense GEMM by at a token count to run there (timings differ by a few
percent from run to run)."""
NEAR_TIE = 1.01
"""A later kernel of `KERNELS` replaces an earlier one on a layer only when at least this much faster."""


class DenseFallback(enum.StrEnum):
    """What a layer holds when its 2:4 kernel is faster than dense at some tuned token counts and slower at others."""

    AUTO = "auto"
    """A dense copy for the layers that lose most per byte, as long as the swapped layers stay within their dense
    bytes; the compressed weight only for the rest."""
    COPY = "copy"
    """A dense copy for every such layer."""
    NONE = "none"
    """The compressed weight only."""
    COMPRESSED = "compressed"
    """No dense copy and one compressed layout: the compressed weight where it is faster than dense over the tuned
    token counts (weighted by the workload), else the dense weight only. The default for decoder LLMs."""


class Holds(enum.StrEnum):
    """What a swapped layer keeps: its kernel's weight and a dense copy (each bucket runs the faster), its kernel's
    weight only, or the dense weight only (the layer stays dense)."""

    COPY = "copy"
    COMPRESSED = "compressed"
    DENSE = "dense"
    TWO = "two"
    """Its kernel's weight and a second kernel's compressed layout (each bucket runs the faster kernel)."""


class Outcome(enum.StrEnum):
    """How a kernel did against the dense GEMM over the tuned buckets: dense won at every one, the kernel at every
    one, or each at some."""

    DENSE = "dense"
    SPARSE = "sparse"
    MIXED = "mixed"


@dataclass(frozen=True)
class Fp8Options:
    """The FP8 swap's choices (from `Fp8Config`)."""

    sparse: bool = True
    """False: dense FP8 for every layer, untimed."""
    fuse_gelu: bool = True
    """Try GELU in the epilogue (static scales: the next layer's input scale is known)."""


@dataclass(frozen=True)
class Options:
    """What a swap asks for: the dense fallback, the margin, the token counts tuned (bucket -> the token count named
    for it; empty: nothing tuned), for an FP8 swap its options, and for a decoder LLM the generation workload that
    weighs the token counts (None: each counts the same)."""

    fallback: DenseFallback = DenseFallback.AUTO
    min_speedup: float = MIN_SPEEDUP
    buckets: Mapping[int, int] = field(default_factory=dict)
    fp8: Fp8Options | None = None
    workload: Workload | None = None

    @property
    def tuned(self) -> bool:
        return bool(self.buckets)

    def weight(self, bucket: int) -> float:
        """How much a tuned bucket counts against the others (1.0 each without a workload)."""
        return self.workload.weight(self.buckets[bucket]) if self.workload is not None else 1.0


@dataclass
class Kernels:
    """The kernels a swap may use, in `KERNELS` order, and `why_not(kernel, unit)`: why one cannot run a unit's weights
    here (its device and dtype), or None. It is asked only of a kernel some layer could run on (the CUTLASS kernel
    builds itself when asked), and its answers are remembered."""

    in_play: tuple[Kernel, ...]
    why_not: Callable[[Kernel, Unit], str | None] = lambda kernel, unit: None
    _known: dict = field(default_factory=dict, init=False, repr=False)

    def reason(self, kernel: Kernel, unit: Unit) -> str | None:
        key = (kernel.name, unit.device, unit.dtype)
        if key not in self._known:
            self._known[key] = self.why_not(kernel, unit)
        return self._known[key]

    @property
    def dense(self) -> Kernel:
        return next(k for k in self.in_play if k.weights is Weights.MODEL and not k.sparse)

    def swapping(self, fp8: Fp8Options | None) -> list[Kernel]:
        """The kernels a layer can be swapped to: the 2:4 kernels of the model's dtype, or for an FP8 swap the e4m3
        kernels (only the dense ones with `sparse=False`)."""
        if fp8 is None:
            return [k for k in self.in_play if k.weights is Weights.MODEL and k.sparse]
        return [k for k in self.in_play if k.weights is Weights.E4M3 and (fp8.sparse or not k.sparse)]

    def fitting(self, unit: Unit, fp8: Fp8Options | None) -> list[Kernel]:
        """The kernels of `swapping` that take this unit and can run here."""
        return [k for k in self.swapping(fp8) if fits(k, unit) and self.reason(k, unit) is None]


@dataclass
class LayerPlan:
    """What the policy decided for one unit.

    Args:
        unit: the unit.
        holds: the kernels whose weights the layer keeps, the one that builds the layer first (`(dense,)`: the layer
            stays dense; `(cusparselt, dense)`: the compressed weight and a dense copy; `(triton_decode, cusparselt)`:
            two compressed layouts).
        runs: token-count bucket -> what runs there, one of `holds` (empty: nothing was tuned; the layer runs its
            kernel's default).
        gelu: the GELU after the layer runs in the kernel's epilogue.
        status: the report's word for it ("sparse", "sparse+dense", "sparse+sparse", "dense", "fp8 2:4", "fp8 dense").
        reason: why, with the measured speed-ups.
        times: token count -> (the dense GEMM's ms, the ms of what runs there), GELU included where it is fused.
    """

    unit: Unit
    holds: tuple[Kernel, ...]
    runs: dict[int, Run] = field(default_factory=dict)
    gelu: bool = False
    status: str = "dense"
    reason: str = ""
    times: dict[int, tuple[float | None, float | None]] = field(default_factory=dict)

    @property
    def kernel(self) -> Kernel:
        return self.holds[0]

    @property
    def keep_dense(self) -> bool:
        return any(k.name == DENSE_NAME for k in self.holds[1:])

    @property
    def layouts(self) -> tuple[Kernel, ...]:
        """The compressed kernels whose weights the layer holds (two for `Holds.TWO`)."""
        return tuple(k for k in self.holds if k.name != DENSE_NAME)


def fits(kernel: Kernel, unit: Unit) -> bool:
    """Whether `kernel` takes this unit's GEMM (shape, dtype, a fused group or not)."""
    return (kernel.groups or unit.single) and kernel.shape_problem(unit.shape, unit.dtype) is None


def fuses(kernel: Kernel, unit: Unit) -> bool:
    """Whether `kernel` can run the GELU after this unit in its epilogue."""
    gelu = unit.gelu
    if gelu is None or not kernel.sparse or unit.dtype not in kernel.gelu_dtypes:
        return False
    return kernel.gelu is Gelu.ANY or (kernel.gelu is Gelu.EXACT and gelu.exact)


def request(unit: Unit, kernel: Kernel, tokens: int, gelu: bool = False) -> GemmRequest:
    """The autotuner's request for `unit`'s GEMM on `kernel` at `tokens`."""
    return GemmRequest(kernel.name, *unit.shape, unit.dtype, unit.has_bias, tokens, gelu)


def wins(dense: Timing, own: Timing, min_speedup: float) -> bool:
    """Whether a kernel measured `own` beats the dense GEMM measured `dense` by `min_speedup`."""
    return bool(own.ms and dense.ms and dense.ms / own.ms >= min_speedup)


def bucket_run(kernel: Kernel | str, dense: Timing, own: Timing, min_speedup: float, has_dense: bool) -> Run:
    """What a layer on `kernel` runs at one bucket: the kernel where it wins; where dense wins, dense if the layer
    holds a dense weight, else the kernel anyway (dense only where the kernel has no timing at all)."""
    name = kernel if isinstance(kernel, str) else kernel.name
    if not wins(dense, own, min_speedup) and (has_dense or own.ms is None):
        return Run(DENSE_NAME)
    return Run(name, own.config)


# -- what to time ------------------------------------------------------------------------------------------------------


def requests(units: Sequence[Unit], kernels: Kernels, options: Options) -> list[GemmRequest]:
    """Every timing `decide` reads: per unit and tuned token count, the dense GEMM and each kernel that could run it
    (a kernel that can run the GELU after the layer in its epilogue with it, as it would run, and then the dense GEMM
    followed by GELU too). Nothing for an untuned swap."""
    _check_not_fp8(options)
    found: list[GemmRequest] = []
    for unit in units if options.tuned else ():
        fitting = kernels.fitting(unit, None)
        if not fitting:
            continue
        plain, with_gelu = [k for k in fitting if not fuses(k, unit)], [k for k in fitting if fuses(k, unit)]
        for tokens in options.buckets.values():
            found += [request(unit, k, tokens) for k in [kernels.dense, *plain]]
            if with_gelu:
                found += [request(unit, k, tokens, gelu=True) for k in [kernels.dense, *with_gelu]]
    return found


def _check_not_fp8(options: Options) -> None:
    if options.fp8 is not None:
        raise ValueError("an FP8 swap follows other rules: ask fp8_policy.requests and fp8_policy.decide.")


# -- the swap in the model's dtype ---------------------------------------------------------------------------------------


def decide(
    units: Sequence[Unit], kernels: Kernels, timings: Mapping[GemmRequest, Timing], options: Options
) -> list[LayerPlan]:
    """One `LayerPlan` per unit, from the timings of `requests(units, kernels, options)`."""
    _check_not_fp8(options)
    verdicts = [_choose_kernel(unit, kernels, timings, options) if options.tuned else None for unit in units]
    holds = _holds(units, verdicts, options)
    return [_plan(unit, verdict, held, kernels, options) for unit, verdict, held in zip(units, verdicts, holds)]


@dataclass
class Verdict:
    """One kernel against the dense GEMM on one unit, per tuned bucket (`gelu`: both with the GELU after the layer,
    the kernel with it in its epilogue)."""

    kernel: Kernel
    gelu: bool
    dense: dict[int, Timing]
    own: dict[int, Timing]
    wins: dict[int, bool]
    tokens: dict[int, int]
    notes: list[str] = field(default_factory=list)
    """Why the GELU after the layer stays a separate step, where another kernel could have run it."""
    moved: str = ""
    """Why the layer runs on this kernel and not on the first one that takes it."""
    second: Verdict | None = None
    """The kernel of another layout the layer could hold beside this one (`Holds.TWO`), where the memory rule may
    allow it."""

    @property
    def status(self) -> Outcome:
        if not any(self.wins.values()):
            return Outcome.DENSE
        return Outcome.SPARSE if all(self.wins.values()) else Outcome.MIXED

    def weighted(self, options: Options, view: str) -> float:
        """Weighted milliseconds over the tuned buckets: "own" (compressed only), "dense", "copy" (the faster of the
        two per bucket) or "two" (beside `second`)."""
        ms = {
            "own": lambda b: self.own[b].ms,
            "dense": lambda b: self.dense[b].ms,
            "copy": lambda b: min(self.dense[b].ms or float("inf"), self.own[b].ms or float("inf")),
            "two": lambda b: pair_ms(self, self.second, b, NEAR_TIE),
        }[view]
        return weighted({b: ms(b) for b in self.own}, options.weight)

    def speed(self) -> str:
        parts = []
        for bucket in sorted(self.own):
            dense, own = self.dense[bucket].ms, self.own[bucket].ms
            parts.append(f"{self.tokens[bucket]}: {f'{dense / own:.2f}x' if dense and own else 'n/a'}")
        return f"sparse/dense speed-up by tokens: {', '.join(parts)}"


def _verdict(unit: Unit, kernel: Kernel, dense: Kernel, timings: Mapping[GemmRequest, Timing], options: Options):
    gelu = fuses(kernel, unit)
    dense_ms = {b: timings[request(unit, dense, t, gelu)] for b, t in options.buckets.items()}
    own = {b: timings[request(unit, kernel, t, gelu)] for b, t in options.buckets.items()}
    won = {b: wins(dense_ms[b], own[b], options.min_speedup) for b in options.buckets}
    return Verdict(kernel, gelu, dense_ms, own, won, dict(options.buckets))


def _choose_kernel(unit: Unit, kernels: Kernels, timings, options: Options) -> Verdict | None:
    """The kernel a tuned unit runs on, against dense (None: no kernel that can run here takes it)."""
    fitting = kernels.fitting(unit, None)
    if not fitting:
        return None
    verdicts = [_verdict(unit, kernel, kernels.dense, timings, options) for kernel in fitting]
    chosen = verdicts[0]
    for verdict in verdicts[1:]:
        chosen = _challenge(chosen, verdict, options)
    if options.fallback in (DenseFallback.COPY, DenseFallback.AUTO) and chosen.status is not Outcome.DENSE:
        chosen.second = best_second(chosen, [v for v in verdicts if v is not chosen], options.weight, NEAR_TIE)
    for kernel in kernels.swapping(None):  # a kernel that could run the GELU, but not here
        problem = kernels.reason(kernel, unit) if fits(kernel, unit) and fuses(kernel, unit) else None
        if problem:
            chosen.notes.append(problem)
    return chosen


def _as_run(side: Verdict, other: Verdict, bucket: int, gelu_ms: float) -> dict[bool, float]:
    """The milliseconds of `side` at `bucket` as its layer would run: {with a dense copy: ..., compressed only: ...},
    plus the separate GELU step where `other` runs GELU in its epilogue and `side` does not."""
    dense, own = side.dense[bucket].ms, side.own[bucket].ms
    if side.status is Outcome.DENSE or not own:
        own = dense  # the layer stays dense
    extra = gelu_ms if other.gelu and not side.gelu else 0.0
    return {True: min(dense, own) + extra, False: own + extra}


def _challenge(held: Verdict, new: Verdict, options: Options) -> Verdict:
    """`new` where it runs the unit at least `NEAR_TIE` faster than `held`, both compared as the layer would run
    them: with a dense copy where dense wins (`COPY`), compressed only (`NONE`), or for `AUTO`, whose budget settles
    that later, both ways. Else `held`, noting why GELU stays a separate step where `new` would have run it."""

    def keep(why: str) -> Verdict:
        if new.gelu:
            held.notes.append(why)
        return held

    if new.status is Outcome.DENSE:
        return keep(f"dense GEMM + GELU beat the {new.kernel.label} with GELU")
    views = {DenseFallback.COPY: (True,), DenseFallback.NONE: (False,), DenseFallback.COMPRESSED: (False,)}.get(
        options.fallback, (True, False)
    )
    on_new, on_held = dict.fromkeys(views, 0.0), dict.fromkeys(views, 0.0)
    for bucket in new.own:
        if not (new.dense[bucket].ms and new.own[bucket].ms and held.dense[bucket].ms):
            return keep(f"the {new.kernel.label} was not measured at every token count")
        # the separate GELU step: the dense GEMM followed by GELU, less the dense GEMM alone
        gelu_ms = 0.0
        if new.gelu != held.gelu:
            with_gelu, without = (new, held) if new.gelu else (held, new)
            gelu_ms = max(0.0, with_gelu.dense[bucket].ms - without.dense[bucket].ms)
        new_ms, held_ms = _as_run(new, held, bucket, gelu_ms), _as_run(held, new, bucket, gelu_ms)
        for with_copy in views:
            on_new[with_copy] += options.weight(bucket) * new_ms[with_copy]
            on_held[with_copy] += options.weight(bucket) * held_ms[with_copy]
    ratio = min(on_held[v] / on_new[v] for v in views)
    if ratio < NEAR_TIE:  # a near tie stays on the earlier kernel
        return keep(f"the {new.kernel.label} with GELU took {1 / ratio:.2f}x the time of this GEMM and GELU")
    what = "with GELU in its epilogue (times and speed-ups include GELU)" if new.gelu else "(bias in its epilogue)"
    gelu = " + GELU" if new.gelu or held.gelu else ""
    new.moved = (
        f"runs on the {new.kernel.label} {what}: {ratio:.2f}x the {held.kernel.label} GEMM{gelu} over the tuned "
        f"token counts{' (weighted by the workload)' if options.workload else ''}"
    )
    if not new.gelu:  # why GELU stays a separate step still holds on the new kernel
        new.notes[:0] = held.notes
    return new


def _holds(units: Sequence[Unit], verdicts: Sequence[Verdict | None], options: Options) -> list[Holds | None]:
    """What each unit holds (None: no verdict)."""
    held = [None if verdict is None else _held(verdict, options) for verdict in verdicts]
    if options.fallback is DenseFallback.AUTO:
        held = budget_dense_copies(units, verdicts, held, options.weight)
    return held


def _held(verdict: Verdict, options: Options) -> Holds:
    """What one unit holds by the fallback's rule (for `AUTO`, before the budget): a second layout where it runs the
    tuned token counts at least as fast as a dense copy would (`verdict.second` is set only where the fallback allows
    a copy's bytes)."""
    if verdict.status is Outcome.DENSE:
        return Holds.DENSE
    if verdict.second is not None and (
        verdict.status is Outcome.SPARSE or verdict.weighted(options, "two") <= verdict.weighted(options, "copy")
    ):
        return Holds.TWO
    if verdict.status is Outcome.SPARSE or options.fallback is DenseFallback.NONE:
        return Holds.COMPRESSED
    if options.fallback is DenseFallback.COMPRESSED:
        pays = verdict.weighted(options, "dense") >= options.min_speedup * verdict.weighted(options, "own")
        return Holds.COMPRESSED if pays else Holds.DENSE
    return Holds.COPY


def budget_dense_copies(
    units: Sequence[Unit],
    verdicts: Sequence[Verdict | None],
    held: Sequence[Holds | None],
    weight: Callable[[int], float] = lambda bucket: 1.0,
) -> list[Holds | None]:
    """`DenseFallback.AUTO`: what each unit holds, with the swapped layers within their dense bytes.

    A mixed unit (its kernel faster at some tuned token counts, dense at others) can keep a dense copy (the faster
    kernel everywhere, for its compressed bytes on top of the dense ones), its compressed weight only (the kernel runs
    where dense would be faster), or stay dense (its dense bytes, and no gain); a unit that holds a second compressed
    layout (`Holds.TWO`, mixed or not) can give it up the same ways. Each starts with what `held` says; while the units
    are over their dense bytes (units holding one compressed layout save what it saves), the unit that gives up the
    least speed per byte saved moves to compressed-only or to dense. Speed is the GEMM time saved against dense at each
    tuned bucket, relative to the dense GEMM time of all units there and times the bucket's `weight`, so without a
    workload every named token count weighs the same.
    """
    totals: dict[int, float] = {}
    for verdict in verdicts:
        for bucket, timing in (verdict.dense if verdict else {}).items():
            totals[bucket] = totals.get(bucket, 0.0) + (timing.ms or 0.0)

    def gain(index: int, holds: Holds) -> float:
        total, verdict = 0.0, verdicts[index]
        for bucket, own in verdict.own.items():
            dense, sparse = verdict.dense[bucket].ms, own.ms
            if not (dense and sparse and totals.get(bucket)):
                continue
            if holds is Holds.TWO:
                ran = pair_ms(verdict, verdict.second, bucket, NEAR_TIE)
            else:
                ran = {Holds.COPY: min(dense, sparse), Holds.COMPRESSED: sparse, Holds.DENSE: dense}[holds]
            total += weight(bucket) * (dense - ran) / totals[bucket]
        return total

    def extra_bytes(index: int, holds: Holds) -> int:
        """Bytes over the unit's dense bytes."""
        unit, verdict = units[index], verdicts[index]
        compressed = verdict.kernel.weight_bytes(unit.shape, unit.dtype)
        if holds is Holds.TWO:
            return compressed + verdict.second.kernel.weight_bytes(unit.shape, unit.dtype) - unit.dense_bytes
        return {Holds.COPY: compressed, Holds.COMPRESSED: compressed - unit.dense_bytes, Holds.DENSE: 0}[holds]

    start = {i: h for i, h in enumerate(held) if h in (Holds.COPY, Holds.TWO)}
    now = dict(start)
    over = sum(extra_bytes(i, h) for i, h in enumerate(held) if h is not None)
    moved: list[int] = []
    while over > 0:
        moves = [
            ((gain(i, h) - gain(i, to)) / saved, i, to, saved)
            for i, h in now.items()
            if h is start[i]
            for to in (Holds.COMPRESSED, Holds.DENSE)
            if (saved := extra_bytes(i, h) - extra_bytes(i, to)) > 0
        ]
        if not moves:
            break
        _, index, to, saved = min(moves)
        now[index] = to
        over -= saved
        moved.append(index)
    for index in reversed(moved):  # the last moves may have saved more than needed: take back what still fits
        cost = extra_bytes(index, start[index]) - extra_bytes(index, now[index])
        if over + cost <= 0:
            now[index] = start[index]
            over += cost
    return [now.get(i, h) for i, h in enumerate(held)]


def unswappable(unit: Unit, kernels: Kernels, fp8: Fp8Options | None) -> str:
    """Why no kernel of the swap takes this unit, in the words of the first one."""
    kernel = kernels.swapping(fp8)[0]
    if not (kernel.groups or unit.single):
        return f"the {kernel.label} runs single layers, not fused groups"
    return kernel.shape_problem(unit.shape, unit.dtype) or kernels.reason(kernel, unit) or "no kernel takes it"


def untuned(unit: Unit, kernels: Kernels, fp8: Fp8Options | None) -> LayerPlan:
    """A unit of an untuned swap: the first kernel that takes it, in its default configuration."""
    for kernel in kernels.swapping(fp8):
        if kernel.sparse != (fp8 is None or fp8.sparse) or not fits(kernel, unit) or kernels.reason(kernel, unit):
            continue
        if fp8 is not None and not fp8.sparse:
            return LayerPlan(
                unit, (kernel,), status=kernel.status, reason="dense FP8 for every layer (Fp8Config(sparse=False))"
            )
        return LayerPlan(unit, (kernel,), status=kernel.status, reason=f"not tuned (autotune off): {kernel.untuned}")
    return LayerPlan(unit, (kernels.dense,), reason=unswappable(unit, kernels, fp8))


_WHY = {
    (Holds.COPY, DenseFallback.AUTO): "within the dense weights' bytes",
    (Holds.COPY, DenseFallback.COPY): "dense_fallback='copy'",
    (Holds.COMPRESSED, DenseFallback.AUTO): "a dense copy would take the swapped layers over their dense bytes",
    (Holds.COMPRESSED, DenseFallback.NONE): "dense_fallback='none'",
    (Holds.COMPRESSED, DenseFallback.COMPRESSED): "dense_fallback='compressed'",
    (Holds.TWO, DenseFallback.AUTO): "within the dense weights' bytes",
    (Holds.TWO, DenseFallback.COPY): "in place of the dense copy dense_fallback='copy' allows",
}


def _base_reason(verdict: Verdict, held: Holds, options: Options) -> str:
    speed, fallback = verdict.speed(), options.fallback
    if verdict.status is Outcome.DENSE:
        return f"dense is faster at every tuned token count ({speed})"
    if held is Holds.TWO:
        return _two_reason(verdict, _WHY[held, fallback])
    if verdict.status is Outcome.SPARSE:
        return f"sparse is faster at every tuned token count ({speed})"
    if held is Holds.DENSE and fallback is DenseFallback.COMPRESSED:
        return (
            f"kept dense: compressed only, the {verdict.kernel.label} would be slower than dense over the tuned token "
            f"counts{' (weighted by the workload)' if options.workload else ''}, and dense_fallback='compressed' keeps "
            f"no dense copy ({speed})"
        )
    if held is Holds.DENSE:
        return (
            "kept dense: its sparse gains were worth less per byte than other layers' within the dense weights' "
            f"bytes, and sparse alone would be slower at some token counts ({speed})"
        )
    if held is Holds.COPY:
        return f"dense copy kept for the token counts where dense is faster, {_WHY[held, fallback]} ({speed})"
    return f"compressed weight only ({_WHY[held, fallback]}): sparse runs where dense would be faster ({speed})"


def _two_reason(verdict: Verdict, why: str) -> str:
    """Names the kernel each tuned token count runs, with its speed-up over dense."""
    parts = []
    for bucket in sorted(verdict.own):
        chosen = pair_kernel(verdict, verdict.second, bucket, NEAR_TIE) or verdict
        dense, own = verdict.dense[bucket].ms, chosen.own[bucket].ms
        parts.append(
            f"{verdict.tokens[bucket]}: {chosen.kernel.label} {f'{dense / own:.2f}x' if dense and own else 'n/a'}"
        )
    return (
        f"holds the {verdict.kernel.label}'s and the {verdict.second.kernel.label}'s compressed weights ({why}); each "
        f"token count runs the faster kernel (speed-up over dense by tokens: {', '.join(parts)})"
    )


def _runs(verdict: Verdict, held: Holds, dense: Kernel, min_speedup: float) -> dict[int, Run]:
    """What each tuned bucket runs, from the kernels the layer holds."""
    runs = {}
    for bucket, own in verdict.own.items():
        if held is Holds.DENSE:
            runs[bucket] = Run(dense.name)
        elif held is Holds.TWO:
            chosen = pair_kernel(verdict, verdict.second, bucket, NEAR_TIE)
            runs[bucket] = Run(dense.name) if chosen is None else Run(chosen.kernel.name, chosen.own[bucket].config)
        else:
            runs[bucket] = bucket_run(verdict.kernel, verdict.dense[bucket], own, min_speedup, held is Holds.COPY)
    return runs


def _plan(unit: Unit, verdict: Verdict | None, held: Holds | None, kernels: Kernels, options: Options) -> LayerPlan:
    if verdict is None:
        if options.tuned:
            return LayerPlan(unit, (kernels.dense,), reason=unswappable(unit, kernels, None))
        return untuned(unit, kernels, None)
    dense, kernel = kernels.dense, verdict.kernel
    second = verdict.second.kernel if held is Holds.TWO else None
    holds = {
        Holds.COPY: (kernel, dense),
        Holds.COMPRESSED: (kernel,),
        Holds.DENSE: (dense,),
        Holds.TWO: (kernel, second),
    }
    runs = _runs(verdict, held, dense, options.min_speedup)
    ran = {kernel.name: verdict.own, dense.name: verdict.dense}
    if second is not None:
        ran[second.name] = verdict.second.own
    times = {verdict.tokens[b]: (verdict.dense[b].ms, ran[run.kernel][b].ms) for b, run in sorted(runs.items())}
    reason = _base_reason(verdict, held, options)
    if held is not Holds.DENSE and verdict.moved:
        reason += f"; {verdict.moved}"
    reason += "".join(f"; GELU stays a separate step ({note})" for note in verdict.notes)
    extra = {Holds.COPY: "+dense", Holds.TWO: "+" + (second.status if second is not None else "")}.get(held, "")
    status = "dense" if held is Holds.DENSE else kernel.status + extra
    return LayerPlan(unit, holds[held], runs, verdict.gelu and held is not Holds.DENSE, status, reason, times)
