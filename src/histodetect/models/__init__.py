"""Models layer: timm backbones or our own CNNs with a one-logit head, and the padding-free FCN."""
