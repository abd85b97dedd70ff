"""Whole-slide images: readers of every pyramid format and the resolution that matches the model."""
