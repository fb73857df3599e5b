"""Per-GEMM decode benchmark: cuBLAS dense against the Triton 2:4 decode kernel and cuSPARSELt, on Llama-shaped
projections at decode token counts, beside the byte ceiling and the GPU's measured copy bandwidth.

Each kernel is timed as the autotuner times it (`tuning.sweep`: every configuration checked against the fp32 result,
the fastest kept, timed under CUDA graphs), in one process, dense in the same run. Dense is timed at exactly the
token rows (`F.linear`, which cuBLAS runs as a GEMV at one row); cuSPARSELt at the rows its layer pads to (8). The
byte ceiling is the dense time times the 2:4 weight's bytes over the dense weight's (9/16): the time a 2:4 kernel
would take if it read its weights as fast as cuBLAS reads the dense ones.

    python -m hf_sparse.inference.decode_bench                    # Llama-3-8B and Llama-3.2-1B shapes, fp16 and bf16
    python -m hf_sparse.inference.decode_bench --models llama-3-8b --dtypes bfloat16 --tokens 1 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .kernels.base import GemmRequest, SweepSettings, dtype_name

SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    # (out_features, in_features) per projection; q/k/v fused as the swap fuses them
    "llama-3-8b": {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
    "llama-3.2-1b": {"qkv": (3072, 2048), "o_proj": (2048, 2048), "gate/up": (8192, 2048), "down": (2048, 8192)},
}
SPARSE_KERNELS = ("triton_decode", "cusparselt", "triton_decode_fp8", "fp8")
DTYPES = ("float16", "bfloat16")


@dataclass
class DecodeBenchArguments:
    """What `python -m hf_sparse.inference.decode_bench` measures."""

    models: list[str] = field(default_factory=lambda: list(SHAPES), metadata={"help": f"Shape sets: {list(SHAPES)}."})
    dtypes: list[str] = field(default_factory=lambda: list(DTYPES), metadata={"help": "float16 and/or bfloat16."})
    tokens: list[int] = field(default_factory=lambda: [1, 16, 64], metadata={"help": "Token rows per GEMM."})
    kernels: list[str] = field(default_factory=lambda: list(SPARSE_KERNELS), metadata={"help": "2:4 kernels to time."})
    reps: int = field(default=10, metadata={"help": "Timings per configuration (the median is kept)."})
    time_budget_s: float = field(default=4.0, metadata={"help": "Seconds per sweep before no new configuration."})
    json: str | None = field(default=None, metadata={"help": "Write the results to this JSON file."})

    def __post_init__(self):
        checks = (("models", self.models, SHAPES), ("dtypes", self.dtypes, DTYPES), ("kernels", self.kernels,
                  SPARSE_KERNELS))  # fmt: skip
        for name, given, known in checks:
            unknown = [v for v in given if v not in known]
            if unknown:
                raise ValueError(f"--{name}: {unknown} unknown; choose from {list(known)}.")
        if not self.tokens or any(int(t) < 1 for t in self.tokens):
            raise ValueError(f"--tokens must be positive integers; got {self.tokens}.")
        if self.reps < 1:
            raise ValueError(f"--reps must be at least 1; got {self.reps}.")


def parse_args(argv: list[str] | None = None) -> DecodeBenchArguments:
    parser = argparse.ArgumentParser(
        prog="python -m hf_sparse.inference.decode_bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    defaults = DecodeBenchArguments()
    for name, value in asdict(defaults).items():
        help_text = DecodeBenchArguments.__dataclass_fields__[name].metadata["help"]
        if isinstance(value, list):
            kind = int if name == "tokens" else str
            parser.add_argument(f"--{name}", nargs="+", type=kind, default=value, help=help_text)
        else:
            parser.add_argument(f"--{name}", type=type(value) if value is not None else str, default=value,
                                help=help_text)  # fmt: skip
    try:
        return DecodeBenchArguments(**vars(parser.parse_args(argv)))
    except ValueError as err:
        parser.error(str(err))


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """The GPU's device-to-device copy bandwidth in GB/s (bytes read plus bytes written per second), from a graphed
    copy of `nbytes`."""
    from .tuning import time_graphed

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_graphed(lambda: dst.copy_(src), 5, 10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def dense_ms(request: GemmRequest, device: torch.device, reps: int) -> float:
    """`F.linear` at exactly the request's token rows (cuBLAS's GEMV at one row), graphed."""
    from .tuning import gemm_inputs, time_graphed

    inputs = gemm_inputs(request, 1, device)
    x, w, b = inputs.x, inputs.weight, inputs.bias
    return time_graphed(lambda: F.linear(x, w, b), 20, reps)


def measure(args: DecodeBenchArguments) -> dict:
    """Times every shape, dtype, token count and kernel of `args` on the current GPU: dense here, the 2:4 kernels in
    a child process (`tuning.measure_in_child`: a configuration that faults the GPU ends its own sweep, not the
    benchmark)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the decode benchmark times GPU kernels: it needs a CUDA GPU, and none is visible here.")
    from . import kernels
    from .tuning import measure_in_child

    device = torch.device("cuda", torch.cuda.current_device())
    settings = SweepSettings(reps=args.reps, time_budget_s=args.time_budget_s)
    rows, sparse = [], []
    for model in args.models:
        for dtype in (getattr(torch, d) for d in args.dtypes):
            for tokens in args.tokens:
                for layer, shape in SHAPES[model].items():
                    request = GemmRequest("dense", *shape, dtype, False, tokens)
                    dense = dense_ms(request, device, args.reps)
                    dense_bytes = shape[0] * shape[1] * dtype.itemsize
                    ratio = kernels.find("triton_decode").weight_bytes(shape, dtype) / dense_bytes  # 9/16
                    row = {"model": model, "layer": layer, "shape": list(shape), "dtype": dtype_name(dtype),
                           "tokens": tokens, "dense_ms": dense, "dense_gbs": dense_bytes / (dense * 1e-3) / 1e9,
                           "ceiling_ms": dense * ratio}  # fmt: skip
                    for name in args.kernels:
                        kernel = kernels.find(name)
                        problem = kernel.unsupported_reason(device, dtype) or kernel.shape_problem(shape, dtype)
                        row[name] = {"ms": None, "config": [], "why_not": problem, "speedup": None, "gbs": None}
                        if not problem:
                            sparse.append((row, name, request.on(name)))
                    rows.append(row)
    timings = measure_in_child([r for _, _, r in sparse], device, settings) if sparse else []
    for (row, name, request), timing in zip(sparse, timings):
        ms, weight_bytes = timing.ms, kernels.find(name).weight_bytes(request.shape, request.dtype)
        row[name].update(ms=ms, config=list(timing.config), note=timing.note, speedup=row["dense_ms"] / ms if ms else
                         None, gbs=weight_bytes / (ms * 1e-3) / 1e9 if ms else None)  # fmt: skip
    return {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "copy_bandwidth_gbs": copy_bandwidth(device),
        "rows": rows,
    }


def format_row(row: dict, kernels: list[str]) -> str:
    cells = [f"{row['model']:<13}", f"{row['layer']:<8}", f"{row['shape'][0]:>6}x{row['shape'][1]:<6}",
             f"{row['dtype']:<9}", f"{row['tokens']:>4}", f"{row['dense_ms'] * 1e3:9.1f}"]  # fmt: skip
    for name in kernels:
        ms, speedup = row[name]["ms"], row[name]["speedup"]
        cells.append(f"{ms * 1e3:9.1f} {speedup:5.2f}x" if ms else f"{'-':>9} {'-':>6}")
    ceiling = row.get("ceiling_ms")
    cells.append(f"{ceiling * 1e3:9.1f} {row['dense_ms'] / ceiling:5.2f}x" if ceiling else "")
    return "  ".join(cells)


def format_table(result: dict, kernels: list[str]) -> str:
    """The results as a table: microseconds per GEMM and speed-up over dense per kernel, and the byte ceiling."""
    head = ["model        ", "layer   ", "   out x in   ", "dtype    ", "tok ", "dense us "]
    head += [f"{name[:9]:>9} us/x  " for name in kernels] + ["ceiling us/x"]
    lines = [f"{result['gpu']}, torch {result['torch']}; copy bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s",
             "  ".join(head)]  # fmt: skip
    lines += [format_row(row, kernels) for row in result["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        result = measure(args)
    except RuntimeError as err:
        sys.exit(f"decode_bench: {err}")
    print(format_table(result, args.kernels))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
