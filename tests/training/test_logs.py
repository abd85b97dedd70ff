"""A run's metrics logs: CSV always, TensorBoard only where the optional extra is installed."""

from __future__ import annotations

import importlib.util

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from histodetect.training.run import run_loggers


def test_training_logs_csv_without_tensorboard_and_both_with_it(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    if find_spec("tensorboard") or find_spec("tensorboardX"):
        assert [type(x) for x in run_loggers(tmp_path)] == [CSVLogger, TensorBoardLogger]
    missing = {"tensorboard", "tensorboardX"}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in missing else find_spec(name, *a),
    )
    assert [type(x) for x in run_loggers(tmp_path)] == [CSVLogger]
