"""How well a tiny BERT trained from scratch on CPU learns `hf_sparse.squad.data.synthetic_squad`.

    python -m benchmarks.synthetic_qa --steps 300 --hidden 128 --layers 2 --threads 2

Trains with the Trainer (no `datasets` needed) and prints `trainer.evaluate()` (exact match / F1 from
`squad_compute_metrics`) before and after training, with the wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import BertConfig, BertForQuestionAnswering, Trainer, TrainingArguments

from hf_sparse.squad.data import squad_records, tokenize_squad
from hf_sparse.squad.metrics import squad_compute_metrics
from hf_sparse.squad.synthetic import synthetic_squad, synthetic_tokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--paragraphs", type=int, default=1000)
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default="/tmp/hf_sparse_synthetic_qa")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tokenizer = synthetic_tokenizer()
    train = squad_records(synthetic_squad(args.paragraphs, facts_per_paragraph=args.facts, seed=0))
    val = squad_records(synthetic_squad(100, facts_per_paragraph=args.facts, seed=1))
    train_features = tokenize_squad(train, tokenizer, train=True, max_length=args.max_length, doc_stride=16)
    val_features = tokenize_squad(val, tokenizer, train=False, max_length=args.max_length, doc_stride=16)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(2, args.hidden // 64),
        intermediate_size=4 * args.hidden,
        max_position_embeddings=args.max_length,
    )
    training_args = TrainingArguments(
        args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=args.lr,
        warmup_steps=args.steps // 10,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, args.steps // 5),
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        BertForQuestionAnswering(config),
        training_args,
        train_dataset=train_features,
        eval_dataset=val_features,
        compute_metrics=squad_compute_metrics(val, val_features),
    )
    before = trainer.evaluate()
    t1 = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - t1
    after = trainer.evaluate()
    summary = {
        "config": vars(args),
        "train_features": len(train_features),
        "eval_examples": len(val),
        "before": {k: before[k] for k in ("eval_exact_match", "eval_f1")},
        "after": {k: after[k] for k in ("eval_exact_match", "eval_f1", "eval_loss")},
        "train_seconds": round(train_time, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
