"""Measuring sample quality: a Fashion-MNIST classifier, classifier-feature FID, Inception FID."""
