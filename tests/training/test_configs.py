"""The shipped recipes in configs/: every file loads through load_config with its key values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from histodetect.config import IMAGENET_MEAN, IMAGENET_STD, RunConfig, load_config, merge, to_dict
from histodetect.training.augment import RECIPES

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FILES = sorted(CONFIGS.glob("*.yaml"))
# The GPU recipes: (architecture, epochs) per file.
GPU_RECIPES = {
    "gpu_efficientnet_b0.yaml": ("efficientnet_b0", 10),
    "gpu_resnet50.yaml": ("resnet50", 8),
}


def test_the_folder_holds_the_gpu_recipes():
    assert {f.name for f in FILES} >= set(GPU_RECIPES)


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_every_config_loads_and_round_trips(path):
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw, f"{path.name} is not a mapping of sections"
    cfg = load_config(path)
    # Saved as a run's config.yaml and read back, it is the same configuration.
    assert merge(RunConfig(), to_dict(cfg)) == cfg
    # Command-line flags still win over the file.
    assert load_config(path, {"data": {"batch_size": 32}}).data.batch_size == 32


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_gpu_recipe_key_values(name):
    arch, epochs = GPU_RECIPES[name]
    cfg = load_config(CONFIGS / name)
    assert (cfg.model.arch, cfg.model.pretrained, cfg.model.weights) == (arch, True, None)
    assert cfg.model.channels_last
    assert (cfg.data.mean, cfg.data.std, cfg.data.crop) == (IMAGENET_MEAN, IMAGENET_STD, 96)
    assert cfg.data.batch_size == 256
    t = cfg.train
    assert t.precision == "bf16-mixed"
    assert (t.epochs, t.max_steps, t.max_minutes) == (epochs, 0, 60)
    assert (t.optimizer, t.schedule, t.lr, t.backbone_lr_mult) == ("adamw", "onecycle", 1e-3, 0.5)
    assert t.ema == 0.999 and t.weight_decay == 0.01 and t.checkpoint_every == 500
    # One epoch of warm-up.
    assert t.warmup_fraction == pytest.approx(1 / epochs)
    # Augmentation written out field by field is exactly the "heavy" recipe.
    assert cfg.augment == RECIPES["heavy"]
