"""Training patches from annotated slides (`histodetect extract`): sampling, labels and outputs."""
