"""The LightningModule: classifier, on-device augmentation, loss, optimiser and LR schedules."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer
from torch import nn

from histodetect.config import RunConfig, merge
from histodetect.data.stain import StainNormaliser
from histodetect.data.transforms import normalise, to_unit_float
from histodetect.errors import HistodetectError
from histodetect.models.classifier import build_model
from histodetect.training.augment import BatchAugment

# Lightning notes that are expected here: the module (not the datamodule) moves batches on
# purpose, and a newer torch deprecates a pytree call inside Lightning itself.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


class PatchModule(L.LightningModule):
    """Classifier + on-device augmentation/normalisation + loss + AUC/accuracy metrics."""

    def __init__(
        self, config: dict, pos_weight: float | None = None, stain_target: dict | None = None
    ) -> None:
        super().__init__()
        # Checkpoints rebuild the same module from these.
        self.save_hyperparameters(
            {"config": config, "pos_weight": pos_weight, "stain_target": stain_target}
        )
        self.cfg: RunConfig = merge(RunConfig(), config)
        m = self.cfg.model
        self.model = build_model(m.arch, m.pretrained, m.weights, m.dropout)
        if m.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.augment = BatchAugment(self.cfg.augment)
        # Before augmentation: the model learns from normalised patches, jittered as usual, so
        # it learns to ignore the colour differences normalisation leaves. Normalising after
        # augmentation (as inference meets a shifted patch) was measured worse on REAL data:
        # H&E -40 % cost 0.033 AUC instead of 0.015 (benchmarks/results/shift.txt).
        self.stain = StainNormaliser(self.cfg.data.stain_norm, stain_target)
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
        x = self.augment(self.stain(to_unit_float(images)), crop=d.crop)
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


def positive_weight(class_weights: str, labels: np.ndarray) -> float | None:
    """The loss's positive-class weight for ``train.class_weights``: none, or negatives/positives.

    Args:
        class_weights: ``none`` (no weight) or ``auto`` (balance the classes of ``labels``).
        labels: the training labels (0/1).
    """
    if class_weights == "auto":
        positives = float(labels.sum())
        return (len(labels) - positives) / max(positives, 1.0)
    if class_weights != "none":
        raise HistodetectError(f"train.class_weights: {class_weights!r} is not none/auto.")
    return None
