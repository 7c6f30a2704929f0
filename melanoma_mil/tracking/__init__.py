"""Experiment tracking (W&B / CSV), local sweeps and paired run comparison."""
