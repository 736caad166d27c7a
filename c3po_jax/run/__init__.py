"""Runs: the run config, the pipeline, suites, device meshes, results files, plots."""
