"""Pipelines: encode -> sampling loop -> decode, one call each."""
