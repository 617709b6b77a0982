"""Checkpoints, datasets and images: the boundary between files and fastdiff modules."""
