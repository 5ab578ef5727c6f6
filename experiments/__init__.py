"""Experiments: the run script, tasks, sweeps and benchmarks."""
