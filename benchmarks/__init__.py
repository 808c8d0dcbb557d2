"""Throughput and latency benchmarks of the relay against baselines."""
