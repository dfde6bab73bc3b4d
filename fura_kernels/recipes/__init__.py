"""Thin, runnable recipes on top of the fura_kernels API."""
