"""The FP8 swap's decisions (`swap_to_semi_structured_(fp8=...)`): pure functions of measured timings, with the
types and helpers of `policy.py`.

Each layer takes the fastest of its fp16 self and the e4m3 kernels over the tuned token counts (each weighed relative
to its fp16 time, and for a decoder LLM by how often a generation runs it; an e4m3 kernel must beat fp16, and a later
one of `KERNELS` the earlier, by `min_speedup`; one weight format per layer, so the weights never take more bytes than
the fastest choice needs). Then a 2:4 layer whose
GELU feeds another FP8 layer runs GELU and that layer's e4m3 quantization in its epilogue where that measures no
slower than the GEMM plus the separate GELU step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .kernels.base import GemmRequest, Kernel, Run, Timing, Weights
from .policy import Kernels, LayerPlan, Options, fits, fuses, request, untuned
from .units import Unit


def requests(units: Sequence[Unit], kernels: Kernels, options: Options) -> list[GemmRequest]:
    """Every timing `decide` reads: per unit and tuned token count, the fp16 dense GEMM and each e4m3 kernel that
    could run it; for a layer whose GELU could run in its kernel's epilogue (`gelu_blocks`), that kernel with GELU and
    the fp16 dense GEMM followed by GELU too. Nothing for an untuned swap, or one to dense FP8 everywhere."""
    if not options.tuned or not options.fp8.sparse:
        return []
    blocks = gelu_blocks(units, kernels, options)
    found: list[GemmRequest] = []
    for unit in units:
        fitting = kernels.fitting(unit, options.fp8)
        if not fitting:
            continue
        for tokens in options.buckets.values():
            found += [request(unit, k, tokens) for k in [kernels.dense, *fitting]]
            if unit.name in blocks:
                found += [request(unit, k, tokens, gelu=True) for k in [kernels.dense, *blocks[unit.name]]]
    return found


def decide(
    units: Sequence[Unit], kernels: Kernels, timings: Mapping[GemmRequest, Timing], options: Options
) -> list[LayerPlan]:
    """One `LayerPlan` per unit, from the timings of `requests(units, kernels, options)`."""
    plans = [_fp8_plan(unit, kernels, timings, options) for unit in units]
    by_name = {plan.unit.name: plan for plan in plans}
    for name, fusing in gelu_blocks(units, kernels, options).items():
        producer = by_name[name]
        _fuse_gelu(producer, by_name[producer.unit.gelu.next_layer], fusing, kernels, timings, options)
    return plans


def gelu_blocks(units: Sequence[Unit], kernels: Kernels, options: Options) -> dict[str, list[Kernel]]:
    """The units whose GELU could run in their FP8 kernel's epilogue (unit name -> the kernels that can), writing
    e4m3 for the next layer: a single layer followed by GELU and by a single layer that an e4m3 kernel takes."""
    if options.fp8 is None or not (options.fp8.fuse_gelu and options.fp8.sparse):
        return {}
    by_name = {u.name: u for u in units if u.single}
    swapping = kernels.swapping(options.fp8)
    found = {}
    for unit in units:
        after = by_name.get(unit.gelu.next_layer) if unit.single and unit.gelu else None
        if after is None or not any(fits(k, after) for k in swapping):
            continue
        fusing = [k for k in swapping if fits(k, unit) and fuses(k, unit) and kernels.reason(k, unit) is None]
        if fusing:
            found[unit.name] = fusing
    return found


def _fp8_plan(unit: Unit, kernels: Kernels, timings, options: Options) -> LayerPlan:
    """What one unit becomes in FP8: its fp16 self or an e4m3 kernel, whichever the autotuner measured fastest over the
    named token counts (each weighed relative to its fp16 time). One weight format per layer, so the weights never take
    more bytes than the fastest choice needs."""
    fitting = kernels.fitting(unit, options.fp8) if options.tuned and options.fp8.sparse else []
    if not fitting:
        return untuned(unit, kernels, options.fp8)
    dense, buckets = kernels.dense, options.buckets
    base = {b: timings[request(unit, dense, t)] for b, t in buckets.items()}
    own = {k: {b: timings[request(unit, k, t)] for b, t in buckets.items()} for k in fitting}
    measured = [b for b in buckets if base[b].ms]
    if not any(own[k][b].ms for k in fitting for b in measured):  # the tuning process died before timing them
        notes = {t.note for t in [*base.values(), *(t for k in fitting for t in own[k].values())] if t.note}
        why = "; ".join(sorted(notes)) or "no timings"
        runs, times = (
            {b: Run(dense.name) for b in buckets},
            {buckets[b]: (base[b].ms, base[b].ms) for b in sorted(buckets)},
        )
        return LayerPlan(
            unit, (dense,), runs, reason=f"left fp16: its FP8 GEMMs were not measured ({why})", times=times
        )
    # each bucket's time relative to fp16, weighed by how often the workload runs it (a decoder LLM's decode steps
    # count new_tokens times, its prefill once; each bucket the same otherwise)
    relative = {k: sum(options.weight(b) * (own[k][b].ms or math.inf) / base[b].ms for b in measured) for k in fitting}
    best = dense
    if min(relative.values()) * options.min_speedup <= sum(options.weight(b) for b in measured):  # beats fp16
        best = fitting[0]
        for kernel in fitting[1:]:  # a later kernel must beat the earlier by the margin too
            if relative[kernel] * options.min_speedup <= relative[best]:
                best = kernel
    ordered = sorted(fitting, key=lambda k: not k.sparse)  # the 2:4 kernels first

    def speed(b: int) -> str:
        if not (base[b].ms and all(own[k][b].ms for k in ordered)):
            return f"{buckets[b]}: n/a"
        return f"{buckets[b]}: " + ", ".join(f"{k.label} {base[b].ms / own[k][b].ms:.2f}x" for k in ordered)

    what = "fp16 is fastest" if best is dense else f"{best.label} is fastest"
    speeds = ", ".join(speed(b) for b in sorted(buckets))
    ran = base if best is dense else own[best]
    return LayerPlan(
        unit,
        (best,),
        runs={b: Run(best.name, () if best is dense else ran[b].config) for b in buckets},
        status=best.status,
        reason=f"{what} over the tuned token counts (GEMM speed over fp16 by tokens: {speeds})",
        times={buckets[b]: (base[b].ms, ran[b].ms) for b in sorted(buckets)},
    )


def _fuse_gelu(
    producer: LayerPlan, consumer: LayerPlan, fusing: list[Kernel], kernels: Kernels, timings, options: Options
) -> None:
    """Whether `producer` runs the GELU after it in its epilogue: it must be on a kernel that can, feeding an FP8
    layer, and the fused kernel (GELU and e4m3 output included) must be measured no slower, over the named token
    counts, than what it replaces: the plain GEMM plus the separate GELU step (the dense GEMM followed by GELU, less
    the dense GEMM alone)."""
    kernel, unit = producer.kernel, producer.unit
    if kernel not in fusing or consumer.kernel.weights is not Weights.E4M3:
        if kernel in fusing:
            producer.reason += (
                "; GELU stays a separate step: this layer and the next are not both FP8 with this one 2:4"
            )
        return
    fused: dict[int, Timing] = {}
    if options.tuned:
        score, plain = 0.0, 0.0
        for b, tokens in options.buckets.items():
            fused[b] = timings[request(unit, kernel, tokens, gelu=True)]
            alone, base = timings[request(unit, kernel, tokens)], timings[request(unit, kernels.dense, tokens)]
            base_gelu = timings[request(unit, kernels.dense, tokens, gelu=True)]
            if not (fused[b].ms and alone.ms and base.ms):
                producer.reason += (
                    "; GELU stays a separate step: the fused kernel was not measured at every token count"
                )
                return
            score += fused[b].ms / base.ms
            plain += (alone.ms + max(0.0, (base_gelu.ms or 0.0) - base.ms)) / base.ms
        if score > plain:
            producer.reason += (
                f"; GELU stays a separate step: the fused kernel was slower than the plain one and GELU "
                f"({score / plain:.2f}x their time)"
            )
            return
        gelu = {b: timings[request(unit, kernels.dense, t, gelu=True)] for b, t in options.buckets.items()}
        why = "fp16 GEMM + GELU over this, by tokens: " + ", ".join(
            f"{options.buckets[b]}: {gelu[b].ms / fused[b].ms:.2f}x" for b in sorted(fused) if gelu[b].ms
        )
        producer.runs = {b: Run(kernel.name, t.config) for b, t in fused.items()}
        producer.times = {options.buckets[b]: (gelu[b].ms, fused[b].ms) for b in sorted(fused)}
    else:
        why = "not tuned (autotune off)"
    producer.gelu = True
    producer.reason += f"; GELU and {consumer.unit.name}'s e4m3 quantization run in its epilogue ({why})"
