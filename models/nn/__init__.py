"""The MoE decoder's `flax.nnx` modules."""
