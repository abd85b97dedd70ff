"""`histodetect train`: resolve the config, open the data, build and fit the model, export it."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch

from histodetect.config import RunConfig, load_config, to_dict
from histodetect.data.folds import run_rows
from histodetect.data.loaders import ensure_store, stratified_subset
from histodetect.data.stain import fit_target
from histodetect.data.store import Store
from histodetect.errors import HistodetectError
from histodetect.files import write_atomic
from histodetect.inference.predictor import MODEL_META, Predictor
from histodetect.training.callbacks import (
    ConsumedBatches,
    FlushLogs,
    FreezeBackbone,
    Throughput,
    progress_bar,
)
from histodetect.training.datamodule import PatchDataModule
from histodetect.training.module import PatchModule, ema_with_warmup, positive_weight
from histodetect.training.run_folder import (
    data_description,
    export_model,
    metrics_before,
    prepare_run_folder,
    record_rank_weights,
    restore_metrics,
    write_curves,
)

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import ModelCheckpoint


# Lightning's lines that say nothing about this run: "💡 Tip" adverts for services, the list
# of accelerators nobody asked for ("GPU available: False", ...) and internal notices. A used
# GPU is still announced ("GPU available: True (cuda), used: True").
_NOISE = (
    "💡",
    "GPU available: False",
    "TPU available: False",
    "HPU available: False",
    "Loading `train_dataloader`",
)
# Training patches a stain-normalising run fits its target on: enough to average out single
# patches, few enough to fit in a second.
STAIN_FIT_PATCHES = 256
# Training patches the out-of-scope statistics are fitted on: plenty for Gaussians of a few
# hundred dimensions, and a minute of inference on a CPU at most.
SCOPE_FIT_PATCHES = 20_000


class _NoNoise(logging.Filter):
    """Drops Lightning's log lines that are noise in every run's log (``_NOISE``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NOISE)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoNoise())


@dataclass(frozen=True)
class TrainResult:
    """Where the run is and how it did on the validation split."""

    run: str
    val_auc: float
    val_acc: float
    n_train: int
    n_valid: int
    images_per_s: float
    seconds: float
    synthetic: bool


def train(
    data: str | Path,
    run: str | Path,
    cfg: RunConfig | None = None,
    progress: bool = True,
    accelerator: str = "auto",
    devices: int | str = "auto",
    num_nodes: int = 1,
    strategy: str = "auto",
    resume: bool = False,
) -> TrainResult:
    """Train a classifier on DATA and write everything into the run folder ``run``.

    Args:
        data: a Kaggle folder, PCam folder or packed store (packed into the cache if needed).
        run: the run folder to create (or to continue, with ``resume``).
        cfg: the run configuration (defaults when None; with ``resume``, the run's own).
        progress: show progress bars.
        accelerator: Lightning accelerator ("auto", "cpu", "gpu").
        devices: devices per node ("auto" or a count).
        num_nodes: machines taking part (multi-node DDP).
        strategy: Lightning strategy, e.g. "ddp" for several GPUs or CPU processes.
        resume: continue an interrupted run from ``checkpoints/last.ckpt`` (mid-epoch too):
            the same schedule, data order and number of optimiser steps as an uninterrupted run.
    """
    t0 = time.perf_counter()
    run = Path(run)
    # DDP launches re-run this same command in worker processes: only the first one prepares
    # (and checks) the run folder.
    primary = all(int(os.environ.get(k, 0)) == 0 for k in ("LOCAL_RANK", "NODE_RANK"))
    cfg = _resolve_config(run, cfg, resume, primary)
    store, train_idx, valid_idx = _open_data(data, cfg, progress)
    data_info = data_description(store)
    prepare_run_folder(run, cfg, data_info, data, resume, primary)

    module = _build_module(cfg, store, train_idx)
    trainer, best, speed = _build_trainer(
        run, cfg, progress, accelerator, devices, num_nodes, strategy
    )
    datamodule = PatchDataModule(store, train_idx, valid_idx, cfg.data.batch_size, cfg.seed)
    _fit(trainer, module, datamodule, run, resume)
    if not trainer.is_global_zero:
        nan = float("nan")
        return _result(run, store, train_idx, valid_idx, speed, t0, nan, nan)

    best_path = _load_best(module, best)
    export_model(module, run, {"synthetic": store.synthetic, "data": data_info["fingerprint"]})
    # Final numbers come from the same predictor every other command uses.
    predictor = Predictor.from_run(run)
    auc, acc = _validation_scores(predictor, store, valid_idx)
    fit_run_scope(run, store, train_idx, valid_idx, cfg.seed, predictor)
    result = _result(run, store, train_idx, valid_idx, speed, t0, auc, acc)
    _write_metrics(run, result, trainer, best_path, resume)
    write_curves(run, cfg.model.arch, store)
    return result


def _last_checkpoint(run: Path) -> Path:
    """The checkpoint a resumed run continues from."""
    return run / "checkpoints" / "last.ckpt"


def _resolve_config(run: Path, cfg: RunConfig | None, resume: bool, primary: bool) -> RunConfig:
    """The run's configuration: the given one (or defaults), or the saved one when resuming.

    Refuses a finished run folder, a resume with nothing to resume, and (in the primary
    process) a new run over an unfinished one.
    """
    if (run / MODEL_META).exists():
        raise HistodetectError(f"{run}: already holds a finished run; choose a new --out.")
    if resume:
        if not _last_checkpoint(run).exists():
            raise HistodetectError(f"{run}: nothing to resume (no checkpoints/last.ckpt).")
        cfg = load_config(run / "config.yaml")
    elif primary and (run / "config.yaml").exists():
        raise HistodetectError(
            f"{run}: holds an unfinished run; pass --resume to continue it or choose a new --out."
        )
    return cfg or RunConfig()


def _open_data(
    data: str | Path, cfg: RunConfig, progress: bool
) -> tuple[Store, np.ndarray, np.ndarray]:
    """The packed store (packing DATA into the cache if needed), training and validation rows.

    The rows are the store's splits, or a cross-validation fold's (``data.folds``); the
    training rows are the configured stratified subset (``data.limit_train``).
    """
    store = ensure_store(
        data, progress=progress, valid_fraction=cfg.data.valid_fraction, seed=cfg.data.split_seed
    )
    train_idx, valid_idx = run_rows(store, cfg.data, "train"), run_rows(store, cfg.data, "valid")
    if len(train_idx) == 0 or len(valid_idx) == 0:
        raise HistodetectError(
            f"{store.path}: needs labelled 'train' and 'valid' patches (has {store.counts()})."
        )
    train_idx = train_idx[
        stratified_subset(store.labels[train_idx], cfg.data.limit_train, cfg.seed)
    ]
    return store, train_idx, valid_idx


def _build_module(cfg: RunConfig, store: Store, train_idx: np.ndarray) -> PatchModule:
    """Seed everything, then build the module: its initial weights follow from the seed.

    A stain-normalising run fits its target on a seeded sample of its training patches here.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    pos_weight = positive_weight(cfg.train.class_weights, store.labels[train_idx])
    target = None
    if cfg.data.stain_norm != "none":
        rows = np.random.default_rng(cfg.seed).permutation(train_idx)[:STAIN_FIT_PATCHES]
        target = fit_target(store.read(np.sort(rows)), cfg.data.stain_norm)
    return PatchModule(to_dict(cfg), pos_weight, target)


def _callbacks(
    run: Path, cfg: RunConfig, progress: bool
) -> tuple[list, ModelCheckpoint, Throughput]:
    """The run's callbacks, with the best-checkpoint keeper and the throughput meter."""
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    best = ModelCheckpoint(
        dirpath=run / "checkpoints",
        filename="best",
        monitor="val_auc",
        mode="max",
        save_last=True,
        # Both keepers write the one last.ckpt (the newer state wins); with Lightning's version
        # counter the second would start a last-v1.ckpt that nothing resumes from.
        enable_version_counter=False,
    )
    # A resumable last.ckpt every few steps, so a crash loses minutes, not an epoch.
    periodic = ModelCheckpoint(
        dirpath=run / "checkpoints",
        save_top_k=0,
        save_last=True,
        every_n_train_steps=max(cfg.train.checkpoint_every, 1),
        enable_version_counter=False,
    )
    speed = Throughput()
    callbacks = [best, periodic, speed, ConsumedBatches(), FlushLogs(), LearningRateMonitor("step")]
    if progress:
        callbacks.append(progress_bar())
    if cfg.train.freeze_epochs:
        callbacks.append(FreezeBackbone(cfg.train.freeze_epochs))
    if cfg.train.ema:
        from lightning.pytorch.callbacks import WeightAveraging

        # Validation, checkpoints and the exported model then use the averaged weights.
        callbacks.append(WeightAveraging(avg_fn=ema_with_warmup(cfg.train.ema)))
    if cfg.train.early_stopping:
        callbacks.append(EarlyStopping("val_auc", mode="max", patience=cfg.train.early_stopping))
    return callbacks, best, speed


def _build_trainer(
    run: Path,
    cfg: RunConfig,
    progress: bool,
    accelerator: str,
    devices: int | str,
    num_nodes: int,
    strategy: str,
) -> tuple[L.Trainer, ModelCheckpoint, Throughput]:
    """The Lightning trainer (limits, precision, callbacks, the logs of :func:`run_loggers`).

    Returns it with its best-checkpoint keeper and throughput meter.
    """
    from lightning.pytorch.callbacks import ProgressBar

    callbacks, best, speed = _callbacks(run, cfg, progress)
    trainer = L.Trainer(
        default_root_dir=run,
        max_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps or -1,
        max_time={"minutes": cfg.train.max_minutes} if cfg.train.max_minutes else None,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=resolve_precision(cfg.train.precision),
        accumulate_grad_batches=cfg.train.accumulate,
        gradient_clip_val=cfg.train.grad_clip or None,
        callbacks=callbacks,
        logger=run_loggers(run),
        # Only our live bar: Lightning would add its own (rich, many lines) beside EpochLines.
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        enable_model_summary=False,
        log_every_n_steps=5,
        use_distributed_sampler=True,
    )
    return trainer, best, speed


def run_loggers(run: Path) -> list:
    """Metrics logs in ``run``: ``logs/metrics.csv`` always, ``tensorboard/`` when TensorBoard
    is installed (the ``tensorboard`` extra: a heavy package that nothing else needs)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [CSVLogger(run, name="", version="logs")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(run, name="tensorboard", version=""))
    return loggers


def _fit(
    trainer: L.Trainer,
    module: PatchModule,
    datamodule: PatchDataModule,
    run: Path,
    resume: bool,
) -> None:
    """Train (continuing from ``checkpoints/last.ckpt`` when resuming); under DDP, check ranks."""
    last = _last_checkpoint(run)
    earlier = []
    if resume and trainer.is_global_zero:
        step = torch.load(last, map_location="cpu", weights_only=False, mmap=True)["global_step"]
        earlier = metrics_before(run, step)
    with warnings.catch_warnings():
        if resume:  # the folders of the run being resumed are meant to be there
            warnings.filterwarnings("ignore", message=r".* directory .* exists and is not empty")
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    if earlier and trainer.is_global_zero:
        restore_metrics(run, earlier)
    if trainer.world_size > 1:
        record_rank_weights(trainer, module, run)


def _load_best(module: PatchModule, best: ModelCheckpoint) -> str:
    """Load the best checkpoint's weights into ``module`` (if one was kept); return its path."""
    best_path = best.best_model_path
    if best_path:
        state = torch.load(best_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
    return best_path


def fit_run_scope(
    run: Path,
    store: Store,
    train_idx: np.ndarray,
    valid_idx: np.ndarray,
    seed: int = 0,
    predictor: Predictor | None = None,
) -> dict:
    """Fit and save the run's out-of-scope statistics on (a sample of) its training patches,
    with the threshold set on its validation patches (``predictor``: the run, if loaded)."""
    from histodetect.inference.scope import fit_scope, save_scope

    rows = np.sort(np.random.default_rng(seed).permutation(train_idx)[:SCOPE_FIT_PATCHES])
    predictor = predictor or Predictor.from_run(run)
    stats = fit_scope(predictor, store.read(rows), store.labels[rows], store.read(valid_idx))
    save_scope(run, stats)
    return stats


def _validation_scores(
    predictor: Predictor, store: Store, valid_idx: np.ndarray
) -> tuple[float, float]:
    """ROC AUC and accuracy of the run's exported model on the validation rows."""
    probs = predictor.predict_proba(store.read(valid_idx))
    labels = store.labels[valid_idx]
    from torchmetrics.functional.classification import binary_accuracy, binary_auroc

    p, y = torch.from_numpy(probs), torch.from_numpy(labels.astype(np.int64))
    return float(binary_auroc(p, y)), float(binary_accuracy(p, y))


def _result(
    run: Path,
    store: Store,
    train_idx: np.ndarray,
    valid_idx: np.ndarray,
    speed: Throughput,
    t0: float,
    auc: float,
    acc: float,
) -> TrainResult:
    """What ``train`` returns: where the run is, its scores, sizes, speed and time since ``t0``."""
    return TrainResult(
        str(run),
        auc,
        acc,
        len(train_idx),
        len(valid_idx),
        speed.rate,
        time.perf_counter() - t0,
        store.synthetic,
    )


def _write_metrics(
    run: Path, result: TrainResult, trainer: L.Trainer, best_path: str, resume: bool
) -> None:
    """``metrics.json``: validation scores, steps and epochs run, speed, time, best checkpoint."""
    metrics = {
        "valid": {"auc": result.val_auc, "accuracy": result.val_acc, "n": result.n_valid},
        "optimizer_steps": int(trainer.global_step),
        "epochs_run": int(trainer.current_epoch),
        "train_images_per_s": result.images_per_s,
        "seconds": result.seconds,
        "best_checkpoint": best_path,
        "resumed": resume,
        "synthetic": result.synthetic,
    }
    write_atomic(run / "metrics.json", json.dumps(metrics, indent=2).encode())


def resolve_precision(precision: str) -> str:
    """``auto`` → bf16 mixed on GPUs that support it, else fp32 (bf16 is slower on CPUs)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"
