"""e4m3 quantization of weights (one scale per output feature) and activations (one scale per token, or one
calibrated scale), shared by the FP8 layers (`fp8.py`) and the FP8 kernels' sweeps (`kernels/fp8.py`)."""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_TINY = 1e-12


def quantize_weight(weight: torch.Tensor, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales, one per output feature (row): `weight ~ values * scales[:, None]`. With
    `per_tensor`, every row gets the same scale (the whole weight's largest value maps to 448).

    Zeros stay exact zeros, so a 2:4 weight stays 2:4."""
    amax = weight.detach().abs().amax(dim=1).float()
    if per_tensor:
        amax = amax.max().expand_as(amax)
    scales = (amax / E4M3_MAX).clamp(min=_TINY).contiguous()
    values = (weight.detach().float() / scales[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return values.contiguous(), scales


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization of `(tokens, features)`: e4m3 values and float32 scales `(tokens, 1)`."""
    scales = (x.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=_TINY)
    return (x.float() / scales).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scales


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 values of `x` with one calibrated float32 scale (saturating at +-448)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
