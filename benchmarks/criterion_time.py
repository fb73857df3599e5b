"""Wall time of each pruning criterion on a BERT-base-sized model, and of SparseGPT's options on single layers of
the sizes an LLM has (weights and data do not change the time).

Builds `BertModel(BertConfig())` (12 layers, hidden 768, intermediate 3072: 72 prunable `nn.Linear`), takes random
token ids as calibration data (`--samples` sequences of `--seq-len` tokens), and times `hf_sparse.prune_` for
each criterion on `--device`, after one warm-up run. A criterion may carry SparseGPT's options as suffixes:
`sparsegpt+bias` (`sparsegpt_update_bias`), `sparsegpt+refit` (`sparsegpt_refit`), `sparsegpt+admm`
(`sparsegpt_admm_steps=--admm-steps`), combined as in `sparsegpt+bias+admm`.

`--layers OUTxIN ...` times `sparsegpt_prune_` on single random layers of those shapes instead (with a Hessian from
`--tokens` random inputs), the unit a large model is pruned in: SparseGPT's one pass costs about `OUT * IN^2`, the
refit solves one `IN/2`-square system per row (about `OUT * IN^3 / 24`), ADMM adds one eigendecomposition and
`--admm-steps` `OUT x IN x IN` products.

Run:

    python -m benchmarks.criterion_time --device cuda --output criterion_time.json
    python -m benchmarks.criterion_time --device cuda --criteria sparsegpt,sparsegpt+bias+refit,sparsegpt+bias+admm
    python -m benchmarks.criterion_time --device cuda --layers 4096x4096 14336x4096 4096x14336 \
        --criteria sparsegpt,sparsegpt+refit,sparsegpt+admm
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
from hf_sparse.criteria import sparsegpt_prune_
from hf_sparse.run_report import environment

OPTIONS = {"bias": "sparsegpt_update_bias", "refit": "sparsegpt_refit", "admm": "sparsegpt_admm_steps"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def criterion_settings(name: str, admm_steps: int = 30) -> dict:
    """The `SparsityConfig` fields a criterion name stands for: `"sparsegpt+bias+admm"` ->
    `{"criterion": "sparsegpt", "sparsegpt_update_bias": True, "sparsegpt_admm_steps": 30}`."""
    criterion, *options = name.split("+")
    settings: dict = {"criterion": criterion}
    for option in options:
        if criterion != "sparsegpt" or option not in OPTIONS:
            known = ", ".join(f"sparsegpt+{o}" for o in OPTIONS)
            raise ValueError(
                f"unknown criterion {name!r}: the options are SparseGPT's ({known}), e.g. sparsegpt+bias+admm."
            )
        settings[OPTIONS[option]] = admm_steps if option == "admm" else True
    return settings


def time_criteria(
    model: torch.nn.Module,
    calibration_data,
    criteria: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt"),
    device: str | torch.device | None = None,
    repeats: int = 1,
    admm_steps: int = 30,
    **config_kwargs,
) -> dict[str, float]:
    """Seconds that `prune_` takes for each criterion on a fresh copy of `model` (best of `repeats`).

    Args:
        model: the dense model, already on the device its forward should run on.
        calibration_data: anything `prune_` accepts (e.g. a list of batches).
        criteria: criteria to time, with SparseGPT's options as suffixes (see `criterion_settings`).
        device: where statistics and the SparseGPT solve run (see `prune_`).
        repeats: runs per criterion; the fastest is reported.
        admm_steps: the ADMM steps of a `+admm` criterion.
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
        config = SparsityConfig(**criterion_settings(criterion, admm_steps), **config_kwargs)
        best = float("inf")
        for _ in range(repeats):
            pruned = copy.deepcopy(model)
            _sync(target)
            started = time.perf_counter()
            prune_(pruned, config, calibration_data, device=device)
            _sync(target)
            best = min(best, time.perf_counter() - started)
            del pruned
        seconds[criterion] = best
    return seconds


def time_layer(
    out_features: int,
    in_features: int,
    criteria: tuple[str, ...] = ("sparsegpt", "sparsegpt+refit", "sparsegpt+admm"),
    device: str | torch.device = "cpu",
    tokens: int = 4096,
    admm_steps: int = 30,
    refit_method: str = "auto",
) -> dict[str, float]:
    """Seconds that `sparsegpt_prune_` takes on one random `(out_features, in_features)` layer for each SparseGPT
    variant in `criteria` (magnitude and Wanda are not timed here: they cost next to nothing per layer), with the
    refit's solver `refit_method` (see `hf_sparse.refit.refit_kept`). The Hessians are formed first and one plain
    SparseGPT pass on the shape warms up, neither timed; each variant then runs once."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g, device=device)
    bias = torch.randn(out_features, generator=g, device=device)
    x = torch.randn(tokens, in_features, generator=g, device=device)
    hessians = {False: x.T @ x}  # calibration statistics are gathered before pruning: not timed
    variants = [criterion_settings(criterion, admm_steps) for criterion in criteria]
    for criterion, options in zip(criteria, variants):
        if options["criterion"] != "sparsegpt":
            raise ValueError(f"--layers times SparseGPT and its options; got {criterion!r}.")
        if options.get("sparsegpt_update_bias") and True not in hessians:
            inputs = torch.cat([x, x.new_ones(tokens, 1)], dim=1)
            hessians[True] = inputs.T @ inputs
    sparsegpt_prune_(weight.clone(), hessians[False])  # warm-up on this shape, not timed
    seconds = {}
    for criterion, settings in zip(criteria, variants):
        with_bias = settings.get("sparsegpt_update_bias", False)
        _sync(device)
        started = time.perf_counter()
        sparsegpt_prune_(
            weight.clone(),
            hessians[with_bias],
            bias=bias.clone() if with_bias else None,
            refit=settings.get("sparsegpt_refit", False),
            admm_steps=settings.get("sparsegpt_admm_steps", 0),
            refit_method=refit_method,
            name=f"{out_features}x{in_features}",
        )
        _sync(device)
        seconds[criterion] = time.perf_counter() - started
    return seconds


def bert_base(device: torch.device) -> torch.nn.Module:
    """The timed model: `BertModel(BertConfig())`, random weights (seed 0), in eval mode on `device`."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(), add_pooling_layer=False).to(device).eval()


def _shape(text: str) -> tuple[int, int]:
    try:
        out_features, in_features = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a layer shape is OUTxIN, e.g. 4096x11008; got {text!r}") from None
    if out_features < 1 or in_features < 4 or in_features % 4:
        raise argparse.ArgumentTypeError(
            f"a layer shape is OUTxIN with OUT >= 1 and IN a positive multiple of 4 (2:4 groups); got {text!r}"
        )
    return out_features, in_features


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--criteria",
        default=None,
        help="comma-separated; default magnitude,wanda,sparsegpt "
        "(with --layers: sparsegpt,sparsegpt+refit,sparsegpt+admm)",
    )
    parser.add_argument("--admm-steps", type=int, default=30, help="ADMM steps of a +admm criterion")
    parser.add_argument(
        "--layers",
        type=_shape,
        nargs="+",
        default=None,
        metavar="OUTxIN",
        help="time single layers of these shapes instead of the BERT-base-sized model",
    )
    parser.add_argument("--tokens", type=int, default=None, help="with --layers: calibration inputs (default 4096)")
    parser.add_argument(
        "--refit-method",
        choices=("auto", "cholesky", "cg"),
        default=None,
        help="with --layers: the refit's solver (auto: conjugate gradients on a GPU for rows of 1024+ kept weights)",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.layers and (args.tokens is not None or args.refit_method is not None):
        parser.error("--tokens and --refit-method apply to single layers: add --layers OUTxIN ...")
    args.tokens, args.refit_method = args.tokens or 4096, args.refit_method or "auto"
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor()} CPU"
    if args.layers:
        criteria = tuple((args.criteria or "sparsegpt,sparsegpt+refit,sparsegpt+admm").split(","))
        time_layer(
            64, 256, criteria, device, 512, args.admm_steps, args.refit_method
        )  # warm-up: CUDA context, solver kernels
        print(f"single layers, {args.tokens} calibration tokens, refit by {args.refit_method}, {name}")
        layers = {}
        for out_features, in_features in args.layers:
            seconds = time_layer(
                out_features, in_features, criteria, device, args.tokens, args.admm_steps, args.refit_method
            )
            layers[f"{out_features}x{in_features}"] = seconds
            print(f"  {out_features}x{in_features}: " + ", ".join(f"{c} {s:.2f} s" for c, s in seconds.items()))
        result = {"device": name, "tokens": args.tokens, "admm_steps": args.admm_steps, "layers": layers}
        result["refit_method"] = args.refit_method
    else:
        criteria = tuple((args.criteria or "magnitude,wanda,sparsegpt").split(","))
        for criterion in criteria:  # a misspelt criterion fails now, not after the model is built and others ran
            SparsityConfig(**criterion_settings(criterion, args.admm_steps))
        model = bert_base(device)
        g = torch.Generator().manual_seed(0)
        batches = [
            {
                "input_ids": torch.randint(1000, 30000, (args.batch_size, args.seq_len), generator=g),
                "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
            }
            for _ in range(0, args.samples, args.batch_size)
        ]
        # Warm-up (CUDA context, kernels) on a small calibration set, not timed.
        time_criteria(
            model, batches[:1], criteria, device, admm_steps=args.admm_steps, calibration_samples=args.batch_size
        )
        seconds = time_criteria(
            model, batches, criteria, device, admm_steps=args.admm_steps, calibration_samples=args.samples
        )
        print(f"BERT-base-sized model, {args.samples} x {args.seq_len} calibration tokens, {name}")
        for criterion, s in seconds.items():
            print(f"  {criterion:<22} {s:8.2f} s")
        result = {"device": name, "samples": args.samples, "seq_len": args.seq_len, "admm_steps": args.admm_steps}
        result["seconds"] = seconds
    result["environment"] = environment()
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
