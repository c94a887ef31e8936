"""Tensors in, tensors out: the oracle, the LSE merge, masks, positions, kernels, validation."""
