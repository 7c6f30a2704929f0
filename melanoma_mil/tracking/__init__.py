"""Experiment tracking: CSV and Weights & Biases loggers, and the one W&B setup."""
