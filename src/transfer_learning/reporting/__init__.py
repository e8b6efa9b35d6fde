"""Evaluation metrics, the comparison, learning curves and the adaptation report."""
