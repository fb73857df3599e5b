"""Per-shape autotuning of 2:4 sparse (cuSPARSELt) against dense GEMMs, cached in memory and on disk.

Which kernel wins depends on the GEMM's shape and on the number of tokens: on an H100 (cuSPARSELt 0.8) the sparse
kernels of BERT-base's layers ran at 0.74-1.02x of dense at 1,536 tokens and at 1.03-1.18x at 24,576-98,304
tokens. So every distinct (weight shape, dtype, bias, token-count bucket) is timed once, dense against the sparse
kernel over its algorithms and split-k settings, and the fastest is remembered. The measuring itself (`tuning.py`)
runs under CUDA graphs, in a child process by default, and keeps only algorithms whose result matches the masked
dense one.

The disk cache is one JSON file, keyed by the GPU, PyTorch, CUDA and cuSPARSELt versions: a choice measured on
one machine is never used on another.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .tuning import MIN_SPEEDUP, measure_in_child, request_epilogue, sweep

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_SPARSE_CACHE"
"""Environment variable naming the autotuning cache file (default `~/.cache/hf_sparse/autotune.json`)."""

CACHE_VERSION = 1


def default_cache_path() -> Path:
    """`$HF_SPARSE_CACHE`, else `$XDG_CACHE_HOME/hf_sparse/autotune.json`, else `~/.cache/hf_sparse/autotune.json`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hf_sparse" / "autotune.json"


def token_bucket(tokens: int) -> int:
    """The bucket a token count (batch x sequence length) falls into: the next power of two, at least 8."""
    tokens = max(int(tokens), 1)
    return max(8, 1 << (tokens - 1).bit_length())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gemm_key(
    out_features: int, in_features: int, dtype: torch.dtype, bias: bool, bucket: int, epilogue: str = ""
) -> str:
    """Cache key of one GEMM shape at one token-count bucket, e.g. `'3072x768|float16|bias|tokens<=2048'` (with
    `|gelu` at the end for a GEMM measured with GELU in its epilogue, `|cutlass` for the CUTLASS kernel, see
    `tuning.sweep`; for float16 both name the CUTLASS build, `|gelu@<cutlass.kernel_id()>`)."""
    key = f"{out_features}x{in_features}|{dtype_name(dtype)}|{'bias' if bias else 'nobias'}|tokens<={bucket}"
    from .cutlass import kernel_id, uses_cutlass

    if uses_cutlass(dtype, epilogue):  # the CUTLASS kernels: their build's choices
        epilogue = f"{epilogue}@{kernel_id()}"
    return f"{key}|{epilogue}" if epilogue else key


class Plan(NamedTuple):
    """How one GEMM runs: dense (`F.linear`) or the cuSPARSELt 2:4 kernel with its settings."""

    backend: str  # "sparse" or "dense"
    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int = -1

    def describe(self) -> str:
        if self.backend == "dense":
            return "dense"
        extra = f", split-k {self.split_k}/{self.split_k_mode}" if self.split_k != 1 else ""
        return f"sparse (alg {self.alg_id}{extra})"


DENSE = Plan("dense")


@dataclass
class GemmChoice:
    """What the autotuner measured and chose for one GEMM shape and token-count bucket.

    `backend` is the winner, "sparse" or "dense". `sparse` is the fastest sparse `Plan` even when dense won, so a
    layer that holds only the compressed weight still runs its best sparse kernel. Times are per GEMM, in
    milliseconds, measured at `tokens` tokens.
    """

    backend: str
    sparse: Plan = Plan("sparse")
    dense_ms: float | None = None
    sparse_ms: float | None = None
    tokens: int = 0
    candidates: int = 0
    note: str = ""  # e.g. "sweep ended by a fault at algorithm 36"
    fp16_ms: float | None = None  # e4m3 GEMMs: the fp16 dense GEMM's time (dense_ms is then the dense FP8 GEMM's)

    @property
    def speedup(self) -> float | None:
        """Dense time over best sparse time (> 1: sparse is faster)."""
        if not self.dense_ms or not self.sparse_ms:
            return None
        return self.dense_ms / self.sparse_ms

    def plan(self, has_dense: bool) -> Plan:
        """The plan a layer runs: the winner, except that a layer without a dense weight runs its best sparse
        kernel where dense won (and dense only where no sparse kernel ran at all)."""
        if self.backend == "dense" and (has_dense or self.sparse_ms is None):
            return DENSE
        return self.sparse

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(self.sparse._asdict(), backend=self.backend)  # flat, as the cache file has always been
        del data["sparse"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> GemmChoice:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "sparse"}
        settings = {k: data[k] for k in ("alg_id", "split_k", "split_k_mode") if k in data}
        return cls(**known, sparse=Plan("sparse", **settings))


def device_key(device: torch.device | str | None = None) -> str:
    """What a cached timing depends on: the GPU model and the PyTorch, CUDA and cuSPARSELt versions."""
    device = torch.device(device if device is not None else "cuda")
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    cusparselt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    return format_device_key(name, (major, minor), torch.__version__, torch.version.cuda, cusparselt)


def format_device_key(
    gpu_name: str, capability: tuple[int, int], torch_version: str, cuda_version: str | None, cusparselt: int | None
) -> str:
    return (
        f"{gpu_name} (sm{capability[0]}{capability[1]})|torch {torch_version}|cuda {cuda_version}"
        f"|cusparselt {cusparselt}"
    )


@dataclass
class Autotuner:
    """Chooses, per GEMM shape and token-count bucket, between dense `F.linear` and the cuSPARSELt 2:4 kernel.

    Args:
        cache_path: JSON file of measured choices; default `default_cache_path()`. `False` keeps them in memory only.
        min_speedup: the sparse kernel is chosen only if it is at least this much faster than dense (a margin for
            timing noise, so a near tie never makes the model slower).
        reps: timed replays per candidate (the median is kept).
        max_algorithms: at most this many cuSPARSELt algorithm ids are tried (0, 1, ..., never past the largest
            one cuSPARSELt offers for the shape).
        time_budget_s: stop trying further algorithms of one shape after this many seconds (each new cuSPARSELt
            algorithm costs host time to plan and load the first time it runs).
        split_k: split-k factors also tried on the two fastest algorithms (default none: they cost tuning time).
        split_k_modes: cuSPARSELt split-k modes tried with them (-1: its default, 1: one kernel, 2: two kernels).
        isolate: run the sweeps in a child process (default), so an algorithm that faults on the GPU costs the
            child and not this process's CUDA context; the child is restarted without it.
        tolerance: largest relative error against the masked dense result (fp32 `F.linear`) for an algorithm to
            be kept; default 5e-3 for fp16, 1e-2 for bf16.

    cuSPARSELt's own search (`torch._C._cusparselt.mm_search`) is not used: with PyTorch 2.11 and cuSPARSELt 0.8
    on an H200 it fails with an internal error for this layout and leaves the CUDA context unusable.

    Example:

    ```python
    >>> tuner = Autotuner()
    >>> tuner.choice(3072, 768, torch.float16, bias=True, tokens=24576, device="cuda")
    GemmChoice(backend='sparse', alg_id=..., dense_ms=..., sparse_ms=..., ...)
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
    _memory: dict[str, dict[str, GemmChoice]] = field(default_factory=dict, init=False, repr=False)
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

    # -- cache -----------------------------------------------------------------------------------------------------

    def device_key(self, device) -> str:
        return device_key(device)

    def cached(
        self,
        out_features: int,
        in_features: int,
        dtype: torch.dtype,
        bias: bool,
        tokens: int,
        device,
        epilogue: str = "",
    ) -> GemmChoice | None:
        """The cached choice for this GEMM's bucket, or None (never measures)."""
        self._load()
        table = self._memory.get(self.device_key(device), {})
        return table.get(gemm_key(out_features, in_features, dtype, bias, token_bucket(tokens), epilogue))

    def choice(
        self,
        out_features: int,
        in_features: int,
        dtype: torch.dtype,
        bias: bool,
        tokens: int,
        device,
        epilogue: str = "",
    ) -> GemmChoice:
        """The cached choice for this GEMM's bucket; measured (on the GPU) and cached first if there is none.
        `epilogue="gelu"`: the GEMM with GELU in its epilogue (e4m3: cuSPARSELt; float16: CUTLASS), "cutlass": the
        float16 GEMM on the CUTLASS kernel (see `tuning.sweep`)."""
        found = self.cached(out_features, in_features, dtype, bias, tokens, device, epilogue)
        if found is not None:
            return found
        chosen = self.measure(out_features, in_features, dtype, bias, tokens, device, epilogue)
        self.measurements += 1
        self.store(out_features, in_features, dtype, bias, tokens, device, chosen, epilogue)
        return chosen

    def store(self, out_features, in_features, dtype, bias, tokens, device, chosen: GemmChoice, epilogue="") -> None:
        key = gemm_key(out_features, in_features, dtype, bias, token_bucket(tokens), epilogue)
        self._memory.setdefault(self.device_key(device), {})[key] = chosen
        self._save()

    def _load(self) -> None:
        if self._loaded or self.cache_path is False:
            self._loaded = True
            return
        self._loaded = True
        for key, table in self._read_disk().items():
            mine = self._memory.setdefault(key, {})
            for gemm, choice in table.items():
                mine.setdefault(gemm, choice)

    def _read_disk(self) -> dict[str, dict[str, GemmChoice]]:
        path = Path(self.cache_path)
        if not path.is_file():
            return {}
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            logger.warning("hf-sparse: ignoring unreadable autotuning cache %s (%s).", path, err)
            return {}
        if raw.get("version") != CACHE_VERSION:
            logger.warning("hf-sparse: ignoring autotuning cache %s of another format version.", path)
            return {}
        return {
            key: {gemm: GemmChoice.from_dict(value) for gemm, value in table.items()}
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

    def prefetch(self, requests: list[tuple], device) -> None:
        """Measures every `(out_features, in_features, dtype, bias, tokens[, epilogue])` not cached yet, together
        (one child process when `isolate`), and caches the choices."""
        missing, seen = [], set()
        for request in requests:
            out_features, in_features, dtype, bias, tokens = request[:5]
            key = gemm_key(out_features, in_features, dtype, bias, token_bucket(tokens), request_epilogue(request))
            if key not in seen and self.cached(*request[:5], device, request_epilogue(request)) is None:
                seen.add(key)
                missing.append(request)
        if not missing:
            return
        for request, chosen in zip(missing, self.measure_many(missing, device)):
            self.measurements += 1
            self.store(*request[:5], device, chosen, request_epilogue(request))

    def measure(
        self, out_features: int, in_features: int, dtype: torch.dtype, bias: bool, tokens: int, device, epilogue=""
    ) -> GemmChoice:
        """Times dense against every sparse candidate for this shape on `device` (see `measure_many`)."""
        return self.measure_many([(out_features, in_features, dtype, bias, tokens, epilogue)], device)[0]

    def measure_many(self, requests: list[tuple], device) -> list[GemmChoice]:
        """Times dense against the sparse candidates of each `(out_features, in_features, dtype, bias, tokens[,
        epilogue])`.

        With `isolate` (the default) the sweeps run in a child process: an algorithm that faults on the GPU (an
        illegal instruction poisons the CUDA context of the process that ran it) costs that child, not this
        process; the child is restarted without the faulty algorithm.
        """
        settings = {
            "reps": self.reps,
            "max_algorithms": self.max_algorithms,
            "time_budget_s": self.time_budget_s,
            "split_k": tuple(self.split_k),
            "split_k_modes": tuple(self.split_k_modes),
            "min_speedup": self.min_speedup,
            "tolerance": self.tolerance,
        }
        if self.isolate:
            measured = measure_in_child(requests, device, settings)
        else:
            measured = [sweep(*r[:5], device, epilogue=request_epilogue(r), **settings) for r in requests]
        return [GemmChoice.from_dict(m) for m in measured]


_DEFAULT_TUNER: Autotuner | None = None


def default_tuner() -> Autotuner:
    """The process-wide autotuner (disk cache at `default_cache_path()`)."""
    global _DEFAULT_TUNER
    if _DEFAULT_TUNER is None:
        _DEFAULT_TUNER = Autotuner()
    return _DEFAULT_TUNER
