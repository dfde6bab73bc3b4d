"""fura-kernels benchmarks: baselines now; the harness, microbenchmarks and results follow."""
