"""`evaluate` modules (`evaluate.load(hf_sparse.metrics.evaluate_module_path("squad"))`) that work offline."""
