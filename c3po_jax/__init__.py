"""c3po-jax."""
