"""The real-model QA benchmark's data split: training questions are answerable and share no paragraph with
XQuAD-en, and the training file it writes for the recipe reads back the same."""

from __future__ import annotations

import argparse

from benchmarks.real_qa import GRIDS, load_data, write_squad_json
from hf_sparse.squad import read_squad_json
from tests.conftest import shared_data


def data_args(**extra) -> argparse.Namespace:
    """The benchmark's data arguments over the shared SQuAD files (skipped with a reason where they are absent)."""
    return argparse.Namespace(
        train_file=shared_data("squad", "squad-v2-dev-sample.json"),
        eval_file=shared_data("squad", "xquad-en.json"),
        max_train_samples=None,
        max_eval_samples=None,
        **extra,
    )


def test_training_questions_are_answerable_and_disjoint_from_xquad(tmp_path):
    args = data_args()
    train, evaluation = load_data(args)
    assert (len(train), len(evaluation)) == (607, 1190)
    assert all(r["answers"]["text"] for r in train)
    assert not {r["context"] for r in train} & {r["context"] for r in evaluation}
    unlabeled, _ = load_data(args, unlabeled=True)
    write_squad_json(train + unlabeled, tmp_path / "train.json")
    by_id = sorted(train + unlabeled, key=lambda r: r["id"])
    assert sorted(read_squad_json(tmp_path / "train.json"), key=lambda r: r["id"]) == by_id  # grouped by paragraph


def test_grids_name_every_row_once():
    for name, grid in GRIDS.items():
        rows = grid()
        assert len({v.name for v in rows}) == len(rows), name


def test_unlabeled_questions_are_unanswerable_disjoint_from_xquad_and_ignored_by_the_task_loss():
    import torch
    from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerFast

    from benchmarks.real_qa import unlabeled_features
    from hf_sparse.squad import tokenize_squad

    args = data_args(max_seq_length=64, doc_stride=16)
    train, evaluation = load_data(args)
    unlabeled, _ = load_data(args, unlabeled=True)
    assert unlabeled and not any(r["answers"]["text"] for r in unlabeled)
    assert not {r["context"] for r in unlabeled} & {r["context"] for r in evaluation}
    import tempfile
    from pathlib import Path

    words = sorted(
        {w.lower() for r in train[:5] + unlabeled[:5] for w in (r["question"] + " " + r["context"]).split()}
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
        tokenizer = BertTokenizerFast(str(Path(folder) / "vocab.txt"))
    args.max_train_samples = 5
    labeled = tokenize_squad(load_data(args)[0], tokenizer, train=True, max_length=64, doc_stride=16)
    both = unlabeled_features(args, tokenizer, labeled)
    extra = len(both) - len(labeled)
    assert extra > 0 and all(int(both[i]["start_positions"]) == 64 for i in range(len(labeled), len(both)))
    # a transformers QA head ignores those positions: the loss of a batch is that of its labeled features alone
    torch.manual_seed(0)
    model = BertForQuestionAnswering(
        BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64)
    ).eval()  # fmt: skip
    rows = [both[0], both[len(labeled)]]
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "token_type_ids",
                                                             "start_positions", "end_positions")}  # fmt: skip
    alone = {k: v[:1] for k, v in batch.items()}
    with torch.no_grad():
        assert torch.allclose(model(**batch).loss, model(**alone).loss)


def test_mismatched_pairs_ask_each_question_of_other_paragraphs_without_answers():
    from benchmarks.real_qa import mismatched_pairs

    args = data_args()
    train, _ = load_data(args)
    pairs = mismatched_pairs(train, 2, seed=0)
    assert len(pairs) == 2 * len(train) and len({p["id"] for p in pairs}) == len(pairs)
    own = {r["id"]: r for r in train}
    for pair in pairs:
        source = own[pair["id"].rsplit("-mismatched-", 1)[0]]
        assert pair["question"] == source["question"] and pair["context"] != source["context"]
        assert pair["answers"] == {"text": [], "answer_start": []}
    assert mismatched_pairs(train, 2, seed=0) == pairs and mismatched_pairs(train, 2, seed=1) != pairs
