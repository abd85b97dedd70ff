"""Tumour maps of slides (`histodetect slide`): cell inference, regions, pictures, output files."""
