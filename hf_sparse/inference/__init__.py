"""Fast 2:4 inference: swap exactly-2:4 `nn.Linear` layers for sparse kernels, never slower than dense.

- `swap.py`: `swap_to_semi_structured_`, the mechanism (find the units, time, ask the policy, install), its report
  (`SwapReport`) and `restore_dense_`.
- `units.py`: the GEMMs a swap decides on (single layers, fused query/key/value groups, the GELU after a layer).
- `policy.py`: which kernel each layer runs at each token count, what it holds and why: pure decisions from timings
  (`fp8_policy.py`: the FP8 swap's rules; `holdings.py`: weight layouts, second layouts, a decoder's workload).
- `kernels/`: one file per kernel (dense, cuSPARSELt 2:4, CUTLASS 2:4 with GELU in its epilogue, the Triton 2:4 decode
  kernel, FP8 2:4, dense FP8) and `kernels.KERNELS`, the list of them; `kernels/base.py` is the `Kernel` interface.
- `autotune.py`: the `Autotuner`, timings per kernel, GEMM shape and token count, cached on disk; `tuning.py`: the
  measuring behind it, one generic sweep, in a child process that a GPU fault cannot spread from.
- the layers: `layers.py` (`SemiStructuredLinear`, fused q/k/v), `cutlass_linear.py` (`CutlassSparseLinear`),
  `triton_linear.py` (`TritonDecodeLinear`), `multi_layout.py` (`MultiLayoutLinear`: two kernels' layouts), `fp8.py`
  (`Fp8Linear`, `Fp8Config`; `quantization.py`: their e4m3 scaling).
- the bindings: `cusparselt.py` (cuSPARSELt plans kept per shape and token count, bound with ctypes to PyTorch's own
  library), `cutlass.py` (the CUTLASS sm90 kernel, compiled on first use from `csrc/sm90_sparse_gemm.cu`), `triton_decode.py` (the
  decode kernel's layout and launcher; `_decode_jit.py`, its Triton code, imported on first use).
- `cuda_graphs.py`: `cuda_graphs(model)` replays captured forwards per input shape; `EagerGraphs` does it for a
  swapped model's own inference calls.
- `benchmark.py`: the latency benchmark (`python -m hf_sparse.inference.benchmark`, or `hf-sparse-bench`);
  `decode_bench.py`: per-GEMM decode timings (`python -m hf_sparse.inference.decode_bench`); `generate_bench.py`:
  `generate()` tokens/s of dense, 2:4 and FP8 variants (`python -m hf_sparse.inference.generate_bench`).

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
