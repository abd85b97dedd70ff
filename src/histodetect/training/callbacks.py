"""Lightning callbacks of a training run: backbone freezing, resume bookkeeping, throughput."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import lightning as L
from torch import nn

from histodetect.data.loaders import EpochLoader

if TYPE_CHECKING:
    from histodetect.training.module import PatchModule


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


class FlushLogs(L.Callback):
    """Writes the logged metrics whenever a checkpoint is saved, so that the log on disk
    reaches the step a resume starts from (Lightning flushes only every 100 steps)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        for logger in trainer.loggers:
            logger.save()


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


def progress_bar(refresh_rate: int = 10) -> L.Callback:
    """A live tqdm bar on a terminal; one plain line per epoch when the output is a file or pipe.

    The tqdm bar has no Lightning ``v_num`` (our logs have no numbered versions) and refreshes
    every few steps: the rich bar costs ~40% of a CPU step here. Redirected to a log, a live
    bar's carriage-return updates pile up into one unreadable line, hence ``EpochLines``.
    """
    import sys

    if not sys.stderr.isatty():
        return EpochLines()
    from lightning.pytorch.callbacks import TQDMProgressBar

    class _Bar(TQDMProgressBar):
        def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            return items

    return _Bar(refresh_rate=refresh_rate)


class EpochLines(L.Callback):
    """Prints one line per finished epoch to stderr: steps, seconds and the logged metrics."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import sys

        if trainer.global_rank or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        shown = ", ".join(
            f"{name} {float(metrics[name]):.4f}"
            for name in ("train_loss", "val_loss", "val_auc", "val_acc")
            if name in metrics
        )
        seconds = time.perf_counter() - getattr(self, "_t", time.perf_counter())
        print(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: step {trainer.global_step}, "
            f"{seconds:.0f} s" + (f", {shown}" if shown else ""),
            file=sys.stderr,
            flush=True,
        )
