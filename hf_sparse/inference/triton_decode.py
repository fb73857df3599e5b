"""A 2:4 GEMM for decoding (1-64 token rows) written in Triton: the compressed layout, the kernel and its launcher.

Decoding is memory-bound: each step reads every weight once for a handful of rows, so a 2:4 kernel is as fast as the
bytes it reads. The layout keeps those bytes few and the reads wide:

- `values` `(out_features, in_features / 2)`, in the layer's dtype: the two kept weights of each group of 4
  consecutive inputs, in input order. A row is contiguous, so a program reads its rows in 16-byte vectors.
- `meta` `(out_features, ceil(in_features / 32))` int32: per group a nibble, the first kept position (bits 0-1)
  and the second (bits 2-3), eight groups a word (group `g` at bits `4 * (g % 8)`). A group with fewer than two
  nonzeros keeps a zero at the lowest free position, so the first position is always below the second.

Values plus metadata are 9/16 of the dense bytes, as cuSPARSELt's and CUTLASS's layouts are.

FP8 x 2:4 (weight-only, `compress_fp8`): the same layout with the kept values in `float8_e4m3fn` and a float32 scale
per output feature (the row's largest kept value / 448, as `quantization.quantize_weight` scales every e4m3 weight of
hf-sparse): 0.5 + 0.125 bytes per weight, 0.3125x the fp16 dense bytes (plus 4 bytes per output feature). The
activations stay fp16/bf16: the kernel widens each e4m3 value to the activations' dtype (exact: every e4m3 value is an
fp16 and a bf16 value), accumulates `x @ values.T` in fp32 and multiplies by the scale in its epilogue, before the
bias.

The kernel (after Sparse-Marlin's design for small batches; no code of it) gives each program a block of output
features, a block of token rows and one slice of the inputs (split-K), so that even one token row spreads over
enough programs to keep every SM reading; the programs of one weight block and several row blocks are launched side
by side, so the weights come from memory once and from L2 after. A program walks its slice `BLOCK_K` inputs at a time: it loads the values
and metadata of its rows once, and either (few rows) picks each value's activation out of the loaded activations by
its position and accumulates in fp32 registers, or (16 rows or more) expands the weights to a dense tile in registers
and runs `tl.dot` with fp32 accumulation. With split-K, each slice writes an fp32 partial sum and a second kernel adds
the slices, the bias and casts (deterministic, no atomics); without, the first kernel does that itself. An FP8 weight's
scale is applied once, after the slices are summed: it is one factor per output feature, so it factors out of the sum
(`sum(p_s) * scale == sum(p_s * scale)` in exact arithmetic), and applying it after the sum rounds once, in the same
order as the kernel without split-K does, where scaling each partial would round once per slice and read the scales
`split_k` times.

Triton is imported on first use only: `import hf_sparse` works without it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .quantization import E4M3, quantize_weight

MAX_ROWS = 64
"""The most token rows an untuned layer picks its default configuration for: a decode kernel (it runs more rows
correctly, one block of rows after another, re-reading the weights for each block; the autotuner times it up to
`kernels.triton_decode.PREFILL_ROWS`)."""


class DecodeConfig(NamedTuple):
    """One configuration of the kernel: the rows, output features and inputs a program takes (`block_m`,
    `block_n`, `block_k`), the slices the inputs are split into (`split_k`), and Triton's `num_warps` and
    `num_stages`. `block_m` below 16 accumulates in registers; 16 and up runs `tl.dot` on a dense tile."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int

    @property
    def uses_dot(self) -> bool:
        return self.block_m >= 16

    def describe(self) -> str:
        return (
            f"block {self.block_m}x{self.block_n}x{self.block_k}, split-k {self.split_k}, {self.num_warps} warps, "
            f"{self.num_stages} stages"
        )


# The configurations the autotuner sweeps, likeliest first (a sweep stops after its time budget). Few rows: many
# narrow programs (one H100 needs several hundred to keep 132 SMs reading) and deep slices; more rows: tensor-core
# tiles of 16-64 rows.
CONFIGS: tuple[DecodeConfig, ...] = tuple(
    DecodeConfig(*c)
    for c in (
        (1, 32, 256, 4, 4, 3),
        (1, 32, 256, 2, 4, 3),
        (1, 64, 256, 4, 4, 3),
        (1, 16, 512, 4, 4, 3),
        (1, 32, 512, 8, 8, 3),
        (1, 64, 128, 8, 4, 4),
        (1, 32, 256, 1, 4, 3),
        (1, 128, 128, 4, 8, 3),
        (4, 32, 128, 4, 4, 3),
        (4, 16, 256, 4, 4, 3),
        (16, 64, 128, 4, 4, 3),
        (16, 64, 128, 2, 4, 3),
        (16, 32, 256, 4, 4, 3),
        (16, 128, 128, 2, 8, 3),
        (16, 64, 256, 4, 8, 3),
        (32, 64, 128, 2, 4, 3),
        (32, 64, 128, 4, 4, 3),
        (64, 64, 128, 2, 4, 3),
        (64, 64, 128, 4, 4, 4),
        (64, 128, 64, 4, 8, 3),
    )
)


def configs_for(rows: int) -> list[DecodeConfig]:
    """The configurations worth timing at `rows` token rows: register accumulation up to 8 rows, tensor-core tiles
    from 2 rows on, no tile taller than the rows need."""
    tall = max(16, 1 << max(rows - 1, 0).bit_length())
    return [c for c in CONFIGS if (rows <= 8 if not c.uses_dot else 2 <= rows and c.block_m <= tall)]


def default_config(rows: int) -> DecodeConfig:
    """The configuration an untuned layer runs at `rows`: the first one `configs_for` lists."""
    return configs_for(min(max(rows, 1), MAX_ROWS))[0]


# -- the layout --------------------------------------------------------------------------------------------------------


def layout_problem(out_features: int, in_features: int) -> str | None:
    """Why a `(out_features, in_features)` weight has no such layout, or None."""
    if in_features % 4 or in_features == 0 or out_features == 0:
        return (
            f"the Triton decode kernel needs in_features to be a positive multiple of 4 (groups of 4 inputs); this "
            f"GEMM is {out_features}x{in_features}"
        )
    return None


def compress(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(values, meta)` of a 2:4 `weight` `(out_features, in_features)` (see the module docstring), on its device.

    Raises:
        ValueError: the shape has no such layout, or a group of 4 holds more than 2 nonzeros.
    """
    out_features, in_features = weight.shape
    problem = layout_problem(out_features, in_features)
    if problem:
        raise ValueError(problem)
    groups = weight.detach().reshape(out_features, in_features // 4, 4)
    nonzero = groups != 0
    if bool((nonzero.sum(-1) > 2).any()):
        raise ValueError("the weight is not 2:4: some group of 4 inputs holds more than 2 nonzeros; prune it first.")
    # the nonzeros first (then zeros), lower positions first; the two kept positions in ascending order
    order = (~nonzero).to(torch.int64) * 4 + torch.arange(4, device=weight.device)
    kept = order.argsort(dim=-1)[..., :2].sort(dim=-1).values
    values = groups.gather(-1, kept).reshape(out_features, in_features // 2).contiguous()
    nibbles = kept[..., 0] | (kept[..., 1] << 2)  # (out_features, groups), int64
    pad = (-nibbles.shape[1]) % 8
    nibbles = torch.nn.functional.pad(nibbles, (0, pad)).reshape(out_features, -1, 8)
    words = (nibbles << (4 * torch.arange(8, device=weight.device))).sum(-1)  # < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same bits, as int32
    return values, words.to(torch.int32).contiguous()


def compress_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `(values, meta, scale)` of a 2:4 `weight` for the FP8 kernel: `compress`'s layout with the kept values in
    e4m3 and one float32 scale per output feature (`quantize_weight` of the kept values, so a row's largest kept value
    maps to 448), `weight ~ decompress(values, meta) * scale[:, None]`.

    Raises:
        ValueError: as `compress`.
    """
    values, meta = compress(weight)
    values, scale = quantize_weight(values)
    return values, meta, scale


def dequantize(values: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """The float32 dense weight a `compress_fp8`ed one stands for: the e4m3 values times their row's scale."""
    return decompress(values, meta, in_features).float() * scale[:, None]


def decompress(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense weight `(out_features, in_features)` of a `compress`ed one, exactly (e4m3 values included)."""
    if values.dtype == E4M3:  # no scatter for float8 on the CPU: move the bytes (a zero byte is e4m3's +0)
        return decompress(values.view(torch.uint8), meta, in_features).view(E4M3)
    out_features, groups = values.shape[0], in_features // 4
    words = meta.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=meta.device)
    nibbles = ((words[..., None] >> shifts) & 15).reshape(out_features, -1)[:, :groups]
    kept = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)  # (out_features, groups, 2)
    dense = torch.zeros(out_features, groups, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, kept, values.reshape(out_features, groups, 2))
    return dense.reshape(out_features, in_features)


# -- the kernels (Triton, imported on first use) ---------------------------------------------------------------------


def triton_problem() -> str | None:
    """Why Triton cannot be imported here, or None."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return (
            f"the Triton decode kernel needs Triton (PyTorch's CUDA wheels install it: pip install triton); "
            f"importing it failed: {err}"
        )
    return None


@functools.cache
def _kernels():
    """Triton and the two kernels, imported on first use."""
    import triton

    from ._decode_jit import decode_kernel, reduce_kernel

    return triton, decode_kernel, reduce_kernel


REDUCE_BLOCK = 1024


def decode_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None,
    config: DecodeConfig | tuple[int, ...],
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T (+ bias)` for a 2D contiguous `x` `(rows, in_features)` and `W` given as `compress` returns it, in
    the configuration `config`, accumulated in fp32 and returned in `x`'s dtype.

    With `scale` (FP8 x 2:4), `W` is given as `compress_fp8` returns it, `(values, meta, scale)` with e4m3 `values`:
    `(x @ values.T) * scale (+ bias)`, the scale and the bias applied in fp32 in the epilogue (after split-K's sum).

    Raises:
        ValueError: the inputs do not fit each other or the configuration is not one this kernel runs.
    """
    config = DecodeConfig(*config)
    rows, in_features = x.shape
    out_features = values.shape[0]
    _check(x, values, meta, bias, config, scale)
    triton, decode_kernel, reduce_kernel = _kernels()
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    tiles = triton.cdiv(in_features, config.block_k)
    split = max(1, min(config.split_k, tiles))
    per_split = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, per_split)  # no empty slice
    grid = (triton.cdiv(rows, config.block_m), triton.cdiv(out_features, config.block_n), split)
    target = out if split == 1 else torch.empty(split, rows, out_features, dtype=torch.float32, device=x.device)
    # absent bias and scale: any pointer in their place (a constexpr switch keeps them unread)
    bias_arg, scale_arg = bias if bias is not None else values, scale if scale is not None else values
    decode_kernel[grid](
        x, values, meta, scale_arg, bias_arg, target, rows, out_features, in_features,
        x.stride(0), values.stride(0), meta.stride(0), out_features, rows * out_features, per_split,
        SCALED=scale is not None, HAS_BIAS=bias is not None, SPLIT=split > 1, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, USE_DOT=config.uses_dot,
        EVEN_K=in_features % config.block_k == 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split > 1:
        total = rows * out_features
        reduce_kernel[(triton.cdiv(total, REDUCE_BLOCK),)](
            target, scale_arg, bias_arg, out, total, out_features, split,
            SCALED=scale is not None, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4,
        )  # fmt: skip
    return out


def _check(x, values, meta, bias, config: DecodeConfig, scale) -> None:
    rows, in_features = x.shape
    out_features = values.shape[0]
    if tuple(values.shape) != (out_features, in_features // 2) or tuple(meta.shape) != (
        out_features,
        -(-in_features // 32),
    ):
        raise ValueError(
            f"the compressed weight ({tuple(values.shape)} values, {tuple(meta.shape)} metadata) does not fit "
            f"inputs of {in_features} features; compress the weight with triton_decode.compress."
        )
    if meta.dtype != torch.int32:
        raise ValueError(f"metadata of {meta.dtype}: the positions are packed into int32 (triton_decode.compress).")
    problem = _dtype_problem(x, values, scale)
    if problem:
        raise ValueError(problem)
    if not (x.is_contiguous() and values.is_contiguous() and meta.is_contiguous()):
        raise ValueError("the Triton decode kernel takes contiguous inputs, values and metadata.")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias of shape {tuple(bias.shape)} for {out_features} output features.")
    if config.block_k % 32 or config.block_k < 32 or config.block_n < 16 or config.block_m < 1:
        raise ValueError(f"not a configuration of the Triton decode kernel: {config}.")
    for size in (config.block_m, config.block_n, config.block_k):
        if size & (size - 1):
            raise ValueError(f"block sizes must be powers of two: {config}.")


def _dtype_problem(x, values, scale) -> str | None:
    """Why the inputs, values and scale do not go together (fp16/bf16 values of the inputs' dtype, or e4m3 values
    with a float32 scale per output feature), or None."""
    if scale is None:
        if values.dtype == E4M3:
            return (
                "values are float8_e4m3fn but no scale was given: FP8 decode needs the float32 scale of each output "
                "feature (scale=, as triton_decode.compress_fp8 returns it)."
            )
        if x.dtype != values.dtype:
            return f"inputs are {x.dtype} but values {values.dtype}: cast the inputs to the weights' dtype."
        return None
    if values.dtype != E4M3:
        return (
            f"values are {values.dtype} but a scale was given: FP8 decode takes float8_e4m3fn values "
            "(triton_decode.compress_fp8); without a scale the kernel runs fp16/bf16 values."
        )
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"inputs are {x.dtype}: FP8 decode (e4m3 weights) takes float16 or bfloat16 activations."
    if scale.dtype != torch.float32 or tuple(scale.shape) != (values.shape[0],) or not scale.is_contiguous():
        return (
            f"scale is {scale.dtype} of shape {tuple(scale.shape)}: FP8 decode needs one contiguous float32 scale per "
            f"output feature, shape ({values.shape[0]},)."
        )
    return None
