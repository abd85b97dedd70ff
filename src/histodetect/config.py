"""Typed, frozen run configuration with YAML overrides, validated when it is read.

The sections are pydantic dataclasses: still frozen standard dataclasses (``fields``,
``replace`` and equality work as before), but every construction checks names, types, ranges,
lengths and allowed values, so a bad setting fails in one paragraph when the config is read,
not as a traceback from torch hours into a run.
"""

from __future__ import annotations

import difflib
from dataclasses import field, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import yaml
from pydantic import (
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass

from histodetect import CENTRE, PATCH_SIZE
from histodetect.errors import HistodetectError

# ImageNet statistics: what timm's pretrained backbones expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Unknown keys are errors (a typo must not silently train with the default); NaN and infinity
# are never meaningful settings. Numbers stay lax: PyYAML reads `1e-3` (no dot) as a string.
_SETTINGS = ConfigDict(extra="forbid", allow_inf_nan=False)

# Whole numbers and switches are strict: `epochs: 2.5`, `epochs: true` or `pretrained: 1` are
# mistakes, not values to round.
Whole = Annotated[int, Strict()]
Count = Annotated[Whole, Field(ge=0)]
AtLeastOne = Annotated[Whole, Field(ge=1)]
Seed = Annotated[Whole, Field(ge=0, le=2**32 - 1)]  # numpy's and Lightning's seed range
Flag = Annotated[bool, Strict()]
NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
BelowOne = Annotated[float, Field(ge=0, lt=1)]  # factors drawn in 1 ± value, shares, decays

# The probability fields of AugmentConfig; every other field is a strength.
PROBABILITIES = (
    "flip",
    "rot90",
    "crop",
    "affine",
    "stain",
    "color",
    "cast",
    "pca",
    "blur",
    "motion_blur",
    "noise",
    "jpeg",
)


@dataclass(frozen=True, config=_SETTINGS)
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
        cast: Probability of a colour cast: each RGB channel scaled by its own factor, as a
            scanner's white balance or an old slide's yellowing does.
        cast_strength: Largest relative change of a channel (factor in ``1 ± strength``).
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

    flip: Probability = 0.5
    rot90: Probability = 1.0
    crop: Probability = 0.25
    crop_min: Annotated[Whole, Field(ge=CENTRE[1] - CENTRE[0], le=PATCH_SIZE)] = 80
    affine: Probability = 0.25
    shift: NonNegative = 0.04
    scale: tuple[Positive, Positive] = (0.9, 1.1)
    rotate: NonNegative = 20.0
    stain: Probability = 0.5
    stain_sigma: BelowOne = 0.05
    stain_bias: NonNegative = 0.05
    color: Probability = 0.5
    brightness: BelowOne = 0.1
    contrast: BelowOne = 0.1
    saturation: BelowOne = 0.1
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.0  # half the colour wheel at most
    cast: Probability = 0.0
    cast_strength: BelowOne = 0.15
    pca: Probability = 0.0
    pca_std: NonNegative = 0.1
    blur: Probability = 0.1
    blur_sigma: Positive = 1.0  # blur: 0 turns blur off
    motion_blur: Probability = 0.0
    motion_blur_kernel: Annotated[Whole, Field(ge=3)] = 5
    noise: Probability = 0.1
    noise_std: NonNegative = 0.02
    jpeg: Probability = 0.0
    jpeg_quality: Annotated[float, Field(ge=1, le=100)] = 60.0

    @field_validator("scale")
    @classmethod
    def _low_high(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if scale[0] > scale[1]:
            raise ValueError("must be a range [low, high] with low <= high")
        return scale


@dataclass(frozen=True, config=_SETTINGS)
class DataConfig:
    """Where patches come from and how they are batched."""

    batch_size: AtLeastOne = 128
    valid_fraction: BelowOne = 0.1  # 0 = no validation split
    split_seed: Seed = 0
    limit_train: Count = 0  # 0 = every training patch; else a seeded stratified subset
    # The model sees the centre crop x crop px (after augmentation; 96 = all). 64 px trains
    # 2.25x faster, but on the real sample the whole patch scored higher in the same 20 min
    # (val AUC 0.948 vs 0.935): the context around the labelled centre carries signal.
    crop: Annotated[Whole, Field(ge=CENTRE[1] - CENTRE[0], le=PATCH_SIZE)] = 96
    # Per-channel statistics of [0, 1] RGB: exactly three values each (R, G, B).
    mean: tuple[Probability, Probability, Probability] = IMAGENET_MEAN
    std: tuple[Positive, Positive, Positive] = IMAGENET_STD
    # Cross-validation (set by `histodetect cv`): the store's train rows are cut into `folds`
    # folds (by slide when slide ids exist, else by `groups`, an id,group csv); fold `fold`
    # validates, -1 = none (the fold ensemble). 0 folds = the store's own train/valid split.
    folds: Count = 0
    fold: Annotated[Whole, Field(ge=-1)] = 0
    groups: str | None = None
    # Stain normalisation of every patch (training and inference alike) onto a target fitted
    # from the training patches: none, reinhard (L*a*b* statistics) or macenko (stain vectors).
    stain_norm: Literal["none", "reinhard", "macenko"] = "none"

    @field_validator("folds")
    @classmethod
    def _no_single_fold(cls, folds: int) -> int:
        if folds == 1:
            raise ValueError("must be 0 (no cross-validation) or at least 2")
        return folds

    @field_validator("fold")
    @classmethod
    def _fold_exists(cls, fold: int, info: ValidationInfo) -> int:
        folds = info.data.get("folds") or 0  # absent when `folds` itself was invalid
        if folds and fold >= folds:
            raise ValueError(f"must be -1 (the ensemble) or 0 to {folds - 1} with {folds} folds")
        return fold


@dataclass(frozen=True, config=_SETTINGS)
class ModelConfig:
    """Backbone (any timm name, or our own ``densecnn``/``smallcnn``) and head."""

    # The most accurate in the default 20-minute CPU budget: on 1,878 held-out real patches,
    # trained one after another with all threads (benchmarks/quality.py), AUC 0.962 vs
    # densecnn's 0.954 (paired 95 % interval of the difference +0.004 to +0.014). It is padded,
    # so `slide` maps it patch by patch; train `densecnn` for dense, 6x faster slide maps.
    arch: str = "smallcnn"
    pretrained: Flag = False
    weights: str | None = None
    dropout: BelowOne = 0.2
    channels_last: Flag = True


@dataclass(frozen=True, config=_SETTINGS)
class TrainConfig:
    """Optimisation and the training loop."""

    epochs: AtLeastOne = 4
    max_steps: Count = 0  # 0 = run every epoch in full
    max_minutes: NonNegative = 0.0  # 0 = no time limit
    lr: Positive = 2e-3
    backbone_lr_mult: NonNegative = 1.0  # discriminative LR: backbone gets lr x this
    weight_decay: NonNegative = 1e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["onecycle", "cosine", "plateau", "none"] = "onecycle"
    # onecycle's rising part, a share of the run (the schedule divides by it).
    warmup_fraction: Annotated[float, Field(gt=0, le=1)] = 0.2
    freeze_epochs: Count = 0  # train only the head for this many epochs first
    loss: Literal["bce", "focal"] = "bce"
    focal_gamma: NonNegative = 2.0
    label_smoothing: BelowOne = 0.0
    # auto: positives weighted by negatives/positives.
    class_weights: Literal["none", "auto"] = "none"
    early_stopping: Count = 0  # patience in epochs on val AUC; 0 = off
    accumulate: AtLeastOne = 1  # gradient accumulation steps
    grad_clip: NonNegative = 0.0  # 0 = off
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    checkpoint_every: Count = 50  # optimiser steps between resumable last.ckpt saves
    # Decay of an exponential moving average of the weights (validated, checkpointed and
    # exported); 0 = off. On the real sample it lifted val AUC from ~0.948 to ~0.954 in 20 min.
    ema: BelowOne = 0.995


@dataclass(frozen=True, config=_SETTINGS)
class RunConfig:
    """Everything a training run depends on; saved as ``config.yaml`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: Seed = 0


@cache
def _adapter(kind: type) -> TypeAdapter:
    """pydantic's validator and serialiser of one config class (built once: it is not free)."""
    return TypeAdapter(kind)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists, for YAML)."""
    return _adapter(type(cfg)).dump_python(cfg, mode="json")


def merge(cfg: Any, overrides: dict, where: str = "config") -> Any:
    """Return ``cfg`` with nested ``overrides`` applied, every setting validated.

    Raises:
        HistodetectError: one paragraph naming each bad key, its value and what is allowed.
    """
    settings = _deep_update(to_dict(cfg), overrides)
    try:
        return _adapter(type(cfg)).validate_python(settings)
    except ValidationError as exc:
        raise HistodetectError(_explain(exc, type(cfg), settings, where)) from None


def _deep_update(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` written over it, section by section."""
    out = dict(base)
    for key, value in overrides.items():
        both = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = _deep_update(out[key], value) if both else value
    return out


def _explain(exc: ValidationError, kind: type, settings: dict, where: str) -> str:
    """pydantic's errors as one paragraph: each bad key, its value and what is allowed."""
    problems: dict[str, str] = {}
    for err in exc.errors():
        # The setting's own key: an index into a list (data.mean.1) is reported as the list.
        path = [part for part in err["loc"] if isinstance(part, str)]
        key = ".".join(path)
        hint, owner = _hint(kind, path)
        if err["type"] == "unexpected_keyword_argument":
            known = [f.name for f in fields(owner)]
            close = difflib.get_close_matches(path[-1], known, n=1)
            tip = f" (did you mean {close[0]!r}?)" if close else ""
            problems[key] = f"{key}: unknown setting {path[-1]!r}{tip}; known: {', '.join(known)}"
        elif key not in problems:
            value = _lookup(settings, path, err["input"])
            problems[key] = f"{key}: {value!r} {_allowed(err, hint)}"
    return f"{where}: " + "; ".join(problems.values()) + "."


def _hint(kind: type, path: list[str]) -> tuple[Any, type]:
    """The type annotation of the setting at ``path`` and the config class that holds it."""
    hint: Any = kind
    owner = kind
    for part in path:
        if not is_dataclass(hint):
            break
        owner = hint
        hint = get_type_hints(hint, include_extras=True).get(part)
    return hint, owner


def _lookup(settings: dict, path: list[str], fallback: Any) -> Any:
    """The value given for the setting at ``path`` (the whole list, not one item of it)."""
    value: Any = settings
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return fallback
        value = value[part]
    return value


def _allowed(err: dict, hint: Any) -> str:
    """What is wrong with a value and what is allowed, from pydantic's error and the type."""
    if err["type"] == "value_error":  # our own validators say what is allowed
        return "is not allowed: " + str(err["ctx"]["error"])
    base = get_args(hint)[0] if get_origin(hint) is Annotated else hint
    if is_dataclass(base):
        return "is not a mapping of settings (name: value)"
    if get_origin(base) is tuple:
        n = len(get_args(base))
        detail = err["msg"].replace("Input should be", "each must be")
        extra = f" ({detail})" if err["type"] not in ("missing", "too_long", "too_short") else ""
        return f"is not allowed: must be a list of {n} numbers{extra}"
    if err["type"].endswith(("_type", "_parsing", "_from_float")):
        names = {
            int: "int (a whole number)",
            float: "float (a number)",
            bool: "bool (true or false)",
        }
        optional = " or null" if type(None) in get_args(base) else ""
        return f"is not a valid {names.get(base, 'str (text)')}{optional}"
    return "is not allowed: " + err["msg"].replace("Input should be", "must be")


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Defaults, then a YAML file (if given), then command-line ``overrides``.

    Raises:
        HistodetectError: the file cannot be read, or a setting is unknown or invalid.
    """
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
