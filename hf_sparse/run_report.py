"""The report of a dense -> 2:4 run: `report.json` (every measured number), `report.md` (the tutorial's table) and
plots. Used by `recipes/squad_24.py`; usable for any workflow that records its stages the same way."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

STAGES = ("dense", "pruned", "sparse", "swapped", "fp8", "fp8_dense")
STAGE_NAMES = {
    "dense": "dense (fine-tuned)",
    "pruned": "2:4, zero-shot (pruned, no training)",
    "sparse": "2:4, recovered (fine-tuned with masks)",
    "swapped": "2:4, recovered, on sparse kernels",
    "fp8": "2:4, recovered, on FP8 (e4m3) 2:4 kernels",
    "fp8_dense": "2:4, recovered, on dense FP8 kernels (baseline)",
}
TIMED = {
    "2:4": ("sparse_ms", "speedup", "swapped"),
    "fp8": ("fp8_ms", "fp8_speedup", "fp8"),
    "fp8-dense": ("fp8_dense_ms", "fp8_dense_speedup", "fp8_dense"),
}
"""Benchmark variant -> (its keys in a timing row: milliseconds, speed-up over dense; the report stage with its F1)."""
TIMED_NAMES = {"dense": "dense fp16", "2:4": "2:4 fp16", "fp8": "2:4 FP8 (e4m3)", "fp8-dense": "dense FP8 (e4m3)"}


def environment() -> dict[str, Any]:
    """Versions and hardware a run's numbers depend on."""
    import accelerate
    import huggingface_hub
    import torch
    import transformers

    from . import __version__

    env = {
        "hf_sparse": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env["gpu"] = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
        env["cuda"] = torch.version.cuda
        try:
            env["cusparselt"] = torch.backends.cusparselt.version()
        except Exception:  # noqa: BLE001 - older builds have no cuSPARSELt
            env["cusparselt"] = None
    return env


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """The report of an earlier (maybe interrupted) run, or an empty one."""
    path = Path(path)
    if not path.is_file():
        return {"stages": {}, "skipped": {}}
    with open(path) as f:
        report = json.load(f)
    if not isinstance(report, dict) or not isinstance(report.get("stages"), dict):
        raise ValueError(f"{path} is not a report written by hf-sparse (no 'stages'); move it away or pick another "
                         "output_dir.")  # fmt: skip
    report.setdefault("skipped", {})
    return report


def save_report(report: dict[str, Any], output_dir: str | os.PathLike) -> None:
    """Writes `report.json`, `report.md` and `f1_by_stage.png` into `output_dir` (atomically, stage by stage)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False))
    os.replace(tmp, output_dir / "report.json")
    (output_dir / "report.md").write_text(markdown(report))
    if any("f1" in report["stages"].get(s, {}) for s in STAGES):
        plot_f1(report, output_dir / "f1_by_stage.png")


def _fmt(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The tutorial-style table: each metric for the dense and the 2:4 model, with the delta or speed-up."""
    stages = report["stages"]
    dense, sparse = stages.get("dense", {}), stages.get("swapped") or stages.get("sparse", {})
    lines = [f"# {report.get('title', '2:4 sparsity report')}", ""]
    if report.get("command"):
        lines += ["Produced by:", "", "```bash", report["command"], "```", ""]
    lines += ["| metric | dense | 2:4 | delta |", "|---|---|---|---|"]
    for key, name in (("exact_match", "exact match"), ("f1", "F1")):
        if key in dense or key in sparse:
            a, b = dense.get(key), sparse.get(key)
            delta = None if a is None or b is None else b - a
            lines.append(f"| {name} | {_fmt(a)} | {_fmt(b)} | {'—' if delta is None else f'{delta:+.2f}'} |")
    for row in report.get("timing", {}).get("rows", []):
        lines.append(
            f"| latency, batch {row['batch_size']} (ms) | {_fmt(row['dense_ms'])} | {_fmt(row['sparse_ms'])} | "
            f"{_fmt(row['speedup'])}x |"
        )
    note = training_note(report)
    lines += ["", note] if note else []
    lines += ["", "## Stages", "", "| stage | exact match | F1 | evaluated in | sparsity | trained |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for stage in STAGES:
        if stage in stages:
            s = stages[stage]
            sparsity, steps = s.get("sparsity"), s.get("train_steps")
            lines.append(
                f"| {STAGE_NAMES[stage]}{_kernels(s)} | {_fmt(s.get('exact_match'))} | {_fmt(s.get('f1'))} | "
                f"{s.get('eval_dtype', '—')} | {'—' if sparsity is None else f'{sparsity:.2%}'} | "
                f"{'—' if steps is None else f'{steps} steps'} |"
            )
    table = timing_table(report)
    if table:
        lines += ["", "## Latency", "", report["timing"].get("description", ""), ""]
        lines += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        for row in table:
            lines.append("| " + " | ".join(_fmt(v) if isinstance(v, float) or v is None else str(v)
                                           for v in row.values()) + " |")  # fmt: skip
    if report.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- **{k}**: {v}" for k, v in report["skipped"].items()]
    env = report.get("environment")
    if env:
        lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items() if v is not None]
    for earlier in report.get("earlier_environments", []):
        changed = [f"{k}: {v}" for k, v in earlier.items() if env and env.get(k) != v]
        lines += ["", "Stages kept from an earlier run ran with " + "; ".join(changed) + "."]
    return "\n".join(lines) + "\n"


def training_note(report: dict[str, Any]) -> str | None:
    """How long the dense and the 2:4 model trained, saying so when the lengths differ (the tutorial compares them
    at equal training); None before the recovery has trained."""
    dense, sparse = (report["stages"].get(s, {}).get("train_steps") for s in ("dense", "sparse"))
    if sparse is None:
        return None
    if dense is None:
        return f"The 2:4 model was pruned from the given dense model and recovered for {sparse} optimizer steps."
    note = (
        f"The dense model was fine-tuned for {dense} optimizer steps; the 2:4 model, pruned from it, recovered for "
        f"{sparse}."
    )
    if dense != sparse:
        note += " The two trained for different lengths, so the delta does not compare them at equal training."
    return note


def _kernels(stage: dict[str, Any]) -> str:
    """What the swapped GEMMs (a fused q/k/v counts once) ran on, e.g. ' (36 of 48 GEMMs sparse)', or for an FP8
    swap ' (18 of 24 GEMMs FP8 2:4, 6 dense FP8; GELU in the epilogue of 6)'."""
    layers = stage.get("layers")
    if not isinstance(layers, dict) or not layers:  # other stages record a number of pruned layers here
        return ""
    fp8 = {
        "fp8 2:4": layers.get("fp8 2:4", 0),
        "dense FP8": layers.get("fp8 dense", 0),
        "fp16": layers.get("dense", 0),
    }
    if fp8["fp8 2:4"] or fp8["dense FP8"]:
        total = sum(fp8.values())
        (first, count), *rest = [(k, v) for k, v in fp8.items() if v] or [("fp8 2:4", 0)]
        text = f" ({count} of {total} GEMMs {first.replace('fp8', 'FP8')}" + "".join(f", {v} {k}" for k, v in rest)
        gelu = stage.get("gelu_in_epilogue")
        return text + (f"; GELU in the epilogue of {gelu}" if gelu else "") + ")"
    sparse = layers.get("sparse", 0) + layers.get("sparse+dense", 0)
    total = sparse + layers.get("dense", 0)
    note = "; dense was faster for the rest" if sparse < total else ""
    return f" ({sparse} of {total} GEMMs sparse{note})"


def plot_f1(report: dict[str, Any], path: str | os.PathLike) -> None:
    """F1 and exact match across the stages of a run (left, every bar labelled), and each stage's change from the
    dense model in points (right): the differences between the stages are often a point or two, which a 0-100
    axis would hide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if "f1" in report["stages"].get(s, {})]
    scores = {
        "F1": [report["stages"][s]["f1"] for s in stages],
        "exact match": [report["stages"][s].get("exact_match", 0.0) for s in stages],
    }
    labels = [STAGE_NAMES[s].replace(" (", "\n(") for s in stages]
    xs = list(range(len(stages)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for offset, (name, values) in zip((-0.2, 0.2), scores.items()):
        bars = left.bar([x + offset for x in xs], values, width=0.4, label=name)
        left.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8, padding=2)
    low = min(min(v) for v in scores.values())
    left.set_ylim(max(0.0, low - 10), min(105.0, max(max(v) for v in scores.values()) + 5))
    left.set_ylabel("score (axis does not start at 0)" if low > 10 else "score")
    left.set_xticks(xs, labels, fontsize=8)
    left.set_title("scores")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)  # below: bars stay clear
    if "dense" in stages:
        base = {name: values[stages.index("dense")] for name, values in scores.items()}
        others = [i for i, s in enumerate(stages) if s != "dense"]
        for offset, (name, values) in zip((-0.2, 0.2), scores.items()):
            deltas = [values[i] - base[name] for i in others]
            bars = right.bar([k + offset for k in range(len(others))], deltas, width=0.4, label=name)
            right.bar_label(bars, labels=[f"{d:+.2f}" for d in deltas], fontsize=8, padding=2)
        right.axhline(0, color="black", linewidth=0.8)
        right.margins(y=0.25)
        right.set_xticks(range(len(others)), [labels[i] for i in others], fontsize=8)
        right.set_ylabel("points vs dense")
        right.set_title("change from the dense model")
    else:
        right.axis("off")
    fig.suptitle(report.get("title", "F1 across stages"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timing_from_benchmark(result: dict[str, Any], seq_len: int) -> dict[str, Any]:
    """The report's "timing" entry from a `hf_sparse.inference.benchmark.run` result: per batch size, the graphs-mode
    time of dense and of each variant in `TIMED` that ran ("2:4" as `sparse_ms`/`speedup`, "fp8" as `fp8_ms`/
    `fp8_speedup`, "fp8-dense" as `fp8_dense_ms`/`fp8_dense_speedup`), and each variant's weight memory over dense."""
    rows = []
    for r in result["rows"]:
        if not r.get("2:4") or r.get("mode", "graphs") != "graphs":
            continue
        row = {"batch_size": r["batch"], "dense_ms": r["dense"]["ms"]}
        for variant, (ms_key, speedup_key, _) in TIMED.items():
            if r.get(variant):
                row[ms_key], row[speedup_key] = r[variant]["ms"], r[variant]["speedup"]
        rows.append(row)
    memory = {v: m.get("ratio") for v, m in result["memory"].items() if v in TIMED}
    fp8 = (
        " FP8 layers: e4m3 weights and static activation scales (calibrated on random batches)."
        if "fp8" in memory
        else ""
    )
    return {
        "description": f"{result['device']}, fp16, sequence length {seq_len}, every model with fused q/k/v, run "
        f"through CUDA graphs; median of CUDA-event timings (hf_sparse.inference.benchmark).{fp8}",
        "rows": rows,
        "weight_memory_ratio": memory.get("2:4"),
        "weight_memory_ratios": memory,
        "bench": result,
    }


def timing_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per timed model (dense fp16, 2:4 fp16, and the FP8 ones when they ran): its F1 and exact match from
    the report's stages, its weight memory over dense, and its latency (speed-up) at each batch size."""
    timing, stages = report.get("timing") or {}, report["stages"]
    rows = timing.get("rows", [])
    if not rows:
        return []
    memory = timing.get("weight_memory_ratios") or {"2:4": timing.get("weight_memory_ratio")}
    table = []
    for variant in ("dense", *TIMED):
        ms_key, speedup_key, stage = TIMED.get(variant, ("dense_ms", None, "dense"))
        if ms_key not in rows[0]:
            continue
        metrics = stages.get(stage) or (stages.get("sparse", {}) if variant == "2:4" else {})
        entry = {
            "model": TIMED_NAMES[variant],
            "F1": metrics.get("f1"),
            "exact match": metrics.get("exact_match"),
            "weight memory": "1.000x" if variant == "dense" else _ratio(memory.get(variant), 3),
        }
        for row in rows:
            ms = row.get(ms_key)
            speedup = 1.0 if speedup_key is None else row.get(speedup_key)  # dense: 1.0 by definition
            entry[f"batch {row['batch_size']} (ms)"] = "—" if ms is None else f"{ms:.3f} ({_ratio(speedup, 2)})"
        table.append(entry)
    return table


def _ratio(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}x"


def card_kwargs(report: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, Any]:
    """What the model card of a run's sparse model says, from its report: `hf_sparse.model_card(folder, **kwargs)`.

    Metrics of the dense and recovered stages, how long each trained (`training_note`), the command, the data (a Hub dataset id, or the name of local or
    synthetic data, which get no `model-index`), the base model when it is a Hub id, and the latency table and plot.
    """
    recipe = report.get("arguments", {}).get("recipe", {})
    stages = report["stages"]
    metrics = {
        key: {"exact_match": stages[key]["exact_match"], "f1": stages[key]["f1"]}
        for key in ("dense", "sparse")
        if "f1" in stages.get(key, {})
    }
    card: dict[str, Any] = dict(metrics=metrics, command=report.get("command"), training=training_note(report))
    dataset = recipe.get("dataset_name", "synthetic")
    if recipe.get("validation_file"):
        card["dataset_name"] = Path(recipe["validation_file"]).name
    elif dataset == "synthetic":
        card["dataset_name"] = "synthetic SQuAD-format facts (hf_sparse.squad.synthetic_squad)"
    else:
        card["dataset"] = dataset
    model = recipe.get("dense_model_name_or_path") or recipe.get("model_name_or_path")  # what was pruned
    if model and not os.path.exists(model):
        card["base_model"] = model
    timing = report.get("timing")
    if timing and timing.get("rows"):
        card["benchmark"] = timing_table(report)
        card["benchmark_description"] = timing.get("description")
        plot = Path(output_dir) / "latency.png"
        if plot.is_file():
            card["benchmark_plot"] = str(plot)
    return card


def write_card_and_push(report: dict[str, Any], output_dir: str | os.PathLike, model_dir: str | os.PathLike,
                        training_args=None) -> None:  # fmt: skip
    """Saves the report into `output_dir`, renders the model card of `model_dir` from it (`card_kwargs`), and
    uploads that folder with its card when `training_args.push_to_hub` (to `hub_model_id`, with `hub_token`,
    `hub_private_repo` and `hub_revision`). Call it on the main process."""
    from .hub import push_to_hub, write_model_card

    save_report(report, output_dir)
    card = card_kwargs(report, output_dir)
    write_model_card(model_dir, **card)
    args = training_args
    if args is not None and args.push_to_hub:
        push_to_hub(model_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo,
                    revision=getattr(args, "hub_revision", None), **card)  # fmt: skip
