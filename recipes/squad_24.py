"""The 2:4 workflow of PyTorch's BERT tutorial in one command: fine-tune a dense question-answering model, evaluate
it, prune it to 2:4, evaluate again (zero-shot), fine-tune with the masks held (recovery), evaluate, swap to sparse
kernels and time dense against 2:4, then write a report, plots and a model card.

    python recipes/squad_24.py                                  # offline default: small BERT, synthetic SQuAD data
    accelerate launch recipes/squad_24.py                       # the same on every process accelerate starts
    accelerate launch recipes/squad_24.py --preset tutorial     # bert-base-cased on SQuAD v1.1 (needs the Hub)
    python recipes/squad_24.py recipes/tutorial.yaml            # the same from a YAML/JSON file of arguments
    python recipes/squad_24.py --model_name_or_path ./my-bert --train_file train.json --validation_file dev.json

Arguments: `RecipeArguments` and `hf_sparse.SparsityConfig` below, and every `transformers.TrainingArguments`
(the dense and the recovery fine-tuning share them, as in the tutorial). Defaults come from `recipes/offline.yaml`,
or from the preset or config file given; explicit flags override them. `--output_dir` receives `dense/` and
`sparse/` (checkpoints with model cards), `report.json`, `report.md` and plots. A run that stops in any stage
continues where it stopped when started again with the same `--output_dir`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

import hf_sparse
import hf_sparse.checkpoint
import hf_sparse.squad
from hf_sparse import run_report
from hf_sparse._distributed import check_replicas_agree, gather_object, shut_down
from hf_sparse.calibration import calibration_sample
from hf_sparse.inference import semi_structured_support
from hf_sparse.numerics import NumericsCallback
from hf_sparse.squad.data import check_squad_inputs

logger = logging.getLogger("squad_24")

HERE = Path(__file__).resolve().parent
OFFLINE_DEFAULTS = HERE / "offline.yaml"
REAL_DATA_DEFAULTS = HERE / "real.yaml"
REAL_DATA_FLAGS = ("--model_name_or_path", "--dense_model_name_or_path", "--train_file", "--validation_file",
                   "--dataset_name")  # fmt: skip
"""Flags that mean real data: without a preset or config file, `recipes/real.yaml` gives the defaults."""
PRESETS = {"tutorial": HERE / "tutorial.yaml"}
"""Presets of defaults: YAML files of arguments beside this recipe."""
STAGES = ("Dense fine-tuning", "Zero-shot 2:4 pruning", "Recovery fine-tuning", "Sparse kernels and timing",
          "Report and model card")  # fmt: skip
"""The stages, in order; each announces itself with a banner."""


@dataclass
class RecipeArguments:
    """The recipe's own arguments: model, data, stages and timing (the rest are `SparsityConfig` and
    `TrainingArguments`)."""

    preset: str | None = field(
        default=None,
        metadata={
            "help": "Preset of defaults, a YAML file beside this recipe: 'tutorial' (recipes/tutorial.yaml) is "
            "PyTorch's 2:4 BERT tutorial (bert-base-cased, SQuAD v1.1, needs the Hub). Without a preset: "
            "recipes/offline.yaml, a small BERT trained from scratch on synthetic SQuAD-format data. Explicit "
            "arguments override the preset."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model to fine-tune (Hub id or folder). Default: a small BERT built from a config."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "When the model is built from a config (no --model_name_or_path): values to override, "
                  "e.g. 'hidden_size=256,num_hidden_layers=4,initializer_range=0.002'."},
    )  # fmt: skip
    dense_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An already fine-tuned dense QA model: skips the dense fine-tuning stage."},
    )
    dataset_name: str = field(
        default="synthetic",
        metadata={"help": "'synthetic' (offline, generated facts), or a Hub dataset in SQuAD format ('squad', "
                  "'squad_v2'). Ignored when --train_file / --validation_file are given."},
    )  # fmt: skip
    train_file: str | None = field(default=None, metadata={"help": "Local SQuAD-format JSON for training."})
    validation_file: str | None = field(default=None, metadata={"help": "Local SQuAD-format JSON for evaluation."})
    version_2_with_negative: bool = field(
        default=False, metadata={"help": "SQuAD v2: some questions have no answer (set for 'squad_v2')."}
    )
    max_seq_length: int = field(
        default=384,
        metadata={"help": "Tokens per feature (question + context window); the tutorial's 384 (offline.yaml: 48 for "
                  "the synthetic facts). Checked against the tokenizer, the model and the longest question before "
                  "anything runs."},
    )  # fmt: skip
    doc_stride: int = field(
        default=128, metadata={"help": "Overlap between the windows of a long context (offline.yaml: 16)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training questions."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many evaluation questions."}
    )
    synthetic_train_paragraphs: int = field(default=1000, metadata={"help": "Synthetic data: training paragraphs."})
    synthetic_eval_paragraphs: int = field(default=100, metadata={"help": "Synthetic data: evaluation paragraphs."})
    synthetic_facts_per_paragraph: int = field(default=3, metadata={"help": "Synthetic data: facts per paragraph."})
    recovery_max_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps of the recovery fine-tuning; unset (None): as many as the dense "
                  "fine-tuning (--max_steps / --num_train_epochs), as in the tutorial."},
    )  # fmt: skip
    recovery_num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "Epochs of the recovery fine-tuning when neither --recovery_max_steps nor --max_steps is "
                  "given. Default: as the dense fine-tuning."},
    )  # fmt: skip
    recovery_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the recovery fine-tuning. Default: --learning_rate."}
    )
    distill: bool = field(
        default=False,
        metadata={"help": "Recover with distillation from the dense model (logits, plus the task loss)."},
    )
    distill_hidden_weight: float = field(
        default=0.0,
        metadata={"help": "With --distill: weight of the MSE between every layer's hidden states of the sparse and "
                  "the dense model (0: logits only)."},
    )  # fmt: skip
    distill_unanswerable: bool = field(
        default=True,
        metadata={"help": "Without --version_2_with_negative, the training file's unanswerable questions are never "
                  "trained on as answers (a v1.1 model would learn to point at [CLS]); with --distill they feed the "
                  "recovery as inputs that only the distillation learns from (measured on all-MiniLM-L6-v2: about "
                  "+1.5 F1 at the same epochs, see the README). False leaves them out."},
    )  # fmt: skip
    timing_batch_sizes: list[int] = field(
        default_factory=lambda: [4, 16, 64, 256],
        metadata={"help": "Batch sizes at which dense and 2:4 are timed (GPU only)."},
    )
    timing_sequence_length: int = field(
        default=384,
        metadata={"help": "Sequence length of the timing stage (at most the model's max_position_embeddings)."},
    )
    timing_tune_seconds: float = field(
        default=2.0,
        metadata={"help": "Autotuning time per GEMM shape and token count in the timing stage (cached on disk; "
                  "more finds faster cuSPARSELt algorithms for large layers)."},
    )  # fmt: skip
    fp16_eval: bool = field(
        default=True, metadata={"help": "Evaluate in fp16 on a GPU, as the tutorial does (fp32 on a CPU)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over: delete the stages, checkpoints and report an earlier run left in --output_dir "
                  "(without it, a rerun continues them, and refuses if they ran with other arguments)."},
    )  # fmt: skip


def _read_config(path: Path) -> dict:
    with open(path) as f:
        values = yaml.safe_load(f) if path.suffix in (".yaml", ".yml") else __import__("json").load(f)
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: a config file holds one mapping of argument names to values.")
    if "preset" in values:
        raise SystemExit(f"{path}: 'preset' cannot be used in a config file; write the values out instead.")
    return values


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every argument's default."""


def parse_args(argv: list[str] | None = None):
    """Parses `RecipeArguments`, `SparsityConfig` and `TrainingArguments`: defaults from `recipes/offline.yaml`,
    from `--preset NAME`, or from a YAML/JSON file given first; then the command-line flags over them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(
        (RecipeArguments, hf_sparse.SparsityConfig, TrainingArguments),
        description=__doc__,
        epilog="Defaults shown are those in effect for this command line (recipes/offline.yaml, recipes/real.yaml "
        "with a model or data of your own, the preset or the config file); every flag overrides them.",
        formatter_class=_HelpFormatter,
    )
    real = any(a.split("=", 1)[0] in REAL_DATA_FLAGS for a in argv)
    defaults = REAL_DATA_DEFAULTS if real else OFFLINE_DEFAULTS
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        defaults = Path(argv.pop(0)).resolve()
    preset = None
    if "--preset" in argv:
        i = argv.index("--preset")
        preset = argv[i + 1] if i + 1 < len(argv) else None
    elif any(a.startswith("--preset=") for a in argv):
        preset = next(a for a in argv if a.startswith("--preset=")).split("=", 1)[1]
    if preset is not None:
        if preset not in PRESETS:
            raise SystemExit(f"--preset {preset!r} is unknown; choose one of {list(PRESETS)} or leave it out.")
        defaults = PRESETS[preset]
    parser.set_defaults(**_read_config(defaults))
    return parser.parse_args_into_dataclasses(argv)


# -- data and model ------------------------------------------------------------------------------------------------


def _on_hub(name: str) -> bool:
    return not os.path.exists(name)


def check_sources(args: RecipeArguments) -> None:
    """Fails at once, before any training, when a model or dataset must come from the Hub and cannot."""
    needed = []
    for what, name in (("model", args.model_name_or_path), ("dense model", args.dense_model_name_or_path)):
        if name and _on_hub(name):
            needed.append((what, name))
    if args.dataset_name != "synthetic" and not (args.train_file and args.validation_file):
        needed.append(("dataset", args.dataset_name))
    if not needed:
        return
    from huggingface_hub import constants

    reason = None
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        import socket
        from urllib.parse import urlparse

        host = urlparse(constants.ENDPOINT).hostname
        try:
            socket.create_connection((host, 443), timeout=5).close()
        except OSError as err:
            reason = f"{host} cannot be reached ({err})"
    if reason is None:
        return
    cached = []
    for what, name in needed:
        if what != "dataset":
            try:
                transformers.AutoConfig.from_pretrained(name, local_files_only=True)
                cached.append(name)
            except OSError:
                pass
    missing = [(w, n) for w, n in needed if n not in cached]
    if missing:
        listed = ", ".join(f"{w} '{n}'" for w, n in missing)
        raise SystemExit(
            f"{listed} must come from the Hub, but {reason}. Pass --model_name_or_path (or "
            "--dense_model_name_or_path) a local model folder and --train_file / --validation_file local SQuAD-format "
            "JSON files, or run without --preset for the offline default (python recipes/squad_24.py)."
        )


def check_arguments(args: RecipeArguments) -> None:
    """Fails at once on arguments that cannot work together."""
    if bool(args.train_file) != bool(args.validation_file):
        given, missing = (
            ("--train_file", "--validation_file") if args.train_file else ("--validation_file", "--train_file")
        )
        raise SystemExit(
            f"{given} was given without {missing}: pass both (local SQuAD-format JSON files), or neither to use "
            f"--dataset_name ({args.dataset_name!r})."
        )


def load_data(args: RecipeArguments):
    if args.train_file or args.validation_file:
        train, validation = (
            hf_sparse.squad.read_squad_json(args.train_file),
            hf_sparse.squad.read_squad_json(args.validation_file),
        )
    elif args.dataset_name == "synthetic":
        from hf_sparse.squad.data import squad_records

        facts = args.synthetic_facts_per_paragraph
        train = squad_records(hf_sparse.squad.synthetic_squad(args.synthetic_train_paragraphs, facts, seed=0))
        validation = squad_records(hf_sparse.squad.synthetic_squad(args.synthetic_eval_paragraphs, facts, seed=1))
    else:
        train = hf_sparse.squad.load_squad(args.dataset_name, split="train")
        validation = hf_sparse.squad.load_squad(args.dataset_name, split="validation")
    if args.max_train_samples is not None:
        train = (
            train[: args.max_train_samples] if isinstance(train, list) else train.select(range(args.max_train_samples))
        )
    if args.max_eval_samples is not None:
        validation = (
            validation[: args.max_eval_samples]
            if isinstance(validation, list)
            else validation.select(range(args.max_eval_samples))
        )
    return train, validation


def load_tokenizer(args: RecipeArguments):
    name = args.dense_model_name_or_path or args.model_name_or_path
    if name is None:
        return hf_sparse.squad.synthetic_tokenizer()
    return AutoTokenizer.from_pretrained(name)


def load_model(name_or_path):
    # fp32 master weights whatever the checkpoint's dtype (transformers 5 keeps an fp16 checkpoint in fp16, and pure
    # fp16 training overflows: NaN gradients from the first step); --fp16 / --bf16 add mixed precision on top.
    return AutoModelForQuestionAnswering.from_pretrained(name_or_path, dtype=torch.float32)


def new_model(args: RecipeArguments, tokenizer):
    if args.model_name_or_path is not None:
        return load_model(args.model_name_or_path)
    # The offline default: a small BERT, trained from scratch on the synthetic facts. Hidden size 32 so that 2:4
    # pruning costs something visible (at 128 the zero-shot F1 matched the dense one), at lr 1e-3 (offline.yaml) so
    # that a run lands within 1 F1 whatever the thread count (at 3e-3 runs spread over ~10 F1).
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=max(64, args.max_seq_length),
    )
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
    return BertForQuestionAnswering(config)


# -- what each stage ran with ---------------------------------------------------------------------------------------

_DATA_ARGUMENTS = ("model_name_or_path", "config_overrides", "dense_model_name_or_path", "dataset_name", "train_file",
                   "validation_file", "version_2_with_negative", "max_seq_length", "doc_stride", "max_train_samples",
                   "max_eval_samples", "synthetic_train_paragraphs", "synthetic_eval_paragraphs",
                   "synthetic_facts_per_paragraph", "fp16_eval")  # fmt: skip
_TRAINING_ARGUMENTS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                       "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "seed",
                       "data_seed", "per_device_train_batch_size", "gradient_accumulation_steps", "fp16", "bf16",
                       "optim", "label_smoothing_factor")  # fmt: skip
_RECOVERY_ARGUMENTS = ("recovery_max_steps", "recovery_num_train_epochs", "recovery_learning_rate", "distill",
                       "distill_hidden_weight", "distill_unanswerable")  # fmt: skip
STAGE_KEYS = ("dense", "pruned", "sparse", "swapped", "fp8", "fp8_dense")
"""The stages in order; each one's result depends on its own arguments and those of the stages before it."""
_RECIPE_FILES = ("dense", "dense-training", "sparse", "sparse-training", "eval", "report.json", "report.md",
                 "f1_by_stage.png", "latency.png")  # fmt: skip
"""What the recipe writes into --output_dir: what --overwrite_output_dir deletes."""


def stage_arguments(args: RecipeArguments, sparsity, training_args: TrainingArguments, stage: str) -> dict:
    """The arguments that `stage` (and the stages it builds on) depend on, by flag name, as JSON values."""
    values = {name: getattr(args, name) for name in _DATA_ARGUMENTS}
    values.update({name: getattr(training_args, name, None) for name in _TRAINING_ARGUMENTS})
    if STAGE_KEYS.index(stage) >= STAGE_KEYS.index("pruned"):
        values.update({k: v for k, v in sparsity.to_dict().items() if k not in ("log_per_layer", "swap_at_end")})
    if STAGE_KEYS.index(stage) >= STAGE_KEYS.index("sparse"):
        values.update({name: getattr(args, name) for name in _RECOVERY_ARGUMENTS})
    values = {k: getattr(v, "value", v) for k, v in values.items()}  # enums (lr_scheduler_type, optim)
    return json.loads(json.dumps(values, default=str))


def check_stage_arguments(report: dict, args: RecipeArguments, sparsity, training_args, output_dir: Path) -> None:
    """Refuses to continue an earlier run's stages with other arguments: its results would sit beside the new
    arguments in the report and the card as if they had been measured with them."""
    recorded = report.get("stage_arguments", {})
    unrecorded = [stage for stage in report["stages"] if stage not in recorded]
    if unrecorded:
        raise SystemExit(
            f"{output_dir} holds stages {unrecorded} of an earlier run that did not record its arguments, so they "
            "cannot be continued safely. Start over with --overwrite_output_dir, or pass a new --output_dir."
        )
    # an argument added after the earlier run recorded its stages: it ran as the argument's default does
    added = {f.name: f.default for f in dataclasses.fields(RecipeArguments) if f.default is not dataclasses.MISSING}
    for stage, before in recorded.items():
        now = stage_arguments(args, sparsity, training_args, stage)
        before = {**{k: added[k] for k in now if k not in before and k in added}, **before}
        differ = {
            k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)
        }
        if differ:
            listed = ", ".join(f"--{k} {a!r} -> {b!r}" for k, (a, b) in differ.items())
            raise SystemExit(
                f"{output_dir} holds the {stage!r} stage of a run with other arguments ({listed}). Rerun with the "
                "same arguments to continue it, or start over with --overwrite_output_dir (deletes that run's "
                "stages), or pass a new --output_dir."
            )


def start_over(training_args: TrainingArguments) -> None:
    """--overwrite_output_dir: deletes what an earlier run of the recipe left in output_dir (main process)."""
    output_dir = Path(training_args.output_dir)
    with training_args.main_process_first(desc="starting over"):
        if training_args.process_index == 0:
            for name in _RECIPE_FILES:
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


# -- one run -------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What every stage reads: the arguments, the tokenized data, and the report it adds to."""

    args: RecipeArguments
    sparsity: hf_sparse.SparsityConfig
    training_args: TrainingArguments
    report: dict
    tokenizer: Any
    examples: tuple[Any, Any]  # (train, evaluation) questions
    features: tuple[Any, Any]  # (train, evaluation) tokenized features
    distill_only: Any = None  # features of unanswerable training questions, for the recovery's distillation

    @property
    def output_dir(self) -> Path:
        return Path(self.training_args.output_dir)

    @property
    def main_process(self) -> bool:
        return self.training_args.process_index == 0

    def done(self, stage: str, key: str = "f1") -> bool:
        return key in self.report["stages"].get(stage, {})

    def begin(self, stage: str) -> None:
        """Records the arguments `stage` runs with before it writes anything (checked when the run is continued)."""
        values = stage_arguments(self.args, self.sparsity, self.training_args, stage)
        self.report.setdefault("stage_arguments", {})[stage] = values
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

    def stage_args(self, **changes) -> TrainingArguments:
        # The recipe pushes the sparse model itself, with its card; the stage trainers never push. Pinned memory
        # needs an accelerator: on a CPU, torch would warn about it for every DataLoader the stages create. The logged
        # loss is the real one (the Trainer's NaN filter would log a running mean instead), for NumericsCallback.
        pin = self.training_args.dataloader_pin_memory and self.training_args.device.type != "cpu"
        changes = {"push_to_hub": False, "dataloader_pin_memory": pin, "logging_nan_inf_filter": False, **changes}
        return dataclasses.replace(self.training_args, **changes)

    def banner(self, number: int, title: str, what: str) -> None:
        """Announces a stage on the console (main process): its number, name and what it does."""
        if self.main_process:
            print(f"\n{'=' * 100}\nStage {number}/{len(STAGES)}: {title}\n  {what}\n{'=' * 100}", flush=True)

    def evaluate(self, model) -> dict:
        """SQuAD metrics of `model`, a plain module (never one a Trainer sharded: stages reload what they saved)."""
        fp16 = self.args.fp16_eval and torch.cuda.is_available()
        if (fp16 and next(model.parameters()).dtype != torch.float16) or _fsdp():
            # A copy: the Trainer's fp16_full_eval would cast the model itself, which trains on, and FSDP2 shards
            # the module it evaluates in place.
            dtype = {"dtype": torch.float16} if fp16 else {}
            model = copy.deepcopy(model).to(device=self.training_args.device, **dtype)
        examples, features = self.examples[1], self.features[1]
        trainer = Trainer(
            model=model,
            # With the inputs, compute_metrics checks each feature's order by its input ids, not by labels alone
            args=self.stage_args(output_dir=str(self.output_dir / "eval"), include_for_metrics=["inputs"]),
            eval_dataset=features,
            compute_metrics=hf_sparse.squad.squad_compute_metrics(
                examples, features, version_2_with_negative=self.args.version_2_with_negative
            ),
        )
        if _fsdp():
            # Accelerate prepares a model for FSDP2 only together with an optimizer (evaluate() alone is refused):
            # shard the copy with one that never steps, and the Trainer evaluates it as prepared.
            trainer.accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
        result = {key.removeprefix("eval_"): value for key, value in trainer.evaluate().items()}
        result["eval_dtype"] = "fp16" if fp16 else str(next(model.parameters()).dtype).removeprefix("torch.")
        return result

    def train(
        self, model, name: str, callbacks=(), compute_loss_func=None, dataset=None, **changes
    ) -> tuple[Trainer, dict]:
        """Trains `model` in `output_dir/name` (on `dataset`, default the training features), resuming from its last
        complete checkpoint there if a run was interrupted (a checkpoint half written when the run was killed is
        passed over, and written again)."""
        output_dir = self.output_dir / name
        trainer = Trainer(
            model=model,
            args=self.stage_args(output_dir=str(output_dir), **changes),
            train_dataset=self.features[0] if dataset is None else dataset,
            callbacks=[NumericsCallback(), *callbacks],
            compute_loss_func=compute_loss_func,
        )
        last, broken = hf_sparse.checkpoint.last_complete_checkpoint(output_dir)
        for folder, problem in broken.items():
            logger.warning("Passing over %s, half written when a run stopped: %s.", folder, problem)
        if last:
            logger.info("Resuming %s from %s", name, last)
        metrics = trainer.train(resume_from_checkpoint=last).metrics
        return trainer, {**metrics, **whole_run_loss(trainer, metrics, int(last.rsplit("-", 1)[1]) if last else 0)}

    def save(self, trainer: Trainer, folder: Path):
        """Saves the trained model and returns it reloaded as a plain module: under FSDP2 the trained module holds
        sharded weights, which cannot be copied, pruned as a whole or evaluated in fp16; everywhere, the later
        stages then start from exactly what was saved."""
        trainer.save_model(str(folder))  # every process: FSDP gathers the weights
        if self.main_process:
            self.tokenizer.save_pretrained(folder)
        self.barrier()
        return load_model(folder)

    def peak_memory(self) -> dict:
        """Peak GPU memory of every rank since the last call (GiB), e.g. to see a sharded teacher."""
        if self.training_args.device.type != "cuda":
            return {}
        peak = torch.cuda.max_memory_allocated(self.training_args.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.training_args.device)
        return {"peak_gpu_memory_gib_by_rank": [round(p, 3) for p in gather_object(peak)]}


def prepare(args: RecipeArguments, sparsity, training_args: TrainingArguments) -> Run:
    """Checks the arguments and sources, reads and tokenizes the data, and opens the report (an earlier run's, if
    any, whose stages must have run with the same arguments)."""
    check_arguments(args)
    check_sources(args)
    if args.overwrite_output_dir:
        start_over(training_args)
    report = run_report.load_report(Path(training_args.output_dir) / "report.json")
    check_stage_arguments(report, args, sparsity, training_args, Path(training_args.output_dir))
    report.update(
        title=f"2:4 sparsity, {_data_name(args)}",
        command=hf_sparse.hub.current_command(),
        environment=run_report.environment(),
        arguments={"recipe": dataclasses.asdict(args), "sparsity": sparsity.to_dict()},
    )
    tokenizer = load_tokenizer(args)
    train_examples, eval_examples = load_data(args)
    # Tokenizer, lengths and data checked before anything trains (a long question or a v2 file fails here).
    checked = check_squad_inputs(tokenizer, {"train": train_examples, "validation": eval_examples},
                                 args.max_seq_length, args.doc_stride, _max_positions(args),
                                 args.version_2_with_negative)  # fmt: skip
    unanswered = []
    if not args.version_2_with_negative:
        train_examples, unanswered = hf_sparse.squad.split_unanswerable(train_examples)
        if len(unanswered):
            use = "feed the recovery's distillation only" if args.distill and args.distill_unanswerable else "left out"
            logger.info("%d unanswerable training questions: %s (not trained on as answers).", len(unanswered), use)
    distill_only = None
    with training_args.main_process_first(desc="tokenizing"):
        kw = dict(max_length=args.max_seq_length, doc_stride=args.doc_stride)
        train_features = hf_sparse.squad.tokenize_squad(train_examples, tokenizer, train=True, **kw)
        eval_features = hf_sparse.squad.tokenize_squad(eval_examples, tokenizer, train=False, **kw)
        if len(unanswered) and args.distill and args.distill_unanswerable:
            distill_only = hf_sparse.squad.distillation_features(
                hf_sparse.squad.tokenize_squad(unanswered, tokenizer, train=True, **kw), args.max_seq_length
            )
    report["data"] = {
        **checked,
        "train_questions": len(train_examples),
        "train_features": len(train_features),
        "unanswerable_train_questions": len(unanswered),
        "distillation_only_features": 0 if distill_only is None else len(distill_only),
        "eval_questions": len(eval_examples),
        "eval_features": len(eval_features),
    }
    return Run(args, sparsity, training_args, report, tokenizer, (train_examples, eval_examples),
               (train_features, eval_features), distill_only)  # fmt: skip


# -- the stages ----------------------------------------------------------------------------------------------------


def fine_tune_dense(run: Run):
    """1. Dense fine-tuning (or a given fine-tuned model)."""
    dense_dir = run.output_dir / "dense"
    steps = _steps(run.training_args.max_steps, run.training_args.num_train_epochs)
    run.banner(1, STAGES[0], f"load {run.args.dense_model_name_or_path} and evaluate it" if
               run.args.dense_model_name_or_path else f"train {_model_name(run.args)} densely for {steps} on "
               f"{_data_name(run.args)}, save it to {dense_dir} and evaluate it")  # fmt: skip
    run.begin("dense")
    if run.args.dense_model_name_or_path:
        dense = load_model(run.args.dense_model_name_or_path)
        run.report["skipped"]["dense fine-tuning"] = f"started from {run.args.dense_model_name_or_path}"
    elif (dense_dir / "config.json").is_file() and run.done("dense", "train_seconds"):
        logger.info("Dense model already fine-tuned in %s; skipping that stage.", dense_dir)
        dense = load_model(dense_dir)
    else:
        torch.manual_seed(run.training_args.seed)
        dense = new_model(run.args, run.tokenizer)
        run.peak_memory()
        start = time.perf_counter()
        trainer, metrics = run.train(dense, "dense-training")
        dense = run.save(trainer, dense_dir)
        run.record("dense", {"train_seconds": time.perf_counter() - start, "train_loss": metrics["train_loss"],
                             "train_loss_steps": metrics["train_loss_steps"], **_throughput(metrics),
                             **run.peak_memory()})  # fmt: skip
    if not run.done("dense"):
        run.record("dense", run.evaluate(dense))
    return dense


def prune_zero_shot(run: Run, dense):
    """2. Zero-shot: prune a copy of the dense model and evaluate it without training. With several processes,
    rank 0 calibrates and broadcasts its masks and weights (`compute_masks`); the masks' digests of every rank are
    compared and recorded."""
    run.banner(2, STAGES[1], f"prune a copy of the dense model to {run.sparsity.sparsity_pattern} by "
               f"{run.sparsity.criterion} and evaluate it without training")  # fmt: skip
    run.begin("pruned")
    pruned = copy.deepcopy(dense).to(run.training_args.device)
    calibration = None
    if run.sparsity.criterion != "magnitude":
        calibration = calibration_sample(run.features[0], run.sparsity, seed=run.training_args.seed)
    start = time.perf_counter()
    masks = hf_sparse.prune_(pruned, run.sparsity, calibration_data=calibration)
    seconds = time.perf_counter() - start
    digests = check_replicas_agree(masks, "after pruning")
    if not run.done("pruned"):
        values = {**run.evaluate(pruned), "prune_seconds": seconds, "mask_digests_by_rank": digests}
        rows = hf_sparse.sparsity_report(pruned, run.sparsity.n, run.sparsity.m, layers=list(masks))
        values["sparsity"], values["layers"] = hf_sparse.masks.total_sparsity(rows), len(masks)
        run.record("pruned", values)
    return pruned, masks


def recover(run: Run, dense, pruned, masks):
    """3. Recovery: fine-tune the pruned model with the masks of the criterion held exactly."""
    sparse_dir = run.output_dir / "sparse"
    changes = _recovery_changes(run)
    steps = _steps(changes.get("max_steps", run.training_args.max_steps),
                   changes.get("num_train_epochs", run.training_args.num_train_epochs))  # fmt: skip
    run.banner(3, STAGES[2], f"fine-tune the pruned model for {steps} with its masks held"
               f"{' and distillation from the dense model' if run.args.distill else ''}, save it to {sparse_dir} "
               "and evaluate it")  # fmt: skip
    run.begin("sparse")
    if (sparse_dir / "config.json").is_file() and run.done("sparse", "train_seconds"):
        logger.info("Sparse model already recovered in %s; skipping that stage.", sparse_dir)
        sparse = load_model(sparse_dir)
    else:
        loss = None
        if run.args.distill:
            loss = hf_sparse.DistillationLoss(dense, pruned, task_weight=1.0, hidden_layers="all",
                                              hidden_weight=run.args.distill_hidden_weight)  # fmt: skip
        # The criterion's own masks, held (so config.json and the card name the criterion that chose them).
        callback = hf_sparse.SparsityCallback(run.sparsity, masks=masks)
        run.peak_memory()
        start = time.perf_counter()
        dataset = None
        if loss is not None and run.distill_only is not None:  # unanswerable questions: distillation inputs only
            dataset = hf_sparse.squad.concatenate_features(run.features[0], run.distill_only)
        trainer, metrics = run.train(pruned, "sparse-training", [callback], compute_loss_func=loss, dataset=dataset,
                                     **changes)  # fmt: skip
        if loss is not None:
            loss.remove()  # its hook asks the student for hidden states; evaluation wants the logits only
        sparse = run.save(trainer, sparse_dir)
        run.record("sparse", {"train_seconds": time.perf_counter() - start, "train_loss": metrics["train_loss"],
                              "train_loss_steps": metrics["train_loss_steps"], "distilled": run.args.distill,
                              "recovery_features": len(run.features[0] if dataset is None else dataset),
                              "criterion": run.sparsity.criterion,
                              **_throughput(metrics), **run.peak_memory()})  # fmt: skip
    if not run.done("sparse"):
        values = run.evaluate(sparse)
        rows = hf_sparse.sparsity_report(sparse, run.sparsity.n, run.sparsity.m, layers=list(masks))
        values["sparsity"] = hf_sparse.masks.total_sparsity(rows)
        values["all_layers_exact"] = all(r.is_nm for r in rows)
        run.record("sparse", values)
    return sparse


def _recovery_changes(run: Run) -> dict:
    """TrainingArguments of the recovery that differ from the dense fine-tuning's."""
    args, changes = run.args, {}
    if args.recovery_learning_rate is not None:
        changes["learning_rate"] = args.recovery_learning_rate
    if args.recovery_max_steps is not None:
        changes["max_steps"] = args.recovery_max_steps
    elif args.recovery_num_train_epochs is not None and run.training_args.max_steps <= 0:
        changes["num_train_epochs"] = args.recovery_num_train_epochs
    return changes


def swap_and_time(run: Run, sparse) -> None:
    """4. GPU only: swap to sparse kernels, evaluate on them, and time dense against 2:4 (same process, same
    execution mode: CUDA graphs for both). On a GPU with FP8 (compute capability 8.9+), the same for FP8 2:4 kernels
    and the dense FP8 baseline, with static activation scales calibrated on training batches."""
    from hf_sparse.inference.fp8 import fp8_support_problem

    problem = semi_structured_support("cuda", torch.float16)
    fp8_problem = problem or fp8_support_problem("cuda")
    timed = "2:4" if fp8_problem else "2:4, FP8 2:4 and dense FP8"
    run.banner(4, STAGES[3], f"skipped: {problem}" if problem else "swap to 2:4 kernels, evaluate on them, "
               f"and time dense against {timed} at batch sizes {run.args.timing_batch_sizes}")  # fmt: skip
    if problem:
        run.report["skipped"]["swap and timing"] = problem
        return
    if fp8_problem:
        run.report["skipped"]["FP8 kernels"] = fp8_problem
    from hf_sparse.inference import benchmark

    run.begin("swapped")
    # Evaluate on the sparse kernels: the answers must match the masked dense model's (fp16 rounding aside).
    if not run.done("swapped") and _fsdp():
        run.report["skipped"]["sparse-kernel evaluation"] = "under FSDP the Trainer would shard the swapped weights"
    elif not run.done("swapped"):
        run.record("swapped", _evaluate_swapped(run, sparse))
    if not fp8_problem and not _fsdp():
        _evaluate_fp8(run, sparse)
    if run.main_process and "timing" not in run.report:
        seq_len = min(run.args.timing_sequence_length, sparse.config.max_position_embeddings)
        if seq_len < run.args.timing_sequence_length:
            logger.warning("Timing at sequence length %d, the model's max_position_embeddings.", seq_len)
        options = benchmark.options(
            model=str(run.output_dir / "sparse"), seq_len=seq_len, modes=["graphs"],
            variants=["dense", "2:4"] + ([] if fp8_problem else ["fp8", "fp8-dense"]),
            batch_sizes=run.args.timing_batch_sizes, tune_seconds=run.args.timing_tune_seconds,
            output_dir=str(run.output_dir),
        )  # fmt: skip
        result = benchmark.run(options)
        benchmark.plot(result, run.output_dir / "latency.png")
        run.report["timing"] = run_report.timing_from_benchmark(result, seq_len)
        run_report.save_report(run.report, run.output_dir)
    run.barrier()


def _evaluate_fp8(run: Run, sparse) -> None:
    """The recovered model on FP8 kernels: e4m3 2:4 (each layer the fastest of FP8 2:4, dense FP8 and fp16 at the
    evaluation's token count) and, as the baseline, dense FP8 for every layer; static activation scales from four
    batches of training features."""
    from hf_sparse.inference.fp8 import Fp8Config

    calibration = None
    for stage, sparse_kernels in (("fp8", True), ("fp8_dense", False)):
        run.begin(stage)
        if run.done(stage):
            continue
        if calibration is None:
            calibration = _calibration_batches(run, 4)
        run.record(
            stage, _evaluate_swapped(run, sparse, fp8=Fp8Config(calibration=calibration, sparse=sparse_kernels))
        )


def _evaluate_swapped(run: Run, sparse, fp8=False) -> dict:
    """SQuAD metrics of an fp16 copy of `sparse` swapped to sparse kernels (tuned at the evaluation's token count;
    `fp8`: an `Fp8Config`), with how many GEMMs ran on each kernel and how many ran GELU in their epilogue."""
    swapped = copy.deepcopy(sparse).to(device=run.training_args.device, dtype=torch.float16).eval()
    tokens = [run.training_args.per_device_eval_batch_size * run.args.max_seq_length]
    swap = hf_sparse.swap_to_semi_structured_(swapped, token_counts=tokens, fp8=fp8)
    values = run.evaluate(swapped)
    values["layers"] = {status: sum(1 for r in swap if r.status == status) for status in {r.status for r in swap}}
    if fp8:
        values["gelu_in_epilogue"] = sum("run in its epilogue" in r.reason for r in swap)
    return values


def _calibration_batches(run: Run, count: int) -> list[dict]:
    """The first `count` batches (evaluation batch size) of the training features, model inputs only, on the device."""
    features = run.features[0]
    names = [n for n in ("input_ids", "token_type_ids", "attention_mask") if n in features.column_names]
    size = run.training_args.per_device_eval_batch_size
    batches = []
    for start in range(0, min(len(features), count * size), size):
        rows = features[start : start + size]
        batches.append({n: torch.tensor(rows[n], device=run.training_args.device) for n in names})
    return batches


def write_card_and_push(run: Run) -> None:
    """5. The model card of the sparse model, and the push (main process)."""
    push = f", and push it to {run.training_args.hub_model_id}" if run.training_args.push_to_hub else ""
    run.banner(5, STAGES[4], f"write report.json, report.md and plots to {run.output_dir}, and the sparse model's "
               f"card{push}")  # fmt: skip
    if not run.main_process:
        return
    run_report.save_report(run.report, run.output_dir)
    sparse_dir = run.output_dir / "sparse"
    card = run_report.card_kwargs(run.report, run.output_dir)
    hf_sparse.hub.write_model_card(sparse_dir, **card)
    args = run.training_args
    if args.push_to_hub:
        hf_sparse.push_to_hub(sparse_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo,
                              revision=getattr(args, "hub_revision", None), **card)  # fmt: skip
    print((run.output_dir / "report.md").read_text())


def main(argv: list[str] | None = None) -> dict:
    args, sparsity, training_args = parse_args(argv)
    _set_up_logging(training_args)
    run = prepare(args, sparsity, training_args)
    dense = fine_tune_dense(run)
    pruned, masks = prune_zero_shot(run, dense)
    sparse = recover(run, dense, pruned, masks)
    swap_and_time(run, sparse)
    write_card_and_push(run)
    shut_down()
    return run.report


def _set_up_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # The recipe's and the library's progress at INFO on the main process; --log_level also sets transformers'.
    log_level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(log_level)
    if training_args.log_level == "passive" and training_args.should_log:
        log_level = logging.INFO
    for name in ("squad_24", "hf_sparse"):
        logging.getLogger(name).setLevel(log_level)


def _throughput(metrics: dict) -> dict:
    return {"train_samples_per_second": metrics.get("train_samples_per_second")}


def _fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def _steps(max_steps: int, epochs: float) -> str:
    return f"{max_steps} steps" if max_steps and max_steps > 0 else f"{epochs:g} epoch(s)"


def _model_name(args: RecipeArguments) -> str:
    return args.model_name_or_path or "a small BERT (built from a config, random weights)"


def _max_positions(args: RecipeArguments) -> int | None:
    name = args.dense_model_name_or_path or args.model_name_or_path
    if name is None:
        return None  # the offline default's model is built with room for max_seq_length
    return getattr(transformers.AutoConfig.from_pretrained(name), "max_position_embeddings", None)


def _data_name(args: RecipeArguments) -> str:
    if args.train_file:
        return Path(args.validation_file).name
    return "synthetic SQuAD-format facts" if args.dataset_name == "synthetic" else args.dataset_name


if __name__ == "__main__":
    main()
