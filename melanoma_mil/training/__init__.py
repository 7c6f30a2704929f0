"""Lightning wrapper, metrics and the cross-validation driver behind `fit`."""
