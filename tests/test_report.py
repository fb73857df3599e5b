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


def test_pruned_stages_record_a_layer_count():
    report = _report({"sparse": 8})
    report["stages"]["pruned"] = {"exact_match": 70.0, "f1": 75.0, "layers": 12, "sparsity": 0.5}
    assert "| 2:4, zero-shot (pruned, no training) | 70.00 | 75.00 | — | 50.00% |" in markdown(report)
