"""The 2:4 workflow of PyTorch's BERT tutorial in one command: fine-tune a dense question-answering model, evaluate
it, prune it to 2:4, evaluate again (zero-shot), fine-tune with the masks held (recovery), evaluate, swap to sparse
kernels and time dense against 2:4, then write a report, plots and a model card.

    python recipes/squad_24.py                                  # offline default: small BERT, synthetic SQuAD data
    accelerate launch recipes/squad_24.py                       # the same on every process accelerate starts
    accelerate launch recipes/squad_24.py --preset tutorial     # bert-base-cased on SQuAD v1.1 (needs the Hub)
    python recipes/squad_24.py recipes/tutorial.yaml            # any of the arguments below from a YAML/JSON file
    python recipes/squad_24.py --model_name_or_path ./my-bert --train_file train.json --validation_file dev.json

Arguments: `RecipeArguments` and `hf_sparse.SparsityConfig` below, and every `transformers.TrainingArguments`
(the dense and the recovery fine-tuning share them, as in the tutorial). `--output_dir` receives `dense/` and
`sparse/` (checkpoints with model cards), `report.json`, `report.md` and plots. A run that stops in any stage
continues where it stopped when started again with the same `--output_dir`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

import hf_sparse
from hf_sparse.report import environment, load_report, save_report

logger = logging.getLogger("squad_24")

# The embedded default: small enough to finish on a 2-core CPU in a few minutes, learnable enough that the F1 of
# each stage means something.
OFFLINE_DEFAULTS = dict(
    output_dir="runs/squad_24",
    learning_rate=3e-3,
    weight_decay=0.1,
    warmup_steps=50,
    max_steps=1200,
    recovery_max_steps=300,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=128,
    logging_steps=50,
    save_steps=200,
    save_total_limit=1,
    report_to="none",
    seed=0,
)
PRESETS = {
    # PyTorch's tutorial: bert-base-cased, SQuAD v1.1, seq 384, 1 epoch, batch 64 / 512, constant lr, fp16 eval.
    "tutorial": dict(
        model_name_or_path="bert-base-cased",
        dataset_name="squad",
        max_seq_length=384,
        doc_stride=128,
        output_dir="runs/squad_24_tutorial",
        num_train_epochs=1,
        max_steps=-1,
        learning_rate=3e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=64,
        per_device_eval_batch_size=512,
        timing_batch_sizes=[4, 16, 64, 256],
        logging_steps=100,
        save_steps=500,
        save_total_limit=2,
        report_to="none",
        seed=0,
    ),
}


@dataclass
class RecipeArguments:
    """The recipe's own arguments: model, data, stages and timing (the rest are `SparsityConfig` and
    `TrainingArguments`)."""

    preset: str | None = field(
        default=None,
        metadata={
            "help": f"Preset of defaults: {', '.join(PRESETS)}. 'tutorial' is PyTorch's 2:4 BERT tutorial "
            "(bert-base-cased, SQuAD v1.1, needs the Hub). Without a preset: the offline default, a small BERT "
            "trained from scratch on synthetic SQuAD-format data. Explicit arguments override the preset."
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
    max_seq_length: int = field(default=48, metadata={"help": "Tokens per feature (question + context window)."})
    doc_stride: int = field(default=16, metadata={"help": "Overlap between the windows of a long context."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training questions."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many evaluation questions."}
    )
    synthetic_train_paragraphs: int = field(default=1000, metadata={"help": "Synthetic data: training paragraphs."})
    synthetic_eval_paragraphs: int = field(default=100, metadata={"help": "Synthetic data: evaluation paragraphs."})
    synthetic_facts_per_paragraph: int = field(default=3, metadata={"help": "Synthetic data: facts per paragraph."})
    recovery_max_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps of the recovery fine-tuning. Default: as the dense fine-tuning "
                  "(--max_steps / --num_train_epochs), as in the tutorial."},
    )  # fmt: skip
    distill: bool = field(
        default=False,
        metadata={"help": "Recover with distillation from the dense model (logits, plus the task loss)."},
    )
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


def parse_args(argv: list[str] | None = None):
    """Parses `RecipeArguments`, `SparsityConfig` and `TrainingArguments` from the command line or one YAML/JSON
    file, with the defaults of the chosen preset (or of the offline default)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((RecipeArguments, hf_sparse.SparsityConfig, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        path = os.path.abspath(argv[0])
        values = parser.parse_yaml_file(path) if path.endswith(("yaml", "yml")) else parser.parse_json_file(path)
        recipe = values[0]
        if recipe.preset is not None:
            raise ValueError(f"{argv[0]}: 'preset' cannot be used in a config file; write the values out instead.")
        return values
    preset = None
    if "--preset" in argv:
        i = argv.index("--preset")
        preset = argv[i + 1] if i + 1 < len(argv) else None
    elif any(a.startswith("--preset=") for a in argv):
        preset = next(a for a in argv if a.startswith("--preset=")).split("=", 1)[1]
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"--preset {preset!r} is unknown; choose one of {list(PRESETS)} or leave it out.")
    parser.set_defaults(**(PRESETS[preset] if preset else OFFLINE_DEFAULTS))
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


def load_data(args: RecipeArguments):
    if args.train_file or args.validation_file:
        if not (args.train_file and args.validation_file):
            raise SystemExit("Pass both --train_file and --validation_file (local SQuAD-format JSON files).")
        train, validation = hf_sparse.read_squad_json(args.train_file), hf_sparse.read_squad_json(args.validation_file)
    elif args.dataset_name == "synthetic":
        from hf_sparse.data import squad_records

        facts = args.synthetic_facts_per_paragraph
        train = squad_records(hf_sparse.synthetic_squad(args.synthetic_train_paragraphs, facts, seed=0))
        validation = squad_records(hf_sparse.synthetic_squad(args.synthetic_eval_paragraphs, facts, seed=1))
    else:
        train = hf_sparse.load_squad(args.dataset_name, split="train")
        validation = hf_sparse.load_squad(args.dataset_name, split="validation")
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
        return hf_sparse.synthetic_tokenizer()
    return AutoTokenizer.from_pretrained(name)


def new_model(args: RecipeArguments, tokenizer):
    if args.model_name_or_path is not None:
        return AutoModelForQuestionAnswering.from_pretrained(args.model_name_or_path)
    # The offline default: a small BERT, trained from scratch on the synthetic facts.
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=max(64, args.max_seq_length),
    )
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
    return BertForQuestionAnswering(config)


# -- stages --------------------------------------------------------------------------------------------------------


def stage_args(training_args: TrainingArguments, output_dir: Path) -> TrainingArguments:
    # The recipe pushes the sparse model itself, with its card; the stage trainers never push.
    return dataclasses.replace(training_args, output_dir=str(output_dir), push_to_hub=False)


def evaluate(model, args: RecipeArguments, training_args, output_dir: Path, features, examples) -> dict:
    fp16 = args.fp16_eval and torch.cuda.is_available()
    if fp16 and next(model.parameters()).dtype != torch.float16:
        # A half-precision copy: the Trainer's fp16_full_eval would cast the model itself, which trains on after.
        model = copy.deepcopy(model).to(device=training_args.device, dtype=torch.float16)
    trainer = Trainer(
        model=model,
        args=stage_args(training_args, output_dir),
        eval_dataset=features,
        compute_metrics=hf_sparse.squad_compute_metrics(
            examples, features, version_2_with_negative=args.version_2_with_negative
        ),
    )
    metrics = trainer.evaluate()
    result = {key.removeprefix("eval_"): value for key, value in metrics.items()}
    result["eval_dtype"] = "fp16" if fp16 else str(next(model.parameters()).dtype).removeprefix("torch.")
    return result


def train(model, training_args, output_dir: Path, train_features, callbacks=(), compute_loss_func=None):
    trainer = Trainer(
        model=model,
        args=stage_args(training_args, output_dir),
        train_dataset=train_features,
        callbacks=list(callbacks),
        compute_loss_func=compute_loss_func,
    )
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last:
        logger.info("Resuming %s from %s", output_dir.name, last)
    result = trainer.train(resume_from_checkpoint=last)
    return trainer, result.metrics


def main(argv: list[str] | None = None) -> dict:
    args, sparsity, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # The recipe's and the library's progress at INFO on the main process; --log_level also sets transformers'.
    log_level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(log_level)
    if training_args.log_level == "passive" and training_args.should_log:
        log_level = logging.INFO
    for name in ("squad_24", "hf_sparse"):
        logging.getLogger(name).setLevel(log_level)
    main_process = training_args.process_index == 0

    check_sources(args)
    output_dir = Path(training_args.output_dir)
    report = load_report(output_dir / "report.json")
    report.update(
        title=f"2:4 sparsity, {_data_name(args)}",
        command=hf_sparse.hub.current_command(),
        environment=environment(),
        arguments={"recipe": dataclasses.asdict(args), "sparsity": sparsity.to_dict()},
    )

    tokenizer = load_tokenizer(args)
    train_examples, eval_examples = load_data(args)
    with training_args.main_process_first(desc="tokenizing"):
        kw = dict(max_length=args.max_seq_length, doc_stride=args.doc_stride)
        train_features = hf_sparse.tokenize_squad(train_examples, tokenizer, train=True, **kw)
        eval_features = hf_sparse.tokenize_squad(eval_examples, tokenizer, train=False, **kw)
    report["data"] = {
        "train_questions": len(train_examples),
        "train_features": len(train_features),
        "eval_questions": len(eval_examples),
        "eval_features": len(eval_features),
    }

    def record(stage: str, values: dict) -> None:
        report["stages"][stage] = {**report["stages"].get(stage, {}), **values}
        if main_process:
            save_report(report, output_dir)
        _barrier(training_args)

    # 1. Dense fine-tuning (or a given fine-tuned model).
    dense_dir = output_dir / "dense"
    if args.dense_model_name_or_path:
        dense = AutoModelForQuestionAnswering.from_pretrained(args.dense_model_name_or_path)
        report["skipped"]["dense fine-tuning"] = f"started from {args.dense_model_name_or_path}"
    elif (dense_dir / "config.json").is_file() and "dense" in report["stages"]:
        logger.info("Dense model already fine-tuned in %s; skipping that stage.", dense_dir)
        dense = AutoModelForQuestionAnswering.from_pretrained(dense_dir)
    else:
        torch.manual_seed(training_args.seed)
        dense = new_model(args, tokenizer)
        start = time.perf_counter()
        trainer, metrics = train(dense, training_args, output_dir / "dense-training", train_features)
        trainer.save_model(str(dense_dir))  # every process: FSDP gathers the weights
        if main_process:
            tokenizer.save_pretrained(dense_dir)
        record("dense", {"train_seconds": time.perf_counter() - start, "train_loss": metrics.get("train_loss")})
    if "f1" not in report["stages"].get("dense", {}):
        record("dense", evaluate(dense, args, training_args, output_dir / "eval", eval_features, eval_examples))

    # 2. Zero-shot: prune the dense model and evaluate it without training.
    sparse_dir = output_dir / "sparse"
    pruned = copy.deepcopy(dense)
    calibration = None
    if sparsity.criterion != "magnitude":
        calibration = [train_features[i] for i in range(min(len(train_features), 128))]
    masks = hf_sparse.prune_(pruned, sparsity, calibration_data=calibration)
    if "f1" not in report["stages"].get("pruned", {}):
        values = evaluate(pruned, args, training_args, output_dir / "eval", eval_features, eval_examples)
        rows = hf_sparse.sparsity_report(pruned, sparsity.n, sparsity.m, layers=list(masks))
        values["sparsity"], values["layers"] = hf_sparse.total_sparsity(rows), len(masks)
        record("pruned", values)

    # 3. Recovery: fine-tune the pruned model with its masks held exactly (the masks of the weights' nonzeros).
    if (sparse_dir / "config.json").is_file() and "sparse" in report["stages"]:
        logger.info("Sparse model already recovered in %s; skipping that stage.", sparse_dir)
        sparse = AutoModelForQuestionAnswering.from_pretrained(sparse_dir)
    else:
        recovery = dataclasses.replace(sparsity, criterion="magnitude")
        loss = hf_sparse.distillation_loss(dense, pruned, task_weight=1.0) if args.distill else None
        start = time.perf_counter()
        recovery_args = training_args
        if args.recovery_max_steps is not None:
            recovery_args = dataclasses.replace(training_args, max_steps=args.recovery_max_steps)
        trainer, metrics = train(
            pruned,
            recovery_args,
            output_dir / "sparse-training",
            train_features,
            callbacks=[hf_sparse.SparsityCallback(recovery)],
            compute_loss_func=loss,
        )
        sparse = pruned
        trainer.save_model(str(sparse_dir))
        if main_process:
            tokenizer.save_pretrained(sparse_dir)
        record("sparse", {"train_seconds": time.perf_counter() - start, "train_loss": metrics.get("train_loss"),
                          "distilled": args.distill})  # fmt: skip
    if "f1" not in report["stages"].get("sparse", {}):
        values = evaluate(sparse, args, training_args, output_dir / "eval", eval_features, eval_examples)
        report_rows = hf_sparse.sparsity_report(sparse, sparsity.n, sparsity.m, layers=list(masks))
        values["sparsity"] = hf_sparse.total_sparsity(report_rows)
        values["all_layers_exact"] = all(r.is_nm for r in report_rows)
        record("sparse", values)

    # 4. GPU only: swap to sparse kernels, evaluate on them, and time dense against 2:4.
    gpu_problem = _gpu_problem()
    if gpu_problem:
        report["skipped"]["swap and timing"] = gpu_problem
    else:
        _swap_and_time(args, training_args, report, record, sparse, output_dir, eval_features, eval_examples)

    # 5. The model card, and the push.
    if main_process:
        save_report(report, output_dir)
        card = _card_kwargs(args, report, output_dir)
        hf_sparse.write_model_card(sparse_dir, **card)
        if training_args.push_to_hub:
            hf_sparse.push_to_hub(
                sparse_dir,
                training_args.hub_model_id,
                token=training_args.hub_token,
                private=training_args.hub_private_repo,
                revision=getattr(training_args, "hub_revision", None),
                **card,
            )
        print((output_dir / "report.md").read_text())
    return report


def _data_name(args: RecipeArguments) -> str:
    if args.train_file:
        return Path(args.validation_file).name
    return "synthetic SQuAD-format facts" if args.dataset_name == "synthetic" else args.dataset_name


def _barrier(training_args) -> None:
    """Waits for every process (after the main one wrote files the others read)."""
    if training_args.world_size > 1:
        torch.distributed.barrier()


def _gpu_problem() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU: the sparse kernels (cuSPARSELt) and the timing need one"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the GPU has compute capability {major}.{minor}; 2:4 sparse kernels need 8.0 or newer"
    return None


def _swap_and_time(args, training_args, report, record, sparse, output_dir, eval_features, eval_examples):
    from hf_sparse import bench

    # Evaluate on the sparse kernels: the answers must match the masked dense model's (fp16 rounding aside).
    if "f1" not in report["stages"].get("swapped", {}):
        swapped = copy.deepcopy(sparse).to(device=training_args.device, dtype=torch.float16).eval()
        tokens = [training_args.per_device_eval_batch_size * args.max_seq_length]
        swap = hf_sparse.swap_to_semi_structured_(swapped, token_counts=tokens)
        values = evaluate(swapped, args, training_args, output_dir / "eval", eval_features, eval_examples)
        values["layers"] = {status: sum(1 for r in swap if r.status == status) for status in {r.status for r in swap}}
        record("swapped", values)
        del swapped
    # Time dense against 2:4 on the same model, same process, same execution mode (CUDA graphs for both).
    if training_args.process_index == 0 and "timing" not in report:
        seq_len = min(args.timing_sequence_length, sparse.config.max_position_embeddings)
        if seq_len < args.timing_sequence_length:
            logger.warning("Timing at sequence length %d, the model's max_position_embeddings.", seq_len)
        bench_args = bench.parse_args(
            ["--model", str(output_dir / "sparse"), "--seq-len", str(seq_len),
             "--variants", "dense", "2:4", "--output-dir", str(output_dir),
             "--tune-seconds", str(args.timing_tune_seconds), "--batch-sizes"]
            + [str(b) for b in args.timing_batch_sizes]
        )  # fmt: skip
        result = bench.run(bench_args)
        bench.plot(result, output_dir / "latency.png")
        report["timing"] = {
            "description": f"{result['device']}, fp16, sequence length {seq_len}, both models "
            f"fused q/k/v and run through CUDA graphs; median of CUDA-event timings (hf_sparse.bench).",
            "rows": [
                {"batch_size": r["batch"], "dense_ms": r["dense"]["ms"], "sparse_ms": r["2:4"]["ms"],
                 "speedup": r["2:4"]["speedup"]}
                for r in result["rows"] if r.get("2:4")
            ],
            "weight_memory_ratio": result["memory"].get("2:4", {}).get("ratio"),
            "bench": result,
        }  # fmt: skip
        save_report(report, output_dir)
    _barrier(training_args)


def _card_kwargs(args: RecipeArguments, report: dict, output_dir: Path) -> dict:
    stages = report["stages"]
    metrics = {}
    for stage, key in (("dense", "dense"), ("sparse", "sparse")):
        if "f1" in stages.get(stage, {}):
            metrics[key] = {"exact_match": stages[stage]["exact_match"], "f1": stages[stage]["f1"]}
    card = dict(metrics=metrics, command=report["command"])
    if args.dataset_name != "synthetic" and not args.train_file:
        card["dataset"] = args.dataset_name
    else:
        card["dataset_name"] = "synthetic SQuAD-format facts (hf_sparse.synthetic_squad)" if not args.train_file else (
            Path(args.validation_file).name
        )  # fmt: skip
    if args.model_name_or_path and _on_hub(args.model_name_or_path):
        card["base_model"] = args.model_name_or_path
    timing = report.get("timing")
    if timing:
        card["benchmark"] = [
            {"batch size": r["batch_size"], "dense (ms)": round(r["dense_ms"], 3), "2:4 (ms)": round(r["sparse_ms"], 3),
             "speed-up": f"{r['speedup']:.2f}x"}
            for r in timing["rows"]
        ]  # fmt: skip
        card["benchmark_description"] = timing.get("description")
        if (output_dir / "latency.png").is_file():
            card["benchmark_plot"] = str(output_dir / "latency.png")
    return card


if __name__ == "__main__":
    main()
