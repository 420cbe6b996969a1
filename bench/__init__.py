"""Benchmarks: `uv run python -m bench` (see bench/README.md)."""
