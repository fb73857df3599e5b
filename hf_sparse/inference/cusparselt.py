"""cuSPARSELt 2:4 matmuls whose plans are kept per shape: the eager path of a swapped layer without per-call set-up.

`torch._cslt_sparse_mm` (PyTorch 2.11) builds its cuSPARSELt descriptors, algorithm selection and plan on every
call and destroys them afterwards: host time on every call, and much more the first time an algorithm id runs.
Under a CUDA graph that cost is paid once, but an ordinary eager `model(**batch)` pays it on every layer. This
module binds the very `libcusparseLt` that PyTorch loaded (through `ctypes`, no extra dependency), so weights
compressed by `torch._cslt_compress` stay valid, and keeps one `MatmulPlan` per (device, weight shape, dtype,
token rows, bias, algorithm, split-k). A call then costs one `cusparseLtMatmul` on PyTorch's current stream, with
the output and the workspace allocated by PyTorch's caching allocator (so CUDA graph capture works unchanged).

Without the binding (no Linux `/proc/self/maps`, a PyTorch linked differently), `cslt_linear` calls
`torch._cslt_sparse_mm` the same way, with its per-call set-up.

The matrices are laid out exactly as `torch._cslt_sparse_mm(packed, x.t(), bias, transpose_result=True,
alg_id=...)` lays them out (the weight row-major, `x` read transposed, the result written row-major), with the same
compute type, so for the same algorithm id the two should run the same kernel and give the same bits
(`tests/test_cusparselt.py` checks it on a GPU).

Example:

```python
>>> from hf_sparse.inference.cusparselt import sparse_linear
>>> packed = torch._cslt_compress(weight_2_4)                 # (out, in) fp16 2:4 weight on the GPU
>>> y = sparse_linear(x, packed, bias, weight_2_4.shape[0])   # x: (tokens, in), tokens a multiple of 8
```
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import OrderedDict
from typing import NamedTuple

import torch

from ._load_once import LoadOnce
from .quantization import E4M3_MAX

logger = logging.getLogger(__name__)

# Values from cusparse.h / cusparseLt.h / library_types.h (stable across cuSPARSELt 0.5-0.8).
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_N, _OP_T = 0, 1
_COMPUTE_32F = 2
_SPARSITY_50 = 0
_MATMUL_ACTIVATION_GELU, _MATMUL_ACTIVATION_GELU_SCALING = 3, 4
_MATMUL_ALPHA_VECTOR_SCALING, _MATMUL_BIAS_POINTER = 5, 8
_ALG_DEFAULT = 0
_ALG_CONFIG_ID, _ALG_CONFIG_MAX_ID, _ALG_SPLIT_K, _ALG_SPLIT_K_MODE = 0, 1, 3, 4
_CUDA_TYPES = {
    torch.float16: 2,
    torch.bfloat16: 14,
    torch.float8_e4m3fn: 28,
}  # CUDA_R_16F, CUDA_R_16BF, CUDA_R_8F_E4M3
_OPAQUE = 1024  # bytes of each opaque cuSPARSELt struct (512 in 0.8; more is harmless)
_ALIGN = 16

MAX_PLANS = 4096
"""Plans kept before the least recently used ones are destroyed (a plan costs a few KB of host memory)."""


class CusparseLtError(RuntimeError):
    """A cuSPARSELt call returned an error status (e.g. an algorithm id this shape does not support)."""

    def __init__(self, function: str, status: int, detail: str = ""):
        self.function, self.status = function, status
        super().__init__(f"{function} failed with cuSPARSELt status {status}{f' ({detail})' if detail else ''}")


class _Library:
    """The process's libcusparseLt, with one cuSPARSELt handle per CUDA device."""

    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)
        p, i64, u32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int
        signatures = {
            "cusparseLtInit": [p],
            "cusparseLtGetVersion": [p, ctypes.POINTER(ctypes.c_int)],
            "cusparseLtStructuredDescriptorInit": [p, p, i64, i64, i64, u32, i32, i32, i32],
            "cusparseLtDenseDescriptorInit": [p, p, i64, i64, i64, u32, i32, i32],
            "cusparseLtMatDescriptorDestroy": [p],
            "cusparseLtMatmulDescriptorInit": [p, p, i32, i32, p, p, p, p, i32],
            "cusparseLtMatmulDescSetAttribute": [p, p, i32, p, ctypes.c_size_t],
            "cusparseLtMatmulAlgSelectionInit": [p, p, p, i32],
            "cusparseLtMatmulAlgSetAttribute": [p, p, i32, p, ctypes.c_size_t],
            "cusparseLtMatmulAlgGetAttribute": [p, p, i32, p, ctypes.c_size_t],
            "cusparseLtMatmulPlanInit": [p, p, p, p],
            "cusparseLtMatmulGetWorkspace": [p, p, ctypes.POINTER(ctypes.c_size_t)],
            "cusparseLtMatmulPlanDestroy": [p],
            "cusparseLtMatmul": [p, p, p, p, p, p, p, p, p, p, i32],
        }
        for name, argtypes in signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
        self.alg_selection_destroy = getattr(lib, "cusparseLtMatmulAlgSelectionDestroy", None)
        if self.alg_selection_destroy is not None:
            self.alg_selection_destroy.argtypes, self.alg_selection_destroy.restype = [p], ctypes.c_int
        self.error_string = getattr(lib, "cusparseLtGetErrorString", None)
        if self.error_string is not None:
            self.error_string.argtypes, self.error_string.restype = [ctypes.c_int], ctypes.c_char_p
        self.lib = lib
        self.matmul = lib.cusparseLtMatmul
        self._handles: dict[int, ctypes.Array] = {}
        self.version = None

    def check(self, function: str, status: int) -> None:
        if status != 0:
            detail = ""
            if self.error_string is not None:
                try:
                    detail = (self.error_string(status) or b"").decode()
                except Exception:  # pragma: no cover - only decorates the message
                    detail = ""
            raise CusparseLtError(function, status, detail)

    def call(self, function: str, *args) -> None:
        self.check(function, getattr(self.lib, function)(*args))

    def handle(self, device: int) -> ctypes.Array:
        found = self._handles.get(device)
        if found is None:
            found = ctypes.create_string_buffer(_OPAQUE)
            with torch.cuda.device(device):
                self.call("cusparseLtInit", found)
            if self.version is None:
                version = ctypes.c_int()
                self.call("cusparseLtGetVersion", found, ctypes.byref(version))
                self.version = version.value
            self._handles[device] = found
        return found


def _loaded_library_path() -> str | None:
    """The path of the libcusparseLt this process has mapped (PyTorch loads it on its first cuSPARSELt call)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(" ")[-1]
                if "libcusparseLt" in os.path.basename(path):
                    return path
    except OSError:
        return None
    return None


def _bind() -> _Library:
    if not torch.cuda.is_available() or not torch.backends.cusparselt.is_available():
        raise RuntimeError("no CUDA GPU, or this PyTorch build has no cuSPARSELt")
    path = _loaded_library_path()
    if path is None:  # make PyTorch load it, then look again
        torch._cslt_compress(torch.zeros(32, 32, dtype=torch.float16, device="cuda"))
        path = _loaded_library_path()
    if path is None:
        raise RuntimeError("PyTorch's libcusparseLt is not in /proc/self/maps (not Linux, or linked in)")
    bound = _Library(path)
    bound.handle(torch.cuda.current_device())
    logger.info("hf-sparse: bound %s (cuSPARSELt %s) for planned 2:4 matmuls.", bound.path, bound.version)
    return bound


_LIBRARY = LoadOnce(
    _bind, lambda err: f"cannot bind cuSPARSELt: {err}", RuntimeError, (RuntimeError, OSError, AttributeError)
)


def library() -> _Library:
    """The bound libcusparseLt (the one PyTorch uses); raises `RuntimeError` saying why when it cannot be bound."""
    return _LIBRARY()


PLANNED_ENV = "HF_SPARSE_PLANNED_MATMULS"
"""Set to 0 to run every sparse call through `torch._cslt_sparse_mm` instead of kept plans (slower eagerly; a way
out if a kept plan ever misbehaves on your GPU or cuSPARSELt version)."""


def available() -> bool:
    """Whether planned cuSPARSELt matmuls can run here (binds the library on first use). False when
    `HF_SPARSE_PLANNED_MATMULS=0`."""
    if os.environ.get(PLANNED_ENV, "1").strip() == "0":
        return False
    try:
        library()
    except RuntimeError:
        return False
    return True


class PlanKey(NamedTuple):
    device: int
    out_features: int
    in_features: int
    rows: int
    dtype: torch.dtype
    bias_ptr: int  # cuSPARSELt keeps the bias pointer in the plan: one plan per bias tensor
    alg_id: int
    split_k: int
    split_k_mode: int
    out_dtype: torch.dtype | None = None  # None: the input dtype (fp8 inputs write fp16 or bf16)
    alpha_vector: bool = False  # a per-output-feature scale vector (on the GPU) multiplies the product
    gelu_scale: float | None = None  # GELU in the epilogue, its result times this (e4m3 output: see MatmulPlan)


class MatmulPlan:
    """One cuSPARSELt plan for `y = x @ W.T + bias`: W `(out, in)` 2:4 compressed, x `(rows, in)` row-major,
    y `(rows, out)` row-major. Built once; each call is a single `cusparseLtMatmul`.

    With `key.gelu_scale` set, the epilogue also applies GELU and multiplies by that scale: `y = gelu(alpha * x @ W.T
    + bias) * gelu_scale`. On an H100 (cuSPARSELt 0.8.0) the GELU epilogue is accepted for e4m3 inputs writing e4m3
    (the scale then quantizes the output for the next e4m3 GEMM; values past the e4m3 range saturate) and refused
    ("invalid value") for float16 or bfloat16 outputs. An e4m3 output is described with a float16 C matrix (an e4m3
    one is refused) that points at D (a NULL C is refused too), and the bias is read as fp16. With beta 0, C is not
    read: the autotuner runs each algorithm it keeps on an output filled with NaN bytes first, which a read of C
    would carry into the result (all 20 offered for 3072x768 on the H100 passed; algorithm 0, which an untuned layer
    runs, among them).

    Raises `CusparseLtError` when cuSPARSELt refuses the configuration, e.g. an `alg_id` above the largest id
    it offers for this shape (`max_alg_id`, read from cuSPARSELt before the id is ever set).
    """

    def __init__(self, key: PlanKey, bias: torch.Tensor | None):
        lib = library()
        self.key = key
        self.lib = lib
        handle = lib.handle(key.device)
        self._handle = handle
        out_f, in_f, rows = key.out_features, key.in_features, key.rows
        out_dtype = key.out_dtype or key.dtype
        e4m3_out = out_dtype == torch.float8_e4m3fn and key.dtype == torch.float8_e4m3fn
        if key.dtype not in _CUDA_TYPES or not (out_dtype in (torch.float16, torch.bfloat16) or e4m3_out):
            raise ValueError(
                f"cuSPARSELt plans take float16, bfloat16 or float8_e4m3fn inputs and write float16 or bfloat16 (or "
                f"float8_e4m3fn from float8_e4m3fn inputs); got {key.dtype} -> {out_dtype}."
            )
        value_type, out_type = _CUDA_TYPES[key.dtype], _CUDA_TYPES[out_dtype]
        c_type = _CUDA_TYPES[torch.float16] if e4m3_out else out_type
        self._a, self._b, self._c, self._d = (ctypes.create_string_buffer(_OPAQUE) for _ in range(4))
        self._matmul_desc = ctypes.create_string_buffer(_OPAQUE)
        self._alg = ctypes.create_string_buffer(_OPAQUE)
        self._plan = ctypes.create_string_buffer(_OPAQUE)
        self._alive: list[str] = []
        try:
            lib.call(
                "cusparseLtStructuredDescriptorInit",
                handle, self._a, out_f, in_f, in_f, _ALIGN, value_type, _ORDER_ROW, _SPARSITY_50,
            )  # fmt: skip
            self._alive.append("a")
            # x (rows, in) row-major, read transposed: the layout of torch's dense_B = x.t() (not contiguous)
            lib.call(
                "cusparseLtDenseDescriptorInit", handle, self._b, rows, in_f, in_f, _ALIGN, value_type, _ORDER_ROW
            )
            self._alive.append("b")
            # y as (out, rows) column-major = (rows, out) row-major: torch's transpose_result=True
            lib.call(
                "cusparseLtDenseDescriptorInit", handle, self._d, out_f, rows, out_f, _ALIGN, out_type, _ORDER_COL
            )
            self._alive.append("d")
            c = self._d
            if c_type != out_type:
                lib.call(
                    "cusparseLtDenseDescriptorInit", handle, self._c, out_f, rows, out_f, _ALIGN, c_type, _ORDER_COL
                )
                self._alive.append("c")
                c = self._c
            lib.call(
                "cusparseLtMatmulDescriptorInit",
                handle, self._matmul_desc, _OP_N, _OP_T, self._a, self._b, c, self._d, _COMPUTE_32F,
            )  # fmt: skip
            self._bias = bias  # keep the tensor alive as long as the plan points at it
            if bias is not None:
                pointer = ctypes.c_void_p(bias.data_ptr())
                lib.call(
                    "cusparseLtMatmulDescSetAttribute",
                    handle, self._matmul_desc, _MATMUL_BIAS_POINTER, ctypes.byref(pointer), ctypes.sizeof(pointer),
                )  # fmt: skip
            if key.alpha_vector:
                on = ctypes.c_int(1)
                lib.call(
                    "cusparseLtMatmulDescSetAttribute",
                    handle, self._matmul_desc, _MATMUL_ALPHA_VECTOR_SCALING, ctypes.byref(on), ctypes.sizeof(on),
                )  # fmt: skip
            if key.gelu_scale is not None:
                on, scale = ctypes.c_int(1), ctypes.c_float(key.gelu_scale)
                for attribute, value in ((_MATMUL_ACTIVATION_GELU, on), (_MATMUL_ACTIVATION_GELU_SCALING, scale)):
                    lib.call(
                        "cusparseLtMatmulDescSetAttribute",
                        handle, self._matmul_desc, attribute, ctypes.byref(value), ctypes.sizeof(value),
                    )  # fmt: skip
            lib.call("cusparseLtMatmulAlgSelectionInit", handle, self._alg, self._matmul_desc, _ALG_DEFAULT)
            self._alive.append("alg")
            # CONFIG_MAX_ID bounds the ids from above, exclusively: cuSPARSELt 0.8 refuses an id equal to it
            # ("invalid value", seen on an H100), and the ones past it are what faulted on an H200.
            self.max_alg_id = self._get_alg_attribute(_ALG_CONFIG_MAX_ID) - 1
            if not 0 <= key.alg_id <= self.max_alg_id:
                raise CusparseLtError(
                    "cusparseLtMatmulAlgSetAttribute",
                    -1,
                    f"algorithm id {key.alg_id} is outside 0..{self.max_alg_id} for this shape",
                )
            self._set_alg_attribute(_ALG_CONFIG_ID, key.alg_id)
            if key.split_k != 1:
                self._set_alg_attribute(_ALG_SPLIT_K, key.split_k)
            if key.split_k_mode != -1:
                self._set_alg_attribute(_ALG_SPLIT_K_MODE, key.split_k_mode)
            lib.call("cusparseLtMatmulPlanInit", handle, self._plan, self._matmul_desc, self._alg)
            self._alive.append("plan")
            size = ctypes.c_size_t()
            lib.call("cusparseLtMatmulGetWorkspace", handle, self._plan, ctypes.byref(size))
            self.workspace_bytes = size.value
        except Exception:
            self.destroy()
            raise
        self._alpha = ctypes.c_float(1.0)
        self._beta = ctypes.c_float(0.0)
        self._streams = (ctypes.c_void_p * 1)()
        self._device = torch.device("cuda", key.device)
        self._shape = (rows, out_f)
        self._out_dtype = out_dtype

    def _get_alg_attribute(self, attribute: int) -> int:
        value = ctypes.c_int()
        self.lib.call(
            "cusparseLtMatmulAlgGetAttribute",
            self._handle, self._alg, attribute, ctypes.byref(value), ctypes.sizeof(value),
        )  # fmt: skip
        return value.value

    def _set_alg_attribute(self, attribute: int, value: int) -> None:
        value = ctypes.c_int(value)
        self.lib.call(
            "cusparseLtMatmulAlgSetAttribute",
            self._handle, self._alg, attribute, ctypes.byref(value), ctypes.sizeof(value),
        )  # fmt: skip

    def __call__(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        out: torch.Tensor | None = None,
        alpha: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """`alpha * (x @ W.T) + bias` into a new (or the given) `(rows, out_features)` tensor, on the current stream.
        `alpha`: a float (default 1; a CUDA graph keeps the value it was captured with), or for a plan built with
        `alpha_vector`, float32 `(out_features,)` on the GPU, one factor per output feature."""
        if out is None:
            out = torch.empty(self._shape, dtype=self._out_dtype, device=self._device)
        if self.key.alpha_vector:
            if not isinstance(alpha, torch.Tensor):
                raise ValueError("this cuSPARSELt plan scales by a vector: pass alpha, float32 (out_features,)")
            alpha_pointer = alpha.data_ptr()
        elif alpha is None or alpha == 1.0:
            alpha_pointer = ctypes.addressof(self._alpha)
        else:
            scalar = ctypes.c_float(alpha)  # read by cuSPARSELt during the call
            alpha_pointer = ctypes.addressof(scalar)
        workspace = None
        if self.workspace_bytes:
            workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=self._device).data_ptr()
        self._streams[0] = torch._C._cuda_getCurrentRawStream(self.key.device)
        status = self.lib.matmul(
            self._handle,
            self._plan,
            alpha_pointer,
            packed.data_ptr(),
            x.data_ptr(),
            ctypes.byref(self._beta),
            out.data_ptr(),  # C (beta is 0: not read)
            out.data_ptr(),
            workspace,
            self._streams,
            1,
        )
        if status:
            self.lib.check("cusparseLtMatmul", status)
        return out

    def destroy(self) -> None:
        alive, self._alive = self._alive, []
        lib = self.lib
        if "plan" in alive:
            lib.lib.cusparseLtMatmulPlanDestroy(self._plan)
        if "alg" in alive and lib.alg_selection_destroy is not None:
            lib.alg_selection_destroy(self._alg)
        for name, desc in (("a", self._a), ("b", self._b), ("c", self._c), ("d", self._d)):
            if name in alive:
                lib.lib.cusparseLtMatDescriptorDestroy(desc)

    def __del__(self):
        try:
            self.destroy()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class PlanCache:
    """`MatmulPlan`s by `PlanKey`, least recently used first out past `max_plans`."""

    def __init__(self, max_plans: int = MAX_PLANS):
        self.max_plans = max_plans
        self._plans: OrderedDict[PlanKey, MatmulPlan] = OrderedDict()
        self.built = 0

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, key: PlanKey, bias: torch.Tensor | None) -> MatmulPlan:
        plan = self._plans.get(key)
        if plan is None:
            plan = MatmulPlan(key, bias)
            self.built += 1
            self._plans[key] = plan
            if len(self._plans) > self.max_plans:
                _, old = self._plans.popitem(last=False)
                old.destroy()
        return plan

    def clear(self) -> None:
        while self._plans:
            _, plan = self._plans.popitem()
            plan.destroy()


PLANS = PlanCache()
"""The process-wide plan cache used by `sparse_linear`."""


def plan_for(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    alg_id: int = 0,
    split_k: int = 1,
    split_k_mode: int = -1,
    out_dtype: torch.dtype | None = None,
    alpha_vector: bool = False,
    gelu_scale: float | None = None,
) -> MatmulPlan:
    """The cached plan for this call (built on first use)."""
    key = PlanKey(
        x.device.index if x.device.index is not None else torch.cuda.current_device(),
        out_features,
        x.shape[1],
        x.shape[0],
        x.dtype,
        0 if bias is None else bias.data_ptr(),
        alg_id,
        split_k,
        split_k_mode,
        None if out_dtype == x.dtype else out_dtype,
        alpha_vector,
        gelu_scale,
    )
    return PLANS.get(key, bias)


def sparse_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    alg_id: int = 0,
    split_k: int = 1,
    split_k_mode: int = -1,
) -> torch.Tensor:
    """`x @ W.T + bias` with W compressed by `torch._cslt_compress` in `packed`, through a cached plan.

    Args:
        x: `(rows, in_features)`, contiguous, fp16/bf16, on the GPU; rows a multiple of 8.
        packed: the compressed weight.
        bias: `(out_features,)` or None (fused into the GEMM).
        out_features: rows of the weight.
        alg_id, split_k, split_k_mode: the cuSPARSELt algorithm settings (see `Autotuner`).

    Returns:
        `(rows, out_features)`, row-major, in x's dtype.
    """
    return plan_for(x, packed, bias, out_features, alg_id, split_k, split_k_mode)(x, packed)


def max_alg_id(
    out_features: int,
    in_features: int,
    rows: int,
    dtype: torch.dtype,
    device=None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    alpha_vector: bool = False,
    gelu_scale: float | None = None,
) -> int:
    """The largest algorithm id cuSPARSELt offers for this GEMM (ids 0..max are valid; larger ones are refused).

    It depends on the shape and on whether a bias is fused (on an H100, fp16 768x768 over 8 rows: cuSPARSELt's
    CONFIG_MAX_ID read 52 without a bias and 50 with one; the largest valid id is one less)."""
    device = torch.device(device if device is not None else "cuda")
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = PlanKey(
        index, out_features, in_features, rows, dtype, 0 if bias is None else bias.data_ptr(), 0, 1, -1,
        None if out_dtype == dtype else out_dtype, alpha_vector, gelu_scale,
    )  # fmt: skip
    plan = MatmulPlan(key, bias)
    try:
        return plan.max_alg_id
    finally:
        plan.destroy()


_REFUSED: set = set()
ROW_ALIGN = 32  # token rows of e4m3 GEMMs are padded to a multiple of this


def fp8_sparse_linear(
    xq: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    alg_id: int,
    alpha: float,
    out_dtype: torch.dtype,
    gelu_scale: float | None = None,
) -> torch.Tensor:
    """`alpha * (xq @ Wq.T) + bias` in `out_dtype` for e4m3 `xq (rows, in)` and the compressed e4m3 2:4 weight
    `packed`, through a kept plan (rows padded to a multiple of 32). An algorithm id refused for this epilogue (it
    was tuned with another bias or output type) falls back to cuSPARSELt's default, 0.

    With `gelu_scale`, the epilogue goes on: `gelu(alpha * (xq @ Wq.T) + bias) * gelu_scale`, written as e4m3 (the
    input of the next e4m3 GEMM, quantized with scale `1 / gelu_scale`; `out_dtype` must be float8_e4m3fn)."""
    if gelu_scale is not None and out_dtype != torch.float8_e4m3fn:
        raise ValueError(f"the GELU epilogue writes float8_e4m3fn; got out_dtype={out_dtype}.")
    rows = xq.shape[0]
    pad = (-rows) % ROW_ALIGN
    if pad:
        xq = torch.nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(xq.dtype)  # no e4m3 pad kernel
    if available():
        key = (out_features, xq.shape[1], xq.shape[0], bias is not None, out_dtype, gelu_scale is not None, alg_id)
        if key in _REFUSED:
            alg_id = 0
        try:
            plan = plan_for(xq, packed, bias, out_features, alg_id, out_dtype=out_dtype, gelu_scale=gelu_scale)
        except CusparseLtError:
            if alg_id == 0:
                raise
            # tuned with another epilogue (bias, output type), this id is refused here: cuSPARSELt's default then
            logger.info("hf-sparse: cuSPARSELt algorithm %d refused for e4m3 %s; using 0.", alg_id, key[:3])
            _REFUSED.add(key)
            plan = plan_for(xq, packed, bias, out_features, 0, out_dtype=out_dtype, gelu_scale=gelu_scale)
        out = plan(xq, packed, alpha=alpha)
    else:
        # the unscaled product of e4m3 values overflows float16 (|x| ~ 1e6 for unit-variance inputs): bfloat16 holds
        # it, then the scale and bias bring it back
        out = torch._cslt_sparse_mm(
            packed, xq.t(), None, out_dtype=torch.bfloat16, transpose_result=True, alg_id=alg_id
        )
        out = out.float() * alpha
        out = out if bias is None else out + bias
        if gelu_scale is not None:
            out = (torch.nn.functional.gelu(out) * gelu_scale).clamp(-E4M3_MAX, E4M3_MAX)
        out = out.to(out_dtype)
    return out[:rows] if pad else out


def split_k_supported() -> bool:
    """Whether this PyTorch's `torch._cslt_sparse_mm` takes `split_k` / `split_k_mode` (PyTorch >= 2.6)."""
    schemas = torch._C._jit_get_schemas_for_operator("aten::_cslt_sparse_mm")
    return any("split_k" in str(schema) for schema in schemas)


def cslt_linear(x, packed, bias, alg_id: int = 0, split_k: int = 1, split_k_mode: int = -1):
    """`x @ W.T + bias` through `torch._cslt_sparse_mm` (a plan set up per call): the path without the binding.

    Passing `x.t()` (a transposed view) with `transpose_result=True` makes cuSPARSELt read x as it lies and write
    the result row-major, `(tokens, out_features)`: the layout the next op reads, with no copy on either side.
    """
    if split_k != 1 or split_k_mode != -1:
        return torch._cslt_sparse_mm(
            packed, x.t(), bias, transpose_result=True, alg_id=alg_id, split_k=split_k, split_k_mode=split_k_mode
        )
    return torch._cslt_sparse_mm(packed, x.t(), bias, transpose_result=True, alg_id=alg_id)
