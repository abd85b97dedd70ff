"""histodetect: metastatic cancer detection in lymph-node histopathology patches."""

__version__ = "0.1.0"
PATCH_SIZE = 96
CENTRE = (32, 64)  # the labelled centre box spans pixels [32, 64) on both axes
