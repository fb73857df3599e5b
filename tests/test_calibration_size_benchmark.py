"""`benchmarks.calibration_size`: held-out layer errors of each criterion, on a tiny BERT and synthetic SQuAD."""

import torch
from transformers import BertConfig, BertModel

from benchmarks.calibration_size import CRITERIA, layer_errors
from hf_sparse.squad.data import squad_records
from hf_sparse.squad.synthetic import synthetic_squad, synthetic_tokenizer


def _model_and_pairs():
    tokenizer = synthetic_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)  # fmt: skip
    records = squad_records(synthetic_squad(num_paragraphs=12, questions_per_paragraph=1, seed=3))
    return BertModel(config).eval(), tokenizer, [(r["question"], r["context"]) for r in records]


def test_calibrated_on_the_held_out_text_itself_sparsegpt_beats_magnitude_on_every_layer():
    # Then the held-out error is what SparseGPT minimises (up to its damping): a check of the measurement itself.
    model, tokenizer, pairs = _model_and_pairs()
    result = layer_errors(model, tokenizer, pairs[:4], pairs[:4], 128, criteria=CRITERIA)
    errors = result["errors"]
    assert result["calibration_tokens"] > 64 and len(errors["magnitude"]) == 12
    for layer in range(12):
        assert errors["sparsegpt+refit"][layer] < errors["magnitude"][layer]
        assert errors["sparsegpt+refit"][layer] <= errors["sparsegpt"][layer] * 1.001
        assert errors["sparsegpt+admm"][layer] <= errors["sparsegpt+refit"][layer] * 1.001


def test_magnitude_does_not_depend_on_the_calibration_and_few_tokens_are_counted():
    model, tokenizer, pairs = _model_and_pairs()
    few = layer_errors(model, tokenizer, pairs[:1], pairs[4:], 24, criteria=("magnitude", "sparsegpt"))
    more = layer_errors(model, tokenizer, pairs[:3], pairs[4:], 128, criteria=("magnitude", "sparsegpt"))
    assert few["calibration_tokens"] == 24
    assert few["errors"]["magnitude"] == more["errors"]["magnitude"]
    assert few["errors"]["sparsegpt"] != more["errors"]["sparsegpt"]
