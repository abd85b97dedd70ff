"""From any DATA path to uint8 batches: store datasets, loaders and on-device normalisation."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from histodetect.config import DataConfig
from histodetect.data.sources import detect_kind
from histodetect.data.store import Store, open_store


def cache_dir() -> Path:
    """Where derived data (packed stores, unzipped PCam files) is kept between runs."""
    return Path(os.environ.get("HISTODETECT_CACHE", Path.home() / ".cache" / "histodetect"))


def ensure_store(data: str | Path, progress: bool = True, **pack_args) -> Store:
    """Open DATA as a packed store, packing it into the cache first when it is not one.

    Packing is idempotent and resumable, so calling this again on the same folder reuses (or
    finishes) the earlier pack instead of decoding every patch again; if the folder's contents
    changed since, the stale cached store is replaced.
    """
    data = Path(data)
    if detect_kind(data) == "store":
        return open_store(data)
    from histodetect.data.pack import pack

    key = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:16]
    target = cache_dir() / "stores" / f"{data.resolve().name}-{key}"
    pack(data, target, progress=progress, replace_stale=True, **pack_args)
    return open_store(target)


def run_split_args(run: Path) -> dict:
    """A run's own train/valid split settings, so packing DATA again reproduces its split."""
    if not (Path(run) / "config.yaml").exists():
        return {}
    d = run_data_config(run)
    return {"valid_fraction": d.valid_fraction, "seed": d.split_seed}


def run_data_config(run: Path) -> DataConfig:
    """A run's saved data settings (``config.yaml``), or the defaults for a bare model folder."""
    from histodetect.config import load_config

    path = Path(run) / "config.yaml"
    return load_config(path).data if path.exists() else DataConfig()


def labelled_split(run: Path, data: str | Path, split: str) -> tuple[Store, np.ndarray]:
    """DATA packed with the run's own split settings, and the labelled patches of ``split``.

    ``split`` is train, valid or test as the run saw them (cross-validation folds included),
    or ``all``: every labelled patch, e.g. of an external set the run never saw.
    """
    from histodetect.data.folds import run_rows
    from histodetect.errors import HistodetectError

    store = ensure_store(data, progress=False, **run_split_args(run))
    idx = run_rows(store, run_data_config(run), split)
    idx = idx[store.labels[idx] >= 0]
    if len(idx) == 0:
        raise HistodetectError(
            f"{data}: no labelled patches in split {split!r} ({store.counts()})."
        )
    return store, idx


class PatchDataset(torch.utils.data.Dataset):
    """Patches of a store as (uint8 HWC tensor, float label); fetched a whole batch at a time."""

    def __init__(self, store: Store, indices: Sequence[int]) -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([i])
        return images[0], labels[0]

    def __getitems__(self, batch: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # One sorted memory-map read per batch instead of one read per patch.
        idx = self.indices[np.asarray(batch, dtype=np.int64)]
        images = torch.from_numpy(self.store.read(idx))
        labels = torch.from_numpy(self.store.labels[idx].astype(np.float32))
        return images, labels


def collate_batch(batch):
    """Collate for :class:`PatchDataset`: batches arrive already stacked from ``__getitems__``."""
    if isinstance(batch, tuple):
        return batch
    images, labels = zip(*batch, strict=True)
    return torch.stack(images), torch.stack(labels)


def split_indices_of(store: Store, split: str) -> np.ndarray:
    """Row indices of one split ("train", "valid" or "test") in the store."""
    return np.flatnonzero(store.splits == split)


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded subset of positions ``0..len(labels)-1`` of size ``n`` keeping class shares."""
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [
        rng.permutation(np.flatnonzero(labels == lab))[: round(n * np.mean(labels == lab))]
        for lab in np.unique(labels)
    ]
    return np.sort(np.concatenate(keep))


def make_loader(
    store: Store, indices: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0
) -> torch.utils.data.DataLoader:
    """A loader of uint8 batches; workers are unnecessary since the store is memory-mapped."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        PatchDataset(store, indices),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=False,
        collate_fn=collate_batch,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


class EpochLoader:
    """Seeded, shardable and resumable training batches of (uint8 images, labels).

    Epoch ``e`` visits a permutation drawn from ``(seed, e)``, so a run resumed after a crash
    sees exactly the batches it would have seen. Under DDP each rank takes every
    ``world``-th sample of that permutation (padded like ``DistributedSampler`` so every rank
    runs the same number of steps). ``state_dict`` records how many batches of the current
    epoch training has consumed; Lightning stores it in checkpoints and hands it back on resume,
    when those batches are skipped.
    """

    def __init__(
        self,
        dataset: PatchDataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        epoch_fn=lambda: 0,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.epoch_fn = epoch_fn
        self.consumed = 0  # incremented by ConsumedBatches as training takes each batch
        self._skip = 0

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        per_rank = math.ceil(n / self.world)
        order = np.resize(order, per_rank * self.world)  # repeats the head to pad, as DDP does
        return order[self.rank :: self.world]

    def __len__(self) -> int:
        # The ragged last batch is dropped: a batch of a handful of patches (5,633 = 44 x 128
        # + 1 here) makes a wild gradient step and pulls BatchNorm's running statistics.
        per_rank = math.ceil(len(self.dataset) / self.world)
        return max(1, per_rank // self.batch_size)

    def __iter__(self):
        order = self._order(self.epoch_fn())
        skip, self._skip = self._skip, 0
        self.consumed = skip
        for b in range(skip, len(self)):
            yield self.dataset.__getitems__(order[b * self.batch_size : (b + 1) * self.batch_size])

    def state_dict(self) -> dict:
        """Batches of the current epoch already trained on."""
        return {"consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Skip the batches a resumed epoch already trained on."""
        self._skip = int(state.get("consumed", 0)) % max(len(self), 1)
