"""Hopper 2:4 sparse GEMMs with the bias and GELU in their epilogue (CUTLASS), compiled on first use.

cuSPARSELt 0.8.0 applies GELU in its epilogue only for e4m3 outputs: for float16 or bfloat16 it refuses the
attribute. So an fp16 2:4 layer followed by GELU (BERT's intermediate layers, the widest output of the model) pays a
separate element-wise pass that reads and writes that output again, which costs a large part of the GEMM's own time
(the README has the measurement). This module runs that layer as one kernel: CUTLASS's sm90 sparse
tensor-core GEMM (`csrc/sm90_sparse_gemm.cu`) with `y = gelu(x @ W.T + bias)` in its epilogue.

The kernels are compiled on first use with the CUDA toolkit's `nvcc` against the CUTLASS headers of the
`nvidia-cutlass` package (`pip install nvidia-cutlass`), once per machine: the library is cached under
`~/.cache/hf_sparse/cutlass/<hash of the source and flags>/` (`$HF_SPARSE_CUTLASS_DIR` to put it elsewhere, or
`$HF_SPARSE_CUTLASS_LIB` to load a library built before). Where it cannot be built or run (not an sm_90 GPU, no
`nvcc`, no headers), `device_problem()` says why and the swap keeps cuSPARSELt with GELU a separate step. The kernel
as the swap and the autotuner see it is `kernels/cutlass.py`.

CUTLASS's sm90 kernels take only their first operand sparse, so a layer computes `y.T = W @ x.T`: the 2:4 weight
is operand A, the activations operand B read K-major, and the output is written in `y`'s row-major layout. The
weight is compressed by CUTLASS's own compressor (values `(out, in / 2)` and 1-byte metadata, a layout of its own:
not cuSPARSELt's).

Example:

```python
>>> from hf_sparse.inference import cutlass
>>> values, meta = cutlass.compress(weight_2_4)                    # (out, in) fp16 2:4 weight on an H100
>>> y = cutlass.sparse_linear(x, values, meta, bias, 3072, gelu=True)   # gelu(x @ weight_2_4.T + bias)
```
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ._load_once import LoadOnce

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "sm90_sparse_gemm.cu"
LIB_ENV = "HF_SPARSE_CUTLASS_LIB"
"""A CUTLASS library built before (by `build()`), loaded instead of building one."""
DIR_ENV = "HF_SPARSE_CUTLASS_DIR"
"""Where built libraries are cached (default `~/.cache/hf_sparse/cutlass`)."""
DISABLE_ENV = "HF_SPARSE_CUTLASS"
"""Set to 0 to never use (or build) the CUTLASS kernels."""

CONFIGS = 4
"""GEMM configurations (tile and cluster shapes) compiled; `hfs_config_name` names each. The autotuner times them."""

FLAGS = (
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "-O3",
    "-DNDEBUG",  # asserts in device code serialize the tensor-core pipeline
    "-gencode=arch=compute_90a,code=sm_90a",
    "-Xcompiler=-fPIC",
    "-Xcompiler=-fvisibility=hidden",  # only the C entry points (HFS_API) are exported
)
ALIGN_OUT, ALIGN_IN = 64, 128
"""What the kernels take: out_features a multiple of 64 and in_features of 128 (so the metadata is never padded,
and one compressed weight serves every configuration's tile), any token count; fp16 weights and activations."""


class CutlassError(RuntimeError):
    """A CUTLASS kernel refused a problem or failed to launch."""


# -- building --------------------------------------------------------------------------------------------------------


def headers() -> Path | None:
    """The CUTLASS include folder of the installed `nvidia-cutlass` package, or None."""
    try:
        import cutlass_library
    except ImportError:
        return None
    root = Path(cutlass_library.__file__).parent / "source"
    return root if (root / "include" / "cutlass" / "cutlass.h").is_file() else None


def nvcc() -> str | None:
    """The `nvcc` to build with: `$CUDA_HOME/bin/nvcc`, else the one on `PATH`, else `/usr/local/cuda/bin/nvcc`."""
    for candidate in (
        os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _cache_dir(compiler: str, root: Path) -> Path:
    """`$HF_SPARSE_CUTLASS_DIR` (default `~/.cache/hf_sparse/cutlass`) / a hash of the source, the flags, the nvcc
    version and the CUTLASS version: a new CUTLASS or nvcc builds anew."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    cutlass_version = root / "include" / "cutlass" / "version.h"
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), cutlass_version.read_bytes()):
        digest.update(part)
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    base = Path(os.environ[DIR_ENV]) if os.environ.get(DIR_ENV) else cache_home / "hf_sparse" / "cutlass"
    return base / digest.hexdigest()[:16]


def build(jobs: int | None = None) -> Path:
    """Compiles `csrc/sm90_sparse_gemm.cu` into a shared library (once: later calls, in any process, find it cached)
    and returns its path. One object per GEMM configuration, compiled in parallel (each takes a minute or more and
    ~5 GB of memory; `jobs` defaults to what the CPU count and memory allow)."""
    compiler, root = nvcc(), headers()
    if compiler is None or root is None:
        raise CutlassError(_missing_toolchain(compiler, root))
    out = _cache_dir(compiler, root)
    library = out / "libhfs_sm90.so"
    if library.is_file():
        return library
    import fcntl  # POSIX only: imported here so that `import hf_sparse` works everywhere

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:  # several processes (the autotuner's children) may ask at once
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            logger.warning("hf-sparse: waiting for another process's build of the CUTLASS kernels in %s ...", out)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if library.is_file():
            return library
        with tempfile.TemporaryDirectory(dir=out) as scratch:  # objects and the unlinked library: gone on failure
            _compile(compiler, root, Path(scratch), library, jobs)
    return library


def _compile(compiler: str, root: Path, scratch: Path, library: Path, jobs: int | None) -> None:
    include = [f"-I{root / 'include'}", f"-I{root / 'tools' / 'util' / 'include'}"]
    units = [("main", ["-DHFS_ONLY_MAIN"])] + [(f"config{i}", [f"-DHFS_ONLY_CONFIG={i}"]) for i in range(CONFIGS)]
    if jobs is None:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        jobs = max(1, min(len(units), os.cpu_count() or 1, int(memory_gb // 6)))
    started = time.perf_counter()
    logger.warning(
        "hf-sparse: compiling the CUTLASS 2:4 kernels with %s (%d objects, %d at a time: about 1.5 minutes on 16 "
        "cores, 3 on 2; once per machine, cached in %s). To skip them: swap_to_semi_structured_(..., cutlass=False) "
        "or HF_SPARSE_CUTLASS=0.", compiler, len(units), jobs, library.parent,
    )  # fmt: skip

    def run(what: str, command: list[str]) -> None:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise CutlassError(
                f"nvcc exited with code {done.returncode} {what}"
                + (f":\n{done.stderr[-4000:]}" if done.stderr else " (no message: out of memory? pass build(jobs=1))")
            )

    def compile_unit(unit) -> Path:
        name, defines = unit
        obj = scratch / f"{name}.o"
        run(
            f"compiling {SOURCE.name} ({name})",
            [compiler, *FLAGS, *include, *defines, "-c", str(SOURCE), "-o", str(obj)],
        )
        return obj

    with ThreadPoolExecutor(jobs) as pool:
        objects = list(pool.map(compile_unit, units))
    linked = scratch / library.name
    run(
        "linking",
        [compiler, "-shared", "-gencode=arch=compute_90a,code=sm_90a", "-o", str(linked), *map(str, objects)],
    )
    linked.replace(library)  # atomic: a library that exists is complete
    logger.warning("hf-sparse: CUTLASS kernels built in %.0f s: %s", time.perf_counter() - started, library)


def _missing_toolchain(compiler: str | None, root: Path | None) -> str:
    missing = []
    if compiler is None:
        missing.append("no nvcc (install the CUDA toolkit, 12.2 or newer, or set CUDA_HOME)")
    if root is None:
        missing.append("no CUTLASS headers (pip install nvidia-cutlass)")
    return "the CUTLASS 2:4 kernels are compiled on first use, but " + " and ".join(missing)


# -- the library -----------------------------------------------------------------------------------------------------


class _Library:
    """The built library's C entry points (see the top of `csrc/sm90_sparse_gemm.cu`)."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        signatures = {
            "hfs_last_error": ([], ctypes.c_char_p),
            "hfs_num_configs": ([], i32),
            "hfs_config_name": ([i32], ctypes.c_char_p),
            "hfs_compressed_sizes": ([i64, i64, ctypes.POINTER(i64), ctypes.POINTER(i64)], i32),
            "hfs_compress_workspace_bytes": ([i64, i64], i64),
            "hfs_compress": ([p, p, p, i64, i64, p, i64, p], i32),
            "hfs_gemm_workspace_bytes": ([i32, i32, i64, i64, i64], i64),
            "hfs_can_implement": ([i32, i32, i64, i64, i64], i32),
            "hfs_gemm": ([i32, i32, p, p, p, p, p, i64, i64, i64, p, i64, p], i32),
        }
        for name, (argtypes, restype) in signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
        self.lib = lib
        self.configs = [lib.hfs_config_name(i).decode() for i in range(lib.hfs_num_configs())]
        self._workspace: dict[tuple, int] = {}

    def check(self, what: str, status: int) -> None:
        if status != 0:
            raise CutlassError(f"{what}: {(self.lib.hfs_last_error() or b'').decode() or f'status {status}'}")

    def workspace_bytes(self, config: int, gelu: bool, m: int, n: int, k: int) -> int:
        key = (config, gelu, m, n, k)
        found = self._workspace.get(key)
        if found is None:
            found = int(self.lib.hfs_gemm_workspace_bytes(config, int(gelu), m, n, k))
            if found < 0:
                self.check(f"workspace of configuration {config} for {m}x{k} at {n} tokens", 1)
            self._workspace[key] = found
        return found


def _load() -> _Library:
    if not torch.cuda.is_available():  # nothing could run them: do not spend minutes compiling
        raise CutlassError("no CUDA GPU; to compile them for later, call hf_sparse.inference.cutlass.build()")
    path = Path(os.environ[LIB_ENV]) if os.environ.get(LIB_ENV) else build()
    loaded = _Library(path)
    logger.info("hf-sparse: loaded the CUTLASS 2:4 kernels from %s (%s).", path, ", ".join(loaded.configs))
    return loaded


def _unavailable(err: BaseException) -> str:
    # once per process, in full (restart to retry); reports carry its first line
    logger.warning("hf-sparse: the CUTLASS 2:4 kernels are unavailable (cuSPARSELt alone runs): %s", err)
    return f"the CUTLASS 2:4 kernels are unavailable: {str(err).splitlines()[0]}"


_LIBRARY = LoadOnce(
    _load, _unavailable, CutlassError, (CutlassError, OSError, AttributeError, subprocess.SubprocessError)
)


def library() -> _Library:
    """The CUTLASS library, built on first use; raises `CutlassError` saying why when it cannot be had."""
    return _LIBRARY()


def device_problem(device: torch.device | str | None = None) -> str | None:
    """Why the CUTLASS kernels cannot run on `device` (not built yet is fine: they build on first use), or None."""
    if os.environ.get(DISABLE_ENV, "1").strip() == "0":
        return f"{DISABLE_ENV}=0"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if device is not None and torch.device(device).type != "cuda":
        return f"the weights are on {torch.device(device).type}; the CUTLASS 2:4 kernels run on an sm_90 GPU"
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) != (9, 0):
        return f"the CUTLASS 2:4 kernels are built for sm_90 (H100, H200); this GPU is {capability[0]}.{capability[1]}"
    if _LIBRARY.value is None and not os.environ.get(LIB_ENV) and (nvcc() is None or headers() is None):
        return _missing_toolchain(nvcc(), headers())
    return _LIBRARY.failure


def shape_problem(out_features: int, in_features: int, dtype: torch.dtype) -> str | None:
    """Why a weight of this shape and dtype cannot run on these kernels, or None."""
    if dtype != torch.float16:
        return f"the CUTLASS 2:4 kernels are built for float16 weights; got {str(dtype).removeprefix('torch.')}"
    if out_features % ALIGN_OUT or in_features % ALIGN_IN:
        return (
            f"the CUTLASS 2:4 kernels need out_features a multiple of {ALIGN_OUT} and in_features of {ALIGN_IN}; "
            f"got {out_features}x{in_features}"
        )
    return None


def available(device: torch.device | str | None = None) -> bool:
    """Whether the kernels can run here: the GPU is sm_90 and the library loads (building it if need be)."""
    if device_problem(device) is not None:
        return False
    try:
        library()
    except CutlassError:
        return False
    return True


# -- the ops ---------------------------------------------------------------------------------------------------------


def compress(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CUTLASS's compressed form of a 2:4 fp16 weight `(out, in)` on the GPU: `(values, metadata)` as two tensors
    (values `(out, in / 2)` fp16, metadata uint8)."""
    problem = shape_problem(*weight.shape, weight.dtype)
    if problem:
        raise ValueError(problem)
    lib = library()
    m, k = weight.shape
    values_bytes, meta_bytes = ctypes.c_int64(), ctypes.c_int64()
    lib.check(
        "compressed sizes", lib.lib.hfs_compressed_sizes(m, k, ctypes.byref(values_bytes), ctypes.byref(meta_bytes))
    )
    weight = weight.detach().contiguous()
    values = torch.empty(values_bytes.value // 2, dtype=torch.float16, device=weight.device)
    meta = torch.empty(meta_bytes.value, dtype=torch.uint8, device=weight.device)
    scratch = int(lib.lib.hfs_compress_workspace_bytes(m, k))
    if scratch < 0:
        lib.check(f"compressing a {m}x{k} weight", 1)
    workspace = torch.empty(max(scratch, 1), dtype=torch.uint8, device=weight.device)
    with torch.cuda.device(weight.device):
        stream = torch.cuda.current_stream().cuda_stream
        lib.check(
            f"compressing a {m}x{k} weight",
            lib.lib.hfs_compress(
                weight.data_ptr(), values.data_ptr(), meta.data_ptr(), m, k, workspace.data_ptr(), scratch, stream
            ),
        )
    return values, meta


def sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    config: int = 0,
    gelu: bool = False,
) -> torch.Tensor:
    """`x @ W.T + bias` (then GELU, erf form, when `gelu`) for `x` `(tokens, in)` fp16, W given as `compress(W)`;
    one kernel launch on the current stream of `x`'s device (CUDA-graph capturable after a first call)."""
    lib = library()
    n, k = x.shape
    m = out_features
    if (
        x.dtype != torch.float16
        or x.device.type != "cuda"
        or values.device != x.device
        or meta.device != x.device
        or values.numel() * 2 != m * k
        or meta.numel() * 8 != m * k
        or (bias is not None and (bias.numel() != m or bias.dtype != torch.float16 or bias.device != x.device))
    ):
        raise ValueError(
            f"cutlass.sparse_linear: x must be float16 (tokens, in_features) on the GPU that holds a weight "
            f"compressed by cutlass.compress for {m} outputs and {k} inputs (values {values.numel()}, metadata "
            f"{meta.numel()}), with a float16 bias of {m} or None; got x {str(x.dtype).removeprefix('torch.')} "
            f"{tuple(x.shape)} on {x.device}."
        )
    x = x.contiguous()
    out = torch.empty(n, m, dtype=x.dtype, device=x.device)
    size = lib.workspace_bytes(config, gelu, m, n, k)
    workspace = torch.empty(size, dtype=torch.uint8, device=x.device) if size else None
    with torch.cuda.device(x.device):  # the library launches on the current device
        status = lib.lib.hfs_gemm(
            config,
            int(gelu),
            values.data_ptr(),
            meta.data_ptr(),
            x.data_ptr(),
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            m,
            n,
            k,
            None if workspace is None else workspace.data_ptr(),
            size,
            torch.cuda.current_stream(x.device).cuda_stream,
        )
    if status != 0:
        lib.check(f"CUTLASS 2:4 GEMM {lib.configs[config]} ({m}x{k} at {n} tokens)", status)
    return out


def kernel_id() -> str:
    """What the autotuner's cached choices of these kernels depend on besides the GPU: the library's source and
    flags (or, with `$HF_SPARSE_CUTLASS_LIB`, the library file itself), as a short hash. A configuration index
    means another kernel in another build."""
    global _KERNEL_ID
    if _KERNEL_ID is None:
        digest = hashlib.sha256()
        if os.environ.get(LIB_ENV) and os.path.isfile(os.environ[LIB_ENV]):
            digest.update(Path(os.environ[LIB_ENV]).read_bytes())
        else:
            digest.update(SOURCE.read_bytes() + " ".join(FLAGS).encode())
        _KERNEL_ID = digest.hexdigest()[:10]
    return _KERNEL_ID


_KERNEL_ID: str | None = None
