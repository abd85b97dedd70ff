"""Batched augmentation: recipes, label safety, stain jitter, reproducibility, config, preview."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from histodetect.config import PROBABILITIES, AugmentConfig, RunConfig, merge
from histodetect.data.transforms import dihedral
from histodetect.errors import HistodetectError
from histodetect.training.augment import RECIPES, BatchAugment, preview

NONE = RECIPES["none"]
# Every op on for every sample, so a short batch exercises all of them.
EVERYTHING = replace(RECIPES["heavy"], **dict.fromkeys(PROBABILITIES, 1.0))


@pytest.fixture(autouse=True)
def one_thread():
    """Run these tiny batches on one thread: on a busy machine, waiting for a second thread
    stalled them up to 100-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def augment(cfg: AugmentConfig, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return BatchAugment(cfg).train()(x)


def he_like(n: int, seed: int = 0) -> torch.Tensor:
    """Synthetic H&E-looking patches: dark-purple nuclei on pink stroma, via Beer-Lambert."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    haem = torch.zeros(n, 96, 96)
    for i in range(n):
        for cy, cx in torch.rand(12, 2, generator=g) * 96:
            haem[i] += 1.5 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
    eosin = 0.3 + 0.2 * torch.rand(n, 96, 96, generator=g)
    od = haem[:, None] * torch.tensor([0.65, 0.70, 0.29]).view(1, 3, 1, 1)
    od = od + eosin[:, None] * torch.tensor([0.07, 0.99, 0.11]).view(1, 3, 1, 1)
    return torch.exp(-od)


def test_recipes_are_as_documented() -> None:
    assert AugmentConfig() == RECIPES["default"]
    assert all(getattr(NONE, p) == 0 for p in PROBABILITIES)
    light = {p for p in PROBABILITIES if getattr(RECIPES["light"], p) > 0}
    assert light == {"flip", "rot90"}
    assert all(getattr(RECIPES["heavy"], p) > 0 for p in PROBABILITIES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_keeps_shape_dtype_and_range(name: str) -> None:
    x = torch.rand(8, 3, 96, 96)
    x[0] = 0.0
    x[1] = 1.0
    before = x.clone()
    y = augment(RECIPES[name], x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(x, before), "the input batch must not be modified in place"
    assert torch.equal(y, x) == (name == "none")


def test_every_op_at_once_keeps_the_range() -> None:
    y = augment(EVERYTHING, he_like(4))
    assert y.shape == (4, 3, 96, 96) and y.min() >= 0 and y.max() <= 1


def test_eval_mode_and_none_recipe_are_identity() -> None:
    x = torch.rand(4, 3, 96, 96)
    assert torch.equal(BatchAugment(RECIPES["heavy"]).eval()(x), x)
    assert torch.equal(augment(NONE, x), x)


def test_flips_and_quarter_turns_give_exactly_the_8_dihedral_views() -> None:
    x = torch.rand(128, 3, 8, 8)
    y = augment(RECIPES["light"], x)
    seen = []
    for i in range(len(x)):
        matches = [k for k in range(8) if torch.equal(y[i], dihedral(x[i], k))]
        assert len(matches) == 1, f"sample {i} is not one of the 8 dihedral views"
        seen.append(matches[0])
    assert sorted(set(seen)) == list(range(8))


def test_crop_always_keeps_the_whole_centre_box() -> None:
    # Red: the labelled centre box. Green and blue: each pixel's own x and y (0..1), so after
    # cropping and resizing they tell exactly which part of the patch each output came from.
    n = 256
    ramp = torch.arange(96.0) / 95
    x = torch.zeros(n, 3, 96, 96)
    x[:, 0, 32:64, 32:64] = 1.0
    x[:, 1] = ramp.view(1, 96)
    x[:, 2] = ramp.view(96, 1)
    # Small enough crops that an unconstrained crop (72 px or more always holds it) would not.
    y = augment(replace(NONE, crop=1.0, crop_min=40), x)
    covered_lo = y[:, 1:].amin(dim=(2, 3)) * 95  # (n, 2): first source column and row shown
    covered_hi = y[:, 1:].amax(dim=(2, 3)) * 95
    assert (covered_lo <= 32 + 1e-3).all() and (covered_hi >= 63 - 1e-3).all()
    assert (covered_hi - covered_lo).amax(dim=1).min() < 50, "crops should zoom in"
    # Zooming in only ever enlarges the box: none of its brightness is lost.
    assert (y[:, 0].sum(dim=(1, 2)) >= x[0, 0].sum() * 0.999).all()


def test_stain_jitter_without_strength_is_identity() -> None:
    x = torch.rand(4, 3, 96, 96)
    y = augment(replace(NONE, stain=1.0, stain_sigma=0.0, stain_bias=0.0), x)
    assert (y - x).abs().max() < 1e-4


def test_stain_jitter_changes_colour_but_keeps_structure() -> None:
    x = he_like(8)
    y = augment(replace(NONE, stain=1.0, stain_sigma=0.2, stain_bias=0.1), x)
    colour_shift = (y.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).abs().amax(dim=1)
    assert (colour_shift > 0.005).all()
    grey_x, grey_y = x.mean(1).flatten(1), y.mean(1).flatten(1)
    for a, b in zip(grey_x, grey_y, strict=True):
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.95


def test_same_seed_same_output() -> None:
    x = he_like(4)
    a, b = augment(EVERYTHING, x, seed=3), augment(EVERYTHING, x, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(EVERYTHING, x, seed=4))


def test_colour_cast_scales_each_channel_within_its_strength() -> None:
    cfg = replace(NONE, cast=1.0, cast_strength=0.2)
    x = torch.full((64, 3, 8, 8), 0.5)
    y = augment(cfg, x)
    gains = y[:, :, 0, 0] / 0.5
    assert torch.allclose(y, gains[:, :, None, None] * 0.5)  # one factor per channel
    assert gains.min() >= 0.8 - 1e-6 and gains.max() <= 1.2 + 1e-6
    assert gains.std(0).min() > 0.05  # channels and patches drawn independently


def test_every_field_can_be_set_from_yaml_config() -> None:
    values = {
        "flip": 0.1,
        "rot90": 0.2,
        "crop": 0.3,
        "crop_min": 64,
        "affine": 0.4,
        "shift": 0.1,
        "scale": [0.8, 1.25],
        "rotate": 90,
        "stain": 0.6,
        "stain_sigma": 0.3,
        "stain_bias": 0.2,
        "color": 0.7,
        "brightness": 0.3,
        "contrast": 0.35,
        "saturation": 0.4,
        "hue": 0.1,
        "cast": 0.45,
        "cast_strength": 0.3,
        "pca": 0.8,
        "pca_std": 0.5,
        "blur": 0.9,
        "blur_sigma": 2.0,
        "motion_blur": 0.15,
        "motion_blur_kernel": 9,
        "noise": 0.25,
        "noise_std": 0.1,
        "jpeg": 0.35,
        "jpeg_quality": 30,
    }
    assert set(values) == {f.name for f in fields(AugmentConfig)}, "test every field"
    cfg = merge(RunConfig(), {"augment": values}).augment
    for name, value in values.items():
        got = getattr(cfg, name)
        assert got == (tuple(value) if isinstance(value, list) else value), name
        assert got != getattr(AugmentConfig(), name), f"{name}: pick a non-default value"
    assert isinstance(cfg.scale, tuple)
    BatchAugment(cfg)  # and the modules build from it


@pytest.mark.parametrize(
    "bad", [{"flip": 1.5}, {"crop_min": 20}, {"scale": [1.2, 0.8]}, {"hue": 0.7}, {"blur_sigma": 0}]
)
def test_invalid_settings_are_refused_clearly(bad: dict) -> None:
    with pytest.raises(HistodetectError, match=f"augment.{next(iter(bad))}"):
        merge(RunConfig(), {"augment": bad})


def test_preview_writes_a_png(tmp_path: Path) -> None:
    images = (he_like(3).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    out = tmp_path / "preview.png"
    preview(images, RECIPES["heavy"], out, n_aug=3)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    h, w = imread(out).shape[:2]
    assert w > h > 0  # 3 rows, 4 columns
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]


def test_crop_argument_gives_the_centre_of_the_full_augmentation():
    from histodetect.data.transforms import centre_crop
    from histodetect.training.augment import RECIPES, BatchAugment

    x = torch.rand(6, 3, 96, 96)
    aug = BatchAugment(RECIPES["light"]).train()
    torch.manual_seed(3)
    cropped = aug(x, crop=64)
    torch.manual_seed(3)
    full = aug(x)
    assert cropped.shape[-2:] == (64, 64)
    assert torch.equal(cropped, centre_crop(full, 64))  # geometric ops saw the whole patch
    assert torch.equal(aug.eval()(x, crop=64), centre_crop(x, 64))
    heavy = BatchAugment(RECIPES["heavy"]).train()
    out = heavy(x, crop=64)
    assert out.shape == (6, 3, 64, 64) and out.min() >= 0 and out.max() <= 1
