"""Benchmarks of dsl_kernels (not tests): ``python -m bench.kernels`` for the kernel
microbenchmarks; :mod:`bench.common` holds the shared timing helpers."""
