"""Training with Lightning: the LightningModule, callbacks and the self-describing run folder."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

from histodetect import PATCH_SIZE, __version__
from histodetect.augment import BatchAugment
from histodetect.config import RunConfig, merge, save_config, to_dict
from histodetect.data import (
    ensure_store,
    make_loader,
    normalise,
    split_indices_of,
    stratified_subset,
    to_unit_float,
)
from histodetect.errors import HistodetectError
from histodetect.models import build_model
from histodetect.predict import MODEL_FILE, MODEL_META, Predictor
from histodetect.store import Store, write_atomic


class PatchModule(L.LightningModule):
    """Classifier + on-device normalisation/augmentation + BCE loss + AUC/accuracy metrics."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})  # checkpoints rebuild the same module
        self.cfg: RunConfig = merge(RunConfig(), config)
        m = self.cfg.model
        self.model = build_model(m.arch, m.pretrained, m.weights, m.dropout)
        if m.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.augment = BatchAugment(self.cfg.augment)
        self.loss_fn = nn.BCEWithLogitsLoss()
        from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

        self.val_auc = BinaryAUROC()
        self.val_acc = BinaryAccuracy()
        self.train_acc = BinaryAccuracy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Batches cross to the device as uint8 (4x less traffic); the float work happens here.
        images, labels = batch
        d = self.cfg.data
        x = self.augment(to_unit_float(images))
        return normalise(x, d.mean, d.std, self.cfg.model.channels_last), labels

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        self.train_acc(logits.detach(), y.int())
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_auc(logits, y.int())
        self.val_acc(logits, y.int())
        bs = len(y)
        self.log("val_loss", self.loss_fn(logits, y), prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val_auc", self.val_auc, prog_bar=True, batch_size=bs)
        self.log("val_acc", self.val_acc, prog_bar=True, batch_size=bs)

    def configure_optimizers(self):
        t = self.cfg.train
        if t.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        elif t.optimizer == "sgd":
            opt = torch.optim.SGD(
                self.parameters(), lr=t.lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay
            )
        else:
            raise HistodetectError(f"train.optimizer: {t.optimizer!r} is not adamw or sgd.")
        if t.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt,
                max_lr=t.lr,
                total_steps=int(self.trainer.estimated_stepping_batches),
                pct_start=0.25,
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if t.schedule == "none":
            return opt
        raise HistodetectError(f"train.schedule: {t.schedule!r} is not onecycle or none.")


class Throughput(L.Callback):
    """Shows training images/s in the progress bar and keeps the whole-run figure."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._t = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dt = time.perf_counter() - self._t
        n = len(batch[1])
        self.images += n
        self.seconds += dt
        pl_module.log("img_s", n / max(dt, 1e-9), prog_bar=True, on_step=True, on_epoch=False)

    @property
    def rate(self) -> float:
        """Images per second over every training step so far."""
        return self.images / self.seconds if self.seconds else 0.0


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


def environment() -> dict:
    """Versions and hardware, saved in every run folder."""
    import lightning
    import timm

    env = {
        "histodetect": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    return env


def plot_curves(metrics_csv: Path, out: Path, title: str) -> None:
    """Loss, accuracy and AUC per epoch, and per-step training loss, as one PNG."""
    import csv

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))

    def series(key: str, by: str = "epoch") -> tuple[list[float], list[float]]:
        pts = [(float(r[by]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(13, 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    panels = [
        ("loss", [("train_loss_epoch", "train"), ("val_loss", "valid")]),
        ("accuracy", [("train_acc", "train"), ("val_acc", "valid")]),
        ("ROC AUC", [("val_auc", "valid")]),
    ]
    for ax, (name, keys) in zip(axes, panels, strict=False):
        for key, label in keys:
            xs, ys = series(key)
            if xs:
                ax.plot([x + 1 for x in xs], ys, marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    xs, ys = series("train_loss_step", "step")
    axes[3].plot(xs, ys, lw=0.8)
    axes[3].set_title("training loss per step")
    axes[3].set_xlabel("step")
    axes[3].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def export_model(module: PatchModule, run: Path, extra: dict) -> None:
    """Write ``model.safetensors`` + ``model.json``: all a predictor needs, no pickle."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.model.state_dict().items()}
    tmp = run / f".{MODEL_FILE}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, run / MODEL_FILE)
    cfg = module.cfg
    meta = {
        "format": "histodetect-model",
        "version": 1,
        "arch": cfg.model.arch,
        "dropout": cfg.model.dropout,
        "channels_last": cfg.model.channels_last,
        "input_size": PATCH_SIZE,
        "input": "uint8 RGB, HWC; scaled to 0..1 then normalised with mean/std",
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "threshold": 0.5,
        "histodetect": __version__,
        **extra,
    }
    write_atomic(run / MODEL_META, json.dumps(meta, indent=2).encode())


def train(
    data: str | Path,
    run: str | Path,
    cfg: RunConfig | None = None,
    progress: bool = True,
    accelerator: str = "auto",
    devices: int | str = "auto",
) -> TrainResult:
    """Train a classifier on DATA and write everything into the run folder ``run``.

    Args:
        data: a Kaggle folder, PCam folder or packed store (packed into the cache if needed).
        run: the run folder to create.
        cfg: the run configuration (defaults when None).
        progress: show progress bars.
        accelerator: Lightning accelerator ("auto", "cpu", "gpu").
        devices: Lightning devices.
    """
    t0 = time.perf_counter()
    cfg = cfg or RunConfig()
    run = Path(run)
    if (run / MODEL_META).exists():
        raise HistodetectError(f"{run}: already holds a finished run; choose a new --out.")
    store = ensure_store(
        data, progress=progress, valid_fraction=cfg.data.valid_fraction, seed=cfg.data.split_seed
    )
    train_idx, valid_idx = split_indices_of(store, "train"), split_indices_of(store, "valid")
    if len(train_idx) == 0 or len(valid_idx) == 0:
        raise HistodetectError(
            f"{store.path}: needs labelled 'train' and 'valid' patches (has {store.counts()})."
        )
    train_idx = train_idx[
        stratified_subset(store.labels[train_idx], cfg.data.limit_train, cfg.seed)
    ]
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    write_atomic(run / "environment.json", json.dumps(environment(), indent=2).encode())
    data_info = data_description(store)
    write_atomic(run / "data.json", json.dumps(data_info, indent=2).encode())

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = PatchModule(to_dict(cfg))
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    checkpoint = ModelCheckpoint(
        dirpath=run / "checkpoints",
        filename="best",
        monitor="val_auc",
        mode="max",
        save_last=True,
    )
    speed = Throughput()
    trainer = L.Trainer(
        default_root_dir=run,
        max_epochs=cfg.train.epochs,
        max_time={"minutes": cfg.train.max_minutes} if cfg.train.max_minutes else None,
        accelerator=accelerator,
        devices=devices,
        precision=resolve_precision(cfg.train.precision),
        callbacks=[checkpoint, speed, LearningRateMonitor(logging_interval="step")],
        logger=[
            CSVLogger(run, name="", version="logs"),
            TensorBoardLogger(run, name="tensorboard", version=""),
        ],
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=5,
        deterministic=False,
    )
    b = cfg.data.batch_size
    trainer.fit(
        module,
        make_loader(store, train_idx, b, shuffle=True, seed=cfg.seed),
        make_loader(store, valid_idx, b * 2, shuffle=False),
    )
    if checkpoint.best_model_path:
        best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(best["state_dict"])
    export_model(module, run, {"synthetic": store.synthetic, "data": data_info["fingerprint"]})

    # Final numbers come from the same predictor every other command uses.
    predictor = Predictor.from_run(run)
    probs = predictor.predict_proba(store.read(valid_idx))
    labels = store.labels[valid_idx]
    from torchmetrics.functional.classification import binary_accuracy, binary_auroc

    p, y = torch.from_numpy(probs), torch.from_numpy(labels.astype(np.int64))
    auc, acc = float(binary_auroc(p, y)), float(binary_accuracy(p, y))
    result = TrainResult(
        str(run),
        auc,
        acc,
        len(train_idx),
        len(valid_idx),
        speed.rate,
        time.perf_counter() - t0,
        store.synthetic,
    )
    metrics = {
        "valid": {"auc": auc, "accuracy": acc, "n": len(valid_idx)},
        "train_images_per_s": speed.rate,
        "seconds": result.seconds,
        "best_checkpoint": checkpoint.best_model_path,
        "synthetic": store.synthetic,
    }
    write_atomic(run / "metrics.json", json.dumps(metrics, indent=2).encode())
    csv_path = run / "logs" / "metrics.csv"
    if csv_path.exists():
        title = f"{cfg.model.arch} on {Path(store.manifest['source']['path']).name}"
        plot_curves(
            csv_path, run / "curves.png", title + (" (SYNTHETIC DATA)" if store.synthetic else "")
        )
    return result


def resolve_precision(precision: str) -> str:
    """``auto`` → bf16 mixed on GPUs that support it, else fp32 (bf16 is slower on CPUs)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def data_description(store: Store) -> dict:
    """The data a run saw: store, source, counts, fingerprint and whether it is synthetic."""
    m = store.manifest
    return {
        "store": str(store.path),
        "source": m["source"],
        "fingerprint": m["fingerprint"],
        "counts": m["counts"],
        "synthetic": store.synthetic,
    }
