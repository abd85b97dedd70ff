"""Training layer: on-device augmentation, the Lightning loop and the run folder it writes."""
