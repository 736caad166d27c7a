"""Re-mixing: pathways, the surrogate methods, scoring, neighbour losses, the engine."""
