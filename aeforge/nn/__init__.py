"""Shared building blocks (ViT, MLP, conv stacks, masking) used by every method family."""
