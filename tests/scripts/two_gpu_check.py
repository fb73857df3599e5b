"""The whole two-GPU check of issue 18 in one command: the recipe under DDP and FSDP2 (NCCL) on a BERT-base-sized
model with calibrated pruning and distillation, a single-GPU evaluation of the same checkpoint, a two-GPU resume,
and training throughput on one GPU against two. Writes logs, `checks.json` and `summary.md` to OUT.

    python tests/scripts/two_gpu_check.py OUT            # on a machine with two CUDA GPUs
    python tests/scripts/two_gpu_check.py OUT --cpu      # the same plumbing on two CPU processes (gloo, tiny model)

Each step runs in its own processes with a time limit inside `--budget` seconds in all; a failed step is reported
and the others still run. OUT receives `summary.md`, `checks.json` and `logs.tar.gz` (every step's log).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "squad_24.py"
BERT_BASE = "hidden_size=768,num_hidden_layers=12,num_attention_heads=12,intermediate_size=3072"
FSDP_RUNS = ["2 GPUs FSDP2, teacher sharded", "2 GPUs FSDP2, teacher replicated"]
TINY = "hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128"


def launcher(kind: str, cpu: bool) -> list[str]:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    if cpu:
        n = "1" if kind == "one" else "2"
        extra = [] if kind == "one" else ["--multi_gpu"]
        return [*accelerate, *extra, "--num_processes", n, "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]  # fmt: skip
    config = {"one": "accelerate_gpu.yaml", "ddp": "accelerate_ddp.yaml", "fsdp": "accelerate_fsdp.yaml"}[kind]
    return [*accelerate, "--config_file", str(REPO / "recipes" / config)]


class Steps:
    def __init__(self, logs: Path, budget: float):
        self.out, self.results = logs, {}
        self.deadline = time.perf_counter() + budget

    def run(self, name: str, command: list[str], timeout: int, env: dict | None = None) -> bool:
        timeout = min(timeout, int(self.deadline - time.perf_counter()))
        if timeout < 20:
            self.results[name] = {"rc": "no time left", "seconds": 0}
            print(f"   {name}: skipped, no time left in the budget", flush=True)
            return False
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1", **(env or {})}  # fmt: skip
        start = time.perf_counter()
        print(f"== {name}: {' '.join(command)}", flush=True)
        with open(self.out / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        seconds = time.perf_counter() - start
        self.results[name] = {"rc": rc, "seconds": round(seconds, 1)}
        print(f"   {name}: rc={rc} in {seconds:.0f} s", flush=True)
        if rc != 0:
            tail = (self.out / f"{name}.log").read_text().splitlines()[-25:]
            print("\n".join("   | " + line for line in tail), flush=True)
        return rc == 0


def recipe_args(out: Path, cpu: bool, criterion: str) -> list[str]:
    args = ["--output_dir", str(out), "--config_overrides", TINY if cpu else BERT_BASE, "--criterion", criterion,
            "--calibration_samples", "64", "--distill", "true", "--max_steps", "30", "--recovery_max_steps", "30",
            "--save_steps", "10", "--save_total_limit", "100", "--learning_rate", "1e-4", "--warmup_steps", "5",
            "--synthetic_train_paragraphs", "300", "--synthetic_eval_paragraphs", "100", "--disable_tqdm", "true",
            "--timing_batch_sizes", "16", "--timing_sequence_length", "64", "--timing_tune_seconds", "0.1"]  # fmt: skip
    return args + (["--use_cpu", "true"] if cpu else [])


def weights_of(checkpoint: Path) -> dict:
    """The model weights a checkpoint folder holds (safetensors, or FSDP's full-state pytorch_model_fsdp.bin)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("model*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(f).items()}
    fsdp = checkpoint / "pytorch_model_fsdp.bin"
    if fsdp.is_file():
        return torch.load(fsdp, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model weights in {checkpoint}: {sorted(p.name for p in checkpoint.iterdir())}")


def check_checkpoints(training_dir: Path) -> list[dict]:
    """Per checkpoint: the masks saved (rank 0's file under DDP, every rank's rows under FSDP2) equal the nonzeros
    of the checkpoint's weights, the weights are exactly 2:4, and under DDP the digests every rank reported agree."""
    import numpy as np
    import torch
    from safetensors import safe_open

    from hf_sparse.masks import is_nm

    rows = []
    for checkpoint in sorted(training_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        weights = weights_of(checkpoint)
        mask_files = sorted(checkpoint.glob("hf_sparse_masks*.safetensors"))
        masks, digests = {}, []
        for path in mask_files:
            with safe_open(str(path), "pt") as f:
                digests += (f.metadata() or {}).get("digests_by_rank", "").split(",")
                for name in f.keys():
                    if not name.startswith("pruned_values."):
                        masks.setdefault(name, []).append(f.get_tensor(name))
        follow, nm = True, True
        for name, parts in masks.items():
            weight = weights[f"{name}.weight"]
            rows_per_file = weight.shape[0] // len(parts)
            bits = [np.unpackbits(p.numpy())[: rows_per_file * weight.shape[1]] for p in parts]
            mask = torch.from_numpy(np.concatenate(bits).astype(bool)).reshape(weight.shape)
            follow &= bool(torch.equal(mask, weight != 0))
            nm &= is_nm(weight)
        digests = [d for d in digests if d]
        rows.append({"checkpoint": checkpoint.name, "mask_files": len(mask_files), "layers": len(masks),
                     "masks_equal_weight_nonzeros": follow, "weights_2_4": nm,
                     "rank_digests_agree": len(set(digests)) == 1 if digests else None, "digests": digests})  # fmt: skip
    return rows


def final_2_4(folder: Path) -> bool:
    from transformers import AutoModelForQuestionAnswering

    from hf_sparse.masks import is_nm

    model = AutoModelForQuestionAnswering.from_pretrained(folder)
    layers = model.config.sparsity["layers"]
    return len(layers) > 0 and all(is_nm(model.get_submodule(name).weight) for name in layers)


def compare_weights(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    masks_equal = all(((wa[k] != 0) == (wb[k] != 0)).all().item() for k in wa if k.endswith(".weight"))
    return {"bitwise_equal": all(wa[k].equal(wb[k]) for k in wa), "max_abs_diff": diff, "nonzeros_equal": masks_equal}


def report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def simulate_interruption(src: Path, dst: Path, keep_step: int) -> None:
    """`dst` as a run killed right after the recovery saved checkpoint-`keep_step` would have left it."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "sparse")
    for checkpoint in (dst / "sparse-training").glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) > keep_step:
            shutil.rmtree(checkpoint)
    state = report(dst)
    del state["stages"]["sparse"]
    (dst / "report.json").write_text(json.dumps(state))


def throughput(steps: Steps, out: Path, cpu: bool, labels: list[str]) -> dict:
    script = str(REPO / "tests" / "scripts" / "train_throughput.py")
    common = ["--steps", "8" if cpu else "50", "--warmup", "3" if cpu else "10", "--batch", "8" if cpu else "32",
              "--seq", "32" if cpu else "128"] + (["--config", "tiny", "--use_cpu"] if cpu else [])  # fmt: skip
    runs = {"1 GPU": ("one", "sharded"), "2 GPUs DDP": ("ddp", "sharded"),
            "2 GPUs FSDP2, teacher sharded": ("fsdp", "sharded"),
            "2 GPUs FSDP2, teacher replicated": ("fsdp", "replicated")}  # fmt: skip
    results = {}
    for label, (kind, teacher) in runs.items():
        if label not in labels:
            continue
        folder = out / ("tp-" + label.replace(" ", "_").replace(",", ""))
        env = {"CUDA_VISIBLE_DEVICES": "0"} if kind == "one" and not cpu else {}
        if cpu and kind == "fsdp":
            continue  # accelerate does not shard on CPU processes
        ok = steps.run(
            folder.name, [*launcher(kind, cpu), script, str(folder), "--teacher", teacher, *common], 90, env
        )
        if ok:
            results[label] = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--cpu", action="store_true", help="two CPU processes (gloo) and a tiny model")
    parser.add_argument("--skip", nargs="*", default=[], help="steps to skip: throughput ddp resume fsdp")
    parser.add_argument("--budget", type=float, default=600, help="seconds for all steps together")
    options = parser.parse_args()
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TWO_GPU_WORK", "/tmp/two_gpu_check"))
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    steps, checks = Steps(work / "logs", options.budget), {}
    try:
        run_checks(steps, checks, work, options)
    finally:
        checks["steps"] = steps.results
        (out / "checks.json").write_text(json.dumps(checks, indent=1, default=str))
        shutil.make_archive(str(out / "logs"), "gztar", work / "logs")
        summary = summarize(checks)
        (out / "summary.md").write_text(summary)
        print(summary)


def run_checks(steps: Steps, checks: dict, work: Path, options) -> None:
    cpu = options.cpu
    if not cpu:
        steps.run("gpus", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], 60)
        steps.run("topology", ["nvidia-smi", "topo", "-m"], 60)
    ddp, fsdp = work / "ddp", work / "fsdp"
    # Throughput first (the 1.7x target), then the recipes, then FSDP2's teacher memory, as time allows.
    checks["throughput"] = {}
    if "throughput" not in options.skip:
        checks["throughput"] = throughput(steps, work, cpu, ["1 GPU", "2 GPUs DDP"])
    if "fsdp" not in options.skip and not cpu:
        if steps.run("recipe_fsdp", [*launcher("fsdp", cpu), str(RECIPE), *recipe_args(fsdp, cpu, "wanda")], 180):
            state = report(fsdp)
            checks["fsdp"] = {
                "stages": {k: {m: v.get(m) for m in ("f1", "exact_match", "train_samples_per_second",
                                                     "peak_gpu_memory_gib_by_rank", "mask_digests_by_rank",
                                                     "all_layers_exact")} for k, v in state["stages"].items()},
                "checkpoints": check_checkpoints(fsdp / "sparse-training"),
                "final_2_4": final_2_4(fsdp / "sparse"),
                "skipped": state.get("skipped"),
            }  # fmt: skip
    if "ddp" not in options.skip and steps.run(
        "recipe_ddp", [*launcher("ddp", cpu), str(RECIPE), *recipe_args(ddp, cpu, "sparsegpt")], 180
    ):
        state = report(ddp)
        checks["ddp"] = {
            "stages": {k: {m: v.get(m) for m in ("f1", "exact_match", "train_samples_per_second", "prune_seconds",
                                                 "mask_digests_by_rank", "all_layers_exact")}
                       for k, v in state["stages"].items()},
            "data": state["data"],
            "checkpoints": check_checkpoints(ddp / "sparse-training"),
            "final_2_4": final_2_4(ddp / "sparse"),
            "skipped": state.get("skipped"),
        }  # fmt: skip
        # The same checkpoint evaluated in one process on one GPU, by the recipe's own evaluation.
        single = work / "single"
        code = (
            "import json, sys; sys.argv = ['squad_24']; import importlib.util as u; "
            f"spec = u.spec_from_file_location('squad_24', {str(RECIPE)!r}); m = u.module_from_spec(spec); "
            "sys.modules['squad_24'] = m; spec.loader.exec_module(m); "
            f"a = m.parse_args({recipe_args(single, cpu, 'sparsegpt')!r}); run = m.prepare(*a); "
            f"model = m.AutoModelForQuestionAnswering.from_pretrained({str(ddp / 'sparse')!r}); "
            f"r = run.evaluate(model); r['eval_features'] = len(run.features[1]); "
            f"open({str(work / 'single.json')!r}, 'w').write(json.dumps(r))"
        )
        env = {} if cpu else {"CUDA_VISIBLE_DEVICES": "0"}
        if steps.run("single_gpu_eval", [sys.executable, "-c", code], 90, env):
            one = json.loads((work / "single.json").read_text())
            two = state["stages"]["sparse"]
            checks["single_vs_two"] = {
                "two_gpus": {"f1": two["f1"], "exact_match": two["exact_match"], "eval_dtype": two.get("eval_dtype")},
                "one_gpu": {"f1": one["f1"], "exact_match": one["exact_match"], "eval_dtype": one.get("eval_dtype")},
                "eval_features": one["eval_features"],
                "equal": (one["f1"], one["exact_match"]) == (two["f1"], two["exact_match"]),
            }
        if "resume" not in options.skip:
            resumed = work / "ddp_resumed"
            simulate_interruption(ddp, resumed, keep_step=10)
            if steps.run("recipe_ddp_resume", [*launcher("ddp", cpu), str(RECIPE), *recipe_args(resumed, cpu, "sparsegpt")], 150):  # fmt: skip
                again = report(resumed)["stages"]["sparse"]
                checks["resume"] = {
                    "resumed_from": "sparse-training/checkpoint-10",
                    **compare_weights(ddp / "sparse", resumed / "sparse"),
                    "f1": (state["stages"]["sparse"]["f1"], again["f1"]),
                    "log_says_resumed": "Resuming sparse-training"
                    in (steps.out / "recipe_ddp_resume.log").read_text(),
                }
    if "throughput" not in options.skip:
        checks["throughput"].update(throughput(steps, work, cpu, FSDP_RUNS))


def summarize(checks: dict) -> str:
    lines = ["# Two-GPU check", "", "| step | rc | seconds |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['rc']} | {v['seconds']} |" for k, v in checks["steps"].items()]
    for kind in ("ddp", "fsdp"):
        if kind not in checks:
            continue
        c = checks[kind]
        lines += ["", f"## recipe under {kind.upper()}", "", "| stage | F1 | EM | train samples/s | peak GiB by rank |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for stage, v in c["stages"].items():
            lines.append(f"| {stage} | {v.get('f1')} | {v.get('exact_match')} | {v.get('train_samples_per_second')} "
                         f"| {v.get('peak_gpu_memory_gib_by_rank')} |")  # fmt: skip
        pruned = c["stages"].get("pruned", {})
        lines.append(f"\nmask digests by rank after pruning: {pruned.get('mask_digests_by_rank')}; prune seconds "
                     f"(calibration on rank 0 + broadcast): {pruned.get('prune_seconds')}")  # fmt: skip
        lines.append("\n| checkpoint | mask files | layers | masks == nonzeros | 2:4 | rank digests agree |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for r in c["checkpoints"]:
            lines.append(f"| {r['checkpoint']} | {r['mask_files']} | {r['layers']} | {r['masks_equal_weight_nonzeros']} "
                         f"| {r['weights_2_4']} | {r['rank_digests_agree']} |")  # fmt: skip
        lines.append(f"\nfinal sparse checkpoint exactly 2:4: {c['final_2_4']}; skipped: {c['skipped']}")
    if "single_vs_two" in checks:
        s = checks["single_vs_two"]
        lines += ["", "## metric: two GPUs vs one GPU on the same checkpoint", "", json.dumps(s)]
    if "resume" in checks:
        lines += ["", "## resume on two GPUs vs the uninterrupted run", "", json.dumps(checks["resume"])]
    if checks.get("throughput"):
        lines += ["", "## training throughput (steady state, same per-device batch)", "",
                  "| run | samples/s | x one GPU | peak GiB by rank | teacher bytes on rank | final 2:4 |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        base = checks["throughput"].get("1 GPU", [{"samples_per_second": float("nan")}])[0]["samples_per_second"]
        for label, ranks in checks["throughput"].items():
            sps = ranks[0]["samples_per_second"]
            peaks = [round(r["peak_gpu_memory_gib"], 2) if r["peak_gpu_memory_gib"] else None for r in ranks]
            lines.append(f"| {label} | {sps:.1f} | {sps / base:.2f} | {peaks} | "
                         f"{[r['teacher_bytes_on_rank'] for r in ranks]} | {all(r['final_weights_2_4'] for r in ranks)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
