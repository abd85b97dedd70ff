"""`histodetect explore`: class balance, sample patches, colour statistics and data checks."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histodetect import PATCH_SIZE
from histodetect.data.explore_render import (
    CHANNELS,
    CLASS_ORDER,
    FIGURES,
    class_balance_png,
    class_name,
    colour_hist_png,
    positive_fraction,
    samples_png,
    stats_csv,
    summary_html,
    summary_markdown,
)
from histodetect.data.source import Source
from histodetect.data.sources import open_source
from histodetect.errors import HistodetectError
from histodetect.files import write_atomic

LIST_LIMIT = 20  # examples kept per list in summary.json, so it stays readable
BATCH = 256  # patches per read: large enough to amortise overhead, small enough for RAM
UNIFORM_RANGE = 10  # a patch whose pixels all lie within this many levels is blank, not tissue


@dataclass
class _Scan:
    """Everything gathered in one pass over the sampled patches."""

    indices: np.ndarray
    good: np.ndarray
    image_means: np.ndarray
    hist: dict[int, np.ndarray] = field(default_factory=dict)  # label -> (3, 256) pixel counts
    problems: list[tuple[str, str]] = field(default_factory=list)
    digests: list[bytes | None] = field(default_factory=list)
    uniform: list[int] = field(default_factory=list)


def stratified_sample(labels: np.ndarray, max_images: int, seed: int) -> np.ndarray:
    """Pick at most ``max_images`` indices, each label class keeping its share.

    Every class gets ``max_images * class_size / total`` rounded by largest remainder, so the
    pooled sample has the data set's class proportions and its statistics stay representative.

    Args:
        labels: one label per patch (-1 = unlabelled counts as a class of its own).
        max_images: the most indices to return.
        seed: seed of the random choice within each class.

    Returns:
        Sorted indices (sorted so sources read forwards); all of them when there are no more
        than ``max_images``.
    """
    n = len(labels)
    if n <= max_images:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    exact = max_images * sizes / n
    quota = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - quota), kind="stable")[: max_images - quota.sum()]:
        quota[k] += 1
    picked = [
        rng.choice(np.flatnonzero(labels == lab), size=q, replace=False)
        for lab, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def _batches(items: np.ndarray, size: int) -> Iterable[np.ndarray]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _scan(source: Source, indices: np.ndarray, progress: bool) -> _Scan:
    """Read the sampled patches in batches, accumulating histograms, means and hashes."""
    scan = _Scan(
        indices=indices,
        good=np.ones(len(indices), bool),
        image_means=np.zeros((len(indices), 3)),
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), unit="patch", desc="explore")
    pos = 0
    for batch_idx in _batches(indices, BATCH):
        images, bad = source.read_checked(batch_idx)
        good = np.ones(len(batch_idx), bool)
        if bad:
            # Bad patches come back zero-filled; find them so they cannot pollute the stats.
            where_to_k = {source.where(int(i)): k for k, i in enumerate(batch_idx)}
            for where, _ in bad:
                if where in where_to_k:
                    good[where_to_k[where]] = False
            scan.problems.extend(bad)
        scan.good[pos : pos + len(batch_idx)] = good
        flat = images.reshape(len(batch_idx), -1, 3)
        # A float32 matrix product sums exactly here (totals < 2**24) and is ~10x faster than
        # an integer reduction over the strided pixel axis.
        sums = np.ones(PATCH_SIZE * PATCH_SIZE, np.float32) @ flat.astype(np.float32)
        scan.image_means[pos : pos + len(batch_idx)] = sums.astype(np.float64) / PATCH_SIZE**2
        spread = flat.max(axis=(1, 2)).astype(np.int16) - flat.min(axis=(1, 2))
        labels = source.labels[batch_idx]
        for lab in np.unique(labels[good]):
            pixels = flat[good & (labels == lab)]
            counts = np.stack(
                [np.bincount(pixels[..., c].ravel(), minlength=256) for c in range(3)]
            )
            if int(lab) in scan.hist:
                scan.hist[int(lab)] += counts
            else:
                scan.hist[int(lab)] = counts.astype(np.int64)
        for k in range(len(batch_idx)):
            if good[k]:
                scan.digests.append(hashlib.blake2b(images[k].tobytes(), digest_size=16).digest())
                if spread[k] <= UNIFORM_RANGE:
                    scan.uniform.append(int(batch_idx[k]))
            else:
                scan.digests.append(None)
        pos += len(batch_idx)
        if bar is not None:
            bar.update(len(batch_idx))
    if bar is not None:
        bar.close()
    return scan


def _channel_stats(hist: np.ndarray, image_means: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean/std per channel from exact integer pixel histograms, plus per-image-mean stats."""
    values = np.arange(256, dtype=np.int64)
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(CHANNELS):
        # Python ints keep the sums exact, so the variance has no cancellation error.
        n = int(hist[c].sum())
        s1 = int((hist[c] * values).sum())
        s2 = int((hist[c] * values * values).sum())
        mean = s1 / n
        std = math.sqrt(max(n * s2 - s1 * s1, 0)) / n
        out[name] = {
            "mean": mean,
            "std": std,
            "mean_of_image_means": float(image_means[:, c].mean()),
            "std_of_image_means": float(image_means[:, c].std()),
            "mean_0_1": mean / 255,
            "std_0_1": std / 255,
        }
    return out


def _colour_stats(source: Source, scan: _Scan) -> dict:
    """Per-class and overall colour statistics of the good sampled patches."""
    labels = source.labels[scan.indices]
    per_class: dict[str, dict] = {}
    for lab in CLASS_ORDER:
        if lab not in scan.hist:
            continue
        mask = scan.good & (labels == lab)
        per_class[class_name(lab)] = {
            "images": int(mask.sum()),
            "channels": _channel_stats(scan.hist[lab], scan.image_means[mask]),
        }
    if not per_class:
        return {"classes": {}, "overall": None, "normalisation_0_1": None}
    total = sum(scan.hist.values())
    overall = {
        "images": int(scan.good.sum()),
        "channels": _channel_stats(total, scan.image_means[scan.good]),
    }
    return {
        "classes": per_class,
        "overall": overall,
        "normalisation_0_1": {
            "mean": [round(overall["channels"][c]["mean_0_1"], 4) for c in CHANNELS],
            "std": [round(overall["channels"][c]["std_0_1"], 4) for c in CHANNELS],
        },
    }


def _duplicates(source: Source, scan: _Scan) -> dict:
    """Groups of sampled patches with byte-identical pixels (leakage and label-noise risk)."""
    groups: dict[bytes, list[int]] = {}
    for i, digest in zip(scan.indices, scan.digests, strict=True):
        if digest is not None:
            groups.setdefault(digest, []).append(int(i))
    dupes = [members for members in groups.values() if len(members) > 1]
    cross_split = [g for g in dupes if len(set(source.splits[g].tolist())) > 1]
    conflicting = [g for g in dupes if len(set(source.labels[g].tolist())) > 1]
    return {
        "groups": len(dupes),
        "images_in_groups": sum(len(g) for g in dupes),
        "groups_across_splits": len(cross_split),
        "groups_with_conflicting_labels": len(conflicting),
        "examples": [
            {
                "ids": [str(source.ids[i]) for i in g],
                "labels": [class_name(int(source.labels[i])) for i in g],
                "splits": [str(source.splits[i]) for i in g],
            }
            for g in dupes[:LIST_LIMIT]
        ],
    }


def _label_counts(source: Source) -> dict[str, int]:
    labs, n = np.unique(source.labels, return_counts=True)
    by_label = {int(lab): int(c) for lab, c in zip(labs, n, strict=True)}
    return {class_name(lab): by_label[lab] for lab in CLASS_ORDER if lab in by_label}


def _pick_examples(source: Source, per_class: int, seed: int) -> dict[int, np.ndarray]:
    """Read ``per_class`` random readable patches of each class from the whole source."""
    rng = np.random.default_rng(seed + 1)  # independent of the statistics sample
    out: dict[int, np.ndarray] = {}
    for lab in CLASS_ORDER:
        members = np.flatnonzero(source.labels == lab)
        if not len(members):
            continue
        # Draw spares so a few unreadable patches still leave a full grid.
        candidates = np.sort(rng.choice(members, min(len(members), 2 * per_class), replace=False))
        images, bad = source.read_checked(candidates)
        bad_where = {where for where, _ in bad}
        keep = [k for k, i in enumerate(candidates) if source.where(int(i)) not in bad_where]
        out[lab] = images[rng.permutation(np.array(keep, dtype=np.intp))[:per_class]]
    return out


def _listed(problems: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"where": str(where), "why": str(why)} for where, why in problems[:LIST_LIMIT]]


# ----------------------------------------------------------------------------- entry point


def explore(
    data: str | Path,
    out: str | Path,
    *,
    max_images: int = 20000,
    per_class: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Explore a data set and write figures, colour statistics and summaries into ``out``.

    Writes ``class_balance.png``, ``samples.png``, ``colour_hist.png``, ``colour_stats.csv``,
    ``summary.json``, ``summary.md`` and a self-contained ``summary.html``. Unreadable patches
    and folder problems (csv rows without files, ...) are reported, not fatal.

    Args:
        data: a Kaggle folder, PCam HDF5 folder or packed store (see
            :func:`histodetect.sources.open_source`).
        out: folder for the outputs; created when missing.
        max_images: most patches read for pixel statistics and the duplicate search; a seeded
            sample stratified by label is taken when the data set is larger.
        per_class: sample patches shown per label class in ``samples.png``.
        seed: seed of the sample and of the patches shown.
        progress: show a progress bar while reading patches.

    Returns:
        The summary, as also written to ``summary.json``.

    Raises:
        HistodetectError: when ``data`` is not a readable data set, ``out`` is not a folder, or
            an argument is out of range.
    """
    t0 = time.perf_counter()
    if max_images < 1 or per_class < 1:
        raise HistodetectError(
            f"max_images ({max_images}) and per_class ({per_class}) must be at least 1."
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HistodetectError(f"{out}: exists and is not a folder; choose another --out.")
    # Exploring is a diagnosis: leave broken csv rows/files out and report them, never fail.
    source = open_source(data, skip_bad=True)
    out.mkdir(parents=True, exist_ok=True)

    indices = stratified_sample(source.labels, max_images, seed)
    scan = _scan(source, indices, progress)
    summary = _summary(source, scan, max_images, seed)
    pngs = _figures(source, scan, summary["counts"], per_class, seed)
    _write_outputs(out, summary, pngs, t0)
    return summary


def _summary(source: Source, scan: _Scan, max_images: int, seed: int) -> dict:
    """What ``summary.json`` says: counts, sample, image checks, duplicates, colour statistics."""
    indices = scan.indices
    stats = _colour_stats(source, scan)
    counts = source.counts()
    label_counts = _label_counts(source)
    sampled = {
        class_name(lab): int(n)
        for lab, n in zip(*np.unique(source.labels[indices], return_counts=True), strict=True)
    }
    summary: dict = {
        "synthetic": bool(source.synthetic),
        "source": {"kind": source.kind, "path": str(Path(source.path).resolve())},
        "patches": len(source),
        "counts": counts,
        "label_counts": label_counts,
        "positive_fraction": positive_fraction(label_counts),
        "positive_fraction_by_split": {s: positive_fraction(c) for s, c in counts.items()},
        "sample": {
            "images": len(indices),
            "per_class": sampled,
            "max_images": max_images,
            "seed": seed,
        },
        "image_checks": {
            "checked": len(indices),
            "ok": int(scan.good.sum()),
            "problems": len(scan.problems),
            "problem_examples": _listed(scan.problems),
            "uniform": len(scan.uniform),
            "uniform_rule": f"every pixel value within {UNIFORM_RANGE} levels (blank, no tissue)",
            "uniform_examples": [str(source.ids[i]) for i in scan.uniform[:LIST_LIMIT]],
        },
        "source_problems": {
            "count": len(source.problems),
            "examples": _listed(source.problems),
        },
        "duplicates": _duplicates(source, scan),
        "colour_stats": stats,
    }
    if source.kind == "store":
        summary["source"]["packed_from"] = getattr(source, "manifest", {}).get("source")
    return summary


def _figures(
    source: Source, scan: _Scan, counts: dict[str, dict[str, int]], per_class: int, seed: int
) -> dict[str, bytes]:
    """The three figures as PNG bytes, by file name."""
    return {
        "class_balance.png": class_balance_png(counts, source.synthetic, len(source)),
        "samples.png": samples_png(
            _pick_examples(source, per_class, seed), per_class, source.synthetic
        ),
        "colour_hist.png": colour_hist_png(scan.hist, source.synthetic),
    }


def _write_outputs(out: Path, summary: dict, pngs: dict[str, bytes], t0: float) -> None:
    """Write figures, CSV and summaries; the summary gains its run time and list of files."""
    for name, blob in pngs.items():
        write_atomic(out / name, blob)
    write_atomic(out / "colour_stats.csv", stats_csv(summary["colour_stats"]))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["files"] = [*FIGURES, "colour_stats.csv", "summary.json", "summary.md", "summary.html"]
    write_atomic(out / "summary.md", summary_markdown(summary).encode())
    write_atomic(out / "summary.html", summary_html(summary, pngs).encode())
    write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
