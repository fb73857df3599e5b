"""Benchmark: dense against 2:4 sparse inference of a question-answering model on one GPU, in every execution mode.

Times, in one process, the forward pass of these variants in each of the modes `eager` (a plain `model(**batch)`),
`graphs` (`hf_sparse.cuda_graphs`, one CUDA graph per batch size) and `compile` (`torch.compile(dynamic=False)`,
then CUDA graphs):
- `dense`: the 2:4-pruned model run densely, with query/key/value fused into one GEMM (the baseline);
- `2:4`: the same model after `hf_sparse.swap_to_semi_structured_` with its defaults (autotuned; dense copies only
  for the layers that lose at the named token counts, within the dense weights' bytes; plain calls at inference
  run through CUDA graphs per input shape, so its `eager` row is what a user's plain `model(**batch)` gets; on an
  H100/H200 layers run on a CUTLASS kernel where that measures faster, the intermediate ones with GELU in its
  epilogue);
- `2:4-cusparselt`: the same with `cutlass=False` (cuSPARSELt only, GELU a separate step), for the record;
- `2:4-plain`: the same with `eager_graphs=False` (its `eager` row is the layers' own eager speed), for the record;
- `2:4-copy`: `dense_fallback="copy"` (a dense copy for every layer that loses somewhere: fastest, more memory);
- `2:4-lean`: `dense_fallback="none"` (compressed weights only: the least memory);
- `stock`: PyTorch's own path, `torch.sparse.to_sparse_semi_structured` on every pruned layer (as in PyTorch's
  2:4 BERT tutorial), for the record;
- `dense-unfused`: the dense model without the q/k/v fusion, for the record;
- `fp8`: `swap_to_semi_structured_(fp8=...)`: e4m3 2:4 kernels (each layer the fastest of FP8 2:4, dense FP8 and
  fp16, autotuned), activations scaled as `--fp8-scales` says; with static scales, GELU and the next layer's e4m3
  quantization run in the epilogue of the 2:4 kernel before them where that measures faster;
- `fp8-unfused`: the same with GELU a separate step (`Fp8Config(fuse_gelu=False)`), for the record;
- `fp8-dense`: dense FP8 for every layer (`Fp8Config(sparse=False)`), the same activation scaling: the FP8 baseline.
Each latency is the median of repeated CUDA-event timings, taken in interleaved rounds; each speed-up is against
`dense` in the same mode. Also reported: the weight memory of the 2:4 layers and the largest logit difference
from the masked dense model run eagerly. Prints a table and writes `bench.json` and `bench.png` to `--output-dir`.

Run:
    python -m hf_sparse.inference.benchmark    # BERT-base QA (random weights), batch 4 16 64 256, seq 384, fp16
    hf-sparse-bench --model path/to/qa-model --batch-sizes 1 8 32 --seq-len 256 --dtype bfloat16 --modes eager
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

VARIANTS = (
    "dense", "2:4", "2:4-cusparselt", "2:4-plain", "2:4-copy", "2:4-lean", "fp8", "fp8-unfused", "fp8-dense", "stock",
    "dense-unfused",
)  # fmt: skip
DEFAULT_VARIANTS = ("dense", "2:4")
MODES = ("eager", "graphs", "compile")
FALLBACK_OF = {"2:4": "auto", "2:4-cusparselt": "auto", "2:4-plain": "auto", "2:4-copy": "copy", "2:4-lean": "none"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

logger = logging.getLogger(__name__)


@dataclass
class BenchmarkArguments:
    """What the benchmark times and how: the command line of `hf-sparse-bench` (each field is an option, `--seq-len`
    for `seq_len`), or `options(...)` for a Python caller."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Model path or Hub id (AutoModelForQuestionAnswering, else AutoModel). Default: BERT-base QA with "
            "random weights, built from a BertConfig (speed does not depend on the values). Not-2:4 models are "
            "magnitude-pruned to 2:4 first."
        },
    )
    batch_sizes: list[int] = field(default_factory=lambda: [4, 16, 64, 256], metadata={"help": "Batch sizes to time."})
    seq_len: int = field(default=384, metadata={"help": "Sequence length (tokens per example)."})
    dtype: str = field(default="float16", metadata={"choices": sorted(DTYPES), "help": "Weight and activation dtype."})
    modes: list[str] = field(
        default_factory=lambda: list(MODES),
        metadata={
            "choices": MODES,
            "help": "Execution modes, each timed for every variant: 'eager' (plain calls), 'graphs' (CUDA graphs per "
            "batch size, hf_sparse.cuda_graphs), 'compile' (torch.compile, then CUDA graphs; inductor fuses the bias "
            "adds, GELU, residuals and LayerNorms, GEMMs stay cuBLAS / cuSPARSELt / CUTLASS).",
        },
    )
    variants: list[str] = field(
        default_factory=lambda: list(DEFAULT_VARIANTS),
        metadata={"choices": VARIANTS, "help": "What to time ('dense' is always timed: it is the baseline)."},
    )
    reps: int = field(default=10, metadata={"help": "Timed calls per variant per round."})
    rounds: int = field(default=3, metadata={"help": "Interleaved rounds (variants alternate)."})
    no_fuse_qkv: bool = field(default=False, metadata={"help": "Do not fuse query/key/value (dense nor sparse)."})
    attention_mask: bool = field(
        default=False,
        metadata={"help": "Also pass an all-ones attention_mask (default: none, i.e. every sequence is full length)."},
    )
    output_dir: str = field(default="hf_sparse_bench", metadata={"help": "Where bench.json and bench.png go."})
    cache: str | None = field(
        default=None,
        metadata={"help": "Autotuning cache file (default: $HF_SPARSE_CACHE or ~/.cache/hf_sparse/autotune.json)."},
    )
    max_algorithms: int = field(
        default=64, metadata={"help": "Configuration ids tried per kernel and GEMM shape (autotuning)."}
    )
    tune_seconds: float = field(
        default=10.0, metadata={"help": "Autotuning time budget per kernel, GEMM shape and token count."}
    )
    sdpa_backend: str = field(
        default="default",
        metadata={
            "choices": ["default", "flash", "efficient", "cudnn", "math"],
            "help": "Force one scaled-dot-product-attention backend for every variant (captures included), to "
            "compare attention kernels.",
        },
    )
    swap_per_batch: bool = field(
        default=False,
        metadata={
            "help": "Swap a fresh copy of the model for each batch size, naming only that batch size's token count "
            "(a deployment that serves one batch size). Default: one swap that names the token counts of every batch "
            "size."
        },
    )
    fp8_scales: str = field(
        default="static",
        metadata={
            "choices": ["static", "dynamic"],
            "help": "Activation scales of the fp8 variants: one per layer calibrated on 4 random batches, or per "
            "token at run time (hf_sparse.inference.fp8.Fp8Config).",
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random weights and inputs."})


def _checked(args: BenchmarkArguments, error) -> BenchmarkArguments:
    if any(b < 1 for b in args.batch_sizes):
        error(f"--batch-sizes must be positive integers; got {args.batch_sizes}.")
    if args.seq_len < 1:
        error(f"--seq-len must be a positive integer; got {args.seq_len}.")
    if args.max_algorithms < 1 or args.tune_seconds <= 0:
        error("--max-algorithms must be >= 1 and --tune-seconds > 0.")
    if args.reps < 1 or args.rounds < 1:
        error(f"--reps and --rounds must be >= 1; got {args.reps} and {args.rounds}.")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        error(f"--variants {unknown} unknown; choose from {list(VARIANTS)}.")
    args.batch_sizes = sorted(set(args.batch_sizes))
    unknown_modes = [m for m in args.modes if m not in MODES]
    if unknown_modes or not args.modes:
        error(f"--modes {args.modes} must name one or more of {list(MODES)}.")
    args.variants = ["dense"] + [v for v in VARIANTS if v in args.variants and v != "dense"]
    args.modes = [m for m in MODES if m in args.modes]
    return args


def parse_args(argv: list[str] | None = None) -> BenchmarkArguments:
    """Parses and checks the benchmark's command line (exits with a message on bad values)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        BenchmarkArguments,
        prog="hf-sparse-bench",
        description="Dense vs 2:4 sparse inference latency of a question-answering model on one NVIDIA GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return _checked(args, parser.error)


def options(**overrides) -> BenchmarkArguments:
    """The benchmark's settings for a Python caller: the command line's defaults with `overrides` (the option
    names with underscores, e.g. `seq_len=256, variants=["dense", "2:4"]`), checked as the command line is.

    Example:

    ```python
    >>> result = run(options(model="out/sparse", batch_sizes=[16, 64], variants=["dense", "2:4"]))
    ```
    """
    known = {f.name for f in fields(BenchmarkArguments)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown benchmark option(s) {sorted(unknown)}; known: {sorted(known)}.")

    def error(message: str):
        raise ValueError(message)

    return _checked(BenchmarkArguments(**overrides), error)


# -- building the variants -------------------------------------------------------------------------------------------


def build_model(args: BenchmarkArguments) -> nn.Module:
    from transformers import AutoModel, AutoModelForQuestionAnswering, BertConfig, BertForQuestionAnswering

    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    if args.model is None:
        with torch.device("cuda"):
            model = BertForQuestionAnswering(BertConfig())  # BERT-base: 12 layers, hidden 768, intermediate 3072
        return model.to(dtype).eval()
    try:
        model = AutoModelForQuestionAnswering.from_pretrained(args.model, dtype=dtype)
    except (ValueError, KeyError):
        model = AutoModel.from_pretrained(args.model, dtype=dtype)
    return model.to("cuda").eval()


def prune_to_2_4(model: nn.Module) -> list[str]:
    """Magnitude-prunes the transformer blocks' linear layers to 2:4 unless they already are (the 2 largest |w| of
    every 4 kept); returns their names."""
    from ..config import SparsityConfig
    from ..masks import is_nm, nm_mask
    from ..selection import select_layers

    layers = select_layers(model, SparsityConfig()).targets
    if not all(is_nm(layer.weight, 2, 4) for layer in layers.values()):
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight.mul_(nm_mask(layer.weight, name=name))
        print(f"magnitude-pruned {len(layers)} linear layers to 2:4", flush=True)
    return list(layers)


def stock_swap(model: nn.Module, names: list[str]) -> int:
    """PyTorch's tutorial path: every pruned weight becomes a `SparseSemiStructuredTensor`. Returns weight bytes."""
    from torch.sparse import to_sparse_semi_structured

    total = 0
    for name in names:
        layer = model.get_submodule(name)
        sparse = to_sparse_semi_structured(layer.weight.detach())
        layer.weight = nn.Parameter(sparse, requires_grad=False)
        total += sum(
            t.numel() * t.element_size()
            for t in (getattr(sparse, "packed", None), getattr(sparse, "meta", None))
            if t is not None
        )
    return total


def make_inputs(model: nn.Module, batch: int, seq_len: int, seed: int, attention_mask: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed + batch)
    vocab = model.config.vocab_size
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq_len), device="cuda", generator=gen)}
    params = inspect.signature(model.forward).parameters
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros(batch, seq_len, dtype=torch.long, device="cuda")
    if attention_mask:
        inputs["attention_mask"] = torch.ones(batch, seq_len, dtype=torch.long, device="cuda")
    return inputs


def first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if hasattr(output, "values") else output
    return torch.cat([v.float().flatten() for v in values if isinstance(v, torch.Tensor)])


def weight_bytes(layers: list[nn.Module]) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in layers)


# -- the run ---------------------------------------------------------------------------------------------------------


def run(args: BenchmarkArguments) -> dict:
    """Builds every variant, times them batch size by batch size, and returns everything measured."""
    import transformers

    from .. import __version__
    from .autotune import device_facts
    from .kernels.cusparselt import semi_structured_support

    problem = semi_structured_support("cuda", DTYPES[args.dtype])
    if problem is None and any(v.startswith("fp8") for v in args.variants):
        from .fp8 import fp8_support_problem

        problem = fp8_support_problem("cuda")
    if problem:
        raise SystemExit(f"hf-sparse-bench: {problem}")
    # what the numbers depend on (a recipe's report records the whole environment beside them)
    env = dict(device_facts(), transformers=transformers.__version__, hf_sparse=__version__)
    print(f"{env['gpu']} (compute capability {env['capability'][0]}.{env['capability'][1]}), torch {env['torch']}, "
          f"CUDA {env['cuda']}, cuSPARSELt {env['cusparselt']}; {args.dtype}, seq {args.seq_len}, modes "
          f"{' '.join(args.modes)}", flush=True)  # fmt: skip
    base = build_model(args)
    names = prune_to_2_4(base)
    if args.swap_per_batch:
        built = {b: build_variants(dataclasses.replace(args, batch_sizes=[b]), base, names) for b in args.batch_sizes}
    else:
        shared = build_variants(args, base, names)
        built = {b: shared for b in args.batch_sizes}
    first = built[args.batch_sizes[0]]
    models = first[0]
    rows = []
    errors: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}
    for mode in args.modes:
        start = time.perf_counter()
        compiled_from, compiled = None, None
        with _sdpa_backend(args.sdpa_backend):
            for batch in args.batch_sizes:
                runnable = built[batch][0]
                if mode == "compile":  # once per set of models (each batch size's own with --swap-per-batch)
                    if compiled_from is not runnable:
                        compiled_from, compiled = runnable, _compiled(runnable, len(args.batch_sizes))
                    runnable = compiled
                rows.append(_time_batch(args, base, runnable, batch, errors.setdefault(mode, {}), mode))
        notes[mode] = f"{time.perf_counter() - start:.0f} s"
        if mode == "compile":
            from torch._dynamo.utils import counters

            notes[mode] += f", {sum(counters['graph_break'].values())} graph breaks"
        print(f"{mode} mode: {notes[mode]}", flush=True)
    return {
        "device": env["gpu"],
        "capability": env["capability"],
        "torch": env["torch"],
        "cuda": env["cuda"],
        "cusparselt": env["cusparselt"],
        "environment": env,
        "args": dataclasses.asdict(args),
        "variants": [v for v in args.variants if v in models],
        "modes": list(args.modes),
        "rows": rows,
        "memory": first[1],
        "memory_by_batch": {b: built[b][1] for b in args.batch_sizes} if args.swap_per_batch else None,
        "swap_reports_by_batch": {b: built[b][2] for b in args.batch_sizes} if args.swap_per_batch else None,
        "max_abs_diff_vs_masked_dense": errors,
        "mode_notes": notes,
        "swap_reports": first[2],
        "command": "python -m hf_sparse.inference.benchmark " + " ".join(sys.argv[1:]),
    }


def build_variants(args: BenchmarkArguments, base: nn.Module, names: list[str]) -> tuple[dict, dict, dict]:
    """(models, weight memory, swap reports) of every variant in `args.variants`, each a copy of `base`."""
    from .autotune import Autotuner
    from .fp8 import Fp8Config
    from .swap import fuse_qkv_, swap_to_semi_structured_

    dense_2_4_bytes = weight_bytes([base.get_submodule(n) for n in names])
    token_counts = [b * args.seq_len for b in args.batch_sizes]
    tuner = Autotuner(cache_path=args.cache, max_algorithms=args.max_algorithms, time_budget_s=args.tune_seconds)
    fuse = not args.no_fuse_qkv
    models: dict[str, nn.Module] = {"dense": copy.deepcopy(base)}
    memory: dict[str, dict] = {"dense": {"weight_bytes": dense_2_4_bytes, "ratio": 1.0}}
    reports: dict[str, list] = {}
    if fuse:
        fuse_qkv_(models["dense"])
    for variant in VARIANTS:
        if variant not in FALLBACK_OF and not variant.startswith("fp8") or variant not in args.variants:
            continue
        swap_args: dict = {
            "dense_fallback": FALLBACK_OF.get(variant, "auto"),
            "eager_graphs": variant != "2:4-plain",
            "cutlass": variant != "2:4-cusparselt",  # the fp16 swaps: CUTLASS kernels (and GELU fused) where faster
        }
        if variant.startswith("fp8"):
            calibration = None
            if args.fp8_scales == "static":
                calibration = [
                    make_inputs(base, 2, args.seq_len, args.seed + s, args.attention_mask) for s in range(4)
                ]
            swap_args["fp8"] = Fp8Config(
                args.fp8_scales, calibration, sparse=variant != "fp8-dense", fuse_gelu=variant == "fp8"
            )
        model = copy.deepcopy(base)
        start = time.perf_counter()
        report = swap_to_semi_structured_(model, fuse_qkv=fuse, token_counts=token_counts, autotune=tuner, **swap_args)
        seconds = time.perf_counter() - start
        print(f"\n{variant}: swapped in {seconds:.1f} s ({tuner.measurements} GEMM shapes tuned so far)")
        print(report.format(), flush=True)
        models[variant] = model
        swapped_after = sum(r.bytes for r in report if r.status != "not 2:4")
        memory[variant] = {
            "weight_bytes": swapped_after,
            "ratio": swapped_after / dense_2_4_bytes,
            "swapped_layers_ratio": report.memory_ratio,
        }
        reports[variant] = swap_report_rows(report)
        memory[variant]["gemm_speedup_by_tokens"] = {t: report.gemm_speedup(t) for t in report.token_counts}
    if "stock" in args.variants:
        model = copy.deepcopy(base)
        try:
            stock_bytes = stock_swap(model, names)
            models["stock"] = model
            memory["stock"] = {"weight_bytes": stock_bytes, "ratio": stock_bytes / dense_2_4_bytes}
        except Exception as err:  # the stock path is for the record only
            print(f"stock path unavailable: {type(err).__name__}: {err}")
    if "dense-unfused" in args.variants:
        models["dense-unfused"] = copy.deepcopy(base)
        memory["dense-unfused"] = {"weight_bytes": dense_2_4_bytes, "ratio": 1.0}
    return models, memory, reports


def swap_report_rows(report) -> list[dict]:
    """A `SwapReport` as JSON-ready rows: per layer its status, reason, memory, kernel per token bucket (`plans`) and
    the autotuner's (dense ms, its kernel's ms) per tuned token count."""
    return [
        {
            "name": r.name,
            "shape": r.shape,
            "status": r.status,
            "reason": r.reason,
            "memory_ratio": r.memory_ratio,
            "plans": r.plans,
            "times_ms": {t: list(v) for t, v in r.times.items()},
        }
        for r in report
    ]


def _compiled(models: dict[str, nn.Module], batch_sizes: int) -> dict[str, nn.Module]:
    # One compiled graph per model and batch size, all from the same code: raise dynamo's recompile limit.
    limit = 8 * len(models) * batch_sizes
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
    torch._dynamo.reset()
    return {v: torch.compile(m, dynamic=False).eval() for v, m in models.items()}


def _sdpa_backend(name: str):
    import contextlib

    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel(backend)


def _time_batch(args, base, models, batch, errors, mode) -> dict:
    from .cuda_graphs import cuda_graphs
    from .tuning import cuda_event_times

    inputs = make_inputs(base, batch, args.seq_len, args.seed, args.attention_mask)
    runners = {v: (m if mode == "eager" else cuda_graphs(m, warmup=1)) for v, m in models.items()}
    samples: dict[str, list[float]] = {v: [] for v in runners}
    failed: dict[str, str] = {}
    with torch.no_grad():
        reference = first_tensor(base(**inputs)).float() if batch == args.batch_sizes[0] else None
        for variant, runner in runners.items():
            try:
                out = runner(**inputs)  # captures the graph / compiles (and tunes unseen token counts)
                runner(**inputs)
                torch.cuda.synchronize()
            except Exception as err:
                failed[variant] = f"{type(err).__name__}: {str(err)[:200]}"
                print(f"{variant} failed at batch {batch} ({mode}): {failed[variant]}", flush=True)
                continue
            if reference is not None:
                errors[variant] = float((first_tensor(out).float() - reference).abs().max())
        for _ in range(args.rounds):
            for variant, runner in runners.items():
                if variant not in failed:
                    samples[variant] += cuda_event_times(lambda r=runner, x=inputs: r(**x), args.reps)
    row = {"mode": mode, "batch": batch, "tokens": batch * args.seq_len}
    dense_ms = statistics.median(samples["dense"])
    for variant in runners:
        if variant in failed:
            row[variant] = None
            continue
        ms = statistics.median(samples[variant])
        row[variant] = {"ms": ms, "speedup": dense_ms / ms, "samples": len(samples[variant])}
    print(f"{mode} batch {batch}: " + ", ".join(f"{v} {row[v]['ms']:.3f} ms" for v in runners if row[v]), flush=True)
    for runner in runners.values():
        if hasattr(runner, "reset"):
            runner.reset()
    del runners
    torch.cuda.empty_cache()
    return row


def format_table(result: dict) -> str:
    """The results as a Markdown table: one row per batch size, for each mode the dense time and each variant's
    time and speed-up over dense in that mode; then weight memory and logit differences."""
    variants = result["variants"]
    modes = result.get("modes") or sorted({r["mode"] for r in result["rows"]}, key=MODES.index)
    header = ["batch", "tokens"]
    for mode in modes:
        header.append(f"{mode}: dense ms")
        for v in variants[1:]:
            header += [f"{v} ms", "x"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key = {(r["mode"], r["batch"]): r for r in result["rows"]}
    for batch in sorted({r["batch"] for r in result["rows"]}):
        cells = None
        for mode in modes:
            row = by_key.get((mode, batch))
            if cells is None:
                cells = [str(batch), str(batch * result["args"]["seq_len"]) if "args" in result else "-"]
                if row is not None:
                    cells[1] = str(row["tokens"])
            if row is None or not row.get("dense"):
                cells += ["-"] * (1 + 2 * (len(variants) - 1))
                continue
            cells.append(f"{row['dense']['ms']:.3f}")
            for v in variants[1:]:
                cell = row.get(v)
                cells += ["failed", "-"] if cell is None else [f"{cell['ms']:.3f}", f"{cell['speedup']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    by_batch = result.get("memory_by_batch") or {"": result["memory"]}
    for batch, mem in by_batch.items():
        lines.append(
            f"weight memory of the 2:4 layers vs dense{f' (swapped for batch {batch})' if batch != '' else ''}: "
            + ", ".join(f"{v} {mem[v]['ratio']:.3f}x" for v in variants if v in mem and v != "dense")
        )
    errors = result.get("max_abs_diff_vs_masked_dense") or {}
    first = min(r["batch"] for r in result["rows"]) if result["rows"] else "-"
    for mode in modes:
        if errors.get(mode):
            lines.append(
                f"max |logits - masked dense eager logits| at batch {first}, {mode}: "
                + ", ".join(f"{v} {e:.2e}" for v, e in errors[mode].items())
            )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ms, ax_x) = plt.subplots(1, 2, figsize=(11, 4.2))
    batches = sorted({r["batch"] for r in result["rows"]})
    for mode in result.get("modes", ["graphs"]):
        rows = [r for r in result["rows"] if r.get("mode", mode) == mode]
        for v in result["variants"]:
            points = [(r["batch"], r[v]) for r in rows if r.get(v)]
            if not points:
                continue
            label = f"{v}, {mode}"
            ax_ms.plot([b for b, _ in points], [c["ms"] for _, c in points], marker="o", label=label)
            if v != "dense":
                ax_x.plot([b for b, _ in points], [c["speedup"] for _, c in points], marker="o", label=label)
                for b, c in points:  # the value of every point: the differences are a few percent
                    ax_x.annotate(f"{c['speedup']:.2f}x", (b, c["speedup"]), textcoords="offset points",
                                  xytext=(0, 6), ha="center", fontsize=8)  # fmt: skip
    ax_x.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    for ax in (ax_ms, ax_x):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.legend()
        ax.grid(alpha=0.3)
    ax_ms.set_yscale("log")
    ax_ms.set_ylabel("latency per forward (ms)")
    ax_x.set_ylabel("speed-up over dense (same mode)")
    args = result["args"]
    fig.suptitle(f"{result['device']}, {args['dtype']}, seq {args['seq_len']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Entry point of `python -m hf_sparse.inference.benchmark` and `hf-sparse-bench`."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("hf_sparse.inference.autotune").setLevel(logging.INFO)
    result = run(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "bench.png")
    print()
    print(format_table(result))
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.png'}")
    return result


if __name__ == "__main__":
    main()
