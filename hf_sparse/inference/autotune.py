"""The autotuner: what each kernel takes per GEMM shape and token count, measured once and cached in memory and on
disk.

Which kernel wins depends on the GEMM's shape and on the number of tokens, so every `GemmRequest` (a kernel, a weight
shape and dtype, a bias or not, a token-count bucket, GELU or not) is timed once: the kernel's configurations, each
verified against the fp32 result, the fastest kept (`tuning.py`: under CUDA graphs, in a child process by default).
Which kernel a layer runs is then the policy's decision (`policy.py`), from these timings.

The disk cache is one JSON file, keyed by the GPU and the PyTorch, CUDA and cuSPARSELt versions (a timing measured on
one machine is never used on another) and, per entry, by the request and the kernel's own build (`Kernel.version`).
A file of another format version is ignored and rewritten: its timings are measured again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import kernels
from .kernels.base import GemmRequest, SweepSettings, Timing, dtype_name
from .policy import MIN_SPEEDUP
from .tuning import measure_in_child, sweep

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_SPARSE_CACHE"
"""Environment variable naming the autotuning cache file (default `~/.cache/hf_sparse/autotune.json`)."""

CACHE_VERSION = 3
"""The cache file's format. 3: every GEMM timed over the token rows its layer runs (`Kernel.row_align`); 2 timed the
dense, CUTLASS and dense FP8 GEMMs over rows padded to 8 or 32 (at 1 token, cuBLAS at 8 rows against a decode kernel
at 1), so its timings are measured again; 1 (hf-sparse before kernels were plug-ins): cuSPARSELt's and dense timings
together. Files of another version are ignored and rewritten."""


def default_cache_path() -> Path:
    """`$HF_SPARSE_CACHE`, else `$XDG_CACHE_HOME/hf_sparse/autotune.json`, else `~/.cache/hf_sparse/autotune.json`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hf_sparse" / "autotune.json"


def cache_key(request: GemmRequest, version: str = "") -> str:
    """Cache key of one request at its token-count bucket, e.g. `'cusparselt|3072x768|float16|bias|tokens<=2048'`
    (`|gelu` at the end for GELU after the GEMM; `cutlass@<build>` for a kernel with a build of its own)."""
    kernel = f"{request.kernel}@{version}" if version else request.kernel
    key = (
        f"{kernel}|{request.out_features}x{request.in_features}|{dtype_name(request.dtype)}|"
        f"{'bias' if request.bias else 'nobias'}|tokens<={request.bucket}"
    )
    return key + "|gelu" if request.gelu else key


def device_facts(device: torch.device | str | None = None) -> dict:
    """What a timing on `device` depends on: the GPU (name, compute capability) and the PyTorch, CUDA and cuSPARSELt
    versions."""
    device = torch.device(device if device is not None else "cuda")
    major, minor = torch.cuda.get_device_capability(device)
    cusparselt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    return {
        "gpu": torch.cuda.get_device_name(device),
        "capability": [major, minor],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": cusparselt,
    }


def device_key(device: torch.device | str | None = None) -> str:
    """The cache's key for `device_facts`: a timing measured on one machine is never used on another."""
    facts = device_facts(device)
    return format_device_key(
        facts["gpu"], tuple(facts["capability"]), facts["torch"], facts["cuda"], facts["cusparselt"]
    )


def format_device_key(
    gpu_name: str, capability: tuple[int, int], torch_version: str, cuda_version: str | None, cusparselt: int | None
) -> str:
    return (
        f"{gpu_name} (sm{capability[0]}{capability[1]})|torch {torch_version}|cuda {cuda_version}"
        f"|cusparselt {cusparselt}"
    )


@dataclass
class Autotuner:
    """Times the kernels (`kernels.KERNELS`) per GEMM shape and token-count bucket, and remembers what it measured.

    Args:
        cache_path: JSON file of measured timings; default `default_cache_path()`. `False` keeps them in memory only.
        min_speedup: the margin a swap asks of a 2:4 kernel over the dense GEMM (and of a kernel over the one
            listed before it in `KERNELS`, see `policy.py`), so that timing noise never makes a model slower.
        reps: timed replays per configuration (the median is kept).
        max_algorithms: at most this many configuration ids are tried per kernel (0, 1, ..., never past the largest
            one the kernel offers for the shape).
        time_budget_s: stop trying further configurations of one GEMM after this many seconds (each new cuSPARSELt
            algorithm costs host time to plan and load the first time it runs).
        split_k: split-k factors also tried on cuSPARSELt's two fastest algorithms (default none: they cost tuning
            time).
        split_k_modes: cuSPARSELt split-k modes tried with them (-1: its default, 1: one kernel, 2: two kernels).
        isolate: time in a child process (default), so a configuration that faults on the GPU costs the child and
            not this process's CUDA context; the child is restarted without it.
        tolerance: largest relative error against the fp32 result for a configuration to be kept; default per
            kernel and dtype (5e-3 for fp16, 1e-2 for bf16 and e4m3 products).

    cuSPARSELt's own search (`torch._C._cusparselt.mm_search`) is not used: with PyTorch 2.11 and cuSPARSELt 0.8
    on an H200 it fails with an internal error for this layout and leaves the CUDA context unusable.

    Example:

    ```python
    >>> tuner = Autotuner()
    >>> tuner.timing(GemmRequest("cusparselt", 3072, 768, torch.float16, bias=True, tokens=24576), "cuda")
    Timing(ms=..., config=(..., 1, -1), tokens=24576, candidates=..., note='')
    ```
    """

    cache_path: str | os.PathLike | bool | None = None
    min_speedup: float = MIN_SPEEDUP
    reps: int = 10
    max_algorithms: int = 64
    time_budget_s: float = 4.0
    split_k: tuple[int, ...] = ()
    split_k_modes: tuple[int, ...] = (-1,)
    isolate: bool = True
    tolerance: float | None = None
    _memory: dict[str, dict[str, Timing]] = field(default_factory=dict, init=False, repr=False)
    _loaded: bool = field(default=False, init=False, repr=False)
    measurements: int = field(default=0, init=False)

    def __post_init__(self):
        if self.cache_path is None or self.cache_path is True:
            self.cache_path = default_cache_path()
        elif self.cache_path is not False:
            self.cache_path = Path(self.cache_path).expanduser()
        if not self.min_speedup > 0:
            raise ValueError(f"min_speedup must be > 0; got {self.min_speedup!r}.")
        if int(self.reps) < 1:
            raise ValueError(f"reps must be >= 1; got {self.reps!r}.")

    @property
    def settings(self) -> SweepSettings:
        return SweepSettings(
            int(self.reps), int(self.max_algorithms), float(self.time_budget_s), tuple(self.split_k),
            tuple(self.split_k_modes), self.tolerance,
        )  # fmt: skip

    # -- cache -----------------------------------------------------------------------------------------------------

    def device_key(self, device) -> str:
        return device_key(device)

    def key(self, request: GemmRequest) -> str:
        return cache_key(request, kernels.find(request.kernel).version())

    def cached(self, request: GemmRequest, device) -> Timing | None:
        """The cached timing of this request's bucket, or None (never measures)."""
        self._load()
        return self._memory.get(self.device_key(device), {}).get(self.key(request))

    def timing(self, request: GemmRequest, device) -> Timing:
        """The cached timing of this request's bucket; measured (on the GPU) and cached first if there is none."""
        return self.timings([request], device)[0]

    def timings(self, requests: Sequence[GemmRequest], device) -> list[Timing]:
        """The timings of `requests`, measuring those not cached yet together (`prefetch`)."""
        self.prefetch(requests, device)
        return [self.cached(request, device) for request in requests]

    def store(self, request: GemmRequest, device, timing: Timing) -> None:
        self._memory.setdefault(self.device_key(device), {})[self.key(request)] = timing
        self._save()

    def _load(self) -> None:
        if self._loaded or self.cache_path is False:
            self._loaded = True
            return
        self._loaded = True
        for key, table in self._read_disk().items():
            mine = self._memory.setdefault(key, {})
            for gemm, timing in table.items():
                mine.setdefault(gemm, timing)

    def _read_disk(self) -> dict[str, dict[str, Timing]]:
        path = Path(self.cache_path)
        if not path.is_file():
            return {}
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            logger.warning("hf-sparse: ignoring unreadable autotuning cache %s (%s).", path, err)
            return {}
        version = raw.get("version") if isinstance(raw, dict) else None
        if version != CACHE_VERSION:
            logger.warning(
                "hf-sparse: ignoring the autotuning cache %s: it has format version %s and this hf-sparse reads %d; "
                "its GEMMs are timed again, and the file is rewritten.", path, version, CACHE_VERSION,
            )  # fmt: skip
            return {}
        return {
            key: {gemm: Timing.from_dict(value) for gemm, value in table.items()}
            for key, table in raw.get("devices", {}).items()
        }

    def _save(self) -> None:
        if self.cache_path is False:
            return
        path = Path(self.cache_path)
        # Merge with what other processes wrote since we read the file, then replace it atomically.
        merged = self._read_disk()
        for key, table in self._memory.items():
            merged.setdefault(key, {}).update(table)
        payload = {
            "version": CACHE_VERSION,
            "devices": {k: {g: c.to_dict() for g, c in sorted(t.items())} for k, t in sorted(merged.items())},
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
                json.dump(payload, handle, indent=1)
            os.replace(handle.name, path)
        except OSError as err:
            logger.warning("hf-sparse: could not write the autotuning cache %s (%s); keeping it in memory.", path, err)

    # -- measuring (GPU) -------------------------------------------------------------------------------------------

    def prefetch(self, requests: Sequence[GemmRequest], device) -> None:
        """Measures every request whose bucket is not cached yet, together (one child process when `isolate`), and
        caches the timings."""
        missing, seen = [], set()
        for request in requests:
            key = self.key(request)
            if key not in seen and self.cached(request, device) is None:
                seen.add(key)
                missing.append(request)
        if not missing:
            return
        for request, timing in zip(missing, self.measure_many(missing, device)):
            self.measurements += 1
            self.store(request, device, timing)

    def measure_many(self, requests: Sequence[GemmRequest], device) -> list[Timing]:
        """Times each request's kernel on `device`.

        With `isolate` (the default) the sweeps run in a child process: a configuration that faults on the GPU (an
        illegal instruction poisons the CUDA context of the process that ran it) costs that child, not this
        process; the child is restarted without the faulty configuration.
        """
        if self.isolate:
            return measure_in_child(requests, device, self.settings)
        return [sweep(kernels.find(r.kernel), r, device, self.settings) for r in requests]


_DEFAULT_TUNER: Autotuner | None = None


def default_tuner() -> Autotuner:
    """The process-wide autotuner (disk cache at `default_cache_path()`)."""
    global _DEFAULT_TUNER
    if _DEFAULT_TUNER is None:
        _DEFAULT_TUNER = Autotuner()
    return _DEFAULT_TUNER
