"""Grad-CAM explanations: maps in the patch frame, galleries of the real top losses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn

from histodetect.errors import HistodetectError
from histodetect.inference.explain import explain_image, explain_run, gradcam, overlay, target_layer
from histodetect.inference.predictor import Predictor
from histodetect.models.classifier import Classifier, build_model

META = {
    "arch": "smallcnn",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "crop": 96,
    "threshold": 0.5,
    "channels_last": True,
}


def _smallcnn_predictor(crop: int) -> Predictor:
    """An untrained SmallCNN whose head weights are all positive.

    Its last feature maps are non-negative (ReLU then max-pooling), so every Grad-CAM map is
    positive wherever a feature fires: the maps cannot pass the tests by being all zero.
    """
    torch.manual_seed(0)
    model = build_model("smallcnn", dropout=0.0)
    with torch.no_grad():
        model.head[1].weight.abs_()
    return Predictor(model, {**META, "crop": crop}, device="cpu")


class DarknessNet(nn.Module):
    """A hand-set backbone whose features are 'darkness' per 4x4 cell (16x16 maps at 64 px)."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 2, kernel_size=4, stride=4)
        with torch.no_grad():
            conv.weight.fill_(-1.0 / 48)  # minus the mean of the cell's 48 values
            conv.bias.zero_()
        self.features = nn.Sequential(conv, nn.ReLU())
        self.num_features = 2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean((2, 3))


def _darkness_predictor() -> Predictor:
    model = Classifier(DarknessNet(), 2, dropout=0.0)
    with torch.no_grad():
        model.head[1].weight.fill_(1.0)  # darker = more "tumour"
        model.head[1].bias.zero_()
    return Predictor(model, {**META, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3}, "cpu")


def test_target_layer_is_the_last_feature_block():
    smallcnn = build_model("smallcnn")
    assert target_layer(smallcnn) is smallcnn.backbone.blocks[-1]
    resnet = build_model("resnet18")  # timm, random weights (offline)
    assert target_layer(resnet) is resnet.backbone.layer4[-1]
    darkness = Classifier(DarknessNet(), 2)
    assert target_layer(darkness, 64) is darkness.backbone.features
    smallcnn.train()
    before = smallcnn.backbone.stem[1].running_mean.clone()
    target_layer(smallcnn)  # the probe pass leaves mode and batch-norm statistics alone
    assert smallcnn.training
    assert torch.equal(before, smallcnn.backbone.stem[1].running_mean)


def test_gradcam_maps_are_normalised_and_zero_outside_the_crop():
    images = np.random.default_rng(0).integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    cropped = _smallcnn_predictor(crop=64)
    before = cropped.predict_proba(images)
    heat = gradcam(cropped, images, batch_size=2)
    assert heat.shape == (5, 96, 96) and heat.dtype == np.float32
    assert heat.min() >= 0 and np.allclose(heat.max(axis=(1, 2)), 1.0)
    outside = np.ones((96, 96), bool)
    outside[16:80, 16:80] = False  # the centre 64 px the model sees
    assert (heat[:, outside] == 0).all()
    assert (heat[:, 16:80, 16:80] > 0).mean() > 0.5
    # Explaining changes nothing about the predictions.
    assert np.array_equal(cropped.predict_proba(images), before)

    full = gradcam(_smallcnn_predictor(crop=96), images)
    assert (full[:, outside] > 0).any()  # without a crop the border is explained too


def test_gradcam_lands_on_the_evidence():
    """The only dark region of the patch is where the map is hot (no flip, offset or transpose)."""
    predictor = _darkness_predictor()
    for top, left in ((40, 56), (20, 28)):  # patch coordinates, 4-px aligned inside the crop
        image = np.full((1, 96, 96, 3), 200, np.uint8)
        image[0, top : top + 16, left : left + 16] = 30
        assert predictor.predict_proba(image)[0] > 0.5
        heat = gradcam(predictor, image)[0]
        row, col = np.unravel_index(np.argmax(heat), heat.shape)
        assert top <= row < top + 16 and left <= col < left + 16
        assert heat[top : top + 16, left : left + 16].mean() > 0.8
        near = np.zeros((96, 96), bool)
        near[top - 3 : top + 19, left - 3 : left + 19] = True
        assert heat[~near].max() < 1e-6


def test_gradcam_rejects_non_uint8_patches():
    with pytest.raises(HistodetectError, match="uint8"):
        gradcam(_smallcnn_predictor(96), np.zeros((1, 96, 96, 3), np.float32))


def test_overlay_keeps_the_patch_where_there_is_no_evidence_and_draws_the_centre_box():
    image = np.random.default_rng(1).integers(0, 200, (96, 96, 3), dtype=np.uint8)
    heat = np.zeros((96, 96), np.float32)
    heat[0:10, 0:10] = 1.0
    out = overlay(image, heat)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[32, 32:64] == 255).all() and (out[32:64, 63] == 255).all()  # box edges
    assert np.array_equal(out[40:56, 40:56], image[40:56, 40:56])  # inside the box: untouched
    assert np.array_equal(out[80:, 80:], image[80:, 80:])  # no heat: untouched
    assert not np.array_equal(out[:10, :10], image[:10, :10])  # heat: tinted


def _write_run(run: Path) -> Predictor:
    """A run folder holding an untrained SmallCNN (explanations need only the model files)."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = build_model("smallcnn", dropout=0.0)
    run.mkdir(parents=True)
    save_file(model.state_dict(), str(run / "model.safetensors"))
    (run / "model.json").write_text(json.dumps(META))
    return Predictor.from_run(run, device="cpu")


def test_explain_run_writes_galleries_of_the_highest_losses(kaggle_dir, tmp_path):
    from histodetect.data.loaders import ensure_store, split_indices_of

    data = kaggle_dir(n=60)
    (data / "SYNTHETIC.md").write_text("generated\n")
    predictor = _write_run(tmp_path / "run")
    out = tmp_path / "explain"
    summary = explain_run(tmp_path / "run", data, out, n=3)

    for name in ("top_losses.png", "uncertain.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 600
    assert json.loads((out / "explain.json").read_text()) == summary
    assert summary["synthetic"] is True

    store = ensure_store(data, progress=False)
    idx = split_indices_of(store, "valid")
    p = predictor.predict_proba(store.read(idx)).astype(np.float64)
    y = store.labels[idx].astype(np.float64)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    loss = -(y * np.log(q) + (1 - y) * np.log(1 - q))
    by_id = {str(store.ids[i]): k for k, i in enumerate(idx)}
    assert summary["n_patches"] == len(idx)

    top = summary["top_losses"]
    assert len(top) == 3
    rows = [by_id[e["id"]] for e in top]
    assert [e["label"] for e in top] == [int(y[k]) for k in rows]
    assert np.allclose([e["probability"] for e in top], p[rows], atol=1e-6)
    assert np.allclose([e["loss"] for e in top], loss[rows], atol=1e-5)
    assert [e["loss"] for e in top] == sorted((e["loss"] for e in top), reverse=True)
    others = np.delete(loss, rows)
    assert min(e["loss"] for e in top) >= others.max() - 1e-6  # really the highest

    unsure = summary["uncertain"]
    rows = [by_id[e["id"]] for e in unsure]
    gap = np.abs(p - 0.5)
    assert max(gap[rows]) <= np.delete(gap, rows).min() + 1e-6


def test_explain_run_uses_the_runs_own_validation_split(kaggle_dir, tmp_path):
    from histodetect.config import RunConfig, merge, save_config

    data = kaggle_dir(n=40)
    _write_run(tmp_path / "run")
    save_config(
        merge(RunConfig(), {"data": {"valid_fraction": 0.25}}), tmp_path / "run" / "config.yaml"
    )
    summary = explain_run(tmp_path / "run", data, tmp_path / "explain", n=2)
    assert summary["n_patches"] == 10  # not the default 10% (which would mix in training data)


def test_explain_image_returns_the_predicted_probability(tmp_path):
    predictor = _write_run(tmp_path / "run")
    image = np.random.default_rng(2).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    path = tmp_path / "patch.tif"
    tifffile.imwrite(path, image, photometric="rgb")
    out = tmp_path / "figs" / "patch.png"
    prob = explain_image(tmp_path / "run", path, out)
    assert prob == pytest.approx(float(predictor.predict_proba(image[None])[0]), abs=1e-6)
    with Image.open(out) as im:
        assert im.format == "PNG"
