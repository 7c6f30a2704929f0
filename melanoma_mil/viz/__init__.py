"""Plots: ROC curves, attention heatmaps, tile montages."""
