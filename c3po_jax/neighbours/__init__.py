"""Neighbourhoods: sample embeddings, neighbour search, kernels, reference sets."""
