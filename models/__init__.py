"""Model implementations used by c3po-jax (pure functions of explicit pytrees)."""
