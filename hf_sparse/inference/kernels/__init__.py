"""The GEMM kernels a 2:4 layer can run on, one file each; `KERNELS` lists every one there is.

The order is the tie-break: where two kernels of a swap measure within its margin of each other, the one listed
first is kept (a 2:4 kernel must beat the dense GEMM before it, CUTLASS must beat cuSPARSELt, e4m3 2:4 must beat
dense FP8). A new kernel is a file here (a class with the members of `Kernel`, see `base.py`) and a line below.
"""

from __future__ import annotations

from .base import Kernel
from .cusparselt import CUSPARSELT
from .cutlass import CUTLASS
from .dense import DENSE
from .fp8 import FP8
from .fp8_dense import FP8_DENSE
from .triton_decode import TRITON_DECODE
from .triton_decode_fp8 import TRITON_DECODE_FP8

KERNELS: tuple[Kernel, ...] = (DENSE, CUSPARSELT, CUTLASS, TRITON_DECODE, FP8_DENSE, FP8, TRITON_DECODE_FP8)


def find(name: str) -> Kernel:
    """The kernel of `KERNELS` called `name`."""
    for kernel in KERNELS:
        if kernel.name == name:
            return kernel
    raise KeyError(f"no kernel named {name!r}; KERNELS has {[k.name for k in KERNELS]}.")
