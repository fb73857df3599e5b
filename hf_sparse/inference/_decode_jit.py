"""The Triton kernels of the 2:4 decode GEMM (`triton_decode.py` holds the layout, the launcher and the reasons), for
fp16/bf16 weights and, with `SCALED`, e4m3 weights with a float32 scale per output feature; imported on first use,
since importing it imports Triton."""

import triton
import triton.language as tl


@triton.jit
def load_weights(values, meta, tile, n_offsets, n_mask, K, stride_v, stride_meta,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    """One tile's kept values `(BLOCK_N, BLOCK_K / 4)` twice (the first and the second of each group) and their
    positions in the group (the first 0-2, the second 1-3)."""
    GROUPS: tl.constexpr = BLOCK_K // 4
    # offsets as multiples of the block (not k0 // 2), so that Triton sees 16-byte aligned, contiguous rows
    pairs = tile * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    g = tile * GROUPS + tl.arange(0, GROUPS)
    v_mask, g_mask = n_mask[:, None], n_mask[:, None]  # constant along K: the loads stay 16-byte vectors
    if not EVEN_K:
        v_mask = v_mask & (pairs[None, :] < K // 2)
        g_mask = g_mask & (g[None, :] < K // 4)
    v = tl.load(values + n_offsets[:, None] * stride_v + pairs[None, :], mask=v_mask, other=0.0)
    first, second = tl.split(tl.reshape(v, (BLOCK_N, GROUPS, 2)))
    # eight groups share a word: the repeated addresses are served by one cached line
    words = tl.load(meta + n_offsets[:, None] * stride_meta + (g // 8)[None, :], mask=g_mask, other=0)
    nibble = (words >> ((g % 8) * 4)[None, :]) & 15
    return first, second, nibble & 3, nibble >> 2


@triton.jit
def epilogue(acc, scale, bias, n, n_mask, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """`acc * scale[n] + bias[n]` in fp32: an FP8 weight's scale of each output feature `n` (applied to the whole sum,
    after split-K's reduction: see `triton_decode.py`), then the bias."""
    if SCALED:
        acc = acc * tl.load(scale + n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc = acc + tl.load(bias + n, mask=n_mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def decode_kernel(x, values, meta, scale, bias, out, M, N, K, stride_x, stride_v, stride_meta, stride_out_m,
                  stride_out_split, tiles_per_split, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  USE_DOT: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    GROUPS: tl.constexpr = BLOCK_K // 4
    # row blocks vary fastest: the programs that read the same weights run side by side, so all but the first
    # find them in L2
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_offsets = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rows < M, n_offsets < N
    tiles = tl.cdiv(K, BLOCK_K)
    start = pid_s * tiles_per_split
    stop = tl.minimum(start + tiles_per_split, tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in tl.range(start, stop):
        first, second, i0, i1 = load_weights(values, meta, tile, n_offsets, n_mask, K, stride_v, stride_meta,
                                             BLOCK_N, BLOCK_K, EVEN_K)  # fmt: skip
        k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        x_mask = m_mask[:, None]
        if not EVEN_K:
            x_mask = x_mask & (k[None, :] < K)
        xs = tl.load(x + rows[:, None] * stride_x + k[None, :], mask=x_mask, other=0.0)
        if USE_DOT:
            # the dense tile, position by position, for the tensor cores, in the activations' dtype (e4m3 values
            # widen exactly; fp16/bf16 values are already in it)
            first, second = first.to(xs.dtype), second.to(xs.dtype)
            zero = tl.zeros_like(first)
            d0 = tl.where(i0 == 0, first, zero)
            d1 = tl.where(i0 == 1, first, tl.where(i1 == 1, second, zero))
            d2 = tl.where(i0 == 2, first, tl.where(i1 == 2, second, zero))
            d3 = tl.where(i1 == 3, second, zero)
            dense = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))
            acc = tl.dot(xs, tl.trans(dense), acc)
        else:
            # each kept value times the activation at its position
            even, odd = tl.split(tl.reshape(xs, (BLOCK_M, GROUPS, 2, 2)))  # positions (0, 2) and (1, 3)
            x0, x2 = tl.split(even)
            x1, x3 = tl.split(odd)
            x0, x1, x2, x3 = x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :]
            a = tl.where(i0[None] == 0, x0, tl.where(i0[None] == 1, x1, x2)).to(tl.float32)
            b = tl.where(i1[None] == 1, x1, tl.where(i1[None] == 2, x2, x3)).to(tl.float32)
            acc += tl.sum(first[None].to(tl.float32) * a + second[None].to(tl.float32) * b, axis=2)
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        target = out + pid_s * stride_out_split + rows[:, None] * stride_out_m + n_offsets[None, :]
        tl.store(target, acc, mask=mask)
    else:
        acc = epilogue(acc, scale, bias, n_offsets[None, :], n_mask[None, :], SCALED, HAS_BIAS)
        target = out + rows[:, None] * stride_out_m + n_offsets[None, :]
        tl.store(target, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def reduce_kernel(partials, scale, bias, out, total, N, splits, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(partials + s * total + offsets, mask=mask, other=0.0)
    acc = epilogue(acc, scale, bias, offsets % N, mask, SCALED, HAS_BIAS)
    tl.store(out + offsets, acc.to(out.dtype.element_ty), mask=mask)
