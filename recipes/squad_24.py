"""The 2:4 workflow of PyTorch's BERT tutorial in one command: fine-tune a dense question-answering model, evaluate
it, prune it to 2:4, evaluate again (zero-shot), fine-tune with the masks held (recovery), evaluate, swap to sparse
kernels and time dense against 2:4, then write a report, plots and a model card.

    python recipes/squad_24.py                                  # offline default: small BERT, synthetic SQuAD data
    accelerate launch recipes/squad_24.py                       # the same on every process accelerate starts
    accelerate launch recipes/squad_24.py --preset tutorial     # bert-base-cased on SQuAD v1.1 (needs the Hub)
    python recipes/squad_24.py recipes/tutorial.yaml            # the same from a YAML/JSON file of arguments
    python recipes/squad_24.py --model_name_or_path ./my-bert --train_file train.json --validation_file dev.json

Arguments: `RecipeArguments` and `hf_sparse.SparsityConfig` below, and every `transformers.TrainingArguments`
(the dense and the recovery fine-tuning share them, as in the tutorial). Defaults come from `recipes/offline.yaml`
(`recipes/real.yaml` with a model or data of your own), or else from the preset and a config file given first, the
file's values over the preset's; explicit flags override them all. `--output_dir` receives `dense/` and
`sparse/` (checkpoints with model cards), `report.json`, `report.md` and plots. A run that stops in any stage
continues where it stopped when started again with the same `--output_dir`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    TrainingArguments,
)

import hf_sparse
import hf_sparse.squad
from hf_sparse import run_report, stages
from hf_sparse.calibration import calibration_sample
from hf_sparse.inference import semi_structured_support
from hf_sparse.parser import RecipeParser, check_hub_sources
from hf_sparse.squad.data import check_squad_inputs

logger = logging.getLogger("squad_24")

HERE = Path(__file__).resolve().parent
OFFLINE_DEFAULTS = HERE / "offline.yaml"
REAL_DATA_DEFAULTS = HERE / "real.yaml"
REAL_DATA_ARGUMENTS = ("model_name_or_path", "dense_model_name_or_path", "train_file", "validation_file",
                       "dataset_name")  # fmt: skip
"""Arguments that mean real data (`dataset_name` other than 'synthetic'): without a preset or config file,
`recipes/real.yaml` gives the defaults."""
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
            "recipes/offline.yaml, a small BERT trained from scratch on synthetic SQuAD-format data. A config file "
            "given first overrides the preset's values, and explicit arguments override both."
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
        default=None, metadata={"help": "An already fine-tuned dense QA model: skips the dense fine-tuning stage."}
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
                  "fine-tuning (--max_steps / --num_train_epochs), as in the tutorial. A --max_steps or "
                  "--num_train_epochs given without it unsets the defaults file's value."},
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
    timing_tune_seconds: float = field(default=2.0, metadata={"help": "Autotuning time per GEMM shape and token "
                                       "count in the timing stage (cached on disk; more finds faster algorithms)."})  # fmt: skip
    fp16_eval: bool = field(default=True, metadata={"help": "Evaluate in fp16 on a GPU, as the tutorial does."})
    cpu_threads: int | None = field(default=None, metadata={"help": "torch's CPU threads (torch.set_num_threads, over "
                                    "OMP_NUM_THREADS); offline.yaml: 1. Default: torch's choice."})  # fmt: skip
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over: delete the stages, checkpoints and report an earlier run left in --output_dir "
                  "(without it, a rerun continues them, and refuses if they ran with other arguments)."},
    )  # fmt: skip


def _default_file(given: dict) -> Path:
    """Without a preset or config file: the real-data defaults when the flags name a model or data of your own."""
    real = any(n in given for n in REAL_DATA_ARGUMENTS) and given.get("dataset_name") != "synthetic"
    return REAL_DATA_DEFAULTS if real else OFFLINE_DEFAULTS


def parse_args(argv: list[str] | None = None):
    """`RecipeArguments`, `SparsityConfig` and `TrainingArguments`: the flags over the preset, a YAML/JSON config file
    given first (its values over the preset's) or, with neither, `recipes/offline.yaml` (`recipes/real.yaml` when a
    flag names a model or data of your own)."""
    parser = RecipeParser(
        (RecipeArguments, hf_sparse.SparsityConfig, TrainingArguments), presets=PRESETS, default_file=_default_file,
        # The recovery's length in a file goes with that file's dense length: --max_steps alone sets both.
        linked=[(("max_steps", "num_train_epochs"), ("recovery_max_steps", "recovery_num_train_epochs"))],
        description=__doc__, epilog="Defaults shown are those in effect for this command line: recipes/offline.yaml, "
        "recipes/real.yaml with a model or data of your own, or the preset with the config file's values over it; "
        "every flag overrides them.",
    )  # fmt: skip
    return parser.parse(argv)


# -- data and model ------------------------------------------------------------------------------------------------


def check_sources(args: RecipeArguments) -> None:
    """Fails at once, before any training, when a model or dataset must come from the Hub and cannot."""
    needed = [("model", args.model_name_or_path), ("dense model", args.dense_model_name_or_path)]
    if args.dataset_name != "synthetic" and not (args.train_file and args.validation_file):
        needed.append(("dataset", args.dataset_name))
    check_hub_sources(needed, "Pass --model_name_or_path (or --dense_model_name_or_path) a local model folder and "
                      "--train_file / --validation_file local SQuAD-format JSON files, or run without --preset for "
                      "the offline default (python recipes/squad_24.py).")  # fmt: skip


def check_arguments(args: RecipeArguments, sparsity) -> None:
    """Fails at once on arguments that cannot work together."""
    if sparsity.criterion == "learned":  # learn_masks runs in recipes/llm_24.py; here, SparsityCallback(masks=...)
        raise SystemExit("--criterion learned: this recipe has no mask-learning stage; choose magnitude, wanda or "
                         "sparsegpt (recipes/llm_24.py learns masks, or see hf_sparse.learn_masks).")  # fmt: skip
    if bool(args.train_file) != bool(args.validation_file):
        given, missing = ("--train_file", "--validation_file")[:: 1 if args.train_file else -1]
        raise SystemExit(
            f"{given} was given without {missing}: pass both (local SQuAD-format JSON files), or neither to use "
            f"--dataset_name ({args.dataset_name!r})."
        )


def load_data(args: RecipeArguments):
    if args.train_file or args.validation_file:
        train, validation = (hf_sparse.squad.read_squad_json(f) for f in (args.train_file, args.validation_file))
    elif args.dataset_name == "synthetic":
        from hf_sparse.squad.data import squad_records

        facts = args.synthetic_facts_per_paragraph
        train = squad_records(hf_sparse.squad.synthetic_squad(args.synthetic_train_paragraphs, facts, seed=0))
        validation = squad_records(hf_sparse.squad.synthetic_squad(args.synthetic_eval_paragraphs, facts, seed=1))
    else:
        train = hf_sparse.squad.load_squad(args.dataset_name, split="train")
        validation = hf_sparse.squad.load_squad(args.dataset_name, split="validation")
    return _first(train, args.max_train_samples), _first(validation, args.max_eval_samples)


def _first(questions, count: int | None):
    if count is None:
        return questions
    return questions[:count] if isinstance(questions, list) else questions.select(range(min(count, len(questions))))


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
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=max(64, args.max_seq_length))  # fmt: skip
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
    return BertForQuestionAnswering(config)


# -- what each stage ran with ---------------------------------------------------------------------------------------

PLAN = stages.StagePlan(
    stages=("dense", "pruned", "sparse", "swapped", "fp8", "fp8_dense", "timing"),
    first_used={
        "pruned": tuple(f.name for f in dataclasses.fields(hf_sparse.SparsityConfig)),
        "sparse": ("recovery_max_steps", "recovery_num_train_epochs", "recovery_learning_rate", "distill",
                   "distill_hidden_weight", "distill_unanswerable"),
        "swapped": ("per_device_eval_batch_size",),  # the token count kernels are tuned at; FP8 calibration batches
        "timing": ("timing_batch_sizes", "timing_sequence_length", "timing_tune_seconds"),
    },
    # Besides the TrainingArguments that cannot change a result: the preset only gives defaults (the values are
    # recorded), the sparse model is saved as a plain checkpoint whether or not it is swapped at the end, and the
    # CPU threads change results no more than another CPU does (the report's environment records them).
    unrecorded=stages.NOT_RESULT_ARGUMENTS | {"preset", "overwrite_output_dir", "log_per_layer", "swap_at_end",
                                              "cpu_threads"},
    files=("dense", "dense-training", "sparse", "sparse-training", "eval", "report.json", "report.md",
           "f1_by_stage.png", "latency.png"),
)  # fmt: skip
"""The stages in order; every argument is recorded with the stages it can change (all from the first, except those
`first_used` later), and checked when a run is continued. `files`: what the recipe writes into --output_dir (what
--overwrite_output_dir deletes)."""


# -- one run -------------------------------------------------------------------------------------------------------


@dataclass
class Run(stages.StagedRun):
    """What every stage reads: the arguments, the tokenized data, and the report it adds to (`hf_sparse.stages`
    records what each stage ran with, and resumes training)."""

    plan: ClassVar[stages.StagePlan] = PLAN
    titles: ClassVar[tuple[str, ...]] = STAGES
    args: RecipeArguments = None
    sparsity: hf_sparse.SparsityConfig = None
    examples: tuple[Any, Any] = (None, None)  # (train, evaluation) questions
    features: tuple[Any, Any] = (None, None)  # (train, evaluation) tokenized features
    distill_only: Any = None  # features of unanswerable training questions, for the recovery's distillation

    def configs(self) -> tuple:
        return (self.args, self.sparsity, self.training_args)

    def evaluate(self, model) -> dict:
        """SQuAD metrics of `model` on the evaluation features (fp16 on a GPU with --fp16_eval); with the inputs,
        compute_metrics checks each feature's order by its input ids, not by its labels alone."""
        metrics = hf_sparse.squad.squad_compute_metrics(
            self.examples[1], self.features[1], version_2_with_negative=self.args.version_2_with_negative
        )
        return self.evaluate_with(
            model, self.features[1], metrics, self.args.fp16_eval, include_for_metrics=["inputs"]
        )

    def load_model(self, folder: Path):
        return load_model(folder)


def prepare(args: RecipeArguments, sparsity, training_args: TrainingArguments) -> Run:
    """Checks the arguments and sources, reads and tokenizes the data, and opens the report (an earlier run's, if
    any, whose stages must have run with the same arguments)."""
    check_arguments(args, sparsity)
    check_sources(args)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    report = PLAN.open((args, sparsity, training_args), start_over=args.overwrite_output_dir,
                       title=f"2:4 sparsity, {_data_name(args)}",
                       arguments={"recipe": dataclasses.asdict(args), "sparsity": sparsity.to_dict()})  # fmt: skip
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
    report["data"] = {**checked, "train_questions": len(train_examples), "train_features": len(train_features),
                      "unanswerable_train_questions": len(unanswered),
                      "distillation_only_features": 0 if distill_only is None else len(distill_only),
                      "eval_questions": len(eval_examples), "eval_features": len(eval_features)}  # fmt: skip
    return Run(training_args, report, args=args, sparsity=sparsity, tokenizer=tokenizer,
               examples=(train_examples, eval_examples), features=(train_features, eval_features),
               distill_only=distill_only)  # fmt: skip


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
    elif run.trained("dense", dense_dir):
        logger.info("Dense model already fine-tuned in %s; skipping that stage.", dense_dir)
        dense = load_model(dense_dir)
    else:
        torch.manual_seed(run.training_args.seed)
        dense = new_model(run.args, run.tokenizer)
        dense = run.fine_tune("dense", dense, "dense-training", run.features[0], dense_dir)
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
    calibration, chosen_by = None, run.sparsity
    if run.sparsity.criterion != "magnitude":
        calibration = calibration_sample(run.features[0], run.sparsity, seed=run.training_args.seed)
        # config.json and the card record how many features calibrated, not how many were asked for
        chosen_by = dataclasses.replace(run.sparsity, calibration_samples=len(calibration))
    start = time.perf_counter()
    masks = hf_sparse.prune_(pruned, chosen_by, calibration_data=calibration)
    seconds = time.perf_counter() - start
    digests = stages.check_replicas_agree(masks, "after pruning")
    if not run.done("pruned"):
        values = {**run.evaluate(pruned), "prune_seconds": seconds, "mask_digests_by_rank": digests}
        rows = hf_sparse.sparsity_report(pruned, run.sparsity.n, run.sparsity.m, layers=list(masks))
        values["sparsity"], values["layers"] = hf_sparse.masks.total_sparsity(rows), len(masks)
        values["calibration_samples"] = 0 if calibration is None else len(calibration)
        run.record("pruned", values)
    return pruned, masks, chosen_by


def recover(run: Run, dense, pruned, masks, chosen_by):
    """3. Recovery: fine-tune the pruned model with the masks of the criterion held exactly (`chosen_by`: the config
    that chose them)."""
    sparse_dir = run.output_dir / "sparse"
    changes = _recovery_changes(run)
    steps = _steps(changes.get("max_steps", run.training_args.max_steps),
                   changes.get("num_train_epochs", run.training_args.num_train_epochs))  # fmt: skip
    run.banner(3, STAGES[2], f"fine-tune the pruned model for {steps} with its masks held"
               f"{' and distillation from the dense model' if run.args.distill else ''}, save it to {sparse_dir} "
               "and evaluate it")  # fmt: skip
    run.begin("sparse")
    if run.trained("sparse", sparse_dir):
        logger.info("Sparse model already recovered in %s; skipping that stage.", sparse_dir)
        sparse = load_model(sparse_dir)
    else:
        loss = None
        if run.args.distill:
            # The Trainer leaves a compute_loss_func's loss undivided by the accumulation: the loss divides itself.
            loss = hf_sparse.DistillationLoss(
                dense, pruned, task_weight=1.0, hidden_layers="all", hidden_weight=run.args.distill_hidden_weight,
                gradient_accumulation_steps=run.training_args.gradient_accumulation_steps,
            )  # fmt: skip
        # The criterion's own masks, held (so config.json and the card name the criterion that chose them).
        callback = hf_sparse.SparsityCallback(chosen_by, masks=masks)
        dataset = run.features[0]
        if loss is not None and run.distill_only is not None:  # unanswerable questions: distillation inputs only
            dataset = hf_sparse.squad.concatenate_features(run.features[0], run.distill_only)
        values = {
            "distilled": run.args.distill,
            "recovery_features": len(dataset),
            "criterion": run.sparsity.criterion,
        }
        sparse = run.fine_tune("sparse", pruned, "sparse-training", dataset, sparse_dir, values, callbacks=[callback],
                               compute_loss_func=loss, **changes)  # fmt: skip
        if loss is not None:
            loss.remove()  # its hook asks the student for hidden states; the pruned model is not used again
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
    if not run.done("swapped") and stages.fsdp():
        run.report["skipped"]["sparse-kernel evaluation"] = "under FSDP the Trainer would shard the swapped weights"
    elif not run.done("swapped"):
        run.record("swapped", _evaluate_swapped(run, sparse))
    if not fp8_problem and not stages.fsdp():
        _evaluate_fp8(run, sparse)
    run.begin("timing")
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
    if run.main_process:
        run_report.write_card_and_push(run.report, run.output_dir, run.output_dir / "sparse", run.training_args)
        print((run.output_dir / "report.md").read_text())


def main(argv: list[str] | None = None) -> dict:
    args, sparsity, training_args = parse_args(argv)
    stages.set_up_logging(training_args, "squad_24")
    run = prepare(args, sparsity, training_args)
    dense = fine_tune_dense(run)
    pruned, masks, chosen_by = prune_zero_shot(run, dense)
    sparse = recover(run, dense, pruned, masks, chosen_by)
    swap_and_time(run, sparse)
    write_card_and_push(run)
    stages.shut_down()
    return run.report


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
