"""What a 2:4 layer holds beside its kernel's weight, and how the tuned token counts weigh against each other: pure
functions of the timings, used by `policy.py`.

A kernel reads its weight in a *layout* (`Kernel.layout`, default its name): cuSPARSELt's opaque compressed tensor,
the CUTLASS kernel's values and metadata, the Triton decode kernel's values and 2-bit positions, the dense weight.
Kernels that read the same layout share its bytes. A layer holds its kernel's layout and, where the memory rule
leaves room (`DenseFallback` in `policy.py`), a dense copy or a second compressed layout; each token-count bucket then
runs the fastest kernel among those it holds.

How much a bucket counts: for an encoder, every tuned token count the same; for a decoder LLM, as a generation runs
them (`Workload`): a prompt's prefill once, then one decode step per new token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DECODE_TOKENS = 64
"""The largest token count a decoder's workload counts as a decode step (batch 64 of one new token each)."""


@dataclass(frozen=True)
class Workload:
    """A generation workload that weighs a decoder's tuned token counts: each prompt of `prompt_tokens` is prefilled
    once, then `new_tokens` decode steps follow. A token count up to `decode_tokens` is a decode step (the batch, one
    new token per sequence) and counts `new_tokens` times; a larger one is a prefill and counts once. So a layout that
    saves a tenth of a decode step's GEMM outweighs one that saves the same share of a prefill's, by `new_tokens`."""

    prompt_tokens: int = 512
    new_tokens: int = 256
    decode_tokens: int = DECODE_TOKENS

    def weight(self, tokens: int) -> float:
        """How many times a generation runs a GEMM at `tokens` rows, per prompt."""
        return float(self.new_tokens) if tokens <= self.decode_tokens else 1.0

    def describe(self) -> str:
        return (
            f"a {self.prompt_tokens}-token prompt, then {self.new_tokens} new tokens: a token count up to "
            f"{self.decode_tokens} counts {self.new_tokens} times (decode steps), a larger one once (prefill)"
        )


def layout(kernel: Any) -> str:
    """The layout a kernel reads its weight in (`Kernel.layout`; a kernel without one has its own, its name)."""
    return getattr(kernel, "layout", kernel.name)


def pair_kernel(primary: Any, second: Any, bucket: int, tie: float) -> Any | None:
    """Which of two verdicts a layer holding both layouts runs at `bucket`: the second where it was measured and is at
    least `tie` faster than the first (or the first was not measured); else the first (None: neither measured)."""
    mine, theirs = primary.own[bucket].ms, second.own[bucket].ms
    if theirs and (not mine or theirs * tie <= mine):
        return second
    return primary if mine else None


def pair_ms(primary: Any, second: Any, bucket: int, tie: float) -> float:
    """Milliseconds of a layer holding both layouts at `bucket` (the dense GEMM's where neither kernel was measured:
    the layer then runs its kernel untimed)."""
    chosen = pair_kernel(primary, second, bucket, tie)
    return chosen.own[bucket].ms if chosen is not None else primary.dense[bucket].ms


def weighted(ms: Mapping[int, float | None], weight: Callable[[int], float]) -> float:
    """The weighted sum of per-bucket milliseconds (a bucket without a time counts as infinitely slow)."""
    return sum(weight(b) * (t if t else float("inf")) for b, t in ms.items())


def best_second(primary: Any, rivals: Sequence[Any], weight: Callable[[int], float], tie: float) -> Any | None:
    """The rival verdict whose layout, held beside `primary`'s, runs the layer fastest over the weighted buckets, if it
    runs some bucket at least `tie` faster than `primary`'s kernel; None otherwise. A layer that runs GELU in its
    epilogue holds one layout (its GELU module is replaced for every call), and a rival of the same layout adds
    nothing."""
    if primary.gelu:
        return None
    candidates = [
        r for r in rivals
        if not r.gelu and layout(r.kernel) != layout(primary.kernel)
        and any(pair_kernel(primary, r, b, tie) is r for b in primary.own)
    ]  # fmt: skip
    if not candidates:
        return None
    return min(candidates, key=lambda r: weighted({b: pair_ms(primary, r, b, tie) for b in primary.own}, weight))
