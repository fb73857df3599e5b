"""Model cards: filled from measured numbers only, sections without numbers left out, template found anywhere."""

from __future__ import annotations

import re

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import BertForQuestionAnswering

import hf_sparse
from hf_sparse import SparsityConfig, model_card, prune_
from hf_sparse.hub import template_path, write_model_card
from tests.conftest import tiny_bert_config

METRICS = {"dense": {"exact_match": 81.25, "f1": 88.5}, "sparse": {"exact_match": 79.75, "f1": 87.125}}
BENCHMARK = [
    {"batch size": 1, "dense ms": 2.5, "2:4 ms": 1.75, "speedup": 1.43},
    {"batch size": 32, "dense ms": 20.0, "2:4 ms": 12.5, "speedup": 1.6},
]


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    prune_(model)
    hf_sparse.save_pretrained(model, tmp_path / "ckpt", config=SparsityConfig())
    return tmp_path / "ckpt"


def _no_placeholders(text: str) -> None:
    for marker in ("{{", "{%", "None", "TODO", "[More Information Needed]", "not measured", "nan"):
        assert marker not in text, marker


def test_card_without_measurements_leaves_their_sections_out(folder):
    card = model_card(folder)
    text = str(card)
    _no_placeholders(text)
    assert "## Sparsity" in text and "12 linear layers" in text and "50.00% of their weights" in text
    for section in ("## Evaluation", "## Latency", "## Reproduce", "## How to use", "model-index"):
        assert section not in text
    assert card.data.eval_results is None


def test_card_with_measurements(folder, tmp_path):
    plot = tmp_path / "latency.png"
    plot.write_bytes(b"\x89PNG fake bytes")
    path = write_model_card(
        folder,
        repo_id="alice/bert-2of4",
        base_model="google-bert/bert-base-cased",
        dataset="rajpurkar/squad",
        dataset_name="SQuAD v1.1 (XQuAD-en questions)",
        metrics=METRICS,
        benchmark=BENCHMARK,
        benchmark_plot=plot,
        benchmark_description="NVIDIA H200, fp16, sequence length 384.",
        command="python recipes/train_squad.py --sparsity 2:4",
    )
    card = ModelCard.load(path)
    text = str(card)
    _no_placeholders(text)
    assert card.data.base_model == "google-bert/bert-base-cased"
    assert card.data.datasets == ["rajpurkar/squad"]
    results = {(r.task_type, r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {
        ("question-answering", "SQuAD v1.1 (XQuAD-en questions)", "exact_match"): 79.75,
        ("question-answering", "SQuAD v1.1 (XQuAD-en questions)", "f1"): 87.125,
    }
    assert "| dense (google-bert/bert-base-cased) | 81.25 | 88.50 |" in text
    assert "| 2:4 sparse (this model) | 79.75 | 87.12 |" in text
    assert "| 32 | 20.00 | 12.50 | 1.60 |" in text
    assert "![latency: dense vs 2:4 sparse](latency.png)" in text
    assert (folder / "latency.png").read_bytes() == plot.read_bytes()
    assert "python recipes/train_squad.py --sparsity 2:4" in text
    assert 'BertForQuestionAnswering.from_pretrained("alice/bert-2of4")' in text
    assert 'hf_sparse.from_pretrained("alice/bert-2of4", fast=True)' in text


def test_only_measured_rows_and_columns_appear(folder):
    text = str(model_card(folder, dataset="rajpurkar/squad", metrics={"sparse": {"f1": 70.0}}))
    assert re.search(r"\| model \| F1 \|\n\|---\|---\|\n\| 2:4 sparse \(this model\) \| 70.00 \|\n", text)
    assert "dense" not in text.split("## Evaluation")[1]


def test_compact_card_says_how_to_load(folder, tmp_path):
    model = hf_sparse.from_pretrained(folder)
    hf_sparse.save_pretrained(model, tmp_path / "compact", compact=True)
    text = str(model_card(tmp_path / "compact", repo_id="alice/c"))
    assert "compact format" in text and "2-bit positions" in text


def test_card_links_and_code_work_as_written(folder, tmp_path):
    model = hf_sparse.from_pretrained(folder)
    hf_sparse.save_pretrained(model, tmp_path / "compact", compact=True)
    command = "python recipes/squad_24.py --max_steps 10"
    for path in (folder, tmp_path / "compact"):
        # A local folder as the repo id, so that the card's code runs here as a reader would run it.
        text = str(model_card(path, repo_id=str(path), command=command))
        assert "github.com" not in text and "pip install hf-sparse" not in text  # neither exists
        links = re.findall(r"\]\((https?://[^)]+)\)", text)
        assert all(link.startswith("https://huggingface.co/") for link in links), links
        assert "root of a checkout of hf-sparse" in text and "recipes/squad_24.py" in text
        blocks = re.findall(r"```python\n(.*?)```", text, re.S)
        assert blocks
        for block in blocks:
            namespace: dict = {}
            exec(block.replace(", fast=True)", ")  # fast=True: GPU only"), namespace)  # noqa: S102
            loaded = namespace["model"]
            for key, tensor in model.state_dict().items():
                assert torch.equal(loaded.state_dict()[key], tensor), (path, key)


def test_an_fp8_compact_card_loads_it_the_one_way_that_works(folder, tmp_path):
    """Before: the card of an FP8 compact folder showed plain from_pretrained after `import hf_sparse`, which
    refuses FP8 folders, and described the layers as kept values plus positions only."""
    from tests.test_checkpoint import LAYER, export_fp8

    model = hf_sparse.from_pretrained(folder)
    export_fp8(model.get_submodule(LAYER))
    hf_sparse.save_pretrained(model, tmp_path / "fp8", compact=True)
    expected = hf_sparse.from_pretrained(tmp_path / "fp8").state_dict()
    text = str(model_card(tmp_path / "fp8", repo_id=str(tmp_path / "fp8")))
    _no_placeholders(text)
    assert "1 of them in FP8" in text and "e4m3" in text and "scale per row" in text
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks and not any("from transformers import" in block for block in blocks)
    for block in blocks:  # every snippet of the card runs as written
        namespace: dict = {}
        exec(block.replace(", fast=True)", ")  # fast=True: GPU only"), namespace)  # noqa: S102
        assert all(torch.equal(namespace["model"].state_dict()[k], v) for k, v in expected.items())


def test_bad_inputs_are_named(folder, tmp_path):
    with pytest.raises(ValueError, match=r"metrics\['sparse'\]\['f1'\] must be a finite number; got 'high'"):
        model_card(folder, dataset="d", metrics={"sparse": {"f1": "high"}})
    with pytest.raises(ValueError, match="metrics keys must be 'dense' and/or 'sparse'; got \\['pruned'\\]"):
        model_card(folder, metrics={"pruned": {"f1": 1.0}})
    with pytest.raises(ValueError, match="benchmark_plot was given without the benchmark rows"):
        model_card(folder, benchmark_plot=tmp_path / "x.png")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="no sparsity metadata"):
        model_card(BertForQuestionAnswering(tiny_bert_config()))


def test_template_is_found_in_the_source_checkout():
    path = template_path()
    assert path.name == "sparse_model_card.md" and path.parent.name == "model_cards"
    assert "{{ card_data }}" in path.read_text()


def test_local_or_generated_data_gets_the_table_but_no_model_index(folder):
    card = model_card(folder, dataset_name="synthetic SQuAD-format facts", metrics=METRICS)
    text = str(card)
    _no_placeholders(text)
    assert "## Evaluation" in text and "synthetic SQuAD-format facts" in text and "87.12" in text
    assert "model-index" not in text and card.data.eval_results is None


def test_a_failed_card_write_leaves_the_folder_card_as_it_was(folder, monkeypatch):
    (folder / "README.md").write_text("the card the folder had\n")

    def fail(self, path):
        with open(path, "w") as f:
            f.write("---\nhalf a card")  # a partial write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(ModelCard, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        write_model_card(folder, repo_id="alice/c")
    assert (folder / "README.md").read_text() == "the card the folder had\n"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary left behind
