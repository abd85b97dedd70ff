"""A first training run: the run folder describes itself and the predictor reproduces it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from histodetect.config import RunConfig, load_config, merge, to_dict
from histodetect.data.loaders import PatchDataset, make_loader
from histodetect.data.pack import pack
from histodetect.data.store import open_store
from histodetect.data.transforms import to_model_input
from histodetect.errors import HistodetectError
from histodetect.inference.predictor import Predictor
from histodetect.training.run import train


def test_yaml_overrides_defaults_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.01\nmodel:\n  arch: resnet18\n")
    cfg = load_config(path, {"data": {"batch_size": 32}})
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.arch, cfg.data.batch_size) == (
        7,
        0.01,
        "resnet18",
        32,
    )
    assert merge(RunConfig(), to_dict(cfg)) == cfg
    path.write_text("train:\n  epoch: 7\n")
    with pytest.raises(HistodetectError, match="unknown setting 'epoch'"):
        load_config(path)
    path.write_text("train:\n  epochs: lots\n")
    with pytest.raises(HistodetectError, match="not a valid int"):
        load_config(path)


def test_normalisation_matches_the_textbook_formula():
    images = torch.randint(0, 256, (4, 96, 96, 3), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    x = to_model_input(images, mean, std)
    ref = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / (
        torch.tensor(std).view(1, 3, 1, 1)
    )
    assert torch.allclose(x, ref, atol=1e-5)


def test_loader_yields_uint8_batches_with_labels(kaggle_dir, tmp_path):
    pack(kaggle_dir(n=20), tmp_path / "s", progress=False, workers=1)
    store = open_store(tmp_path / "s")
    images, labels = next(iter(make_loader(store, np.arange(20), 8, shuffle=False)))
    assert images.dtype == torch.uint8 and images.shape == (8, 96, 96, 3)
    assert torch.equal(labels, torch.from_numpy(store.labels[:8].astype(np.float32)))
    assert torch.equal(
        PatchDataset(store, np.arange(20))[3][0], torch.from_numpy(store.read([3])[0])
    )


@pytest.mark.slow
def test_short_training_run_writes_a_self_describing_folder(kaggle_dir, tmp_path):
    data = kaggle_dir(n=160)
    cfg = merge(
        RunConfig(), {"train": {"epochs": 3, "checkpoint_every": 5}, "data": {"batch_size": 16}}
    )
    result = train(data, tmp_path / "run", cfg, progress=False)
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "environment.json",
        "data.json",
        "metrics.json",
        "model.json",
        "model.safetensors",
        "scope.safetensors",
        "curves.png",
        "logs/metrics.csv",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    ):
        assert (run / name).exists(), name
    # One resumable "last" checkpoint, not last.ckpt beside a last-v1.ckpt.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3
    meta = json.loads((run / "model.json").read_text())
    assert meta["arch"] == "smallcnn" and meta["input_size"] == 96 and meta["synthetic"] is False
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["valid"]["auc"] == pytest.approx(result.val_auc)
    # The dark-centre toy task is easy: three tiny epochs must learn it.
    assert result.val_auc > 0.9
    # The predictor loaded from the folder reproduces the run's own validation AUC.
    from torchmetrics.functional.classification import binary_auroc

    store = open_store(json.loads((run / "data.json").read_text())["store"])
    idx = np.flatnonzero(store.splits == "valid")
    probs = Predictor.from_run(run).predict_proba(store.read(idx), tta=8)
    auc = float(binary_auroc(torch.from_numpy(probs), torch.from_numpy(store.labels[idx]).long()))
    assert auc == pytest.approx(result.val_auc, abs=0.1)
    with pytest.raises(HistodetectError, match="already holds a finished run"):
        train(data, run, cfg, progress=False)


def test_centre_crop_keeps_the_labelled_centre():
    from histodetect.data.transforms import centre_crop

    x = torch.zeros(2, 3, 96, 96)
    x[:, :, 32:64, 32:64] = 1.0
    cropped = centre_crop(x, 64)
    assert cropped.shape[-2:] == (64, 64)
    assert cropped.sum() == x.sum()  # the whole centre box survives
    assert torch.equal(centre_crop(x, 96), x)


def test_unknown_recipe_is_a_clear_error():
    from histodetect.training.augment import RECIPES, recipe

    assert recipe("light") == RECIPES["light"]
    with pytest.raises(HistodetectError, match="choose one of none, light, default, heavy"):
        recipe("extreme")


def test_inference_preprocessing_equals_the_training_path():
    from histodetect.data.transforms import centre_crop, normalise, to_unit_float

    images = torch.randint(0, 256, (3, 96, 96, 3), dtype=torch.uint8)
    mean, std = (0.7, 0.55, 0.7), (0.24, 0.28, 0.21)
    for crop in (96, 64):
        fast = to_model_input(images, mean, std, crop=crop)
        slow = normalise(centre_crop(to_unit_float(images), crop), mean, std)
        assert torch.allclose(fast, slow, atol=1e-5)


def test_ema_forgets_the_initial_weights_and_keeps_integer_buffers():
    from torch.optim.swa_utils import AveragedModel

    from histodetect.training.module import ema_with_warmup

    live = torch.nn.BatchNorm1d(1)
    avg = AveragedModel(live, avg_fn=ema_with_warmup(0.998), use_buffers=True)
    with torch.no_grad():
        live.weight.fill_(0.0)
    avg.update_parameters(live)  # the first update copies the initial weights
    with torch.no_grad():
        live.weight.fill_(1.0)
    for _ in range(200):
        live.num_batches_tracked += 1
        avg.update_parameters(live)
    # A fixed decay of 0.998 would still hold 0.998**200 = 67 % of the initial weight.
    assert avg.module.weight.item() > 0.95
    assert avg.module.num_batches_tracked.item() == 200


def test_a_stain_normalising_run_stores_its_target_and_predicts_the_same_way(kaggle_dir, tmp_path):
    data = kaggle_dir(n=64)
    cfg = merge(
        RunConfig(),
        {"train": {"epochs": 1}, "data": {"batch_size": 16, "stain_norm": "reinhard"}},
    )
    train(data, tmp_path / "run", cfg, progress=False)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["stain_norm"]["method"] == "reinhard" and len(meta["stain_norm"]["lab_mean"]) == 3
    predictor = Predictor.from_run(tmp_path / "run")
    images = torch.randint(0, 256, (4, 96, 96, 3), dtype=torch.uint8)
    # A global colour cast is taken out before the model sees the patch.
    tinted = (images.float() * torch.tensor([1.0, 0.95, 0.8])).round().to(torch.uint8)
    a, b = predictor.predict_proba(images), predictor.predict_proba(tinted)
    assert np.abs(a - b).max() < 0.05
    plain = json.loads((tmp_path / "run" / "model.json").read_text())
    plain.pop("stain_norm")
    assert Predictor(predictor.model, plain, "cpu").stain.method == "none"
