"""`evaluate` modules (`evaluate.load(hf_sparse.squad.metrics.evaluate_module_path("squad"))`) that work offline."""
