"""Slides layer: whole-slide readers, tissue, cell inference, regions and their outputs."""

# A 96 px window is analysed when at least this share of it is tissue. PCam sampled patches
# from tissue, but a patch of fat or loose stroma holds only a few stained strands: a share of
# 2 % (3 thumbnail pixels of 144) keeps 99.8 % of the real Kaggle sample's patches.
DEFAULT_MIN_TISSUE = 0.02  # here, not in tissue.py: the CLI needs it without scipy
