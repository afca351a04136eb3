"""Evaluation: reconstruction metrics (metrics.py)."""
