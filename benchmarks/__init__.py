"""Benchmarks: task data adapters, prompt formats and speed scripts."""
