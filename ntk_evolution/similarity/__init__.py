"""Representation similarity: linear and online CKA (cka) and the PyTorch networks it compares,
with their hooked layers (torch_models)."""
