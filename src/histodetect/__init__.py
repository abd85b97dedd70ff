"""histodetect: metastatic cancer detection in lymph-node histopathology patches."""

__version__ = "0.1.0"
PATCH_SIZE = 96
CENTRE = (32, 64)  # the labelled centre box spans pixels [32, 64) on both axes
# PCam's patches come from Camelyon16 scanned at 0.243 µm/px and downsampled 4x (10x).
PCAM_MPP = 0.972
