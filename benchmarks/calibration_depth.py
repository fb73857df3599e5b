"""Wanda and SparseGPT prune time of a deep Llama against a shallow one of the same width: calibration on stored block
inputs (linear in depth) against running the model again for each block (quadratic), on the same machine in one run.

Builds `LlamaForCausalLM` with random weights (seed 0) at each depth of `--depths` (default 4 and 32 blocks of hidden
256, intermediate 688, 8 query heads, 2 key/value heads), takes `--samples` random sequences of `--seq-len` tokens in
batches of `--batch-size` as calibration data, and times `compute_masks` on every selected layer (7 per block) with
`block_inputs="none"` (old: the model runs from its inputs again for each block) and `"auto"` (new: stored inputs).

Each measurement runs in a child process of its own and reports the fastest of `--repeats` runs, after a warm-up on a
one-block model. On the CPU the time is the process's CPU time (one thread: on a shared machine the wall time also
counts the other processes' turns); on a GPU it is the wall time. The first run also measures the peak memory of
pruning: on the CPU the process's peak resident memory (`VmHWM`, reset just before; it includes the CPU copy of the
selected weights that `compute_masks` keeps to undo a failed pruning), on a GPU `torch.cuda.max_memory_allocated`
above what was allocated before. It counts how often each block's forward ran, and for the new path measures the
bytes of the stored block inputs against the formula of `hf_sparse.calibration.block_statistics`: B·T·h·s for the
hidden states, plus per batch Llama's rotary cos and sin (2·T·d·s) and position ids (SDPA needs no attention mask
without padding). "stored + statistics" adds one block's statistics (4 bytes per input of each layer for Wanda, per
pair of inputs for SparseGPT): on a GPU the peak is that plus one block's forward on one batch.

Run (one thread: the machine is shared):

    python -m benchmarks.calibration_depth --threads 1

and a 1B-shaped bf16 Llama with 128 x 2048 calibration tokens on a GPU:

    python -m benchmarks.calibration_depth --device cuda --dtype bfloat16 --depths 16 --hidden 2048 \\
        --intermediate 8192 --heads 32 --kv-heads 8 --samples 128 --seq-len 2048 --batch-size 8 --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path


class _Peak:
    """The peak memory above what was in use at `reset()`: the process's resident memory on the CPU, the CUDA
    allocator's on a GPU."""

    def __init__(self, device: str):
        self.device = device
        self.start = 0

    def reset(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from VmRSS
            self.start = _status("VmRSS")

    def increase(self) -> int:
        import torch

        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.start
        return _status("VmHWM") - self.start


def _status(field: str) -> int:
    """A `/proc/self/status` memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _llama(settings: dict, depth: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=settings["hidden"], intermediate_size=settings["intermediate"],
        num_hidden_layers=depth, num_attention_heads=settings["heads"], num_key_value_heads=settings["kv_heads"],
        max_position_embeddings=settings["seq_len"],
    )  # fmt: skip
    dtype = getattr(torch, settings["dtype"])
    return LlamaForCausalLM(config).to(settings["device"], dtype).eval()


def run_one(settings: dict) -> dict:
    """One measurement, in this process: prune a fresh Llama of `settings["depth"]` blocks."""
    import torch

    from hf_sparse import SparsityConfig, select_layers
    from hf_sparse.blocks import StackInputs
    from hf_sparse.criteria import compute_masks

    torch.set_num_threads(settings["threads"])
    device = settings["device"]
    model, warm_up = _llama(settings, settings["depth"]), _llama(settings, 1)
    ids = torch.randint(
        0, 1024, (settings["samples"], settings["seq_len"]), generator=torch.Generator().manual_seed(0)
    )
    ids, size = ids.to(device), settings["batch_size"]
    data = [{"input_ids": ids[i : i + size], "attention_mask": torch.ones_like(ids[i : i + size])}
            for i in range(0, len(ids), size)]  # fmt: skip
    sparsity = SparsityConfig(criterion=settings["criterion"], calibration_samples=settings["samples"])
    # one-off costs (kernels' first calls, lazy imports) on a one-block model, not timed
    compute_masks(warm_up, select_layers(warm_up, sparsity).targets, sparsity, data[:1], block_inputs="none")
    del warm_up
    counts, stored = [0] * settings["depth"], []
    capture = StackInputs.capture.__func__

    def recording_capture(cls, *args, **kwargs):
        stack = capture(cls, *args, **kwargs)
        stored.append(stack.nbytes())  # right after the capture: every batch's calls, the most held at once
        return stack

    StackInputs.capture = classmethod(recording_capture)
    seconds, cpu_seconds, peak = [], [], _Peak(device)
    for repeat in range(settings["repeats"]):
        pruned = copy.deepcopy(model) if settings["repeats"] > 1 else model  # a copy is not pruning's memory
        layers = select_layers(pruned, sparsity).targets
        if repeat == 0:  # the first run also counts the blocks' forward passes and measures memory
            for index, block in enumerate(pruned.model.layers):
                block.register_forward_hook(lambda *args, index=index: counts.__setitem__(index, counts[index] + 1))
            peak.reset()
        started, cpu_started = time.perf_counter(), time.process_time()
        compute_masks(pruned, layers, sparsity, data, block_inputs=settings["block_inputs"])
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        if repeat == 0:
            peak_bytes = peak.increase()
        del pruned, layers
    selected = select_layers(model, sparsity).targets.values()
    return {
        **settings,
        "seconds": min(seconds),
        "all_seconds": seconds,
        "cpu_seconds": min(cpu_seconds),
        "all_cpu_seconds": cpu_seconds,
        "passes_per_batch": [count / len(data) for count in counts],
        "stored_bytes": stored[0] if stored else 0,
        "peak_increase_bytes": peak_bytes,
        # compute_masks keeps a CPU copy of the selected weights, to put them back if pruning fails
        "snapshot_bytes": sum(layer.weight.numel() * layer.weight.element_size() for layer in selected),
    }


def formula_bytes(settings: dict) -> int:
    """The stored inputs by `block_statistics`' formula: the hidden states, B·T·h·s, plus per batch Llama's rotary
    cos and sin (2·T·d·s: one row of positions, shared by the batch's sequences) and its position ids (8·T)."""
    import torch

    size = torch.empty(0, dtype=getattr(torch, settings["dtype"])).element_size()
    samples, length, hidden = settings["samples"], settings["seq_len"], settings["hidden"]
    batches = -(-samples // settings["batch_size"])
    return size * samples * length * hidden + batches * length * (2 * size * hidden // settings["heads"] + 8)


def statistics_bytes(settings: dict) -> int:
    """One block's statistics in float32: q, k, v, o, gate and up take `hidden` inputs, down `intermediate`."""
    inputs = [settings["hidden"]] * 6 + [settings["intermediate"]]
    return 4 * sum(n * n if settings["criterion"] == "sparsegpt" else n for n in inputs)


def measure(settings: dict) -> dict:
    """`run_one` in a child process (its own peak memory, no allocator state from the runs before)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(settings["threads"]), HF_HUB_DISABLE_PROGRESS_BARS="1")
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.calibration_depth", "--one", json.dumps(settings)],
        env=env, capture_output=True, text=True, check=False, cwd=repo,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"measurement {settings} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _time(result: dict) -> float:
    return result["seconds"] if result["device"] == "cuda" else result["cpu_seconds"]


def table(results: list[dict]) -> str:
    """The results as a Markdown table, and the deep-to-shallow time ratios."""
    mib, gpu = 2**20, results[0]["device"] == "cuda"
    unit = "s" if gpu else "CPU s (wall s)"
    rows = [
        f"| criterion | blocks | old: {unit} | new: {unit} | new / old | block passes per batch, new (first, last); "
        "old (first) | stored inputs, MiB: measured / formula | stored + statistics, MiB | peak memory increase, "
        f"MiB: old / new{'' if gpu else ' (of which the weights snapshot)'} |",
        "|---|---:|---:|---:|---:|---|---|---:|---|",
    ]
    by = {(r["criterion"], r["depth"], r["block_inputs"]): r for r in results}
    criteria = list(dict.fromkeys(r["criterion"] for r in results))
    depths = sorted({r["depth"] for r in results})
    for criterion in criteria:
        for depth in depths:
            old, new = by[criterion, depth, "none"], by[criterion, depth, "auto"]
            times = [f"{_time(r):.1f}" + ("" if gpu else f" ({r['seconds']:.1f})") for r in (old, new)]
            passes = new["passes_per_batch"]
            snapshot = "" if gpu else f" ({new['snapshot_bytes'] / mib:.0f})"
            rows.append(
                f"| {criterion} | {depth} | {times[0]} | {times[1]} | {_time(new) / _time(old):.2f} | "
                f"{passes[0]:g}, {passes[-1]:g}; {old['passes_per_batch'][0]:g} | "
                f"{new['stored_bytes'] / mib:.2f} / {formula_bytes(new) / mib:.2f} | "
                f"{(formula_bytes(new) + statistics_bytes(new)) / mib:.0f} | "
                f"{old['peak_increase_bytes'] / mib:.0f} / {new['peak_increase_bytes'] / mib:.0f}{snapshot} |"
            )
    lines = ["\n".join(rows), ""]
    shallow, deep = depths[0], depths[-1]
    for criterion in criteria if deep != shallow else []:
        for mode, label in (("none", "old"), ("auto", "new")):
            ratio = _time(by[criterion, deep, mode]) / _time(by[criterion, shallow, mode])
            lines.append(
                f"{criterion}, {label}: {deep} blocks took {ratio:.1f}x the time of {shallow} "
                f"(depth ratio {deep / shallow:g}; the target is at most {1.5 * deep / shallow:g}x)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--criteria", default="wanda,sparsegpt", help="comma-separated")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each measurement")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the fastest is reported")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process's one measurement
    args = parser.parse_args(argv)
    if args.one is not None:
        result = run_one(json.loads(args.one))
        print(json.dumps(result))
        return [result]
    base = {
        "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads, "kv_heads": args.kv_heads,
        "samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size, "device": args.device,
        "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats,
    }  # fmt: skip
    results = []
    for criterion in args.criteria.split(","):
        for depth in args.depths:
            for block_inputs in ("none", "auto"):
                results.append(measure({**base, "criterion": criterion, "depth": depth, "block_inputs": block_inputs}))
                print(f"{criterion} {depth} blocks {block_inputs}: {_time(results[-1]):.1f} s", flush=True)
    print(table(results))
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
