"""The N:M encoding shared by the compact formats: an N:M weight as its kept values plus their positions inside
each group of M, packed ceil(log2(M)) bits each (2 bits for 2:4)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..masks import group_counts
from .metadata import SparseCheckpointError

VALUES_SUFFIX = ".nm_values"
INDICES_SUFFIX = ".nm_indices"
"""Key suffixes of an N:M layer's kept values and packed positions (`<layer>.weight.nm_values`, ...)."""


def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def compact_encode(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Splits an N:M weight into its kept values (`[rows, cols * n / m]`, the weight's dtype) and their positions
    inside each group of `m`, packed `ceil(log2(m))` bits each (2 bits for 2:4) into a flat uint8 tensor.

    Groups with fewer than `n` nonzeros store zeros at unused positions, so decoding restores the exact weight.
    """
    if weight.dim() != 2 or weight.shape[1] % m:
        raise ValueError(
            f"{name}: a compact N:M layer needs a 2-D weight with columns divisible by {m}; got {tuple(weight.shape)}."
        )
    groups = weight.detach().cpu().reshape(-1, m)
    nonzero = groups != 0
    counts = group_counts(nonzero)
    over = int((counts > n).sum())
    if over:
        raise ValueError(f"{name}: {over} group(s) of {m} hold more than {n} nonzeros; the layer is not {n}:{m}.")
    # Keep every nonzero, and pad groups with fewer than n nonzeros with their first zero positions; boolean
    # indexing then lists the kept positions of each group in ascending order.
    zero = ~nonzero
    missing = (n - counts.to(torch.int32)).unsqueeze(1)
    running, ranks = torch.zeros(groups.shape[0], dtype=torch.int32), []
    for column in zero.unbind(dim=1):  # running count of zeros, column by column (see group_counts)
        running = running + column
        ranks.append(running)
    keep = nonzero | (zero & (torch.stack(ranks, dim=1) <= missing))
    indices = keep.nonzero()[:, 1].reshape(-1, n)
    values = groups[keep].reshape(weight.shape[0], -1).contiguous()
    bits = index_bits(m)
    position_bits = ((indices.reshape(-1, 1).to(torch.uint8) >> torch.arange(bits, dtype=torch.uint8)) & 1).numpy()
    packed = np.packbits(position_bits.reshape(-1), bitorder="little")
    return values, torch.from_numpy(packed)


def compact_decode(
    values: torch.Tensor, packed: torch.Tensor, n: int, m: int, name: str = "weight", file: str = "?"
) -> torch.Tensor:
    """Inverse of `compact_encode`, checking that the positions are well formed (else `SparseCheckpointError`)."""
    if values.dim() != 2 or values.shape[1] % n:
        raise SparseCheckpointError(
            f"layer {name} in {file}: values of shape {tuple(values.shape)} cannot hold groups of {n} kept weights."
        )
    rows, kept = values.shape
    groups = rows * kept // n
    bits = index_bits(m)
    expected = math.ceil(groups * n * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise SparseCheckpointError(
            f"layer {name} in {file}: positions hold {packed.numel()} {packed.dtype} values, expected {expected} "
            f"uint8 for a weight of shape {(rows, kept * m // n)}; the file is damaged or not a {n}:{m} checkpoint."
        )
    flat = np.unpackbits(packed.numpy(), count=groups * n * bits, bitorder="little").reshape(-1, bits)
    indices = torch.from_numpy((flat.astype(np.int64) << np.arange(bits)).sum(axis=1)).reshape(groups, n)
    bad = (indices >= m).any(dim=1)
    if n > 1:
        bad |= (indices[:, 1:] <= indices[:, :-1]).any(dim=1)
    if bool(bad.any()):
        group = int(bad.nonzero()[0, 0])
        raise SparseCheckpointError(
            f"layer {name} in {file}: group {group} has positions {indices[group].tolist()}, not {n} distinct "
            f"increasing positions below {m}; the file is damaged."
        )
    dense = torch.zeros(groups, m, dtype=values.dtype)
    dense.scatter_(1, indices, values.reshape(groups, n))
    return dense.reshape(rows, kept * m // n)
