"""After training: paired comparison of runs, local sweeps, localisation scores."""
