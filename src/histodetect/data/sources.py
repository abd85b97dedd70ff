"""Data sources behind one interface: Kaggle folders, PCam HDF5 files and packed stores."""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histodetect import PATCH_SIZE
from histodetect.data.patchio import PatchDecodeError, decode_patch
from histodetect.data.source import PCAM_PREFIX, SPLITS, UNLABELLED, Source, split_indices
from histodetect.errors import BadInputError, HistodetectError, describe_problems

# ----------------------------------------------------------------------------- Kaggle


@dataclass
class KaggleSource(Source):
    """Kaggle layout: ``train/<id>.tif`` + ``train_labels.csv``, optional ``test/``.

    An optional ``meta.csv`` (``id,slide,x,y``, as `histodetect extract` writes; PCam's
    ``wsi``/``coord_x``/``coord_y`` names work too) gives slide ids and level-0 coordinates.
    """

    files: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))

    def where(self, i: int) -> str:
        return str(self.files[i])

    def read_one(self, i: int) -> np.ndarray:
        return decode_patch(self.files[i])


def _read_id_label_csv(
    path: Path, problems: list[tuple[str, str]]
) -> tuple[dict[str, int], set[str]]:
    """Parse an ``id,label`` csv into (good rows, ids of rejected rows); bad rows and duplicate
    ids are recorded in ``problems``.

    Columns are found by name in the header, in any order and beside other columns; a
    UTF-8 byte-order mark and Windows line ends (a csv saved by Excel) are fine.
    """
    rows: dict[str, int] = {}
    rejected: set[str] = set()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, None) or []]
            missing = [name for name in ("id", "label") if name not in header]
            if missing:
                found = ",".join(header) or "an empty file"
                raise HistodetectError(
                    f"{path}: the header has no {' or '.join(repr(m) for m in missing)} column "
                    f"(Kaggle's train_labels.csv starts with 'id,label'); found {found!r}."
                )
            at_id, at_label = header.index("id"), header.index("label")
            for lineno, row in enumerate(reader, start=2):
                if not row or not "".join(row).strip():
                    continue
                if len(row) <= max(at_id, at_label):
                    problems.append(
                        (f"{path.name} line {lineno}", f"expected {len(header)} columns, got {row}")
                    )
                    continue
                pid, raw = row[at_id].strip(), row[at_label].strip()
                if raw not in ("0", "1"):
                    problems.append((f"{path.name} line {lineno}", f"label {raw!r} is not 0 or 1"))
                    rejected.add(pid)
                    continue
                if pid in rows:
                    problems.append((f"{path.name} line {lineno}", f"duplicate id {pid!r}"))
                    continue
                rows[pid] = int(raw)
    except UnicodeDecodeError:
        raise HistodetectError(f"{path}: not a text csv file (cannot decode as UTF-8).") from None
    return rows, rejected


META_CSV = "meta.csv"
_META_COLUMNS = {"slide": ("slide", "wsi"), "x": ("x", "coord_x"), "y": ("y", "coord_y")}


def _read_meta_csv(path: Path, problems: list[tuple[str, str]]) -> dict[str, tuple[str, int, int]]:
    """``id → (slide, x, y)`` from a meta csv; coordinates are -1 when it has no such columns.

    Columns are found by name (``slide`` or PCam's ``wsi``; ``x``/``coord_x``, ``y``/
    ``coord_y``); a row whose coordinate is not an integer is recorded in ``problems``.
    """
    out: dict[str, tuple[str, int, int]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, None) or []]
            at = {
                key: next((header.index(n) for n in names if n in header), None)
                for key, names in _META_COLUMNS.items()
            }
            if "id" not in header or at["slide"] is None:
                raise HistodetectError(
                    f"{path}: needs an 'id' and a 'slide' (or 'wsi') column; found "
                    f"{','.join(header) or 'an empty file'!r}."
                )
            at_id = header.index("id")
            for lineno, row in enumerate(reader, start=2):
                if not row or not "".join(row).strip():
                    continue
                try:
                    cells = [row[at_id], row[at["slide"]]]
                    xy = [int(row[at[k]]) if at[k] is not None else -1 for k in ("x", "y")]
                except (IndexError, ValueError):
                    problems.append((f"{path.name} line {lineno}", f"bad row {row}"))
                    continue
                out[cells[0].strip()] = (cells[1].strip(), xy[0], xy[1])
    except UnicodeDecodeError:
        raise HistodetectError(f"{path}: not a text csv file (cannot decode as UTF-8).") from None
    return out


def _list_patches(folder: Path) -> dict[str, Path]:
    """Map id → file for every ``.tif`` in ``folder`` (non-recursive)."""
    out: dict[str, Path] = {}
    with os.scandir(folder) as it:
        for entry in it:
            if entry.is_file() and entry.name.lower().endswith((".tif", ".tiff")):
                out[entry.name.rsplit(".", 1)[0]] = Path(entry.path)
    return out


def open_kaggle(
    root: Path, skip_bad: bool = False, valid_fraction: float = 0.1, seed: int = 0
) -> KaggleSource:
    """Open a Kaggle-layout folder, checking the csv against the files.

    Raises:
        BadInputError: listing every bad label, duplicate id, id with no file and file with no
            csv row, unless ``skip_bad`` is set (then they are left out and kept in ``problems``).
    """
    problems: list[tuple[str, str]] = []
    labels_csv = root / "train_labels.csv"
    train_dir = root / "train"
    entries: list[tuple[str, Path, int, str]] = []
    if labels_csv.exists() or train_dir.is_dir():
        if not labels_csv.exists():
            raise HistodetectError(f"{root}: has train/ but no train_labels.csv (id,label).")
        if not train_dir.is_dir():
            raise HistodetectError(f"{root}: has train_labels.csv but no train/ folder of .tif.")
        rows, rejected = _read_id_label_csv(labels_csv, problems)
        files = _list_patches(train_dir)
        for pid, label in rows.items():
            if pid not in files:
                problems.append(
                    (str(train_dir / f"{pid}.tif"), "listed in train_labels.csv, no file")
                )
            else:
                entries.append((pid, files[pid], label, "train"))
        problems.extend(
            (str(path), "file has no row in train_labels.csv")
            for pid, path in sorted(files.items())
            if pid not in rows and pid not in rejected
        )
    test_dir = root / "test"
    if test_dir.is_dir():
        files = _list_patches(test_dir)
        submission = root / "sample_submission.csv"
        if submission.exists():
            wanted, _ = _read_id_label_csv(submission, problems)
            problems.extend(
                (str(test_dir / f"{pid}.tif"), "listed in sample_submission.csv, no file")
                for pid in wanted
                if pid not in files
            )
            problems.extend(
                (str(path), "file has no row in sample_submission.csv")
                for pid, path in sorted(files.items())
                if pid not in wanted
            )
            order = [pid for pid in wanted if pid in files]
        else:
            order = sorted(files)
        entries.extend((pid, files[pid], UNLABELLED, "test") for pid in order)
    meta = _read_meta_csv(root / META_CSV, problems) if (root / META_CSV).is_file() else None
    if problems and not skip_bad:
        raise BadInputError(
            f"{root}: {len(problems)} problem(s) in the Kaggle folder; fix them or pass "
            f"--skip-bad to leave those patches out:\n" + describe_problems(problems),
            problems,
        )
    if not entries:
        raise HistodetectError(f"{root}: the Kaggle folder holds no patches.")
    ids = np.array([e[0] for e in entries], dtype=object)
    labels = np.array([e[2] for e in entries], dtype=np.int8)
    splits = np.array([e[3] for e in entries], dtype="<U5")
    train = splits == "train"
    slides = coords = None
    if meta is not None:
        # A patch missing from meta.csv is its own group: it can go either way, alone.
        rows = [meta.get(e[0], (e[0], -1, -1)) for e in entries]
        slides = np.array([r[0] for r in rows], dtype=object)
        coords = np.array([r[1:] for r in rows], dtype=np.int64).reshape(-1, 2)
    groups = slides[train] if slides is not None else None
    splits[train] = split_indices(labels[train], groups, valid_fraction, seed)
    return KaggleSource(
        kind="kaggle",
        path=root,
        ids=ids,
        labels=labels,
        splits=splits,
        synthetic=(root / "SYNTHETIC.md").exists(),
        problems=problems,
        files=np.array([e[1] for e in entries], dtype=object),
        slides=slides,
        coords=coords,
    )


# ----------------------------------------------------------------------------- PCam HDF5


@dataclass
class PCamSource(Source):
    """PatchCamelyon HDF5 files; rows are read lazily, one open file per process."""

    parts: list[tuple[Path, int]] = field(default_factory=list)  # (x file, first global row)
    _handles: dict = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # h5py handles cannot cross process boundaries
        return state

    def _locate(self, i: int) -> tuple[Path, int]:
        starts = [start for _, start in self.parts]
        k = int(np.searchsorted(starts, i, side="right")) - 1
        return self.parts[k][0], i - self.parts[k][1]

    def where(self, i: int) -> str:
        path, row = self._locate(i)
        return f"{path.name}[{row}]"

    def _dataset(self, path: Path):
        import h5py

        if path not in self._handles:
            self._handles[path] = h5py.File(path, "r")
        return self._handles[path]["x"]

    def read_one(self, i: int) -> np.ndarray:
        path, row = self._locate(i)
        try:
            return np.asarray(self._dataset(path)[row])
        except Exception as exc:
            raise PatchDecodeError(f"HDF5 read failed ({exc})") from None

    def read_checked(self, indices: Sequence[int]) -> tuple[np.ndarray, list[tuple[str, str]]]:
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
        starts = np.array([start for _, start in self.parts])
        part_of = np.searchsorted(starts, idx, side="right") - 1
        try:
            for k in np.unique(part_of):
                # One HDF5 read per file: h5py wants increasing, unique row lists (or a slice).
                mine = np.flatnonzero(part_of == k)
                rows = idx[mine] - starts[k]
                unique, inverse = np.unique(rows, return_inverse=True)
                ds = self._dataset(self.parts[k][0])
                contiguous = unique[-1] - unique[0] + 1 == len(unique)
                block = ds[unique[0] : unique[-1] + 1] if contiguous else ds[unique]
                out[mine] = np.asarray(block)[inverse]
            return out, []
        except Exception:
            return super().read_checked(indices)  # row by row, to name the bad rows


def _gunzip_cached(path: Path, cache_dir: Path | None) -> Path:
    """Decompress ``x.h5.gz`` once into the cache and return the ``.h5`` path."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    cache = cache_dir or Path(
        os.environ.get("HISTODETECT_CACHE", Path.home() / ".cache" / "histodetect")
    )
    target = cache / "pcam" / f"{path.name[:-3]}.{key[:12]}.h5"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    try:
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
    except (OSError, EOFError) as exc:
        tmp.unlink(missing_ok=True)
        raise HistodetectError(
            f"{path}: cannot decompress ({exc}); the .gz file is damaged."
        ) from None
    os.replace(tmp, target)
    return target


def _pcam_file(root: Path, split: str, part: str) -> Path | None:
    for suffix in (".h5", ".h5.gz"):
        candidate = root / f"{PCAM_PREFIX}{split}_{part}{suffix}"
        if candidate.exists():
            return candidate
    return None


def open_pcam(
    root: Path, valid_fraction: float = 0.1, seed: int = 0, cache_dir: Path | None = None
) -> PCamSource:
    """Open PCam ``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5[.gz]`` files.

    The files' own splits are kept; when no valid file exists, a slide-grouped stratified split
    of train is made from ``*_meta.csv`` slide ids (plain stratified without them).
    """
    import h5py

    ids, labels, splits, slides, parts = [], [], [], [], []
    have_slides = True
    total = 0
    for split in SPLITS:
        xfile = _pcam_file(root, split, "x")
        if xfile is None:
            continue
        xpath = _gunzip_cached(xfile, cache_dir) if xfile.suffix == ".gz" else xfile
        try:
            with h5py.File(xpath, "r") as fh:
                if "x" not in fh:
                    raise HistodetectError(f"{xfile}: has no dataset 'x' (found {list(fh)}).")
                shape, dtype = fh["x"].shape, fh["x"].dtype
        except OSError as exc:
            raise HistodetectError(f"{xfile}: not a readable HDF5 file ({exc}).") from None
        if len(shape) != 4 or shape[1:] != (PATCH_SIZE, PATCH_SIZE, 3) or dtype != np.uint8:
            raise HistodetectError(
                f"{xfile}: dataset 'x' is {shape} {dtype}, expected N x 96 x 96 x 3 uint8."
            )
        n = shape[0]
        yfile = _pcam_file(root, split, "y")
        if yfile is None:
            y = np.full(n, UNLABELLED, np.int8)
        else:
            ypath = _gunzip_cached(yfile, cache_dir) if yfile.suffix == ".gz" else yfile
            try:
                with h5py.File(ypath, "r") as fh:
                    y = np.asarray(fh["y"]).reshape(-1)
            except (OSError, KeyError) as exc:
                raise HistodetectError(f"{yfile}: cannot read dataset 'y' ({exc}).") from None
            if len(y) != n:
                raise HistodetectError(
                    f"{yfile}: has {len(y)} labels but {xfile.name} has {n} patches."
                )
            bad = np.flatnonzero((y != 0) & (y != 1))
            if len(bad):
                raise BadInputError(
                    f"{yfile}: {len(bad)} label(s) are not 0 or 1 (first at row {bad[0]}: "
                    f"{y[bad[0]]!r}).",
                    [(f"{yfile.name}[{r}]", f"label {y[r]!r}") for r in bad[:100]],
                )
            y = y.astype(np.int8)
        meta = root / f"{PCAM_PREFIX}{split}_meta.csv"
        if meta.exists():
            with open(meta, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            if len(rows) != n or (rows and "wsi" not in rows[0]):
                raise HistodetectError(
                    f"{meta}: expected {n} rows with a 'wsi' (slide id) column, "
                    f"found {len(rows)} rows."
                )
            slides.extend(r["wsi"] for r in rows)
        else:
            have_slides = False
        ids.extend(f"{split}-{i:06d}" for i in range(n))
        labels.append(y)
        splits.extend([split] * n)
        parts.append((xpath, total))
        total += n
    if not parts:
        raise HistodetectError(f"{root}: no {PCAM_PREFIX}<split>_x.h5 file found.")
    label_arr = np.concatenate(labels)
    split_arr = np.array(splits, dtype="<U5")
    slide_arr = np.array(slides, dtype=object) if have_slides else None
    if not (split_arr == "valid").any():
        train = split_arr == "train"
        groups = slide_arr[train] if slide_arr is not None else None
        split_arr[train] = split_indices(label_arr[train], groups, valid_fraction, seed)
    return PCamSource(
        kind="pcam",
        path=root,
        ids=np.array(ids, dtype=object),
        labels=label_arr,
        splits=split_arr,
        slides=slide_arr,
        parts=parts,
    )


# ----------------------------------------------------------------------------- detection


def detect_kind(path: Path) -> str:
    """Return "store", "kaggle" or "pcam" for ``path``; raise a clear error otherwise."""
    if not path.exists():
        raise HistodetectError(f"{path}: no such file or folder.")
    if path.is_file():
        if path.name.startswith(PCAM_PREFIX):
            return "pcam"
        raise HistodetectError(
            f"{path}: is a file; DATA must be a folder (Kaggle layout, PCam .h5 files or a "
            f"packed store)."
        )
    if (path / "store.json").exists():
        return "store"
    names = os.listdir(path)
    if any(n.startswith(PCAM_PREFIX) and n.endswith((".h5", ".h5.gz")) for n in names):
        return "pcam"
    if {"train_labels.csv", "train", "test"} & set(names):
        return "kaggle"
    what = (
        "is empty" if not names else f"holds none of them (found: {', '.join(sorted(names)[:8])})"
    )
    raise HistodetectError(
        f"{path}: not a recognised data folder. Expected one of: a Kaggle folder "
        f"(train/<id>.tif + train_labels.csv, optional test/ + sample_submission.csv); PCam files "
        f"({PCAM_PREFIX}{{train,valid,test}}_{{x,y}}.h5 or .h5.gz); or a packed store made by "
        f"'histodetect pack' (store.json + images.npy). The folder {what}."
    )


def open_source(
    path: str | Path, skip_bad: bool = False, valid_fraction: float = 0.1, seed: int = 0
) -> Source:
    """Open any supported DATA path as a :class:`Source` (the kind is detected)."""
    path = Path(path)
    kind = detect_kind(path)
    if kind == "store":
        from histodetect.data.store import open_store

        return open_store(path)
    if kind == "pcam":
        root = path.parent if path.is_file() else path
        return open_pcam(root, valid_fraction, seed)
    return open_kaggle(path, skip_bad, valid_fraction, seed)
