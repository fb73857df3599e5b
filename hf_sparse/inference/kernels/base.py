"""The kernel interface, and the types the swap, the autotuner and the policy pass between them.

A kernel is one object in `KERNELS` (`kernels/__init__.py`) that says why it cannot run here
(`unsupported_reason`), which GEMMs it takes (`shape_problem`), how the autotuner times it (`problem`: its
configurations, each checked against the fp32 result) and how to build the layer that runs it (`layer`). What it
measures is a `Timing` per `GemmRequest`; what the policy decides for a layer is a `Run` per token-count bucket.

This module imports no kernel binding: the policy (`policy.py`) reads only these types.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
"""The layer dtypes the 2:4 kernels here take."""

DENSE_NAME = "dense"
"""The dense GEMM's name in `KERNELS` and in `Run`s: what a layer runs where it runs dense."""

Config = tuple[int, ...]
"""One configuration of a kernel, as the kernel names it (cuSPARSELt: algorithm id, split-k, split-k mode;
CUTLASS: the index of a compiled tile shape; dense: nothing)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def token_bucket(tokens: int) -> int:
    """The bucket a token count (batch x sequence length) falls into: the next power of two, at least 8."""
    tokens = max(int(tokens), 1)
    return max(8, 1 << (tokens - 1).bit_length())


class Weights(enum.Enum):
    """How a kernel holds a layer's weight values."""

    MODEL = "model"
    """In the layer's own dtype (float16 or bfloat16)."""
    E4M3 = "e4m3"
    """As FP8 (e4m3) values with float32 scales: `swap_to_semi_structured_(fp8=...)` only."""


class Gelu(enum.Enum):
    """Which GELU activation after a layer a kernel can compute in its epilogue."""

    NONE = "none"
    EXACT = "exact"
    """The erf form only (a float16 output would show the tanh approximation's difference)."""
    ANY = "any"
    """Exact or tanh-approximated (an e4m3 output's rounding step hides their difference)."""


@dataclass(frozen=True)
class GemmRequest:
    """One GEMM for the autotuner: `x @ W.T (+ bias)` for a `(out_features, in_features)` weight of `dtype` (the
    layer's), over `tokens` rows, run by `kernel` (a name in `KERNELS`), with GELU after it (`gelu`: in the
    kernel's epilogue, or for a kernel without one, as the separate step after it)."""

    kernel: str
    out_features: int
    in_features: int
    dtype: torch.dtype
    bias: bool
    tokens: int
    gelu: bool = False

    @property
    def bucket(self) -> int:
        return token_bucket(self.tokens)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def on(self, kernel: str, gelu: bool | None = None) -> GemmRequest:
        """The same GEMM on another kernel (and with or without GELU)."""
        return dataclasses.replace(self, kernel=kernel, gelu=self.gelu if gelu is None else gelu)

    def family(self) -> str:
        """The kernel variant this request sweeps, e.g. `"cusparselt|float16"`: its configuration ids mean one
        thing (another dtype or GELU epilogue is another kernel of the library)."""
        return f"{self.kernel}|{dtype_name(self.dtype)}" + ("|gelu" if self.gelu else "")

    def describe(self) -> str:
        gelu = " + GELU" if self.gelu else ""
        return f"{self.out_features}x{self.in_features} {dtype_name(self.dtype)} on {self.kernel}{gelu} at {self.tokens} tokens"

    def to_json(self) -> list:
        return [
            self.kernel,
            self.out_features,
            self.in_features,
            dtype_name(self.dtype),
            self.bias,
            self.tokens,
            self.gelu,
        ]

    @classmethod
    def from_json(cls, data: Sequence) -> GemmRequest:
        kernel, out_features, in_features, dtype, bias, tokens, gelu = data
        return cls(str(kernel), int(out_features), int(in_features), getattr(torch, dtype), bool(bias), int(tokens),
                   bool(gelu))  # fmt: skip


@dataclass(frozen=True)
class Timing:
    """What the autotuner measured for one `GemmRequest`: the fastest verified configuration and its milliseconds
    per call (None: nothing ran, every configuration was refused or off the reference, or the measuring process
    died), at `tokens` rows, over `candidates` verified configurations; `note` says what cut the sweep short."""

    ms: float | None = None
    config: Config = ()
    tokens: int = 0
    candidates: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        data = {"ms": self.ms, "config": list(self.config), "tokens": self.tokens, "candidates": self.candidates}
        return dict(data, note=self.note) if self.note else data

    @classmethod
    def from_dict(cls, data: Mapping) -> Timing:
        ms = data.get("ms")
        return cls(None if ms is None else float(ms), tuple(int(c) for c in data.get("config") or ()),
                   int(data.get("tokens", 0)), int(data.get("candidates", 0)), str(data.get("note", "")))  # fmt: skip


@dataclass(frozen=True)
class Run:
    """What a layer runs at one token-count bucket: a kernel (its name) in one of its configurations."""

    kernel: str
    config: Config = ()


@dataclass
class SweepSettings:
    """How hard the autotuner looks (see `Autotuner`)."""

    reps: int = 10
    max_algorithms: int = 64
    time_budget_s: float = 4.0
    split_k: tuple[int, ...] = ()
    split_k_modes: tuple[int, ...] = (-1,)
    tolerance: float | None = None

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping) -> SweepSettings:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass
class GemmInputs:
    """The random GEMM a sweep times: `x` `(rows, in_features)`, the 2:4 `weight` and the `bias` (or None), in the
    request's dtype on one GPU; `rows` is the token count padded to the kernel's `row_align` (the rows its layer
    runs: the token count itself for every kernel whose layer pads nothing)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    rows: int


@dataclass
class Problem:
    """One GEMM set up for a kernel's sweep (`tuning.sweep`).

    Args:
        configs: the configurations to try, in order.
        call: the call of one configuration, timed as it is (raises when the kernel refuses the configuration).
        reference: the float32 result every configuration is checked against; None for a kernel whose single
            configuration needs no check (the dense GEMMs).
        tolerance: the largest relative error against `reference` for a configuration to be kept.
        result: the float32 result of a call to check (default: the call's output, as float32).
        stop_at_refusal: the ids past the first refused one are refused too: stop there (cuSPARSELt's ids run up to
            a maximum that depends on the shape); False tries every configuration.
        refine: more configurations to try from the timings of the first pass (cuSPARSELt's split-k settings).
        close: frees what the set-up holds (plans).
    """

    configs: Sequence[Config]
    call: Callable[[Config], Callable[..., torch.Tensor]]
    reference: torch.Tensor | None = None
    tolerance: float = 5e-3
    result: Callable[[Callable[..., torch.Tensor]], torch.Tensor] | None = None
    stop_at_refusal: bool = True
    refine: Callable[[dict[Config, float]], Sequence[Config]] | None = None
    close: Callable[[], None] | None = None


class Tuner(Protocol):
    """What a layer asks of the autotuner for a token count it meets after the swap (`Autotuner` is one)."""

    min_speedup: float

    def timings(self, requests: Sequence[GemmRequest], device: Any) -> list[Timing]: ...


@dataclass
class LayerSpec:
    """What the layer a kernel builds must hold and run (the policy's decision for one unit, and what it needs).

    Args:
        weight: the dense 2:4 weight `(out_features, in_features)` (a fused group's rows stacked).
        bias: the bias, or None.
        name: the unit's name, for messages.
        emits_state: whether `state_dict()` holds this layer's `weight`/`bias` (False for a fused group, whose
            members emit their slices).
        runs: token-count bucket -> what runs there (this kernel, or the dense GEMM where the layer keeps a copy);
            empty when nothing was tuned.
        keep_dense: also keep the dense weight, for the buckets that run dense.
        gelu: run the GELU after the layer in the kernel's epilogue.
        input_scale: FP8 with static scales: the layer's calibrated input scale.
        output_scale: FP8 with GELU in the epilogue: the next layer's input scale, which the output is quantized to.
        tuner: the autotuner a layer may ask for token counts it meets later, or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    name: str
    emits_state: bool = True
    runs: Mapping[int, Run] = dataclasses.field(default_factory=dict)
    keep_dense: bool = False
    gelu: bool = False
    input_scale: float | None = None
    output_scale: float | None = None
    tuner: Tuner | None = None


class Kernel(Protocol):
    """A GEMM kernel a 2:4 layer can run on: one file in `kernels/`, one entry in `KERNELS`.

    Attributes:
        name: the key of its timings in the autotuning cache, and of its `Run`s.
        label: how reasons name it ("cuSPARSELt", "CUTLASS kernel").
        layout: the tensors it reads the weight from ("cusparselt", "triton_decode", "dense"): kernels of one layout
            share a layer's bytes; a layer holds one layout or, where the memory rule allows, two (`policy.Holds`).
        status: the report's word for a layer on it ("sparse", "fp8 2:4"; "+dense" is added for a dense copy).
        untuned: what a layer on it runs when nothing was tuned, for the report.
        weights: how it holds the weight values (`Weights.MODEL`: the layer's dtype; `Weights.E4M3`: FP8).
        sparse: it holds the 2:4 weight compressed (False: a dense GEMM).
        gelu: the GELU it can run in its epilogue, for layers of a dtype in `gelu_dtypes`.
        gelu_dtypes: the layer dtypes it runs GELU in its epilogue for.
        groups: its layer can stand for a fused q/k/v group (False: single layers only).
        row_align: the multiple its layer pads a call's token rows to (cuSPARSELt: 8; 1 for a kernel whose layer
            runs any row count), so that its sweep times the GEMM a model runs: the dense GEMM at 1 token is timed
            at 1 row, not 8.
    """

    name: str
    label: str
    layout: str
    status: str
    untuned: str
    weights: Weights
    sparse: bool
    gelu: Gelu
    gelu_dtypes: tuple[torch.dtype, ...]
    groups: bool
    row_align: int

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, layer: str = "") -> str | None:
        """Why it cannot run for weights of `dtype` on `device` (naming `layer`), or None when it can. May load
        or build the kernel's library (so asked only when a layer could run on it)."""
        ...

    def shape_problem(self, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        """Why it cannot take a `(out_features, in_features)` weight of `dtype`, or None."""
        ...

    def weight_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """Bytes of such a weight as it holds it."""
        ...

    def version(self) -> str:
        """What its cached timings depend on besides the GPU and the PyTorch, CUDA and cuSPARSELt versions (a
        build of its own: a hash of it), or ""."""
        ...

    def problem(self, request: GemmRequest, inputs: GemmInputs, settings: SweepSettings) -> Problem:
        """The sweep of `request` on `inputs` (on the GPU): its configurations and what each is checked against."""
        ...

    def layer(self, spec: LayerSpec) -> nn.Module | None:
        """The layer that runs `spec` (None: the `nn.Linear` stays as it is)."""
        ...

    def describe(self, config: Config, gelu: bool) -> str:
        """A bucket's `Run` of it, for the report (`gelu`: GELU runs in the layer)."""
        ...
