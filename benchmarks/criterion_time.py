"""Wall time of each pruning criterion on a BERT-base-sized model (weights do not change the time).

Builds `BertModel(BertConfig())` (12 layers, hidden 768, intermediate 3072: 72 prunable `nn.Linear`), takes random
token ids as calibration data (`--samples` sequences of `--seq-len` tokens), and times `hf_sparse.prune_` for
each criterion on `--device`, after one warm-up run.

Run:

    python -m benchmarks.criterion_time --device cuda --output criterion_time.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from hf_sparse import SparsityConfig, prune_
from hf_sparse.run_report import environment


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_criteria(
    model: torch.nn.Module,
    calibration_data,
    criteria: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt"),
    device: str | torch.device | None = None,
    repeats: int = 1,
    **config_kwargs,
) -> dict[str, float]:
    """Seconds that `prune_` takes for each criterion on a fresh copy of `model` (best of `repeats`).

    Args:
        model: the dense model, already on the device its forward should run on.
        calibration_data: anything `prune_` accepts (e.g. a list of batches).
        criteria: criteria to time.
        device: where statistics and the SparseGPT solve run (see `prune_`).
        repeats: runs per criterion; the fastest is reported.
        config_kwargs: further `SparsityConfig` fields (e.g. `calibration_samples=128`).

    Example:

    ```python
    >>> time_criteria(model.cuda(), batches, calibration_samples=128)
    {'magnitude': 0.01, 'wanda': 0.9, 'sparsegpt': 12.3}
    ```
    """
    target = torch.device(device) if device is not None else next(model.parameters()).device
    seconds = {}
    for criterion in criteria:
        best = float("inf")
        for _ in range(repeats):
            pruned = copy.deepcopy(model)
            _sync(target)
            started = time.perf_counter()
            prune_(pruned, SparsityConfig(criterion=criterion, **config_kwargs), calibration_data, device=device)
            _sync(target)
            best = min(best, time.perf_counter() - started)
            del pruned
        seconds[criterion] = best
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--criteria", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = BertModel(BertConfig(), add_pooling_layer=False).to(device).eval()
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(1000, 30000, (args.batch_size, args.seq_len), generator=g),
            "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
        }
        for _ in range(0, args.samples, args.batch_size)
    ]
    criteria = tuple(args.criteria.split(","))
    # Warm-up (CUDA context, kernels) on a small calibration set, not timed.
    time_criteria(model, batches[:1], criteria, device, calibration_samples=args.batch_size)
    seconds = time_criteria(model, batches, criteria, device, calibration_samples=args.samples)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor()} CPU"
    print(f"BERT-base-sized model, {args.samples} x {args.seq_len} calibration tokens, {name}")
    for criterion, s in seconds.items():
        print(f"  {criterion:<10} {s:8.2f} s")
    result = {"device": name, "samples": args.samples, "seq_len": args.seq_len, "seconds": seconds}
    result["environment"] = environment()
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
