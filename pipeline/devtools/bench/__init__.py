"""Benchmarks: ``forgetting`` (+ its report) in-process, ``throughput`` (stages, bank stage,
report) against a real broker and redis-server."""
