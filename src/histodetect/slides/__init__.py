"""Slides layer: whole-slide readers, tissue, cell inference, regions and their outputs."""
