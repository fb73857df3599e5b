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
QA_METRICS = ({"key": "exact_match", "name": "exact match"}, {"key": "f1", "name": "F1"})
"""The metrics of a report that names none (`report["metrics"]`): SQuAD's. Each is `{"key", "name"}`, and
`"lower_is_better": True` for one compared as a ratio to dense (perplexity) rather than a difference."""


def metrics_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The metrics a report's stages hold, in the order its tables show them (`QA_METRICS` unless it names its own)."""
    return list(report.get("metrics") or QA_METRICS)


def _stage_names(report: dict[str, Any]) -> dict[str, str]:
    return {**STAGE_NAMES, **report.get("stage_names", {})}


def _change(metric: dict[str, Any], dense: float | None, sparse: float | None) -> str:
    """The 2:4 model's change from dense: a difference in points, or a ratio for a lower-is-better metric."""
    if dense is None or sparse is None:
        return "—"
    return f"{sparse / dense:.2f}x" if metric.get("lower_is_better") else f"{sparse - dense:+.2f}"


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
    """Writes `report.json`, `report.md` and plots into `output_dir` (atomically, stage by stage): `f1_by_stage.png`,
    or `metrics_by_stage.png` for a report that names its own metrics, and `generation.png` once generation was
    timed."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False))
    os.replace(tmp, output_dir / "report.json")
    (output_dir / "report.md").write_text(markdown(report))
    if report.get("metrics"):
        if any(m["key"] in report["stages"].get(s, {}) for s in STAGES for m in report["metrics"]):
            plot_metrics(report, output_dir / "metrics_by_stage.png")
    elif any("f1" in report["stages"].get(s, {}) for s in STAGES):
        plot_f1(report, output_dir / "f1_by_stage.png")
    if report.get("generation", {}).get("rows"):
        plot_generation(report, output_dir / "generation.png")


def _fmt(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The tutorial-style table: each metric for the dense and the 2:4 model, with the delta or speed-up."""
    stages, metrics, names = report["stages"], metrics_of(report), _stage_names(report)
    dense, sparse = stages.get("dense", {}), stages.get("swapped") or stages.get("sparse", {})
    lines = [f"# {report.get('title', '2:4 sparsity report')}", ""]
    if report.get("command"):
        lines += ["Produced by:", "", "```bash", report["command"], "```", ""]
    lines += ["| metric | dense | 2:4 | delta |", "|---|---|---|---|"]
    for metric in metrics:
        a, b = dense.get(metric["key"]), sparse.get(metric["key"])
        if a is not None or b is not None:
            lines.append(f"| {metric['name']} | {_fmt(a)} | {_fmt(b)} | {_change(metric, a, b)} |")
    for row in report.get("timing", {}).get("rows", []):
        lines.append(
            f"| latency, batch {row['batch_size']} (ms) | {_fmt(row['dense_ms'])} | {_fmt(row['sparse_ms'])} | "
            f"{_fmt(row['speedup'])}x |"
        )
    note = training_note(report)
    lines += ["", note] if note else []
    lines += ["", "## Stages", "", f"| stage | {' | '.join(m['name'] for m in metrics)} | evaluated in | sparsity | "
              "trained |", "|---|" + "---|" * (len(metrics) + 3)]  # fmt: skip
    for stage in STAGES:
        if stage in stages:
            s = stages[stage]
            sparsity, steps = s.get("sparsity"), s.get("train_steps")
            scores = " | ".join(_fmt(s.get(m["key"])) for m in metrics)
            lines.append(
                f"| {names[stage]}{_kernels(s)} | {scores} | {s.get('eval_dtype', '—')} | "
                f"{'—' if sparsity is None else f'{sparsity:.2%}'} | {'—' if steps is None else f'{steps} steps'} |"
            )
    for title, table, description in (
        ("Latency", timing_table(report), report.get("timing", {}).get("description", "")),
        ("Generation", generation_table(report), report.get("generation", {}).get("description", "")),
    ):
        if table:
            lines += ["", f"## {title}", "", description, ""]
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
    at equal training); None before the recovery has trained. A report's own `training_note` goes first."""
    if report.get("training_note"):
        return report["training_note"]
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


def plot_metrics(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Each of a report's own metrics (`report["metrics"]`) across its stages, one panel per metric, every bar
    labelled with its value (and, for a lower-is-better metric, its ratio to dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _stage_names(report)
    panels = [(m, [s for s in STAGES if m["key"] in report["stages"].get(s, {})]) for m in report["metrics"]]
    panels = [(m, stages) for m, stages in panels if stages]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (metric, stages) in zip(axes[0], panels):
        values = [report["stages"][s][metric["key"]] for s in stages]
        dense = report["stages"].get("dense", {}).get(metric["key"])
        labels = [f"{v:.2f}" + (f"\n({v / dense:.2f}x)" if metric.get("lower_is_better") and dense else "")
                  for v in values]  # fmt: skip
        bars = ax.bar(range(len(stages)), values, color=[f"C{STAGES.index(s)}" for s in stages])
        ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
        ax.margins(y=0.2)
        ax.set_xticks(range(len(stages)), [names[s].replace(" (", "\n(") for s in stages], fontsize=8)
        ax.set_title(metric["name"] + (" (lower is better)" if metric.get("lower_is_better") else ""))
    fig.suptitle(report.get("title", "metrics across stages"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def generation_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per batch size of a report's `generation` timing: new tokens per second of the dense and the 2:4
    model, and the speed-up."""
    rows = (report.get("generation") or {}).get("rows", [])
    return [
        {
            "batch size": row["batch_size"],
            "prompt + new tokens": f"{row['prompt_tokens']} + {row['new_tokens']}",
            "dense (tokens/s)": row["dense_tokens_per_second"],
            "2:4 (tokens/s)": row["sparse_tokens_per_second"],
            "speed-up": _ratio(row["sparse_tokens_per_second"] / row["dense_tokens_per_second"], 2),
        }
        for row in rows
    ]


def plot_generation(report: dict[str, Any], path: str | os.PathLike) -> None:
    """New tokens per second of `generate()`, dense against 2:4, at each batch size of the report's `generation`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["generation"]["rows"]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    for offset, (key, name) in zip((-0.2, 0.2), (("dense_tokens_per_second", "dense"),
                                                  ("sparse_tokens_per_second", "2:4"))):  # fmt: skip
        bars = ax.bar([x + offset for x in xs], [r[key] for r in rows], width=0.4, label=name)
        ax.bar_label(bars, labels=[f"{r[key]:.0f}" for r in rows], fontsize=8, padding=2)
    ax.set_xticks(list(xs), [f"batch {r['batch_size']}" for r in rows])
    ax.set_ylabel("new tokens per second")
    ax.margins(y=0.15)
    ax.legend()
    ax.set_title(report["generation"].get("title", "generate(): dense vs 2:4"))
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

    Metrics of the dense and recovered stages (`metrics_of`), how long each trained (`training_note`), the command, the data (a Hub dataset id, or the name of local or
    synthetic data, which get no `model-index`), the base model when it is a Hub id, the latency or generation table
    and plot, and last the report's own `card` entries over these.
    """
    recipe = report.get("arguments", {}).get("recipe", {})
    stages, keys = report["stages"], [m["key"] for m in metrics_of(report)]
    metrics = {
        stage: {k: stages[stage][k] for k in keys if k in stages[stage]}
        for stage in ("dense", "sparse")
        if any(k in stages.get(stage, {}) for k in keys)
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
    for key, table, plot in (("timing", timing_table, "latency.png"), ("generation", generation_table,
                                                                         "generation.png")):  # fmt: skip
        timing = report.get(key)
        if timing and timing.get("rows"):
            card["benchmark"] = table(report)
            card["benchmark_description"] = timing.get("description")
            if (Path(output_dir) / plot).is_file():
                card["benchmark_plot"] = str(Path(output_dir) / plot)
    card.update(report.get("card", {}))  # what a script knows better than its arguments say (data, base model)
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
