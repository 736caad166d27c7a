"""References and fixtures for tests: the PyTorch C3PO override, tiny models."""
