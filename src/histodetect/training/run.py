"""Training with Lightning: the LightningModule, callbacks and the self-describing run folder."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer
from torch import nn

from histodetect import PATCH_SIZE, __version__
from histodetect.config import RunConfig, load_config, merge, save_config, to_dict
from histodetect.data.loaders import (
    EpochLoader,
    PatchDataset,
    ensure_store,
    make_loader,
    split_indices_of,
    stratified_subset,
)
from histodetect.data.store import Store
from histodetect.data.transforms import normalise, to_unit_float
from histodetect.errors import HistodetectError
from histodetect.files import write_atomic
from histodetect.inference.predictor import MODEL_FILE, MODEL_META, Predictor
from histodetect.models.classifier import build_model
from histodetect.training.augment import BatchAugment

# Lightning notes that are expected here: the module (not the datamodule) moves batches on
# purpose, and a newer torch deprecates a pytree call inside Lightning itself.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


class PatchModule(L.LightningModule):
    """Classifier + on-device augmentation/normalisation + loss + AUC/accuracy metrics."""

    def __init__(self, config: dict, pos_weight: float | None = None) -> None:
        super().__init__()
        # Checkpoints rebuild the same module from these.
        self.save_hyperparameters({"config": config, "pos_weight": pos_weight})
        self.cfg: RunConfig = merge(RunConfig(), config)
        m = self.cfg.model
        self.model = build_model(m.arch, m.pretrained, m.weights, m.dropout)
        if m.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.augment = BatchAugment(self.cfg.augment)
        self.register_buffer(
            "pos_weight", torch.tensor(pos_weight if pos_weight else 1.0), persistent=False
        )
        from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

        self.val_auc = BinaryAUROC()
        self.val_acc = BinaryAccuracy()
        self.train_acc = BinaryAccuracy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """BCE or focal loss, with optional label smoothing and positive-class weight."""
        t = self.cfg.train
        target = y * (1 - t.label_smoothing) + 0.5 * t.label_smoothing
        if t.loss == "focal":
            from torchvision.ops import sigmoid_focal_loss

            per = sigmoid_focal_loss(logits, target, alpha=-1, gamma=t.focal_gamma)
            weights = torch.where(y > 0.5, self.pos_weight, torch.ones_like(y))
            return (per * weights).mean()
        if t.loss != "bce":
            raise HistodetectError(f"train.loss: {t.loss!r} is not bce or focal.")
        return nn.functional.binary_cross_entropy_with_logits(
            logits, target, pos_weight=self.pos_weight
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Batches cross to the device as uint8 (4x less traffic); the float work happens here.
        images, labels = batch
        d = self.cfg.data
        x = self.augment(to_unit_float(images), crop=d.crop)
        return normalise(x, d.mean, d.std, self.cfg.model.channels_last), labels

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
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
        self.log("val_loss", self.loss(logits, y), prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val_auc", self.val_auc, prog_bar=True, batch_size=bs)
        self.log("val_acc", self.val_acc, prog_bar=True, batch_size=bs)

    def param_groups(self) -> list[dict]:
        """Backbone and head as separate groups, for discriminative learning rates."""
        t = self.cfg.train
        return [
            {"params": list(self.model.backbone.parameters()), "lr": t.lr * t.backbone_lr_mult},
            {"params": list(self.model.head.parameters()), "lr": t.lr},
        ]

    def progress(self, total_steps: int) -> float:
        """Fraction of training done: steps of ``total_steps``, or time of ``max_minutes``.

        Whichever is further along wins, so a run cut short by its time budget still ends on
        a fully annealed learning rate instead of stopping mid-schedule.
        """
        trainer = self.trainer
        done = trainer.global_step / max(total_steps, 1)
        budget = self.cfg.train.max_minutes * 60
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if budget and timer is not None:  # Lightning's timer also restores its time on resume
            done = max(done, timer.time_elapsed("train") / budget)
        return min(done, 1.0)

    def configure_optimizers(self):
        t = self.cfg.train
        groups = self.param_groups()
        if t.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
        elif t.optimizer == "sgd":
            opt = torch.optim.SGD(
                groups, lr=t.lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay
            )
        else:
            raise HistodetectError(f"train.optimizer: {t.optimizer!r} is not adamw or sgd.")
        if t.schedule in ("onecycle", "cosine"):
            shape = (
                partial(one_cycle, warmup=t.warmup_fraction) if t.schedule == "onecycle" else cosine
            )
            total = int(self.trainer.estimated_stepping_batches)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: shape(self.progress(total)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if t.schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="max", factor=0.3, patience=1
            )
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "monitor": "val_auc", "interval": "epoch"},
            }
        if t.schedule == "none":
            return opt
        raise HistodetectError(
            f"train.schedule: {t.schedule!r} is not onecycle, cosine, plateau or none."
        )


def one_cycle(progress: float, warmup: float = 0.2) -> float:
    """One-cycle learning-rate factor: cosine up from 1/25 to 1, then down to 1/25e4."""
    start, end = 1 / 25, 1 / 25e4
    if progress < warmup:
        return start + (1 - start) * (1 - math.cos(math.pi * progress / warmup)) / 2
    down = (progress - warmup) / max(1 - warmup, 1e-8)
    return end + (1 - end) * (1 + math.cos(math.pi * down)) / 2


def cosine(progress: float) -> float:
    """Cosine decay factor from 1 to 0."""
    return (1 + math.cos(math.pi * progress)) / 2


def ema_with_warmup(decay: float) -> Callable:
    """EMA update whose decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after n updates.

    A fixed decay of 0.998 leaves ~20 % of the random initial weights in the average after
    800 steps (a whole CPU run here); the ramp forgets them within the first few dozen.
    Integer buffers (BatchNorm's batch counter) follow the live model.
    """

    def update(avg: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if not avg.is_floating_point():
            return current
        d = ((1.0 + n) / (10.0 + n)).clamp(max=decay).to(avg.dtype)  # a tensor: no GPU sync
        return avg + (current - avg) * (1.0 - d)

    return update


class FreezeBackbone(L.Callback):
    """Trains only the new head for the first ``epochs`` epochs, then the whole network.

    Frozen parameters simply get no gradient, so the optimiser and its schedule stay the same
    object throughout and a resumed run continues identically.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_start(self, trainer, pl_module: PatchModule) -> None:
        frozen = trainer.current_epoch < self.epochs
        backbone = pl_module.model.backbone
        for p in backbone.parameters():
            p.requires_grad_(not frozen)
        if frozen:  # keep pretrained BatchNorm statistics while the head settles
            for m in backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


class ConsumedBatches(L.Callback):
    """Counts the training batches actually trained on, for an exact mid-epoch resume."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, EpochLoader):
            loader.consumed += 1


class PatchDataModule(L.LightningDataModule):
    """Training and validation batches from a packed store, sharded per DDP rank."""

    def __init__(
        self, store: Store, train_idx: np.ndarray, valid_idx: np.ndarray, batch_size: int, seed: int
    ) -> None:
        super().__init__()
        self.store, self.train_idx, self.valid_idx = store, train_idx, valid_idx
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> EpochLoader:
        trainer = self.trainer
        return EpochLoader(
            PatchDataset(self.store, self.train_idx),
            self.batch_size,
            seed=self.seed,
            rank=trainer.global_rank if trainer else 0,
            world=trainer.world_size if trainer else 1,
            epoch_fn=(lambda: trainer.current_epoch) if trainer else (lambda: 0),
        )

    def val_dataloader(self):
        return make_loader(self.store, self.valid_idx, self.batch_size * 2, shuffle=False)


class Throughput(L.Callback):
    """Training images/s by the wall clock: data loading, augmentation and logging included.

    Each batch is timed from the end of the previous one (or the epoch's start), so nothing
    between steps escapes; validation is not counted. The first ``warmup`` batches of a run
    (kernel selection, allocator growth) are left out of the whole-run figure.
    """

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.images = 0
        self.seconds = 0.0
        self.batches = 0
        self._t = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        n = len(batch[1])
        self.batches += 1
        if self.batches > self.warmup:
            self.images += n
            self.seconds += dt
        pl_module.log("img_s", n / max(dt, 1e-9), prog_bar=True, on_step=True, on_epoch=False)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()  # a mid-epoch validation is not training time

    @property
    def rate(self) -> float:
        """Images per second over the run's training batches after warm-up."""
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
        "crop": cfg.data.crop,
        "input": "uint8 RGB, HWC; scaled to 0..1, centre crop, then normalised with mean/std",
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
    if (run / MODEL_META).exists():
        raise HistodetectError(f"{run}: already holds a finished run; choose a new --out.")
    last = run / "checkpoints" / "last.ckpt"
    if resume:
        if not last.exists():
            raise HistodetectError(f"{run}: nothing to resume (no checkpoints/last.ckpt).")
        cfg = load_config(run / "config.yaml")
    elif primary and (run / "config.yaml").exists():
        raise HistodetectError(
            f"{run}: holds an unfinished run; pass --resume to continue it or choose a new --out."
        )
    cfg = cfg or RunConfig()
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
    data_info = data_description(store)
    if resume:
        before = json.loads((run / "data.json").read_text())["fingerprint"]
        if before != data_info["fingerprint"]:
            raise HistodetectError(f"{run}: was trained on other data than {data}; cannot resume.")
    elif primary:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
        write_atomic(run / "data.json", json.dumps(data_info, indent=2).encode())
    if primary:
        write_atomic(run / "environment.json", json.dumps(environment(), indent=2).encode())

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    pos_weight = None
    if cfg.train.class_weights == "auto":
        positives = float(store.labels[train_idx].sum())
        pos_weight = (len(train_idx) - positives) / max(positives, 1.0)
    elif cfg.train.class_weights != "none":
        raise HistodetectError(
            f"train.class_weights: {cfg.train.class_weights!r} is not none/auto."
        )
    module = PatchModule(to_dict(cfg), pos_weight)
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    best = ModelCheckpoint(
        dirpath=run / "checkpoints",
        filename="best",
        monitor="val_auc",
        mode="max",
        save_last=True,
    )
    # A resumable last.ckpt every few steps, so a crash loses minutes, not an epoch.
    periodic = ModelCheckpoint(
        dirpath=run / "checkpoints",
        save_top_k=0,
        save_last=True,
        every_n_train_steps=max(cfg.train.checkpoint_every, 1),
    )
    speed = Throughput()
    callbacks = [best, periodic, speed, ConsumedBatches(), LearningRateMonitor("step")]
    if progress:
        from lightning.pytorch.callbacks import TQDMProgressBar

        # tqdm, refreshed every few steps: the rich bar costs ~40% of a CPU step here.
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    if cfg.train.freeze_epochs:
        callbacks.append(FreezeBackbone(cfg.train.freeze_epochs))
    if cfg.train.ema:
        from lightning.pytorch.callbacks import WeightAveraging

        # Validation, checkpoints and the exported model then use the averaged weights.
        callbacks.append(WeightAveraging(avg_fn=ema_with_warmup(cfg.train.ema)))
    if cfg.train.early_stopping:
        callbacks.append(EarlyStopping("val_auc", mode="max", patience=cfg.train.early_stopping))
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
        logger=[
            CSVLogger(run, name="", version="logs"),
            TensorBoardLogger(run, name="tensorboard", version=""),
        ],
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=5,
        use_distributed_sampler=True,
    )
    datamodule = PatchDataModule(store, train_idx, valid_idx, cfg.data.batch_size, cfg.seed)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    if trainer.world_size > 1:
        record_rank_weights(trainer, module, run)
    if not trainer.is_global_zero:
        return TrainResult(
            str(run),
            float("nan"),
            float("nan"),
            len(train_idx),
            len(valid_idx),
            speed.rate,
            time.perf_counter() - t0,
            store.synthetic,
        )
    best_path = best.best_model_path
    if best_path:
        state = torch.load(best_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
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
        "optimizer_steps": int(trainer.global_step),
        "epochs_run": int(trainer.current_epoch),
        "train_images_per_s": speed.rate,
        "seconds": result.seconds,
        "best_checkpoint": best_path,
        "resumed": resume,
        "synthetic": store.synthetic,
    }
    write_atomic(run / "metrics.json", json.dumps(metrics, indent=2).encode())
    csv_path = run / "logs" / "metrics.csv"
    if csv_path.exists():
        title = f"{cfg.model.arch} on {Path(store.manifest['source']['path']).name}"
        if store.synthetic:
            title += " (SYNTHETIC DATA)"
        plot_curves(csv_path, run / "curves.png", title)
    return result


def record_rank_weights(trainer: L.Trainer, module: PatchModule, run: Path) -> None:
    """Under DDP, every rank records a hash of its final weights; rank 0 checks they agree.

    Parameters are compared; BatchNorm running statistics are per-rank by design (DDP
    broadcasts rank 0's before each forward pass), so they are left out.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    folder = run / "ddp"
    folder.mkdir(exist_ok=True)
    write_atomic(folder / f"rank{trainer.global_rank}.sha256", digest.hexdigest().encode())
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        hashes = {p.stem: p.read_text() for p in sorted(folder.glob("rank*.sha256"))}
        same = len(set(hashes.values())) == 1
        report = {"world_size": trainer.world_size, "identical": same, "hashes": hashes}
        write_atomic(folder / "check.json", json.dumps(report, indent=2).encode())
        if not same:
            raise HistodetectError(f"DDP ranks ended with different weights: {hashes}")


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
    train_idx, valid_idx = split_indices_of(store, "train"), split_indices_of(store, "valid")
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
