"""Measuring dense against the cuSPARSELt 2:4 kernel for one GEMM shape, in this process or in a child process.

`sweep` times dense `F.linear` and the sparse kernel's algorithm ids (under CUDA graphs, so the host work is not
timed), checks every algorithm it keeps against the masked dense result, and returns the fastest.

An algorithm id that cuSPARSELt accepts can still fault on the GPU ("an illegal instruction" was seen on an H200
with ids past the first one refused, and on an H100 in a test that ran ids below cuSPARSELt's maximum over 8 rows):
the CUDA context of the process that ran it is then lost for good. On an H100 with cuSPARSELt 0.8.0 (torch
2.11.0+cu130), algorithm 36 of fp16 3072x768 and 768x3072 GEMMs faulted that way, through `torch._cslt_sparse_mm` as
well as through the kept plans, although cuSPARSELt offered ids up to 49 for them. So `measure_in_child` runs the
sweeps in `python -c "...tuning.main()"`, which reads the requests as JSON on stdin and answers one JSON line per
event on stdout: `{"request": i, "dense_ms": ms}`, then `{"request": i, "trying": alg_id, "split_k": k}` before each
algorithm runs and `{"request": i, "timed": [alg_id, split_k, mode], "ms": ms}` after it is verified and timed, and
`{"request": i, "result": {...}}` at the end. If the child dies, the request it was measuring is settled from the
algorithms already timed (a fault ends its sweep as a refusal would), later sweeps on that GPU stop below the id
that faulted, and a new child measures the requests that have no result yet.

`Autotuner` (in `autotune.py`) caches what these return.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import cusparselt, cutlass

logger = logging.getLogger(__name__)

MIN_SPEEDUP = 1.03
"""Sparse must be at least this much faster than dense for a GEMM to run sparse (timings differ by a few percent
from run to run)."""

MAX_RESTARTS = 4
"""Extra children allowed per `measure_in_child` call beyond one per request (each death settles one request)."""

FAULT_ENV = "_HF_SPARSE_TUNE_FAULT"
"""Testing hook: an algorithm id at which the child process makes a real, sticky CUDA fault (a device-side
assert), as a faulty cuSPARSELt kernel would. Never set it outside tests."""

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


EPILOGUES = ("", "gelu", "cutlass")
"""What a sweep measures besides the plain cuSPARSELt GEMM with its bias: "gelu", the GEMM with GELU in its
epilogue (e4m3: cuSPARSELt, with the e4m3 quantization of the output for the next e4m3 GEMM; float16: CUTLASS's sm90
kernel, see `cutlass.py`, since cuSPARSELt refuses GELU for float16 outputs), or "cutlass" (float16), the CUTLASS
kernel with the bias alone."""


def _reference_tolerance(dtype: torch.dtype, epilogue: str = "") -> float:
    if epilogue and dtype == torch.float8_e4m3fn:  # an e4m3 output: 3 mantissa bits, ~3% relative error by rounding
        return 8e-2
    # e4m3: the sparse kernel's bfloat16 product against the exact product of the same e4m3 values
    return 1e-2 if dtype in (torch.bfloat16, torch.float8_e4m3fn) else 5e-3


def sweep(
    out_features: int,
    in_features: int,
    dtype: torch.dtype,
    bias: bool,
    tokens: int,
    device,
    *,
    reps: int = 10,
    max_algorithms: int = 64,
    time_budget_s: float = 4.0,
    split_k: tuple[int, ...] = (),
    split_k_modes: tuple[int, ...] = (-1,),
    min_speedup: float = MIN_SPEEDUP,
    tolerance: float | None = None,
    skip: tuple[int, ...] = (),
    progress=None,
    on_timed=None,
    epilogue: str = "",
) -> dict:
    """Times dense against the sparse kernel's algorithms for one GEMM shape, in this process, under CUDA graphs.

    Algorithm ids run from 0 up to the largest one cuSPARSELt offers for this shape (read from cuSPARSELt itself
    when the plan-keeping binding is available, so no id past it is ever set; otherwise the sweep stops at the first
    id refused). Every algorithm kept is checked against the masked dense result (`F.linear` in fp32): one whose
    relative error exceeds `tolerance` is dropped. `skip` lists ids never to run; `progress(alg_id, split_k)` is
    called before each one runs (the child process reports it, so a fault can be pinned on its algorithm), and
    `on_timed(config, ms)` after each (ms None when it was refused or not verified; `on_timed("dense", ms)` first), so
    a sweep that a fault ends can still be settled from what it measured.

    Returns the measurement as a dict: `backend` ("sparse" or "dense"), `alg_id`, `split_k`, `split_k_mode`,
    `dense_ms`, `sparse_ms`, `tokens`, `candidates` (algorithms verified and timed).

    `dtype` float8_e4m3fn measures the FP8 layers (`fp8.py`) as they run with static scales: "dense" is then the
    dense FP8 GEMM (`torch._scaled_mm`), the sparse kernel takes e4m3 inputs and writes float16 with the scales and
    the bias in its epilogue, and the fp16 dense GEMM of the same shape is timed too (`fp16_ms`, reported first as
    `on_timed("fp16", ms)`).

    `epilogue="gelu"` measures the GEMM of a layer followed by GELU (a BERT intermediate layer) as it runs fused, with
    "dense" the dense GEMM followed by GELU (one element-wise kernel, as `torch.compile` runs it). For e4m3 the sparse
    kernel applies the bias, GELU and the next layer's e4m3 quantization in its epilogue and writes e4m3, and
    `fp16_ms` is the fp16 GEMM followed by GELU. For float16 the candidates are the CUTLASS sm90 kernel's
    configurations (`cutlass.py`; their index stands for the algorithm id) with the bias and GELU in the epilogue.
    """
    import torch.nn.functional as F

    from ..masks import nm_mask

    device = torch.device(device)
    allowed = {"": True, "gelu": dtype in (torch.float8_e4m3fn, torch.float16), "cutlass": dtype == torch.float16}
    if not allowed.get(epilogue, False):
        raise ValueError(
            f"epilogue must be one of {list(EPILOGUES)} ('gelu' for float8_e4m3fn and float16 only, 'cutlass' for "
            f"float16 only); got {epilogue!r} for {_dtype_name(dtype)}."
        )
    on_cutlass = cutlass.uses_cutlass(dtype, epilogue)
    act = F.gelu if epilogue == "gelu" else (lambda y: y)
    tolerance = _reference_tolerance(dtype, epilogue) if tolerance is None else tolerance
    fp8 = dtype == torch.float8_e4m3fn
    rows = tokens + (-tokens) % (cusparselt.ROW_ALIGN if fp8 else 8)
    gen = torch.Generator(device=device).manual_seed(0)
    weights_dtype = torch.float16 if fp8 else dtype
    x = torch.randn(rows, in_features, device=device, dtype=weights_dtype, generator=gen)
    w = torch.randn(out_features, in_features, device=device, dtype=weights_dtype, generator=gen)
    w = w * nm_mask(w)
    b = torch.randn(out_features, device=device, dtype=weights_dtype, generator=gen) if bias else None
    flops = 2.0 * rows * in_features * out_features
    # replays per timing: about half a millisecond of GEMMs (at ~400 TFLOP/s), so the timings of small GEMMs (~10
    # us) are not lost in the resolution of CUDA events (with 3 replays, two runs of one sweep disagreed by 30%)
    inner = int(min(200, max(1, 2e11 // flops)))
    fp16_ms = None
    if fp8:
        # e4m3, as the layers run with static scales (fp8.py): "dense" is the dense FP8 GEMM (torch._scaled_mm,
        # scales and bias in its epilogue), the sparse kernel takes the product of the scales as alpha and fuses
        # the bias; the fp16 GEMM of the same shape is timed too.
        from .quantization import E4M3_MAX, quantize_static, quantize_weight

        fp16_ms = time_graphed(lambda: act(F.linear(x, w, b)), inner, reps)
        if on_timed is not None:
            on_timed("fp16", fp16_ms)
        x_scale = (x.abs().max().float() / E4M3_MAX).reshape(())
        xq = quantize_static(x, x_scale)
        wq, w_scales = quantize_weight(w, per_tensor=True)
        w_scale = w_scales[:1].reshape(())
        alpha = float(x_scale) * float(w_scale)
        packed = torch._cslt_compress(wq)
        reference = alpha * (xq.float() @ wq.float().t()) + (0.0 if b is None else b.float())
        kernel_in, kernel_bias, kernel_out, gelu_scale = xq, b, torch.float16, None
        if epilogue:
            reference = F.gelu(reference)
            out_scale = float(reference.abs().max().clamp(min=1e-12)) / E4M3_MAX
            kernel_out, gelu_scale = dtype, 1.0 / out_scale

        def dense():
            return act(torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, bias=b, out_dtype=torch.float16))
    elif on_cutlass:
        values, meta = cutlass.compress(w)
        reference = act(F.linear(x.float(), w.float(), None if b is None else b.float()))
        gelu_scale = None

        def dense():
            return act(F.linear(x, w, b))
    else:
        packed = torch._cslt_compress(w)
        reference = F.linear(x.float(), w.float(), None if b is None else b.float())
        kernel_in, kernel_bias, kernel_out, gelu_scale = x, b, dtype, None
        alpha = 1.0

        def dense():
            return F.linear(x, w, b)

    dense_ms = time_graphed(dense, inner, reps)
    if dense_ms is None:  # pragma: no cover - dense GEMMs do not fail
        raise RuntimeError(f"could not time a dense {out_features}x{in_features} GEMM on {device}.")
    if on_timed is not None:
        on_timed("dense", dense_ms)

    planned = cusparselt.available() and not on_cutlass
    plans = cusparselt.PlanCache()
    if on_cutlass:
        last_id = len(cutlass.library().configs) - 1
    elif planned:
        last_id = cusparselt.max_alg_id(
            out_features, in_features, rows, dtype, device, kernel_bias, kernel_out, gelu_scale=gelu_scale
        )
        last_id = min(max_algorithms - 1, last_id)
    else:
        last_id = max_algorithms - 1

    def sparse(alg_id, k=1, mode=-1):
        if on_cutlass:
            return lambda: cutlass.sparse_linear(x, values, meta, b, out_features, alg_id, epilogue == "gelu")
        if planned:
            bias_ptr = 0 if kernel_bias is None else kernel_bias.data_ptr()
            out = None if kernel_out == dtype else kernel_out
            key = cusparselt.PlanKey(
                device.index or 0, out_features, in_features, rows, dtype, bias_ptr, alg_id, k, mode, out,
                gelu_scale=gelu_scale,
            )  # fmt: skip
            plan = plans.get(key, kernel_bias)
            return lambda out=None: plan(kernel_in, packed, out=out, alpha=alpha)
        if fp8:
            return lambda: cusparselt.fp8_sparse_linear(
                xq, packed, b, out_features, alg_id, alpha, kernel_out, gelu_scale
            )
        return lambda: cusparselt.cslt_linear(x, packed, b, alg_id, k, mode)

    def run(config) -> float | None:
        try:
            fn = sparse(*config)
            if gelu_scale and planned:
                # the e4m3 output's C matrix points at D and must not be read (beta is 0): fill D with NaN bytes,
                # which any read of C would carry into the result (and fail the check below)
                sentinel.view(torch.uint8).fill_(0xFF)
                result = fn(sentinel).float() / gelu_scale
            else:
                result = fn().float() * (1.0 / gelu_scale if gelu_scale else 1.0)  # an e4m3 output dequantized
            error = float((result - reference).norm() / reference.norm())
        except (cusparselt.CusparseLtError, cutlass.CutlassError, ValueError):  # refused for this shape
            return None
        except RuntimeError:
            torch.cuda.synchronize()  # a GPU fault leaves a sticky error: raise it here, ending this process's sweep
            return None
        if not error <= tolerance:  # NaN fails too
            logger.warning(
                "hf-sparse: sparse kernel %s of %dx%d %s at %d tokens is off the masked dense result "
                "(relative error %.2e > %.0e); not used.",
                config, out_features, in_features, _dtype_name(dtype), tokens, error, tolerance,
            )  # fmt: skip
            return float("nan")
        return time_graphed(fn, inner, reps)

    sentinel = torch.empty(rows, out_features, dtype=kernel_out, device=device) if gelu_scale else None
    timings: dict[tuple[int, int, int], float] = {}
    deadline = time.perf_counter() + time_budget_s
    try:
        for alg_id in range(last_id + 1):
            if alg_id > 0 and time.perf_counter() > deadline:
                logger.info("hf-sparse: tuning time budget spent after %d algorithms.", alg_id)
                break
            if alg_id in skip:
                continue
            if progress is not None:
                progress(alg_id, 1)
            ms = run((alg_id, 1, -1))
            if on_timed is not None:  # None: refused or not verified (so a later fault is not blamed on it)
                on_timed((alg_id, 1, -1), ms if ms is not None and ms == ms else None)
            if ms is None and on_cutlass:  # a configuration that cannot run this shape: the others may
                continue
            if ms is None:  # refused: ids run from 0 to a maximum that depends on the shape; stop past it
                break
            if ms == ms:  # not NaN: verified
                timings[(alg_id, 1, -1)] = ms
        if (
            split_k and not fp8 and not on_cutlass and (planned or cusparselt.split_k_supported())
        ):  # FP8 layers keep an id only
            best_algs = sorted({cfg[0] for cfg in timings}, key=lambda a: timings[(a, 1, -1)])[:2]
            for cfg in [(a, k, mode) for a in best_algs for k in split_k for mode in split_k_modes]:
                if progress is not None:
                    progress(cfg[0], cfg[1])
                ms = run(cfg)
                if on_timed is not None:
                    on_timed(cfg, ms if ms is not None and ms == ms else None)
                if ms is not None and ms == ms:
                    timings[cfg] = ms
    finally:
        plans.clear()
    chosen = choose(dense_ms, timings, tokens, min_speedup)
    if fp16_ms is not None:
        chosen["fp16_ms"] = fp16_ms
    if timings:
        logger.info(
            "hf-sparse: tuned %s at %d tokens: dense %.4f ms, sparse %.4f ms (alg %d, split-k %d/%d, %d verified) "
            "-> %s",
            f"{out_features}x{in_features} {_dtype_name(dtype)}", tokens, dense_ms, chosen["sparse_ms"],
            chosen["alg_id"], chosen["split_k"], chosen["split_k_mode"], len(timings), chosen["backend"],
        )  # fmt: skip
    return chosen


def choose(
    dense_ms: float | None, timings: dict[tuple[int, int, int], float], tokens: int, min_speedup: float
) -> dict:
    """The measurement dict of a sweep (see `sweep`) from its dense time and its verified sparse timings."""
    if not timings or not dense_ms:
        return {"backend": "dense", "dense_ms": dense_ms, "tokens": tokens, "candidates": len(timings)}
    (alg_id, k, mode), sparse_ms = min(timings.items(), key=lambda item: item[1])
    return {
        "backend": "sparse" if dense_ms / sparse_ms >= min_speedup else "dense",
        "alg_id": alg_id,
        "split_k": k,
        "split_k_mode": mode,
        "dense_ms": dense_ms,
        "sparse_ms": sparse_ms,
        "tokens": tokens,
        "candidates": len(timings),
    }


def cuda_event_times(fn, reps: int) -> list[float]:
    """Milliseconds of each of `reps` calls of `fn`, between CUDA events on the current stream (one synchronize at
    the end, so the host does not wait between calls)."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_graphed(fn, inner: int, reps: int) -> float | None:
    """Median milliseconds of one call of `fn`: a CUDA graph of one call, replayed `inner` times per timing, `reps`
    timings.

    One call is captured and replayed, so the timing is the GPU's (not the host work of the call). Returns None if
    `fn` is refused (an algorithm id or split-k setting cuSPARSELt does not support for this shape); a GPU fault
    (a sticky CUDA error) raises.
    """
    try:
        fn()
        torch.cuda.synchronize()
    except RuntimeError:
        torch.cuda.synchronize()  # raises again if the context is lost (a fault, not a refusal)
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    graph.replay()

    def replays():
        for _ in range(inner):
            graph.replay()

    return statistics.median(cuda_event_times(replays, reps)) / inner


def _command() -> list[str]:
    return [sys.executable, "-c", "from hf_sparse.inference.tuning import main; main()"]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this very hf_sparse
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def request_epilogue(request: tuple) -> str:
    """The epilogue of a request `(out_features, in_features, dtype, bias, tokens[, epilogue])`: "" when not given."""
    return request[5] if len(request) > 5 else ""


def _kernel(request: tuple) -> str:
    """The kernel family a request sweeps: its dtype name, with `|epilogue` for an epilogue sweep (different kernels,
    different algorithm ids). One child process and one `FAULT_FLOOR` entry per family."""
    epilogue = request_epilogue(request)
    return _dtype_name(request[2]) + (f"|{epilogue}" if epilogue else "")


def _kernel_name(request: tuple) -> str:
    """What a request's candidate ids are: CUTLASS configurations (float16 "gelu" and "cutlass") or cuSPARSELt
    algorithms."""
    return (
        "CUTLASS configuration"
        if cutlass.uses_cutlass(request[2], request_epilogue(request))
        else "cuSPARSELt algorithm"
    )


FAULT_FLOOR: dict[tuple[int, str], int] = {}
"""(GPU index, kernel family: see `_kernel`) -> the lowest cuSPARSELt algorithm id above 0 that killed a tuning child
in this process. Later sweeps of that family on that GPU try only the ids below it: the ids past one that faults
tend to fault too (on the H100 above, every GEMM shape that reached id 36 faulted there), and each fault costs a
child process. Their results say so (`note`)."""


def measure_in_child(requests: list[tuple], device, settings: dict, command: list[str] | None = None) -> list[dict]:
    """Runs `sweep` for each `(out_features, in_features, dtype, bias, tokens[, epilogue])` in child processes.

    Returns one measurement dict (see `sweep`) per request. When an algorithm kills the child, the request it was
    measuring is settled from the algorithms already verified and timed, the ids from the faulting one up are not
    tried again on this GPU (`FAULT_FLOOR`), and a new child measures the requests left. `command` replaces the
    child's command line (tests).
    """
    device = torch.device(device)
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    results: dict[int, dict] = {}
    limit = int(settings.get("max_algorithms", 64))
    for _ in range(2 * len(requests) + MAX_RESTARTS):  # a pass ends a dtype group or settles a request
        pending = [i for i in range(len(requests)) if i not in results]
        if not pending:
            break
        # one child per kernel family: the cap learnt from a fault applies to the sweeps of that family only
        family = _kernel(requests[pending[0]])
        floor = FAULT_FLOOR.get((index, family))
        pending = [i for i in pending if _kernel(requests[i]) == family]
        capped = dict(settings, max_algorithms=min(limit, floor) if floor else limit)
        payload = {
            "device": index,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in capped.items()},
            "requests": {str(i): _encode(requests[i]) for i in pending},
        }
        proc = subprocess.run(
            command or _command(), input=json.dumps(payload), capture_output=True, text=True, env=_child_env()
        )
        partial: dict[int, dict] = {}
        current: int | None = None
        trying: tuple[int, int] | None = None
        for line in proc.stdout.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict) or "request" not in event:
                continue
            i = int(event["request"])
            seen = partial.setdefault(i, {"dense_ms": None, "timings": {}})
            current = i
            if "fp16_ms" in event:
                seen["fp16_ms"] = event["fp16_ms"]
            elif "dense_ms" in event:
                seen["dense_ms"] = event["dense_ms"]
            elif "trying" in event:
                trying = (int(event["trying"]), int(event.get("split_k", 1)))
            elif "timed" in event:
                seen["timings"][tuple(event["timed"])] = float(event["ms"])
                trying = None
            elif "untimed" in event:
                trying = None
            elif "result" in event:
                results[i] = dict(event["result"])
                if floor and floor < limit:
                    results[i].setdefault("note", f"algorithms from {floor} up not tried (one faulted on this GPU)")
                current = trying = None
        if all(i in results for i in pending):
            continue  # whatever the exit code (a crash at teardown costs nothing measured)
        tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
        if current is None:
            if not partial and not results:  # nothing ever came out: the child cannot run here
                raise RuntimeError(
                    f"hf-sparse: the autotuning child process failed before measuring anything (exit code "
                    f"{proc.returncode}): {tail}. Pass Autotuner(isolate=False) to tune in this process."
                )
            current = next(i for i in pending if i not in results)  # it died between two requests
            partial[current] = {"dense_ms": None, "timings": {}}
        out_f, in_f, _, _, tokens = requests[current][:5]
        what = f"{out_f}x{in_f} {_kernel(requests[current]).replace('|', ' + ')} at {tokens} tokens"
        seen = partial[current]
        results[current] = dict(
            choose(seen["dense_ms"], seen["timings"], tokens, float(settings.get("min_speedup", MIN_SPEEDUP))),
            note=f"sweep ended by a fault at algorithm {trying[0]}" if trying else "tuning process died",
        )
        if seen.get("fp16_ms") is not None:
            results[current]["fp16_ms"] = seen["fp16_ms"]
        key = (index, _kernel(requests[current]))
        if trying is not None and trying[1] == 1 and trying[0] > 0:
            FAULT_FLOOR[key] = min(FAULT_FLOOR.get(key, trying[0]), trying[0])
        logger.warning(
            "hf-sparse: %s of %s killed the tuning process (exit code %d: %s); settled it from the %d algorithm(s) "
            "verified before it%s.",
            f"{_kernel_name(requests[current])} {trying[0]}" if trying else "measuring", what, proc.returncode, tail,
            len(seen["timings"]),
            f", and algorithms from {FAULT_FLOOR[key]} up are not tried again for {key[1]} on this GPU"
            if key in FAULT_FLOOR else "",
        )  # fmt: skip
    for i in range(len(requests)):
        if i not in results:  # pragma: no cover - every pass settles at least one request
            results[i] = {"backend": "dense", "tokens": requests[i][4], "note": "not measured"}
    return [results[i] for i in range(len(requests))]


def _encode(request: tuple) -> list:
    out_features, in_features, dtype, bias, tokens = request[:5]
    encoded = [int(out_features), int(in_features), _dtype_name(dtype), bool(bias), int(tokens)]
    epilogue = request_epilogue(request)
    return encoded + [epilogue] if epilogue else encoded


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main() -> None:
    """The child's entry point: reads the JSON payload on stdin, sweeps, writes JSON lines on stdout."""
    payload = json.loads(sys.stdin.read())
    torch.cuda.set_device(payload["device"])
    device = torch.device("cuda", payload["device"])
    settings = payload["settings"]
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    fault = os.environ.get(FAULT_ENV)
    for key, request in payload["requests"].items():
        out_f, in_f, dtype, bias, tokens = request[:5]

        def progress(alg_id, split_k, key=key):
            _emit({"request": key, "trying": alg_id, "split_k": split_k})
            if fault is not None and alg_id == int(fault):
                _cuda_fault(device)

        def on_timed(config, ms, key=key):
            if config in ("dense", "fp16"):
                _emit({"request": key, f"{config}_ms": ms})
            else:
                _emit(
                    {"request": key, "timed": config, "ms": ms}
                    if ms is not None
                    else {"request": key, "untimed": config}
                )

        chosen = sweep(
            out_f, in_f, _DTYPES[dtype], bias, tokens, device, progress=progress, on_timed=on_timed,
            epilogue=request_epilogue(request), **settings,
        )  # fmt: skip
        _emit({"request": key, "result": chosen})


def _cuda_fault(device: torch.device) -> None:
    """A real, sticky CUDA fault: a device-side assert (out-of-bounds gather), which ruins this process's context."""
    values = torch.zeros(4, device=device)
    values[torch.tensor([1 << 30], device=device)].sum().item()
