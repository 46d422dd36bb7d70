"""pytest-benchmark suite for the fused ops (``pytest benchmarks/microbench --benchmark-json=...``)."""
