"""Kernel and layer benchmarks: python -m bench."""
