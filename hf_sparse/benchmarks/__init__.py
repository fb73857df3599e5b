"""Benchmarks of hf-sparse, runnable with `python -m hf_sparse.benchmarks.<name>`."""
