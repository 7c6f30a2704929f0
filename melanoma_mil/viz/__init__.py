"""Drawing only: ROC curves, attention heatmaps, tile montages (no pipeline logic)."""
