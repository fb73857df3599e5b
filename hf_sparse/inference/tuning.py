"""Timing one kernel on one GEMM, in this process or in a child process that a GPU fault cannot spread from.

`sweep(kernel, request, device, settings)` builds the GEMM (random inputs and a 2:4 weight, the request's shape and
dtype), asks the kernel for its configurations (`Kernel.problem`), runs each under a CUDA graph (so the host work is
not timed), keeps only those whose result matches the fp32 one, and returns the fastest as a `Timing`. Nothing in
here knows one kernel from another.

A configuration that a kernel accepts can still fault on the GPU: "an illegal instruction" was seen on an H200 with
cuSPARSELt algorithm ids past the first one refused, and on an H100 in a test that ran ids below cuSPARSELt's
maximum over 8 rows; on an H100 with cuSPARSELt 0.8.0 (torch 2.11.0+cu130), algorithm 36 of fp16 3072x768 and
768x3072 GEMMs faulted that way, through `torch._cslt_sparse_mm` as well as through the kept plans, although
cuSPARSELt offered ids up to 49 for them. The CUDA context of the process that ran it is then lost for good. So
`measure_in_child` runs the sweeps in `python -c "...tuning.main()"`, which reads the requests as JSON on stdin and
answers one JSON line per event on stdout: `{"request": i, "trying": config, "first": true}` before each
configuration runs (`first`: in the sweep's first pass), `{"request": i, "timed": config, "ms": ms}` after it is
verified and timed (`{"request": i, "untimed": config}` when it was refused or off the reference), and
`{"request": i, "result": {...}}` at the end. If the child dies, the request it was measuring is settled from the
configurations already timed (a fault ends its sweep as a refusal would), later sweeps of that kernel variant on that
GPU stop below the configuration that faulted (`FAULT_FLOOR`), and a new child measures the requests left.

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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import kernels
from .kernels.base import Config, Gelu, GemmInputs, GemmRequest, Kernel, Problem, SweepSettings, Timing, dtype_name

logger = logging.getLogger(__name__)

MAX_RESTARTS = 4
"""Extra children allowed per `measure_in_child` call beyond one per request (each death settles one request)."""

FAULT_ENV = "_HF_SPARSE_TUNE_FAULT"
"""Testing hook: a configuration id at which the child process makes a real, sticky CUDA fault (a device-side
assert), as a faulty cuSPARSELt kernel would. Never set it outside tests."""


def gemm_inputs(request: GemmRequest, row_align: int, device: torch.device) -> GemmInputs:
    """The random GEMM of `request` on `device`: the same values for every kernel (seed 0), the weight made 2:4."""
    from ..masks import nm_mask

    tokens, (out_features, in_features) = request.tokens, request.shape
    rows = tokens + (-tokens) % row_align
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, in_features, device=device, dtype=request.dtype, generator=gen)
    w = torch.randn(out_features, in_features, device=device, dtype=request.dtype, generator=gen)
    w = w * nm_mask(w)
    b = torch.randn(out_features, device=device, dtype=request.dtype, generator=gen) if request.bias else None
    return GemmInputs(x, w, b, rows)


def gelu_problem(kernel: Kernel, request: GemmRequest) -> str | None:
    """Why `kernel` cannot run `request` with GELU, or None: a dense GEMM runs it as the step after it; a 2:4
    kernel only in its epilogue, where it has one for the request's dtype."""
    if not request.gelu or not kernel.sparse or (kernel.gelu is not Gelu.NONE and request.dtype in kernel.gelu_dtypes):
        return None
    dtypes = ", ".join(dtype_name(d) for d in kernel.gelu_dtypes) or "no dtype"
    return (
        f"the {kernel.label} runs no GELU in its epilogue for {dtype_name(request.dtype)} (it does for {dtypes}); "
        "ask for it without gelu."
    )


def sweep(
    kernel: Kernel,
    request: GemmRequest,
    device,
    settings: SweepSettings | None = None,
    *,
    progress: Callable[[Config, bool], None] | None = None,
    on_timed: Callable[[Config, float | None], None] | None = None,
) -> Timing:
    """Times `kernel`'s configurations on the GEMM of `request`, in this process, under CUDA graphs.

    Every configuration is checked first against the problem's fp32 reference: one whose relative error exceeds its
    tolerance is dropped. A refused one (`ValueError`, or a `RuntimeError` that leaves no sticky CUDA error) ends
    the first pass where the kernel says so (`Problem.stop_at_refusal`). After `settings.time_budget_s` seconds no
    further configuration of the first pass starts. `progress(config, first)` is called before each one runs (the
    child process reports it, so a fault can be pinned on its configuration) and `on_timed(config, ms)` after each
    (ms None when it was refused or not verified), so a sweep that a fault ends can still be settled from what it
    measured.

    Returns:
        `Timing`: the fastest verified configuration and its milliseconds per call (None when none ran).
    """
    problem = gelu_problem(kernel, request)
    if problem:
        raise ValueError(problem)
    settings = settings or SweepSettings()
    device = torch.device(device)
    inputs = gemm_inputs(request, kernel.row_align, device)
    flops = 2.0 * inputs.rows * request.in_features * request.out_features
    # replays per timing: about half a millisecond of GEMMs (at ~400 TFLOP/s), so the timings of small GEMMs (~10
    # us) are not lost in the resolution of CUDA events (with 3 replays, two runs of one sweep disagreed by 30%)
    inner = int(min(200, max(1, 2e11 // flops)))
    setup = kernel.problem(request, inputs, settings)

    def attempt(config: Config, first: bool) -> float | None:
        if progress is not None:
            progress(config, first)
        ms = _timed(setup, config, inner, settings.reps, request)
        if on_timed is not None:  # None: refused or not verified (so a later fault is not blamed on it)
            on_timed(config, ms if ms is not None and ms == ms else None)
        return ms

    timings: dict[Config, float] = {}
    deadline = time.perf_counter() + settings.time_budget_s
    try:
        for index, config in enumerate(setup.configs):
            if index > 0 and time.perf_counter() > deadline:
                logger.info("hf-sparse: tuning time budget spent after %d configurations.", index)
                break
            ms = attempt(config, True)
            if ms is None and setup.stop_at_refusal:  # ids run up to a maximum that depends on the shape
                break
            if ms is not None and ms == ms:  # not NaN: verified
                timings[config] = ms
        for config in setup.refine(dict(timings)) if setup.refine and timings else ():
            ms = attempt(config, False)
            if ms is not None and ms == ms:
                timings[config] = ms
    finally:
        if setup.close is not None:
            setup.close()
    timing = best(timings, request.tokens)
    logger.info(
        "hf-sparse: tuned %s: %s (configuration %s, %d verified)",
        request.describe(), "nothing ran" if timing.ms is None else f"{timing.ms:.4f} ms", timing.config,
        timing.candidates,
    )  # fmt: skip
    return timing


def _timed(problem: Problem, config: Config, inner: int, reps: int, request: GemmRequest) -> float | None:
    """Milliseconds of one configuration, NaN when its result is off the reference, None when it is refused."""
    try:
        fn = problem.call(config)
        if problem.reference is not None:
            result = problem.result(fn) if problem.result is not None else fn().float()
            error = float((result - problem.reference).norm() / problem.reference.norm())
    except ValueError:  # refused for this shape
        return None
    except RuntimeError:
        torch.cuda.synchronize()  # a GPU fault leaves a sticky error: raise it here, ending this process's sweep
        return None
    if problem.reference is not None and not error <= problem.tolerance:  # NaN fails too
        logger.warning(
            "hf-sparse: configuration %s of %s is off the fp32 result (relative error %.2e > %.0e); not used.",
            config, request.describe(), error, problem.tolerance,
        )  # fmt: skip
        return float("nan")
    return time_graphed(fn, inner, reps)


def best(timings: dict[Config, float], tokens: int, note: str = "") -> Timing:
    """The fastest of a sweep's verified configurations."""
    if not timings:
        return Timing(None, (), tokens, 0, note)
    config, ms = min(timings.items(), key=lambda item: item[1])
    return Timing(ms, config, tokens, len(timings), note)


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
    `fn` is refused (a configuration the kernel does not support for this shape); a GPU fault (a sticky CUDA error)
    raises.
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


# -- the child process ------------------------------------------------------------------------------------------------


def _command() -> list[str]:
    return [sys.executable, "-c", "from hf_sparse.inference.tuning import main; main()"]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this very hf_sparse
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


FAULT_FLOOR: dict[tuple[int, str], int] = {}
"""(GPU index, kernel variant: `GemmRequest.family()`) -> the lowest configuration id above 0 whose first-pass run
killed a tuning child in this process. Later sweeps of that variant on that GPU try only the ids below it: the ids
past one that faults tend to fault too (on the H100 above, every GEMM shape that reached id 36 faulted there), and
each fault costs a child process. Their timings say so (`note`)."""


class _Child:
    """What one child process reported, read from its output."""

    def __init__(self, stdout: str):
        self.results: dict[int, Timing] = {}
        self.timed: dict[int, dict[Config, float]] = {}
        self.current: int | None = None
        self.trying: tuple[Config, bool] | None = None
        for line in stdout.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "request" in event:
                self._read(event)

    def _read(self, event: dict) -> None:
        i = int(event["request"])
        timed = self.timed.setdefault(i, {})
        self.current = i
        if "trying" in event:
            self.trying = (tuple(event["trying"]), bool(event.get("first", True)))
        elif "timed" in event:
            timed[tuple(event["timed"])] = float(event["ms"])
            self.trying = None
        elif "untimed" in event:
            self.trying = None
        elif "result" in event:
            self.results[i] = Timing.from_dict(event["result"])
            self.current = self.trying = None


def measure_in_child(
    requests: Sequence[GemmRequest], device, settings: SweepSettings, command: list[str] | None = None
) -> list[Timing]:
    """Runs `sweep` for each request in child processes.

    Returns one `Timing` per request. When a configuration kills the child, the request it was measuring is settled
    from the configurations already verified and timed, the ids from the faulting one up are not tried again for
    that kernel variant on this GPU (`FAULT_FLOOR`), and a new child measures the requests left. `command` replaces
    the child's command line (tests).
    """
    device = torch.device(device)
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    results: dict[int, Timing] = {}
    for _ in range(2 * len(requests) + MAX_RESTARTS):  # a pass measures every request left, or settles one
        pending = [i for i in range(len(requests)) if i not in results]
        if not pending:
            break
        caps = {i: FAULT_FLOOR.get((index, requests[i].family())) for i in pending}
        payload = {
            "device": index,
            "settings": settings.to_json(),
            "requests": {
                str(i): {
                    "request": requests[i].to_json(),
                    "max_algorithms": min(settings.max_algorithms, caps[i] or settings.max_algorithms),
                }
                for i in pending
            },
        }
        proc = subprocess.run(
            command or _command(), input=json.dumps(payload), capture_output=True, text=True, env=_child_env()
        )
        child = _Child(proc.stdout)
        for i, timing in child.results.items():
            cap = caps.get(i)
            if cap and cap < settings.max_algorithms and not timing.note:
                timing = Timing(timing.ms, timing.config, timing.tokens, timing.candidates,
                                f"configurations from {cap} up not tried (one faulted on this GPU)")  # fmt: skip
            results[i] = timing
        if all(i in results for i in pending):
            continue  # whatever the exit code (a crash at teardown costs nothing measured)
        _settle_death(requests, pending, results, child, proc, index)
    for i, request in enumerate(requests):
        if i not in results:  # pragma: no cover - every pass settles at least one request
            results[i] = Timing(None, (), request.tokens, 0, "not measured")
    return [results[i] for i in range(len(requests))]


def _settle_death(requests, pending, results, child: _Child, proc, index: int) -> None:
    """A child died before answering every request: settles the one it was measuring from what it timed, and caps
    later sweeps of that kernel variant below the configuration it was trying."""
    tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
    current = child.current
    if current is None:
        if not child.timed and not child.results:  # nothing ever came out: the child cannot run here
            raise RuntimeError(
                f"hf-sparse: the autotuning child process failed before measuring anything (exit code "
                f"{proc.returncode}): {tail}. Pass Autotuner(isolate=False) to tune in this process."
            )
        current = next(i for i in pending if i not in results)  # it died between two requests
    request, timed = requests[current], child.timed.get(current, {})
    config, first = child.trying or ((), False)
    fault = config[0] if config else None  # the configuration id that was running
    note = f"sweep ended by a fault at configuration {fault}" if fault is not None else "tuning process died"
    results[current] = best(timed, request.tokens, note)
    key = (index, request.family())
    if first and fault is not None and fault > 0:
        FAULT_FLOOR[key] = min(FAULT_FLOOR.get(key, fault), fault)
    logger.warning(
        "hf-sparse: %s of %s killed the tuning process (exit code %d: %s); settled it from the %d configuration(s) "
        "verified before it%s.",
        f"configuration {fault}" if fault is not None else "measuring", request.describe(), proc.returncode, tail,
        len(timed),
        f", and configurations from {FAULT_FLOOR[key]} up are not tried again for {key[1]} on this GPU"
        if key in FAULT_FLOOR else "",
    )  # fmt: skip


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main() -> None:
    """The child's entry point: reads the JSON payload on stdin, sweeps, writes JSON lines on stdout."""
    payload = json.loads(sys.stdin.read())
    torch.cuda.set_device(payload["device"])
    device = torch.device("cuda", payload["device"])
    settings = SweepSettings.from_json(payload["settings"])
    fault = os.environ.get(FAULT_ENV)
    for key, entry in payload["requests"].items():
        request = GemmRequest.from_json(entry["request"])
        capped = SweepSettings.from_json(dict(settings.to_json(), max_algorithms=entry["max_algorithms"]))

        def progress(config, first, key=key):
            _emit({"request": key, "trying": list(config), "first": first})
            if fault is not None and config and config[0] == int(fault):
                _cuda_fault(device)

        def on_timed(config, ms, key=key):
            _emit(
                {"request": key, "timed": list(config), "ms": ms}
                if ms is not None
                else {"request": key, "untimed": list(config)}
            )

        timing = sweep(kernels.find(request.kernel), request, device, capped, progress=progress, on_timed=on_timed)
        _emit({"request": key, "result": timing.to_dict()})


def _cuda_fault(device: torch.device) -> None:
    """A real, sticky CUDA fault: a device-side assert (out-of-bounds gather), which ruins this process's context."""
    values = torch.zeros(4, device=device)
    values[torch.tensor([1 << 30], device=device)].sum().item()
