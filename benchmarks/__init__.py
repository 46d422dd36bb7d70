"""Benchmarks for effnet_kernels: whole networks (:mod:`benchmarks.network`), single ops
(:mod:`benchmarks.ops`, ``benchmarks/microbench``) and the report (:mod:`benchmarks.report`).

Results are appended to CSV files under ``benchmarks/results/``; a number not in those
files was not measured. See ``benchmarks/README.md``.
"""
