"""Evaluation: the scene checker and benchmarks."""
