"""The recipe's report: the tutorial-style table says how many GEMMs actually ran on sparse kernels."""

from __future__ import annotations

from hf_sparse.run_report import markdown


def _report(layers):
    stage = {"exact_match": 80.0, "f1": 85.0, "eval_dtype": "fp16", "layers": layers}
    return {"stages": {"dense": {"exact_match": 81.0, "f1": 86.0}, "swapped": stage}, "skipped": {}}


def test_swapped_stage_counts_sparse_and_dense_gemms():
    text = markdown(_report({"sparse": 30, "sparse+dense": 6, "dense": 12, "not 2:4": 1}))
    assert "| 2:4, recovered, on sparse kernels (36 of 48 GEMMs sparse; dense was faster for the rest) |" in text
    assert "(8 of 8 GEMMs sparse) |" in markdown(_report({"sparse": 8, "not 2:4": 1}))
    assert "| F1 | 86.00 | 85.00 | -1.00 |" in text


def test_fp8_stages_say_what_each_gemm_ran_on():
    report = _report({"sparse": 8})
    report["stages"]["fp8"] = {"f1": 85.1, "layers": {"fp8 2:4": 18, "fp8 dense": 6, "not 2:4": 1},
                               "gelu_in_epilogue": 6}  # fmt: skip
    report["stages"]["fp8_dense"] = {"f1": 84.0, "layers": {"fp8 dense": 24, "not 2:4": 1}}
    text = markdown(report)
    assert "on FP8 (e4m3) 2:4 kernels (18 of 24 GEMMs FP8 2:4, 6 dense FP8; GELU in the epilogue of 6) |" in text
    assert "on dense FP8 kernels (baseline) (24 of 24 GEMMs dense FP8) |" in text


def test_pruned_stages_record_a_layer_count():
    report = _report({"sparse": 8})
    report["stages"]["pruned"] = {"exact_match": 70.0, "f1": 75.0, "layers": 12, "sparsity": 0.5}
    assert "| 2:4, zero-shot (pruned, no training) | 70.00 | 75.00 | — | 50.00% |" in markdown(report)


def test_f1_plot_labels_every_bar_and_shows_one_point_differences(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from hf_sparse.run_report import plot_f1

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    report = _report({"sparse": 8})
    report["stages"]["pruned"] = {"exact_match": 79.5, "f1": 85.2, "sparsity": 0.5}
    plot_f1(report, tmp_path / "f1.png")
    (fig,) = figures
    scores, deltas = fig.axes
    # Every bar carries its value: 3 stages x (F1, exact match) on the left, 2 x 2 changes on the right.
    assert sorted(t.get_text() for t in scores.texts) == sorted(["86.00", "81.00", "85.20", "79.50", "85.00", "80.00"])
    assert sorted(t.get_text() for t in deltas.texts) == sorted(["-0.80", "-1.50", "-1.00", "-1.00"])
    low, high = scores.get_ylim()
    assert low >= 60 and high - low <= 40  # a 1-point gap is at least 1/40 of the axis, not 1/105


def _trained(dense_steps, sparse_steps):
    report = _report({"sparse": 8})
    report["stages"]["dense"]["train_steps"] = dense_steps
    report["stages"]["sparse"] = {"exact_match": 80.0, "f1": 85.0, "sparsity": 0.5, "train_steps": sparse_steps}
    return report


def test_the_report_says_how_long_each_model_trained_and_when_the_lengths_differ():
    text = markdown(_trained(20, 300))
    assert "fine-tuned for 20 optimizer steps; the 2:4 model, pruned from it, recovered for 300." in text
    assert "trained for different lengths, so the delta does not compare them at equal training" in text
    assert "| 2:4, recovered (fine-tuned with masks) | 80.00 | 85.00 | — | 50.00% | 300 steps |" in text
    assert "| dense (fine-tuned) | 81.00 | 86.00 | — | — | 20 steps |" in text
    same = markdown(_trained(300, 300))
    assert "recovered for 300." in same and "different lengths" not in same


def test_the_model_card_says_how_long_each_model_trained(tmp_path):
    import torch
    from transformers import BertForQuestionAnswering

    import hf_sparse
    from hf_sparse.hub import model_card
    from hf_sparse.run_report import card_kwargs
    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    hf_sparse.prune_(model, hf_sparse.SparsityConfig())
    hf_sparse.save_pretrained(model, tmp_path / "sparse")
    card = str(model_card(tmp_path / "sparse", **card_kwargs(_trained(20, 300), tmp_path)))
    assert "recovered for 300. The two trained for different lengths" in card


def test_the_card_names_the_dense_model_that_was_pruned():
    from hf_sparse.run_report import card_kwargs

    report = _report({"sparse": 8})
    report["arguments"] = {"recipe": {"model_name_or_path": "bert-base-cased", "dense_model_name_or_path": "me/qa"}}
    assert card_kwargs(report, ".")["base_model"] == "me/qa"
    report["arguments"]["recipe"]["dense_model_name_or_path"] = None
    assert card_kwargs(report, ".")["base_model"] == "bert-base-cased"
