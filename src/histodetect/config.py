"""Typed, frozen run configuration with YAML overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from histodetect import CENTRE, PATCH_SIZE
from histodetect.errors import HistodetectError

# ImageNet statistics: what timm's pretrained backbones expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The probability fields of AugmentConfig; every other field is a strength.
PROBABILITIES = (
    "flip",
    "rot90",
    "crop",
    "affine",
    "stain",
    "color",
    "pca",
    "blur",
    "motion_blur",
    "noise",
    "jpeg",
)


@dataclass(frozen=True)
class AugmentConfig:
    """Per-sample augmentation: each op's probability (0 disables it) and its strengths.

    The defaults are ``RECIPES["default"]``. Ops run in the order listed here.

    Attributes:
        flip: Probability of a horizontal flip, and independently of a vertical one.
        rot90: Probability of a quarter turn by 0, 90, 180 or 270 degrees (uniformly); with
            ``flip=0.5`` and ``rot90=1`` all 8 dihedral views are equally likely.
        crop: Probability of a random square crop, resized back, that keeps the centre box.
        crop_min: Smallest crop side in pixels of a 96-pixel patch (32 to 96).
        affine: Probability of a random shift/scale/rotation, reflection-padded.
        shift: Largest shift either way, as a fraction of the side.
        scale: Range of the zoom factor, ``(low, high)``.
        rotate: Largest rotation either way, in degrees.
        stain: Probability of H&E stain jitter in HED optical-density space.
        stain_sigma: Largest relative change of each stain's amount (factor in ``1 ± sigma``).
        stain_bias: Largest optical density added to or removed from each stain.
        color: Probability of brightness/contrast/saturation/hue jitter.
        brightness: Largest relative brightness change (factor in ``1 ± brightness``).
        contrast: Largest relative contrast change.
        saturation: Largest relative saturation change.
        hue: Largest hue shift, as a fraction of the colour wheel (at most 0.5).
        pca: Probability of fancy-PCA lighting noise along the image's RGB principal axes.
        pca_std: Standard deviation of the shift along each axis, in units of the image's own
            standard deviation along that axis.
        blur: Probability of Gaussian blur.
        blur_sigma: Largest blur sigma in pixels.
        motion_blur: Probability of motion blur in a random direction.
        motion_blur_kernel: Largest motion-blur length in pixels (odd, at least 3).
        noise: Probability of additive Gaussian pixel noise.
        noise_std: Largest noise standard deviation, in [0, 1] intensity units.
        jpeg: Probability of JPEG compression.
        jpeg_quality: Lowest JPEG quality (1 to 100); the quality is drawn up to 100.
    """

    flip: float = 0.5
    rot90: float = 1.0
    crop: float = 0.25
    crop_min: int = 80
    affine: float = 0.25
    shift: float = 0.04
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: float = 20.0
    stain: float = 0.5
    stain_sigma: float = 0.05
    stain_bias: float = 0.05
    color: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.0
    pca: float = 0.0
    pca_std: float = 0.1
    blur: float = 0.1
    blur_sigma: float = 1.0
    motion_blur: float = 0.0
    motion_blur_kernel: int = 5
    noise: float = 0.1
    noise_std: float = 0.02
    jpeg: float = 0.0
    jpeg_quality: float = 60.0

    def __post_init__(self) -> None:
        # Fail when the config is read, not hours later inside a kornia op.
        def bad(name: str, why: str) -> HistodetectError:
            return HistodetectError(f"augment.{name}: {getattr(self, name)!r} {why}.")

        for name in PROBABILITIES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "is not a probability between 0 and 1")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "scale" and value < 0:
                raise bad(f.name, "is negative")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise bad("scale", "is not a range (low, high) with 0 < low <= high")
        if not CENTRE[1] - CENTRE[0] <= self.crop_min <= PATCH_SIZE:
            raise bad("crop_min", f"must be {CENTRE[1] - CENTRE[0]} to {PATCH_SIZE} pixels")
        for name in ("brightness", "contrast", "saturation", "stain_sigma"):
            if getattr(self, name) >= 1:
                raise bad(name, "must be below 1 (factors are drawn in 1 ± value)")
        if self.blur_sigma <= 0:
            raise bad("blur_sigma", "must be above 0 (blur: 0 turns blur off)")
        if self.hue > 0.5:
            raise bad("hue", "must be at most 0.5 (half the colour wheel)")
        if self.motion_blur_kernel < 3:
            raise bad("motion_blur_kernel", "must be at least 3 pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise bad("jpeg_quality", "must be 1 to 100")


@dataclass(frozen=True)
class DataConfig:
    """Where patches come from and how they are batched."""

    batch_size: int = 128
    valid_fraction: float = 0.1
    split_seed: int = 0
    limit_train: int = 0  # 0 = every training patch; else a seeded stratified subset
    # The model sees the centre crop x crop px (after augmentation; 96 = all). 64 px trains
    # 2.25x faster, but on the real sample the whole patch scored higher in the same 20 min
    # (val AUC 0.948 vs 0.935): the context around the labelled centre carries signal.
    crop: int = 96
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Cross-validation (set by `histodetect cv`): the store's train rows are cut into `folds`
    # folds (by slide when slide ids exist, else by `groups`, an id,group csv); fold `fold`
    # validates, -1 = none (the fold ensemble). 0 folds = the store's own train/valid split.
    folds: int = 0
    fold: int = 0
    groups: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Backbone (any timm name, or our own ``densecnn``/``smallcnn``) and head."""

    # Padding-free, so `slide` maps it densely (6x faster, exact); on the real sample it scored
    # val AUC 0.947 vs smallcnn's 0.944 in the same 20-minute CPU budget (benchmarks/quality.py).
    arch: str = "densecnn"
    pretrained: bool = False
    weights: str | None = None
    dropout: float = 0.2
    channels_last: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the training loop."""

    epochs: int = 4
    max_steps: int = 0  # 0 = run every epoch in full
    max_minutes: float = 0.0  # 0 = no time limit
    lr: float = 2e-3
    backbone_lr_mult: float = 1.0  # discriminative LR: backbone gets lr x this
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    schedule: str = "onecycle"  # onecycle | cosine | plateau | none
    warmup_fraction: float = 0.2  # onecycle's rising part
    freeze_epochs: int = 0  # train only the head for this many epochs first
    loss: str = "bce"  # bce | focal
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    class_weights: str = "none"  # none | auto (positives weighted by negatives/positives)
    early_stopping: int = 0  # patience in epochs on val AUC; 0 = off
    accumulate: int = 1  # gradient accumulation steps
    grad_clip: float = 0.0  # 0 = off
    precision: str = "auto"  # auto | 32-true | bf16-mixed | 16-mixed
    checkpoint_every: int = 50  # optimiser steps between resumable last.ckpt saves
    # Decay of an exponential moving average of the weights (validated, checkpointed and
    # exported); 0 = off. On the real sample it lifted val AUC from ~0.948 to ~0.954 in 20 min.
    ema: float = 0.995


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run depends on; saved as ``config.yaml`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists, for YAML)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {
        f.name: to_dict(getattr(cfg, f.name))
        if is_dataclass(getattr(cfg, f.name))
        else plain(getattr(cfg, f.name))
        for f in fields(cfg)
    }


def merge(cfg: Any, overrides: dict, where: str = "config") -> Any:
    """Return ``cfg`` with nested ``overrides`` applied; unknown keys raise a clear error."""
    hints = get_type_hints(type(cfg))
    names = {f.name for f in fields(cfg)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in names:
            raise HistodetectError(
                f"{where}: unknown setting {key!r}; known: {', '.join(sorted(names))}."
            )
        current = getattr(cfg, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise HistodetectError(f"{where}.{key}: expected a mapping, got {value!r}.")
            changes[key] = merge(current, value, f"{where}.{key}")
        else:
            changes[key] = _coerce(value, hints[key], f"{where}.{key}")
    return dataclasses.replace(cfg, **changes)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value to the field's type, or explain the mismatch."""
    text = str(hint)
    if value is None and "None" in text:
        return None
    try:
        if text.startswith("tuple"):
            return tuple(float(v) for v in value)
        if hint is bool or text == "bool":
            if isinstance(value, bool):
                return value
            raise TypeError
        if hint is int or text == "int":
            if isinstance(value, bool) or float(value) != int(value):
                raise TypeError
            return int(value)
        if hint is float or text == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise HistodetectError(
            f"{where}: {value!r} is not a valid {getattr(hint, '__name__', text)}."
        ) from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Defaults, then a YAML file (if given), then command-line ``overrides``."""
    cfg = RunConfig()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise HistodetectError(f"{path}: cannot read the YAML config ({exc}).") from None
        if not isinstance(data, dict):
            raise HistodetectError(f"{path}: the YAML config must be a mapping of sections.")
        cfg = merge(cfg, data, str(path))
    if overrides:
        cfg = merge(cfg, overrides, "command line")
    return cfg


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
