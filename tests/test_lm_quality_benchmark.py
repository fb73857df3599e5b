"""`benchmarks/llm_quality.py` end to end on a tiny Llama folder: its rows are what `hf_sparse.lm` measures on the
evaluation articles, and nothing of the other articles is evaluated."""

from __future__ import annotations

import copy
import json

import pytest

from benchmarks import llm_quality
from hf_sparse import prune_
from hf_sparse.lm import answer_choice_accuracy, answer_choice_questions, byte_tokenizer, perplexity
from hf_sparse.lm.data import packed_sequences
from hf_sparse.squad import read_squad_json
from tests.conftest import shared_data
from tests.test_lm_evaluation import tiny_llama


def test_the_benchmark_measures_dense_and_magnitude_rows_on_the_last_articles(tmp_path):
    data = shared_data("squad", "squad-v2-dev-sample.json")
    tokenizer = byte_tokenizer()
    model = tiny_llama(tokenizer, max_position_embeddings=2048)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--data", str(data), "--paragraphs", "3", "--questions", "4",
            "--max-length", "128", "--output", str(tmp_path / "out.json")]  # fmt: skip
    result = llm_quality.main(argv)
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == result["rows"]
    assert list(result["rows"]) == ["dense", "magnitude"] and result["rows"]["magnitude"]["layers"] == 14

    records = read_squad_json(data)
    titles = list(dict.fromkeys(r["title"] for r in records))
    held = [r for r in records if r["title"] in titles[-2:]]
    paragraphs = list(dict.fromkeys(r["context"] for r in held))
    paragraphs = [paragraphs[i * len(paragraphs) // 3] for i in range(3)]
    questions = answer_choice_questions(held, num_choices=4, seed=0)
    questions = [questions[i * len(questions) // 4] for i in range(4)]
    assert {q.id for q in questions} <= {r["id"] for r in held}
    assert {titles[-2], titles[-1]} <= {next(r["title"] for r in held if r["id"] == q.id) for q in questions}
    pruned = copy.deepcopy(model)
    prune_(pruned)
    for name, measured in (("dense", model), ("magnitude", pruned)):
        row = result["rows"][name]
        assert row["perplexity"] == pytest.approx(perplexity(measured, tokenizer, paragraphs, 128).perplexity)
        choice = answer_choice_accuracy(measured, tokenizer, questions)
        assert (row["answer_choice_accuracy"], row["questions"]) == (choice.accuracy, 4)
    assert result["rows"]["magnitude"]["perplexity"] != result["rows"]["dense"]["perplexity"]


def test_a_bad_split_is_named():
    records = [{"title": t} for t in ("a", "b")]
    with pytest.raises(SystemExit, match="--eval-articles must be from 1 to 1"):
        llm_quality.evaluation_split(records, 2)


def test_criteria_rows_name_sparsegpt_options_and_refuse_unknown_ones():
    config = llm_quality.sparsity_config("sparsegpt+bias+admm", 16)
    assert (config.criterion, config.sparsegpt_update_bias, config.sparsegpt_admm_steps) == ("sparsegpt", True, 30)
    assert llm_quality.sparsity_config("wanda", 16).calibration_samples == 16
    with pytest.raises(SystemExit, match=r"'wanda\+bias'.*unknown option\(s\) \['bias'\]"):
        llm_quality.sparsity_config("wanda+bias", 16)
    with pytest.raises(SystemExit, match="unknown option"):
        llm_quality.sparsity_config("sparsegpt+admmm", 16)


def test_packed_calibration_sequences_are_the_texts_joined_and_cut_without_padding():
    tokenizer = byte_tokenizer()
    texts = ["first paragraph", "a second one", "and a third, longer than the others"]
    eos = [tokenizer.eos_token_id]
    joined = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + eos]
    packed = packed_sequences(tokenizer, texts, 16)
    assert packed["input_ids"].tolist() == [joined[i : i + 16] for i in range(0, len(joined) - 15, 16)]
    assert bool(packed["attention_mask"].all()) and packed["input_ids"].shape == (len(joined) // 16, 16)
    assert packed_sequences(tokenizer, texts, 16, max_sequences=1)["input_ids"].tolist() == [joined[:16]]
    with pytest.raises(ValueError, match="fewer than one sequence of 1000"):
        packed_sequences(tokenizer, texts, 1000)
