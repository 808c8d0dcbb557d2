"""Baseline relays the benchmark measures ours against, in the same run."""
