"""The LightningDataModule: training and validation batches from a packed store."""

from __future__ import annotations

import lightning as L
import numpy as np

from histodetect.data.loaders import EpochLoader, PatchDataset, make_loader
from histodetect.data.store import Store


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
