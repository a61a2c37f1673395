"""fastshm benchmarks (pytest-benchmark); see bench/README.md."""
