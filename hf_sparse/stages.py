"""Stage and resume bookkeeping of a script that runs a workflow as stages (`recipes/squad_24.py`): each stage records
the arguments it runs with before it writes anything, adds its results to the run's report as they are measured, and
trains from the last complete checkpoint when started again; a rerun in the same output folder continues only stages
that ran with the same arguments (every argument but `NOT_RESULT_ARGUMENTS` is recorded). The report is written by
`hf_sparse.run_report`.

Example:

```python
>>> from hf_sparse.stages import StagePlan, StagedRun
>>> PLAN = StagePlan(stages=("dense", "pruned"), first_used={"pruned": ("criterion", "sparsity_pattern")},
...                  files=("dense", "dense-training", "report.json", "report.md", "f1_by_stage.png"))

>>> @dataclass
... class Run(StagedRun):
...     plan: ClassVar[StagePlan] = PLAN
...     sparsity: SparsityConfig | None = None
...
...     def configs(self):
...         return (self.sparsity, self.training_args)
...
...     def load_model(self, folder):
...         return AutoModelForQuestionAnswering.from_pretrained(folder)

>>> report = PLAN.open((sparsity, training_args))    # an earlier run's stages only where their arguments match
>>> run = Run(training_args, report, sparsity=sparsity)
>>> run.begin("dense")                               # records its arguments before anything is written
>>> if not run.trained("dense", run.output_dir / "dense"):
...     model = run.fine_tune("dense", model, "dense-training", train_dataset, run.output_dir / "dense")
```
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from transformers import Trainer, TrainingArguments

from . import run_report
from ._distributed import check_replicas_agree, gather_object, shut_down
from .checkpoint import last_complete_checkpoint
from .hub import current_command
from .numerics import NumericsCallback

__all__ = ["StagePlan", "StagedRun", "check_replicas_agree", "fsdp", "set_up_logging", "shut_down", "whole_run_loss"]

logger = logging.getLogger(__name__)


NOT_RESULT_ARGUMENTS = frozenset({
    # where output goes and what is logged: not what is trained or measured
    "output_dir", "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node",
    "logging_nan_inf_filter", "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm",
    "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
    "skip_memory_metrics",
    # when checkpoints are written (a resume from any of them continues the same run) and what is pushed
    "save_strategy", "save_steps", "save_total_limit", "save_on_each_node", "enable_jit_checkpoint", "push_to_hub",
    "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
    # how batches reach the model (not which), and what the launcher or the process group sets
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context", "torch_empty_cache_steps", "ddp_timeout", "local_rank",
    # flags a script reads itself, and use_cpu, recorded by its effect: the device
    "do_train", "do_eval", "do_predict", "resume_from_checkpoint", "use_cpu",
})  # fmt: skip
"""`TrainingArguments` that cannot change what a stage trains or measures. Every other field of a run's argument
dataclasses is recorded with the stages it can change (never `hub_token`: a report is meant to be shared)."""

_RUN_FACTS = {"processes": "processes (accelerate launch --num_processes)", "device": "device (--use_cpu)"}
"""What the launch decides rather than a flag, recorded with every stage: name -> how the refusal names it."""


@dataclass(frozen=True)
class StagePlan:
    """The stages of a run in order, and which arguments each one's result depends on.

    Every field of the run's argument dataclasses is recorded with each stage (with the number of processes and the
    device), except those in `unrecorded`, and those in `first_used` of a later stage.

    Args:
        stages: the stages' keys in the report, in the order they run.
        first_used: per stage, the arguments that matter from that stage on only (e.g. the pruning criterion); the
            first stage depends on every other argument, and each stage on those of the stages before it.
        unrecorded: arguments that cannot change any stage's result (default: `NOT_RESULT_ARGUMENTS`).
        files: what a run writes into its output folder: what starting over deletes.
    """

    stages: tuple[str, ...]
    first_used: dict[str, tuple[str, ...]]
    unrecorded: frozenset[str] = NOT_RESULT_ARGUMENTS
    files: tuple[str, ...] = ()

    def open(self, configs: Sequence[Any], start_over: bool = False, **fields) -> dict:
        """The report of the run in `output_dir` (of the `TrainingArguments` among `configs`), or a new one: an
        earlier run's (refused if its stages ran with other arguments, `check`; deleted first with `start_over`),
        updated with this run's command, environment (an earlier run's, where its stages are kept and it differs,
        under `earlier_environments`) and `fields`."""
        training_args = next(c for c in configs if isinstance(c, TrainingArguments))
        output_dir = Path(training_args.output_dir)
        if start_over:
            _start_over(training_args, self.files)
        report = run_report.load_report(output_dir / "report.json")
        self.check(report, configs, output_dir)
        environment = {**run_report.environment(), "processes": training_args.world_size}
        earlier = report.get("environment")
        if report["stages"] and earlier and earlier != environment:  # the stages kept ran with other versions
            report["earlier_environments"] = [e for e in report.get("earlier_environments", []) if e != earlier]
            report["earlier_environments"].append(earlier)
        # What this run skips, said again by each stage as it runs (an earlier run's reasons may no longer hold).
        report.update(command=current_command(), environment=environment, skipped={}, **fields)
        return report

    def record(self, stage: str, configs: Sequence[Any]) -> dict[str, Any]:
        """The arguments `stage` (and the stages it builds on) depends on, by flag name, as JSON values, taken from
        `configs` (the run's argument dataclasses, e.g. its `TrainingArguments`)."""
        later = {n for s in self.stages[self.stages.index(stage) + 1 :] for n in self.first_used.get(s, ())}
        values = {}
        for config in configs:
            for f in dataclasses.fields(config):
                if f.init and f.name not in self.unrecorded and f.name not in later:
                    values.setdefault(f.name, getattr(config, f.name))
            if isinstance(config, TrainingArguments):
                values.update(processes=config.world_size, device=config.device.type)
        return _as_json(values)

    def check(self, report: dict, configs: Sequence[Any], output_dir: Path) -> None:
        """Refuses to continue an earlier run's stages with other arguments: its results would sit beside the new
        arguments in the report and the card as if they had been measured with them."""
        recorded = report.get("stage_arguments", {})
        unrecorded = [stage for stage in report["stages"] if stage not in recorded]
        if unrecorded:
            raise SystemExit(
                f"{output_dir} holds stages {unrecorded} of an earlier run that did not record its arguments, so they "
                "cannot be continued safely. Start over with --overwrite_output_dir, or pass a new --output_dir."
            )
        defaults = None
        for stage, before in recorded.items():
            now = self.record(stage, configs)
            if any(k not in before for k in now):
                # recorded before the argument existed (or was recorded): it ran as the argument's default does
                defaults = _defaults(configs) if defaults is None else defaults
                before = {**{k: defaults[k] for k in now if k not in before and k in defaults}, **before}
            differ = {k: (before[k], now.get(k)) for k in before if before[k] != now.get(k)}
            if differ:
                listed = ", ".join(f"{_RUN_FACTS.get(k, '--' + k)} {a!r} -> {b!r}" for k, (a, b) in differ.items())
                raise SystemExit(
                    f"{output_dir} holds the {stage!r} stage of a run with other arguments ({listed}). Rerun with the "
                    "same arguments to continue it, or start over with --overwrite_output_dir (deletes that run's "
                    "stages), or pass a new --output_dir."
                )


def _as_json(values: dict[str, Any]) -> dict[str, Any]:
    values = {k: getattr(v, "value", v) for k, v in values.items()}  # enums (lr_scheduler_type, optim)
    return json.loads(json.dumps(values, default=str))


def _defaults(configs: Sequence[Any]) -> dict[str, Any]:
    """Every argument of `configs` at its default (as a dataclass built without arguments holds it, after its
    checks: `TrainingArguments` fills some fields in), as JSON values."""
    defaults = {}
    for config in configs:
        try:
            fresh = type(config)()
        except Exception:  # noqa: BLE001 - a dataclass whose checks need arguments: its declared defaults
            fresh = None
        for f in dataclasses.fields(config):
            if fresh is not None:
                defaults[f.name] = getattr(fresh, f.name)
            elif f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
    return _as_json(defaults)


def _start_over(training_args: TrainingArguments, names: Iterable[str]) -> None:
    """Deletes what an earlier run left in `output_dir` (`names`: the files and folders a run writes there), on the
    main process, before the others go on."""
    output_dir = Path(training_args.output_dir)
    with training_args.main_process_first(desc="starting over"):
        if training_args.process_index == 0:
            for name in names:
                path = output_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
                else:
                    continue
                logger.info("--overwrite_output_dir: deleted %s", path)


def whole_run_loss(trainer: Trainer, metrics: dict, resumed_step: int) -> dict:
    """`train_loss` over the whole run: the Trainer's covers only the steps of this `train()` call, so after a resume
    the earlier steps are added back from the logged losses (up to the last step logged before the checkpoint)."""
    steps_now = trainer.state.global_step - resumed_step
    if not resumed_step or metrics.get("train_loss") is None:
        return {"train_loss": metrics.get("train_loss"), "train_loss_steps": steps_now}
    total, covered, previous = 0.0, 0, 0
    for entry in trainer.state.log_history:
        if "loss" in entry and entry.get("step", 0) <= resumed_step:
            total += entry["loss"] * (entry["step"] - previous)
            covered, previous = entry["step"], entry["step"]
    total += metrics["train_loss"] * steps_now
    return {"train_loss": total / max(covered + steps_now, 1), "train_loss_steps": covered + steps_now}


@dataclass
class StagedRun:
    """What every stage of a run reads and adds to: the `TrainingArguments` and the report. A script subclasses it
    (a dataclass) with its data and its own arguments, sets `plan`, and returns its argument dataclasses from
    `configs()`."""

    training_args: TrainingArguments
    report: dict
    tokenizer: Any = None
    """Saved beside every model a stage saves."""

    plan: ClassVar[StagePlan]
    titles: ClassVar[Sequence[str]] = ()
    """The stages' names as the console banners number them."""
    result_key: ClassVar[str] = "f1"
    """The key a stage's evaluation adds to the report: a stage that has it is done."""

    def configs(self) -> tuple[Any, ...]:
        """The run's argument dataclasses, whose fields `plan` records."""
        return (self.training_args,)

    def load_model(self, folder: Path):
        """The model a stage saved in `folder`, as the script loads its models."""
        raise NotImplementedError(f"{type(self).__name__} must say how it loads a saved model (load_model).")

    @property
    def output_dir(self) -> Path:
        return Path(self.training_args.output_dir)

    @property
    def main_process(self) -> bool:
        return self.training_args.process_index == 0

    def done(self, stage: str, key: str | None = None) -> bool:
        return (key or self.result_key) in self.report["stages"].get(stage, {})

    def begin(self, stage: str) -> None:
        """Records the arguments `stage` runs with before it writes anything (checked when the run is continued)."""
        self.report.setdefault("stage_arguments", {})[stage] = self.plan.record(stage, self.configs())
        if self.main_process:
            run_report.save_report(self.report, self.output_dir)

    def record(self, stage: str, values: dict) -> None:
        """Adds `values` to the report's `stage` and saves it (main process), then waits for every process."""
        self.report["stages"][stage] = {**self.report["stages"].get(stage, {}), **values}
        if self.main_process:
            run_report.save_report(self.report, self.output_dir)
        self.barrier()

    def barrier(self) -> None:
        if self.training_args.world_size > 1:
            torch.distributed.barrier()

    def banner(self, number: int, title: str, what: str) -> None:
        """Announces a stage on the console (main process): its number, name and what it does."""
        if self.main_process:
            print(f"\n{'=' * 100}\nStage {number}/{len(self.titles)}: {title}\n  {what}\n{'=' * 100}", flush=True)

    def stage_args(self, **changes) -> TrainingArguments:
        """The `TrainingArguments` of a stage's Trainer: the run's, with `changes`."""
        # The script pushes its model itself, with its card; the stage trainers never push. Pinned memory needs an
        # accelerator: on a CPU, torch would warn about it for every DataLoader the stages create. The logged loss is
        # the real one (the Trainer's NaN filter would log a running mean instead), for NumericsCallback.
        pin = self.training_args.dataloader_pin_memory and self.training_args.device.type != "cpu"
        changes = {"push_to_hub": False, "dataloader_pin_memory": pin, "logging_nan_inf_filter": False, **changes}
        return dataclasses.replace(self.training_args, **changes)

    def train(
        self, model, name: str, dataset, callbacks=(), compute_loss_func=None, data_collator=None, **changes
    ) -> tuple[Trainer, dict]:
        """Trains `model` on `dataset` in `output_dir/name`, resuming from its last complete checkpoint there if a
        run was interrupted (a checkpoint half written when the run was killed is passed over, and written again).
        Returns the trainer and its metrics, with `train_loss` over the whole run (`whole_run_loss`) and the step
        it resumed from (0: from the start; the Trainer's runtime and throughput cover the steps after it).
        `data_collator`: the Trainer's (default: its own, for rows of equal length)."""
        output_dir = self.output_dir / name
        trainer = Trainer(
            model=model,
            args=self.stage_args(output_dir=str(output_dir), **changes),
            train_dataset=dataset,
            callbacks=[NumericsCallback(), *callbacks],
            compute_loss_func=compute_loss_func,
            data_collator=data_collator,
        )
        last, broken = last_complete_checkpoint(output_dir)
        for folder, problem in broken.items():
            logger.warning("Passing over %s, half written when a run stopped: %s.", folder, problem)
        if last:
            logger.info("Resuming %s from %s", name, last)
        metrics = trainer.train(resume_from_checkpoint=last).metrics
        resumed = int(last.rsplit("-", 1)[1]) if last else 0
        return trainer, {**metrics, **whole_run_loss(trainer, metrics, resumed), "resumed_from_step": resumed}

    def evaluate_with(self, model, dataset, compute_metrics, fp16: bool = False, **eval_args) -> dict:
        """Metrics of `model` (a plain module, never one a Trainer sharded: stages reload what they saved) on
        `dataset`, in fp16 where `fp16` and a GPU is present; `eval_dtype` says which. `eval_args` are
        `TrainingArguments` of the evaluation (e.g. `include_for_metrics=["inputs"]`)."""
        fp16 = fp16 and torch.cuda.is_available()
        if (fp16 and next(model.parameters()).dtype != torch.float16) or fsdp():
            # A copy: the Trainer's fp16_full_eval would cast the model itself, which trains on, and FSDP2 shards
            # the module it evaluates in place.
            dtype = {"dtype": torch.float16} if fp16 else {}
            model = copy.deepcopy(model).to(device=self.training_args.device, **dtype)
        trainer = Trainer(
            model=model,
            args=self.stage_args(output_dir=str(self.output_dir / "eval"), **eval_args),
            eval_dataset=dataset,
            compute_metrics=compute_metrics,
        )
        if fsdp():
            # Accelerate prepares a model for FSDP2 only together with an optimizer (evaluate() alone is refused):
            # shard the copy with one that never steps, and the Trainer evaluates it as prepared.
            trainer.accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
        result = {key.removeprefix("eval_"): value for key, value in trainer.evaluate().items()}
        result["eval_dtype"] = "fp16" if fp16 else str(next(model.parameters()).dtype).removeprefix("torch.")
        return result

    def trained(self, stage: str, folder: Path) -> bool:
        """Whether `stage` recorded its training and saved its model in `folder` (a rerun loads it instead)."""
        return (folder / "config.json").is_file() and self.done(stage, "train_seconds")

    def fine_tune(
        self, stage: str, model, name: str, dataset, folder: Path, values: dict | None = None, **train_kwargs
    ):
        """Trains `model` (`train`, in `output_dir/name`), saves it to `folder` and records under `stage` the seconds
        it took, its optimizer steps and epochs, the whole run's `train_loss`, the throughput, the peak GPU memory
        and `values` (after a resume, the seconds and throughput are those of the steps after `resumed_from_step`). Returns the model reloaded from `folder`: under FSDP2 the trained module holds sharded
        weights, which cannot be copied, pruned as a whole or evaluated in fp16; everywhere, the later stages then
        start from exactly what was saved."""
        self.peak_memory()
        start = time.perf_counter()
        trainer, metrics = self.train(model, name, dataset, **train_kwargs)
        trainer.save_model(str(folder))  # every process: FSDP gathers the weights
        if self.main_process and self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        self.barrier()
        model = self.load_model(folder)
        self.record(stage, {"train_seconds": time.perf_counter() - start, "train_loss": metrics["train_loss"],
                            "train_loss_steps": metrics["train_loss_steps"], "train_steps": trainer.state.global_step,
                            "train_epochs": trainer.state.epoch, "resumed_from_step": metrics["resumed_from_step"],
                            "train_samples_per_second": metrics.get("train_samples_per_second"),
                            **self.peak_memory(), **(values or {})})  # fmt: skip
        return model

    def peak_memory(self) -> dict:
        """Peak GPU memory of every rank since the last call (GiB), e.g. to see a sharded teacher."""
        if self.training_args.device.type != "cuda":
            return {}
        peak = torch.cuda.max_memory_allocated(self.training_args.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.training_args.device)
        return {"peak_gpu_memory_gib_by_rank": [round(p, 3) for p in gather_object(peak)]}


def set_up_logging(training_args: TrainingArguments, *names: str) -> None:
    """The script's and the library's progress (loggers `names` and `hf_sparse`) at INFO on the main process;
    `--log_level` also sets transformers'."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    log_level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(log_level)
    if training_args.log_level == "passive" and training_args.should_log:
        log_level = logging.INFO
    for name in (*names, "hf_sparse"):
        logging.getLogger(name).setLevel(log_level)


def fsdp() -> bool:
    """Whether `accelerate launch` started this process to train with FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
