"""Experiments of the paper, as library code (used by the CLI and the benchmarks)."""
