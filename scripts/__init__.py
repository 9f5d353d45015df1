"""Benchmarks, fault suites and tools, run as modules from the repository root
(``python -m scripts.bench_rollout --help``); they import the harness from ``tests.harness``."""
