"""Benchmark OSFN against peer optimizers on the built-in workloads (``osfn-dist bench``)."""
