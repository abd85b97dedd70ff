"""Classifiers: any timm backbone (or our small CPU CNN) with a one-logit head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from histodetect.errors import HistodetectError
from histodetect.models.dense import DenseCNN, SmallFCN

OWN_MODELS = ("smallcnn", "densecnn", "smallfcn")
# Backbones the PCam/Kaggle community used, all checked to run at 96 px; any timm name works.
RECOMMENDED = {
    "smallcnn": "ours: compact, padded, most accurate on CPUs (default; slides map it per patch)",
    "densecnn": "ours: padding-free, dense exact slide maps 6x faster (AUC 0.008 lower)",
    "smallfcn": "ours: a smaller padding-free CNN (dense maps; densecnn is stronger)",
    "resnet18": "ResNet-18, a solid fast baseline",
    "resnet50": "ResNet-50",
    "legacy_xception": "Xception (the Keras original, as in many Kaggle kernels)",
    "xception41": "Xception-41 (timm's aligned variant)",
    "mobilenetv2_100": "MobileNetV2, light for CPUs and phones",
    "mnasnet_100": "MnasNet (NASNet-mobile's successor in timm)",
    "nasnetalarge": "NASNet-A large (85M parameters: GPU only)",
    "efficientnet_b0": "EfficientNet-B0",
    "convnext_tiny": "ConvNeXt-Tiny",
}


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """A compact VGG-style CNN that trains in minutes on two CPU cores.

    The stem convolves at full resolution and then max-pools, halving the size before the
    costly 3x3 stacks (where CPU time goes) without losing the fine nuclear detail a strided
    stem would skip; four blocks then reach 1/32 of the input size.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.blocks = nn.Sequential(
            _block(width, width),
            _block(width, width * 2),
            _block(width * 2, width * 4),
            _block(width * 4, width * 8),
        )
        self.num_features = width * 8

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps before pooling (used by Grad-CAM and dense slide inference)."""
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean((2, 3))


class Classifier(nn.Module):
    """Backbone → global average pooling → dropout → linear → one tumour logit."""

    def __init__(self, backbone: nn.Module, num_features: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).squeeze(1)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth``/``.pt`` state dict (tensors only, never pickled code)."""
    path = Path(path)
    if not path.exists():
        raise HistodetectError(f"{path}: weights file not found.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HistodetectError(f"{path}: cannot read weights ({exc}).") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HistodetectError(f"{path}: is not a state dict of tensors.")
    return state


def build_backbone(arch: str, pretrained: bool = False) -> tuple[nn.Module, int]:
    """Create a feature extractor returning pooled features, and its feature width."""
    own = {"densecnn": DenseCNN, "smallcnn": SmallCNN, "smallfcn": SmallFCN}
    if arch in own:  # densecnn and smallfcn are padding-free: `slide` maps them densely
        if pretrained:
            raise HistodetectError(f"{arch} has no pretrained weights; drop --pretrained.")
        net = own[arch]()
        return net, net.num_features
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise HistodetectError(
            f"unknown architecture {arch!r}. Use densecnn, smallcnn or a timm model name"
            + (f", e.g. {', '.join(close)}." if close else " (see timm.list_models()).")
        )
    try:
        net = timm.create_model(arch, pretrained=pretrained, num_classes=0, global_pool="avg")
    except Exception as exc:  # timm raises several types when weights cannot be fetched
        raise HistodetectError(
            f"cannot create {arch!r} with pretrained={pretrained} ({exc}). Offline? Download the "
            "weights elsewhere and pass --weights FILE."
        ) from None
    return net, net.num_features


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local backbone state dict, ignoring any classifier head; mismatches are errors."""
    state = load_state_dict_file(path)
    own = backbone.state_dict()
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    head_keys = {
        "fc.weight",
        "fc.bias",
        "classifier.weight",
        "classifier.bias",
        "head.fc.weight",
        "head.fc.bias",
        "last_linear.weight",
        "last_linear.bias",
    }
    state = {k: v for k, v in state.items() if k not in head_keys or k in own}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong),
            )
            if keys
        )
        raise HistodetectError(f"{path}: weights do not fit this backbone ({detail}).")
    backbone.load_state_dict(state)


def build_model(
    arch: str, pretrained: bool = False, weights: str | None = None, dropout: float = 0.2
) -> Classifier:
    """Build the classifier; ``weights`` loads a local backbone state dict (offline)."""
    backbone, width = build_backbone(arch, pretrained and weights is None)
    if weights:
        load_backbone_weights(backbone, weights)
    return Classifier(backbone, width, dropout)
