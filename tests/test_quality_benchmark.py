"""The quality benchmark's data split: recovery text never holds an evaluation paragraph or question."""

from __future__ import annotations

import torch
from transformers import BertModel

from benchmarks.quality import embed, format_table, load_retrieval, load_training_text
from tests.conftest import shared_data, tiny_bert_config


def test_xquad_retrieval_and_disjoint_training_text():
    paragraphs, questions, gold = load_retrieval(shared_data("squad", "xquad-en.json"))
    assert (len(paragraphs), len(questions), max(gold)) == (240, 1190, 239)
    texts = load_training_text(shared_data("squad", "squad-v2-dev-sample.json"), set(paragraphs))
    # squad-v2-dev-sample shares 24 of its 173 paragraphs (and their questions) with XQuAD-en: all are dropped.
    assert not set(texts) & (set(paragraphs) | set(questions))
    assert len(texts) == 1355
    more = load_training_text(shared_data("squad", "squad-v2-dev-sample.json"), set(paragraphs), sentences=True)
    assert set(texts) < set(more) and not set(more) & (set(paragraphs) | set(questions))
    added = set(more) - set(texts)
    assert len(added) > 3 * 149 and all(any(a in t for t in texts) for a in added)  # pieces of kept paragraphs


class _Tokenizer:
    def __call__(self, texts, **kwargs):
        lengths = [len(t) for t in texts]
        width = max(lengths)
        ids = torch.tensor([[1 + (ord(c) % 100) for c in t] + [0] * (width - len(t)) for t in texts])
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
        return _Batch(input_ids=ids, attention_mask=mask)


class _Batch(dict):
    def to(self, device):
        return _Batch({k: v.to(device) for k, v in self.items()})


def test_embeddings_are_mean_pooled_over_the_mask_and_normalized():
    torch.manual_seed(0)
    model = BertModel(tiny_bert_config(), add_pooling_layer=False)
    short = embed(model, _Tokenizer(), ["abc", "abcdefgh"], max_length=16)[0]
    alone = embed(model, _Tokenizer(), ["abc"], max_length=16)[0]
    torch.testing.assert_close(short, alone, rtol=1e-5, atol=1e-5)  # padding in the batch changes nothing
    assert abs(float(alone.norm()) - 1.0) < 1e-5


def test_table_shows_drops_against_dense():
    rows = [
        {"criterion": "dense", "zero_shot": 88.49},
        {
            "criterion": "wanda",
            "zero_shot": 85.0,
            "prune_seconds": 12.0,
            "recovered": 88.0,
            "recovery": {"seconds": 60},
        },
    ]
    lines = format_table(rows).splitlines()
    assert lines[2].split() == ["wanda", "85.00", "-3.49", "12.0", "88.00", "-0.49", "60"]
