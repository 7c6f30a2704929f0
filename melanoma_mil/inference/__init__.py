"""A trained run applied to slides: matching features, the fold ensemble, `predict`, `heatmap`."""
