"""Checkpoints: HF safetensors snapshots, the Orbax checkpoint format, the converter."""
