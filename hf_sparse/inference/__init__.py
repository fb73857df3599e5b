"""Fast 2:4 inference: swap exactly-2:4 `nn.Linear` layers for cuSPARSELt kernels, never slower than dense.

- `swap.py`: `swap_to_semi_structured_` decides, layer by layer, what runs sparse, and reports it (`SwapReport`).
- `layers.py`: the layers it installs (`SemiStructuredLinear`, fused q/k/v) and `semi_structured_support`.
- `fp8.py`: FP8 (e4m3) layers, 2:4 or dense (`swap_to_semi_structured_(fp8=...)`); `quantization.py`: their e4m3 scaling.
- `cutlass_linear.py`: `CutlassSparseLinear`, a layer on the CUTLASS sm90 2:4 kernel (H100, H200), with GELU in its
  epilogue where the layer starts a feed-forward block; `cutlass.py`: that kernel, compiled on first use, and its
  ctypes binding (`csrc/sm90_sparse_gemm.cu`).
- `cusparselt.py`: cuSPARSELt plans kept per shape and token count (a ctypes binding to PyTorch's own library).
- `autotune.py`: dense against sparse per GEMM shape and token count, cached on disk.
- `tuning.py`: the measuring behind it: verified algorithm sweeps, in a child process that a GPU fault cannot spread from.
- `cuda_graphs.py`: `cuda_graphs(model)` replays captured forwards per input shape; `EagerGraphs` does it for a
  swapped model's own inference calls.
- `benchmark.py`: the latency benchmark (`python -m hf_sparse.inference.benchmark`, or `hf-sparse-bench`).

Everything here imports on a CPU machine; the kernels need an NVIDIA GPU of compute capability 8.0 or newer.
"""

from .autotune import Autotuner
from .cuda_graphs import EagerGraphs, cuda_graphs, remove_cuda_graphs
from .cutlass_linear import CutlassSparseLinear
from .fp8 import Fp8Config, Fp8Linear
from .kernels.cusparselt import semi_structured_support
from .layers import FusedLinearSlice, SemiStructuredLinear
from .swap import LayerSwap, SwapReport, fuse_qkv_, restore_dense_, swap_to_semi_structured_

__all__ = [
    "Autotuner",
    "CutlassSparseLinear",
    "EagerGraphs",
    "Fp8Config",
    "Fp8Linear",
    "FusedLinearSlice",
    "LayerSwap",
    "SemiStructuredLinear",
    "SwapReport",
    "cuda_graphs",
    "fuse_qkv_",
    "remove_cuda_graphs",
    "restore_dense_",
    "semi_structured_support",
    "swap_to_semi_structured_",
]
