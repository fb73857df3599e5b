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
