"""What every wing shares: error types, the command-line plumbing, atomic file writes."""
