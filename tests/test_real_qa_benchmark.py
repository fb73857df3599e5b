"""The real-model QA benchmark's data split: training questions are answerable and share no paragraph with
XQuAD-en, and the training file it writes for the recipe reads back the same."""

from __future__ import annotations

import argparse

from benchmarks.real_qa import GRIDS, load_data, write_squad_json
from hf_sparse.squad import read_squad_json
from tests.conftest import shared_data


def test_training_questions_are_answerable_and_disjoint_from_xquad(tmp_path):
    args = argparse.Namespace(
        train_file=shared_data("squad", "squad-v2-dev-sample.json"),
        eval_file=shared_data("squad", "xquad-en.json"),
        max_train_samples=None,
        max_eval_samples=None,
    )
    train, evaluation = load_data(args)
    assert (len(train), len(evaluation)) == (607, 1190)
    assert all(r["answers"]["text"] for r in train)
    assert not {r["context"] for r in train} & {r["context"] for r in evaluation}
    write_squad_json(train, tmp_path / "train.json")
    assert read_squad_json(tmp_path / "train.json") == train


def test_grids_name_every_row_once():
    for name, grid in GRIDS.items():
        rows = grid()
        assert len({v.name for v in rows}) == len(rows), name
