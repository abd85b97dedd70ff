"""The run configuration: every section checked when it is read, saved and read back unchanged."""

from __future__ import annotations

import pytest

from histodetect.config import RunConfig, load_config, merge, save_config
from histodetect.errors import HistodetectError


@pytest.mark.parametrize(
    ("bad", "needles"),
    [
        ({"train": {"loss": "focal2"}}, ["train.loss", "'focal2'", "'bce' or 'focal'"]),
        ({"train": {"lr": -1}}, ["train.lr", "-1", "greater than 0"]),
        ({"train": {"optimizer": "adam"}}, ["train.optimizer", "'adam'", "'adamw' or 'sgd'"]),
        ({"train": {"schedule": "step"}}, ["train.schedule", "'step'", "'onecycle'"]),
        ({"train": {"precision": "16"}}, ["train.precision", "'16'", "'bf16-mixed'"]),
        ({"train": {"class_weights": "balanced"}}, ["train.class_weights", "'none' or 'auto'"]),
        ({"train": {"epochs": 2.5}}, ["train.epochs", "2.5", "not a valid int"]),
        ({"train": {"warmup_fraction": 0}}, ["train.warmup_fraction", "greater than 0"]),
        ({"data": {"mean": [0.5]}}, ["data.mean", "[0.5]", "list of 3 numbers"]),
        ({"data": {"std": [0.2, 0.2, 0.0]}}, ["data.std", "[0.2, 0.2, 0.0]", "greater than 0"]),
        ({"data": {"batch_size": 0}}, ["data.batch_size", "0", "greater than or equal to 1"]),
        ({"data": {"crop": 16}}, ["data.crop", "16", "greater than or equal to 32"]),
        ({"data": {"folds": 3, "fold": 3}}, ["data.fold", "3", "0 to 2 with 3 folds"]),
        ({"model": {"pretrained": "yes"}}, ["model.pretrained", "'yes'", "true or false"]),
        ({"model": {"dropout": 1.0}}, ["model.dropout", "1.0", "less than 1"]),
        ({"augment": {"scale": [1.2, 0.8]}}, ["augment.scale", "low <= high"]),
        ({"seed": -1}, ["seed", "-1", "greater than or equal to 0"]),
        ({"train": 5}, ["train", "5", "mapping of settings"]),
    ],
)
def test_a_bad_setting_is_named_with_its_value_and_what_is_allowed(bad, needles):
    with pytest.raises(HistodetectError) as caught:
        merge(RunConfig(), bad, "bad.yaml")
    message = str(caught.value)
    assert message.startswith("bad.yaml: ") and "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_an_unknown_key_suggests_the_setting_meant():
    with pytest.raises(HistodetectError, match=r"train.epoch: unknown setting 'epoch' \(did you"):
        merge(RunConfig(), {"train": {"epoch": 7}})
    with pytest.raises(HistodetectError, match=r"unknown setting 'augmentation'.*known: data,"):
        merge(RunConfig(), {"augmentation": {}})


def test_every_bad_setting_is_reported_at_once():
    with pytest.raises(HistodetectError) as caught:
        merge(RunConfig(), {"train": {"loss": "focal2", "lr": -1}, "data": {"mean": [0.5]}})
    assert str(caught.value).count(";") == 2


def test_saved_config_reads_back_identical(tmp_path):
    cfg = merge(
        RunConfig(),
        {
            "seed": 7,
            "data": {"mean": [0.5, 0.5, 0.5], "folds": 5, "fold": -1, "groups": "g.csv"},
            "model": {"arch": "resnet18", "weights": "w.safetensors", "pretrained": True},
            "augment": {"scale": [0.8, 1.25], "jpeg_quality": 30},
            "train": {"loss": "focal", "schedule": "cosine", "lr": "1e-3"},  # PyYAML: a string
        },
    )
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.data.mean == (0.5, 0.5, 0.5) and again.train.lr == 1e-3
