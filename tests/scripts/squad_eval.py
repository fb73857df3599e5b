"""`trainer.evaluate()` with `squad_compute_metrics` on a tiny random BERT; run by tests/test_qa_trainer.py in one
process and through `accelerate launch --multi_gpu --num_processes 2` with `use_cpu=True` (CPU, gloo). Writes the metrics and the answers to a JSON file.

    python tests/scripts/squad_eval.py OUT.json [--v2]
"""

import json
import sys

import torch
from transformers import BertConfig, BertForQuestionAnswering, Trainer, TrainingArguments

from hf_sparse.squad.data import squad_records, tokenize_squad
from hf_sparse.squad.metrics import squad_compute_metrics
from hf_sparse.squad.synthetic import synthetic_squad, synthetic_tokenizer
from tests.conftest import exit_ranks


def build(v2: bool):
    """Examples, features (a QAFeatures, no `datasets` needed) and a deterministic tiny model."""
    tokenizer = synthetic_tokenizer()
    examples = squad_records(synthetic_squad(num_paragraphs=3, unanswerable_fraction=0.4 if v2 else 0.0, seed=7))
    # Short windows: several examples have 2-3 features; 9 examples -> an odd number of features.
    features = tokenize_squad(examples, tokenizer, train=False, max_length=40, doc_stride=12)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return examples, features, BertForQuestionAnswering(config).eval()


def main():
    out, v2 = sys.argv[1], "--v2" in sys.argv
    examples, features, model = build(v2)
    compute_metrics = squad_compute_metrics(examples, features, version_2_with_negative=v2)
    args = TrainingArguments(
        output_dir=out + ".trainer",
        per_device_eval_batch_size=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        include_for_metrics=["inputs"],  # gathered across processes: compute_metrics checks each feature's input ids
    )
    trainer = Trainer(model, args, eval_dataset=features, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        answers = compute_metrics.last_predictions
        with open(out, "w") as f:
            json.dump(
                {
                    "metrics": metrics,
                    "world_size": trainer.args.world_size,
                    "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
                    "num_features": len(features),
                    "answers": answers.as_dict(),
                    "scores": answers.scores.tolist(),
                },
                f,
            )


if __name__ == "__main__":
    main()
    exit_ranks()
