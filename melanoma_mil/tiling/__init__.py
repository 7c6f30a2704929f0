"""Slides to tiles: resolution handling, tissue masks, tile grids and QC images."""
