"""Extracted patches on disk: per-slide parts, then the packed store or Kaggle folder."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histodetect.data.pack import pack_source
from histodetect.data.source import Source, split_indices
from histodetect.data.store import IMAGES, INDEX, MANIFEST
from histodetect.files import write_atomic
from histodetect.slides.extract.sampling import SlidePatches

ASSEMBLED = "assembled.json"  # in the work folder: which parts the finished output was made of
KAGGLE_WRITTEN = "kaggle-written.jsonl"  # parts whose .tif files are in train/
SYNTHETIC_NOTE = "Patches extracted from SYNTHETIC slides: generated, not scans.\n"


def write_part(path: Path, name: str, patches: SlidePatches) -> None:
    """One slide's patches as an ``.npz`` written atomically (a killed run leaves none)."""
    buf = io.BytesIO()
    np.savez(
        buf,
        images=patches.images,
        x=patches.x,
        y=patches.y,
        labels=patches.labels,
        side=np.float64(patches.side),
        synthetic=np.bool_(patches.synthetic),
        slide=np.str_(name),
    )
    write_atomic(path, buf.getvalue())


def load_part(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a part written by :func:`write_part`."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def patch_ids(slide: str, x: np.ndarray, y: np.ndarray) -> list[str]:
    """Stable ids ``<slide>_<x>_<y>`` (level-0 top-left corner)."""
    return [f"{slide}_{int(a)}_{int(b)}" for a, b in zip(x, y, strict=True)]


@dataclass
class ExtractedSource(Source):
    """Patches of finished parts, in part order, as a ``Source`` that ``pack_source`` packs."""

    parts: list[Path] = field(default_factory=list)
    starts: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    _cache: dict = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}

    def read_one(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        if k not in self._cache:
            self._cache.clear()  # parts are read in order: one at a time in memory
            self._cache[k] = load_part(self.parts[k])["images"]
        return self._cache[k][i - self.starts[k]]


def extracted_source(out: Path, parts: list[Path], valid_fraction: float, seed: int):
    """The ``ExtractedSource`` of ``parts``, split train/valid by slide (never straddling)."""
    ids, labels, slides, coords, sizes, synthetic = [], [], [], [], [], False
    for part in parts:
        with np.load(part, allow_pickle=False) as z:
            name, x, y = str(z["slide"]), z["x"], z["y"]
            ids += patch_ids(name, x, y)
            labels.append(z["labels"])
            slides += [name] * len(x)
            coords.append(np.c_[x, y].astype(np.int64).reshape(-1, 2))
            sizes.append(len(x))
            synthetic |= bool(z["synthetic"])
    labels_arr = np.concatenate(labels).astype(np.int8)
    slides_arr = np.array(slides, dtype=object)
    return ExtractedSource(
        kind="extract",
        path=out,
        ids=np.array(ids, dtype=object),
        labels=labels_arr,
        splits=split_indices(labels_arr, slides_arr, valid_fraction, seed),
        slides=slides_arr,
        synthetic=synthetic,
        parts=list(parts),
        starts=np.r_[0, np.cumsum(sizes)].astype(np.int64),
        coords=np.concatenate(coords),
    )


def parts_digest(keys: list[str], fmt: str, valid_fraction: float, seed: int) -> str:
    """What an assembled output was made of: the parts' keys and the split settings."""
    blob = json.dumps([sorted(keys), fmt, valid_fraction, seed]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def assembled_digest(work: Path) -> str | None:
    """The digest of the output last assembled from ``work``, if any."""
    try:
        return json.loads((work / ASSEMBLED).read_text())["digest"]
    except (OSError, ValueError, KeyError):
        return None


def assemble_store(out: Path, work: Path, source: ExtractedSource, digest: str) -> None:
    """Pack ``source`` into ``work/store-<digest>`` (resumable), then move it into ``out``.

    ``store.json`` goes first out and last in, so ``out`` is never a store half-replaced.
    """
    for old in work.glob("store-*"):
        if old.name != f"store-{digest}":
            shutil.rmtree(old)  # an unfinished pack of parts since changed
    tmp = work / f"store-{digest}"
    if (tmp / MANIFEST).exists() and not (tmp / IMAGES).exists():
        shutil.rmtree(tmp)  # killed while moving into out: pack again, from the parts
    pack_source(source, tmp, workers=1, progress=False)
    (out / MANIFEST).unlink(missing_ok=True)
    for name in (IMAGES, INDEX, "pack-summary.json"):
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
    os.replace(tmp / MANIFEST, out / MANIFEST)
    shutil.rmtree(tmp)
    write_atomic(work / ASSEMBLED, json.dumps({"digest": digest}).encode())


def assemble_kaggle(out: Path, work: Path, parts: dict[str, Path], digest: str) -> int:
    """Kaggle layout in ``out``: ``train/<id>.tif``, ``train_labels.csv`` and ``meta.csv``.

    Only parts not yet written (by key) are written; ``.tif`` files of patches no part holds
    any more (a slide re-extracted) are removed. Returns the number of patches.
    """
    import tifffile

    train = out / "train"
    train.mkdir(parents=True, exist_ok=True)
    log = work / KAGGLE_WRITTEN
    written = set(log.read_text().split()) if log.exists() else set()
    labels_rows, meta_rows, keep, synthetic = [], [], set(), False
    for key, part in parts.items():
        z = load_part(part)
        name = str(z["slide"])
        ids = patch_ids(name, z["x"], z["y"])
        if key not in written:
            for pid, image in zip(ids, z["images"], strict=True):
                tifffile.imwrite(train / f"{pid}.tif", image, photometric="rgb")
            with open(log, "a") as fh:  # after its files: a killed run rewrites the part
                fh.write(key + "\n")
        synthetic |= bool(z["synthetic"])
        for pid, x, y, label in zip(ids, z["x"], z["y"], z["labels"], strict=True):
            labels_rows.append((pid, int(label)))
            meta_rows.append((pid, name, int(x), int(y), int(label)))
            keep.add(pid)
    for tif in train.glob("*.tif"):
        if tif.stem not in keep:
            tif.unlink()
    write_atomic(out / "meta.csv", _csv(("id", "slide", "x", "y", "label"), meta_rows))
    write_atomic(out / "train_labels.csv", _csv(("id", "label"), labels_rows))
    if synthetic:
        write_atomic(out / "SYNTHETIC.md", SYNTHETIC_NOTE.encode())
    write_atomic(work / ASSEMBLED, json.dumps({"digest": digest}).encode())
    return len(labels_rows)


def _csv(header: tuple[str, ...], rows: list[tuple]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()
