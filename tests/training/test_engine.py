"""Training engine: resume after kill -9, DDP on CPU, offline weights, losses and freezing."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from histodetect.cli.main import main
from histodetect.config import RunConfig, merge
from histodetect.data.loaders import EpochLoader, PatchDataset
from histodetect.data.pack import pack
from histodetect.data.store import open_store
from histodetect.errors import HistodetectError
from histodetect.models.classifier import build_model
from histodetect.training.module import PatchModule


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "histodetect.cli", *args], **kw)


def test_epoch_loader_is_seeded_sharded_and_resumable(kaggle_dir, tmp_path):
    pack(kaggle_dir(n=50), tmp_path / "s", progress=False, workers=1)
    ds = PatchDataset(open_store(tmp_path / "s"), np.arange(50))
    epoch = {"e": 0}
    full = EpochLoader(ds, 8, seed=1, epoch_fn=lambda: epoch["e"])
    first = [lab.tolist() for _, lab in full]
    assert len(first) == len(full) == 6  # 50 // 8: the ragged last batch is dropped
    assert all(len(batch) == 8 for batch in first)
    assert [lab.tolist() for _, lab in full] == first  # same epoch, same order
    epoch["e"] = 1
    assert [lab.tolist() for _, lab in full] != first  # next epoch, new order
    epoch["e"] = 0
    resumed = EpochLoader(ds, 8, seed=1, epoch_fn=lambda: 0)
    resumed.load_state_dict({"consumed": 3})
    assert [lab.tolist() for _, lab in resumed] == first[3:]
    ranks = [EpochLoader(ds, 8, seed=1, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 25 per rank, full batches of 8
    shards = [np.concatenate([r._order(0)]) for r in ranks]
    assert set(shards[0]).isdisjoint(shards[1]) and len(shards[0]) == len(shards[1]) == 25


def test_weights_file_is_loaded_and_mismatch_is_explained(tmp_path):
    from safetensors.torch import save_file

    source = build_model("resnet18")
    state = {k: v.clone() for k, v in source.backbone.state_dict().items()}
    save_file(state, str(tmp_path / "r18.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "r18.pth")
    for name in ("r18.safetensors", "r18.pth"):
        model = build_model("resnet18", weights=str(tmp_path / name))
        for key, value in model.backbone.state_dict().items():
            assert torch.equal(value, state[key]), key
    with pytest.raises(HistodetectError, match="do not fit this backbone"):
        build_model("efficientnet_b0", weights=str(tmp_path / "r18.safetensors"))
    with pytest.raises(HistodetectError, match="unknown architecture"):
        build_model("resnet_nonexistent")


@pytest.mark.slow
def test_training_from_a_weights_file_starts_from_those_weights(kaggle_dir, tmp_path):
    from safetensors.torch import save_file

    from histodetect.training.run import train

    backbone = build_model("resnet18").backbone
    save_file(backbone.state_dict(), str(tmp_path / "w.safetensors"))
    cfg = merge(
        RunConfig(),
        {
            "model": {"arch": "resnet18", "weights": str(tmp_path / "w.safetensors")},
            "train": {"max_steps": 1, "epochs": 1, "lr": 1e-9},
            "data": {"batch_size": 8},
        },
    )
    module = PatchModule(to_dict_safe(cfg))
    assert torch.equal(module.model.backbone.conv1.weight, backbone.conv1.weight)
    train(kaggle_dir(n=24), tmp_path / "run", cfg, progress=False)
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    # One step at a negligible learning rate: the exported weights are still the file's.
    assert torch.allclose(trained["backbone.conv1.weight"], backbone.conv1.weight, atol=1e-5)


def to_dict_safe(cfg):
    from histodetect.config import to_dict

    return to_dict(cfg)


def test_loss_options_and_freezing():
    y = torch.tensor([0.0, 1.0, 1.0, 0.0])
    logits = torch.tensor([-2.0, 2.0, -1.0, 0.5])
    plain = PatchModule(to_dict_safe(RunConfig())).loss(logits, y)
    weighted = PatchModule(to_dict_safe(RunConfig()), pos_weight=3.0).loss(logits, y)
    assert weighted > plain  # positives count three times
    smooth = merge(RunConfig(), {"train": {"label_smoothing": 0.2}})
    assert PatchModule(to_dict_safe(smooth)).loss(logits, y) != plain
    focal = merge(RunConfig(), {"train": {"loss": "focal"}})
    assert 0 < PatchModule(to_dict_safe(focal)).loss(logits, y) < plain  # easy ones down-weighted
    module = PatchModule(to_dict_safe(merge(RunConfig(), {"train": {"backbone_lr_mult": 0.1}})))
    groups = module.param_groups()
    assert groups[0]["lr"] == pytest.approx(0.1 * groups[1]["lr"])


def _steps_logged(run) -> list[int]:
    with open(run / "logs" / "metrics.csv", newline="") as fh:
        return [int(row["step"]) for row in csv.DictReader(fh) if row.get("train_loss_step")]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(kaggle_dir, tmp_path):
    data = kaggle_dir(n=400)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  epochs: 2\n  checkpoint_every: 8\ndata:\n  batch_size: 16\n")
    common = ["--data", str(data), "--config", str(cfg), "--accelerator", "cpu"]
    # Only the killed run needs a process of its own; the others run here (no fresh imports).
    assert main(["train", *common, "--out", str(tmp_path / "ref")]) == 0
    run = tmp_path / "run"
    proc = cli(
        "train", *common, "--out", str(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "model.json").exists(), "the run finished before it could be killed"
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    steps_per_epoch = 22  # 360 training patches // 16 (the ragged batch is dropped)
    assert 0 < killed_at < 2 * steps_per_epoch
    logged = _steps_logged(run)
    assert logged and max(logged) < killed_at  # rows of the killed run (every 5 steps)
    resume = ["train", "--data", str(data), "--out", str(run), "--resume", "--accelerator", "cpu"]
    assert main(resume) == 0
    # Nothing logged before the kill is lost, and nothing after the checkpoint is doubled.
    assert _steps_logged(run) == _steps_logged(tmp_path / "ref")
    a = json.loads((run / "metrics.json").read_text())
    b = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert a["resumed"] is True
    assert a["optimizer_steps"] == b["optimizer_steps"] == 2 * steps_per_epoch
    assert abs(a["valid"]["auc"] - b["valid"]["auc"]) < 0.05


@pytest.mark.slow
def test_two_process_cpu_ddp_keeps_weights_identical(kaggle_dir, tmp_path):
    data = kaggle_dir(n=120)
    run = tmp_path / "run"
    proc = cli(
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    check = json.loads((run / "ddp" / "check.json").read_text())
    assert check["world_size"] == 2 and check["identical"] is True
    assert len(set(check["hashes"].values())) == 1 and len(check["hashes"]) == 2
    assert json.loads((run / "metrics.json").read_text())["optimizer_steps"] == 4


@pytest.mark.slow
def test_every_recommended_backbone_builds_and_scores_96px_patches():
    from histodetect.models.classifier import RECOMMENDED

    for name in RECOMMENDED:
        model = build_model(name).eval()
        with torch.no_grad():
            logits = model(torch.randn(2, 3, 96, 96))
        assert logits.shape == (2,), name


@pytest.mark.slow
def test_lr_finder_and_augment_preview_write_their_plots(kaggle_dir, tmp_path):
    from histodetect.cli.main import main

    data = kaggle_dir(n=64)
    plot = tmp_path / "lr.png"
    assert (
        main(
            [
                "lr-find",
                "--data",
                str(data),
                "--out",
                str(plot),
                "--steps",
                "12",
                "--batch-size",
                "8",
                "--accelerator",
                "cpu",
            ]
        )
        == 0
    )
    assert plot.stat().st_size > 5_000
    grid = tmp_path / "aug.png"
    assert main(["augment-preview", str(data), "--out", str(grid), "--recipe", "heavy"]) == 0
    assert grid.stat().st_size > 5_000


def test_training_log_in_a_file_is_the_tools_own_one_line_per_epoch(kaggle_dir, tmp_path):
    data = kaggle_dir(n=64)
    flags = ["--epochs", "2", "--batch-size", "16", "--accelerator", "cpu"]
    proc = cli(
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        *flags,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    log = out + err
    for noise in ("GPU available: False", "TPU available", "💡", "Loading `train_dataloader`"):
        assert noise not in log
    assert "\r" not in log  # no live-bar updates piled up in a file
    assert "train_loss_step" not in log and "━" not in log  # nor a bar's last frame
    epochs = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all("val_auc" in line for line in epochs)
