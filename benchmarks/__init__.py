"""Benchmarks for MoR adapters (run them as ``python -m benchmarks.<name>`` from the repo root)."""
