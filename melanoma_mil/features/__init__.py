"""Feature extraction: tiles -> cached per-slide feature bags (`extract`)."""
