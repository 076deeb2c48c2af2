"""Metrics: Frechet distances, prompt alignment and the image-quality scorers."""
