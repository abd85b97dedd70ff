"""`histodetect lr-find`: sweep the learning rate over a few batches and plot the loss."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from histodetect.config import RunConfig, merge, to_dict
from histodetect.data.folds import run_rows
from histodetect.data.loaders import ensure_store
from histodetect.training.datamodule import PatchDataModule
from histodetect.training.module import PatchModule


def lr_find(
    data: str | Path,
    out: str | Path,
    cfg: RunConfig | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    steps: int = 100,
) -> dict:
    """Sweep the learning rate over ``steps`` batches (Lightning's LR finder) and plot loss.

    Writes ``out`` (a PNG with the suggested LR marked) and returns the suggestion.
    """
    from lightning.pytorch.tuner import Tuner

    cfg = cfg or RunConfig()
    store = ensure_store(data, valid_fraction=cfg.data.valid_fraction, seed=cfg.data.split_seed)
    train_idx, valid_idx = run_rows(store, cfg.data, "train"), run_rows(store, cfg.data, "valid")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = PatchModule(to_dict(merge(cfg, {"train": {"schedule": "none"}})))
    datamodule = PatchDataModule(store, train_idx, valid_idx, cfg.data.batch_size, cfg.seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        default_root_dir=out.parent / f".{out.stem}-lr-find",
        accelerator=accelerator,
        devices=devices,
        max_epochs=max(1, steps // max(len(train_idx) // cfg.data.batch_size, 1) + 1),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    finder = Tuner(trainer).lr_find(
        module,
        datamodule=datamodule,
        min_lr=1e-6,
        max_lr=1.0,
        num_training=steps,
        update_attr=False,
    )
    fig = finder.plot(suggest=True)
    title = f"LR finder: {cfg.model.arch}, batch {cfg.data.batch_size}"
    fig.axes[0].set_title(title + (" (SYNTHETIC DATA)" if store.synthetic else ""))
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, out)
    suggestion = finder.suggestion()
    return {"suggested_lr": suggestion, "plot": str(out), "synthetic": store.synthetic}
