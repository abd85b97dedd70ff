"""The packed store: a memory-mapped uint8 patch array with ids, labels, splits and checksums."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histodetect.data.source import Source
from histodetect.errors import HistodetectError

FORMAT = "histodetect-store"
VERSION = 1
IMAGES = "images.npy"
INDEX = "index.npz"
MANIFEST = "store.json"


def sha256_rows(images: np.ndarray, start: int, stop: int) -> str:
    """SHA-256 of rows ``[start, stop)`` of the image array (hashlib releases the GIL)."""
    return hashlib.sha256(np.ascontiguousarray(images[start:stop]).data).hexdigest()


def index_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise the index arrays deterministically (so its checksum is reproducible)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: arrays[k] for k in sorted(arrays)})
    return buf.getvalue()


@dataclass
class Store(Source):
    """A packed store opened read-only; ``images`` is a memory map of every packed row."""

    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 96, 96, 3), np.uint8))
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    manifest: dict = field(default_factory=dict)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["images"] = None  # reopen the memory map in the receiving process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.images = np.load(self.path / IMAGES, mmap_mode="r")

    def where(self, i: int) -> str:
        return f"{self.path}[{self.ids[i]}]"

    def read_one(self, i: int) -> np.ndarray:
        return np.asarray(self.images[self.rows[i]])

    def read(self, indices: Sequence[int]) -> np.ndarray:
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")  # sorted reads walk the file forwards
        out = np.empty((len(rows), *self.images.shape[1:]), np.uint8)
        out[order] = self.images[rows[order]]
        return out

    def read_checked(self, indices: Sequence[int]) -> tuple[np.ndarray, list[tuple[str, str]]]:
        return self.read(indices), []


def verify_store(path: Path, manifest: dict, images: np.ndarray, index_blob: bytes) -> None:
    """Check sizes and every checksum recorded in the manifest; raise naming what differs."""
    checks = manifest["checksums"]
    if hashlib.sha256(index_blob).hexdigest() != checks["index"]:
        raise HistodetectError(f"{path / INDEX}: checksum mismatch; the store's index is damaged.")
    chunk = checks["chunk_rows"]
    expected = checks["chunks"]
    if images.shape[0] != manifest["rows"] or len(expected) != -(-images.shape[0] // chunk):
        raise HistodetectError(
            f"{path / IMAGES}: holds {images.shape[0]} rows, the manifest says {manifest['rows']}; "
            "the store is damaged or was not written by this pack."
        )
    starts = range(0, images.shape[0], chunk)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        actual = list(pool.map(lambda s: sha256_rows(images, s, s + chunk), starts))
    bad = [k for k, (a, b) in enumerate(zip(actual, expected, strict=True)) if a != b]
    if bad:
        first = bad[0] * chunk
        raise HistodetectError(
            f"{path / IMAGES}: checksum mismatch in {len(bad)} block(s) of {chunk} patches "
            f"(first at rows {first}-{first + chunk - 1}); the store is damaged. Re-run "
            "'histodetect pack' into a new folder."
        )


def open_store(path: str | Path, verify: bool = True) -> Store:
    """Open a packed store, verifying its checksums unless ``verify`` is False.

    Raises:
        HistodetectError: when the folder is not a complete store or any checksum differs.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise HistodetectError(
            f"{path}: no {MANIFEST}; not a packed store (or its pack never finished: "
            "re-run 'histodetect pack' to resume it)."
        ) from None
    except json.JSONDecodeError as exc:
        raise HistodetectError(f"{path / MANIFEST}: damaged ({exc}).") from None
    if manifest.get("format") != FORMAT:
        raise HistodetectError(f"{path / MANIFEST}: not a histodetect store manifest.")
    if manifest.get("version", 0) > VERSION:
        raise HistodetectError(
            f"{path}: store format version {manifest['version']} is newer than this histodetect "
            f"understands ({VERSION}); upgrade histodetect."
        )
    try:
        images = np.load(path / IMAGES, mmap_mode="r")
        index_blob = (path / INDEX).read_bytes()
        index = np.load(io.BytesIO(index_blob), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise HistodetectError(f"{path}: cannot read the store's arrays ({exc}).") from None
    if verify:
        verify_store(path, manifest, images, index_blob)
    slides = index["slides"].astype(object) if "slides" in index.files else None
    return Store(
        kind="store",
        path=path,
        ids=index["ids"].astype(object),
        labels=index["labels"],
        splits=index["splits"],
        slides=slides,
        synthetic=bool(manifest.get("synthetic", False)),
        images=images,
        rows=index["rows"],
        manifest=manifest,
        coords=index["coords"] if "coords" in index.files else None,
    )
