"""Tumour annotations: the Annotation geometry, readers of ASAP XML, GeoJSON and masks, writers."""
