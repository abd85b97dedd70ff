"""`histodetect explore`: class balance, sample patches, colour statistics and data checks."""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from histodetect import CENTRE, PATCH_SIZE
from histodetect.data.source import SPLITS, UNLABELLED, Source
from histodetect.data.sources import open_source
from histodetect.errors import HistodetectError
from histodetect.files import write_atomic

SYNTHETIC_BANNER = "SYNTHETIC DATA"
CHANNELS = ("R", "G", "B")
CLASS_ORDER = (0, 1, UNLABELLED)
CLASS_COLOURS = {0: "#1f77b4", 1: "#d62728", UNLABELLED: "#7f7f7f"}
CLASS_TITLES = {
    0: "label 0: no tumour in the centre 32x32",
    1: "label 1: tumour in the centre 32x32",
    UNLABELLED: "unlabelled",
}
LIST_LIMIT = 20  # examples kept per list in summary.json, so it stays readable
BATCH = 256  # patches per read: large enough to amortise overhead, small enough for RAM
UNIFORM_RANGE = 10  # a patch whose pixels all lie within this many levels is blank, not tissue
FIGURES = ("class_balance.png", "samples.png", "colour_hist.png")


def class_name(label: int) -> str:
    """The key used for a label class in the outputs.

    Args:
        label: 0, 1 or -1 (unlabelled).

    Returns:
        "0", "1" or "unlabelled".
    """
    return "unlabelled" if label == UNLABELLED else str(int(label))


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


def _positive_fraction(counts: dict[str, int]) -> float | None:
    labelled = counts.get("0", 0) + counts.get("1", 0)
    return counts.get("1", 0) / labelled if labelled else None


# ----------------------------------------------------------------------------- figures


def _title(text: str, synthetic: bool) -> str:
    return f"{SYNTHETIC_BANNER}: {text}" if synthetic else text


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    fig.clf()  # drop the artists now; Figure objects outside pyplot are then simply freed
    return buf.getvalue()


def _class_balance_png(counts: dict[str, dict[str, int]], synthetic: bool, total: int) -> bytes:
    splits = [s for s in SPLITS if s in counts]
    classes = [lab for lab in CLASS_ORDER if any(class_name(lab) in counts[s] for s in splits)]
    fig = Figure(figsize=(max(6.0, 2.6 * len(splits) + 2), 4.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(classes)
    top = max(max(c.values()) for c in counts.values())
    for k, lab in enumerate(classes):
        heights = [counts[s].get(class_name(lab), 0) for s in splits]
        xs = np.arange(len(splits)) - 0.4 + width * (k + 0.5)
        bars = ax.bar(xs, heights, width * 0.92, color=CLASS_COLOURS[lab], label=CLASS_TITLES[lab])
        ax.bar_label(bars, labels=[f"{h:,}" if h else "" for h in heights], padding=2, fontsize=9)
    ticks = []
    for s in splits:
        pos = _positive_fraction(counts[s])
        n = sum(counts[s].values())
        share = f"{100 * pos:.1f}% positive" if pos is not None else "unlabelled"
        ticks.append(f"{s}\n{n:,} patches, {share}")
    ax.set_xticks(np.arange(len(splits)), ticks)
    ax.set_ylim(0, top * 1.15)  # head-room for the count labels
    ax.set_ylabel("patches")
    ax.legend(loc="upper right", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    overall = _positive_fraction(
        {key: sum(c.get(key, 0) for c in counts.values()) for key in ("0", "1", "unlabelled")}
    )
    headline = f"Class balance per split: {total:,} patches"
    if overall is not None:
        headline += f", {100 * overall:.1f}% of labelled are positive"
    fig.suptitle(_title(headline, synthetic), color="red" if synthetic else "black")
    return _png(fig)


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


def _samples_png(examples: dict[int, np.ndarray], per_class: int, synthetic: bool) -> bytes:
    gap, scale = 4, 1.5
    cols = min(per_class, 8)
    rows = -(-per_class // cols)
    step = PATCH_SIZE + gap
    width, height = cols * step - gap, rows * step - gap
    fig = Figure(
        figsize=(width * scale / 100, (height * scale + 45) * len(examples) / 100 + 0.5),
        layout="constrained",
    )
    axes = fig.subplots(len(examples), 1, squeeze=False)[:, 0]
    lo, hi = CENTRE
    for ax, (lab, images) in zip(axes, examples.items(), strict=True):
        mosaic = np.full((height, width, 3), 255, np.uint8)
        for k, image in enumerate(images):
            y, x = (k // cols) * step, (k % cols) * step
            mosaic[y : y + PATCH_SIZE, x : x + PATCH_SIZE] = image
            # Pixel j covers [j - 0.5, j + 0.5] in imshow coordinates: outline pixels [lo, hi).
            ax.add_patch(
                Rectangle(
                    (x + lo - 0.5, y + lo - 0.5),
                    hi - lo,
                    hi - lo,
                    fill=False,
                    edgecolor="#00ff00",
                    linewidth=1.0,
                )
            )
        ax.imshow(mosaic, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(
            _title(f"{CLASS_TITLES[lab]} ({len(images)} random patches)", synthetic),
            color="red" if synthetic else CLASS_COLOURS[lab],
            fontsize=11,
        )
    fig.suptitle(
        _title("Sample patches; green box = labelled centre 32x32 region", synthetic),
        color="red" if synthetic else "black",
    )
    return _png(fig)


def _colour_hist_png(hist: dict[int, np.ndarray], synthetic: bool) -> bytes:
    densities = {lab: h / np.maximum(h.sum(axis=1, keepdims=True), 1) for lab, h in hist.items()}
    # Saturated background (255) or black borders (0) can be 5x taller than the tissue
    # curves; clip the y axis to the inner bins and print the end values instead.
    inner = max((float(d[:, 1:255].max()) for d in densities.values()), default=0.0)
    ylim = 1.35 * inner if inner > 0 else None  # head-room for the off-scale note
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for c, (ax, name) in enumerate(zip(axes, ("Red", "Green", "Blue"), strict=True)):
        clipped = []
        for lab in CLASS_ORDER:
            if lab not in densities:
                continue
            d = densities[lab][c]
            ax.plot(np.arange(256), d, color=CLASS_COLOURS[lab], lw=1.3, label=CLASS_TITLES[lab])
            clipped += [
                f"{v}: {100 * d[v]:.1f}% ({CLASS_TITLES[lab].split(':')[0]})"
                for v in (0, 255)
                if ylim is not None and d[v] > ylim
            ]
        if clipped:
            ax.text(
                0.98,
                0.97,
                "off scale\n" + "\n".join(clipped),
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=8,
                color="#444",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
            )
        ax.set_title(f"{name} channel")
        ax.set_xlim(0, 255)
        ax.set_xlabel("intensity (0-255)")
        ax.spines[["top", "right"]].set_visible(False)
    if ylim is not None:
        axes[0].set_ylim(0, ylim)
    axes[0].set_ylabel("fraction of pixels")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(
        _title("Pixel intensity histograms by class (density-normalised)", synthetic),
        color="red" if synthetic else "black",
    )
    return _png(fig)


# ----------------------------------------------------------------------------- reports


def _stats_rows(stats: dict) -> list[list[str]]:
    rows = []
    entries = list(stats["classes"].items())
    if stats["overall"] is not None:
        entries.append(("overall", stats["overall"]))
    for cls, entry in entries:
        for ch in CHANNELS:
            s = entry["channels"][ch]
            rows.append(
                [
                    cls,
                    ch,
                    str(entry["images"]),
                    f"{s['mean']:.4f}",
                    f"{s['std']:.4f}",
                    f"{s['mean_of_image_means']:.4f}",
                    f"{s['std_of_image_means']:.4f}",
                    f"{s['mean_0_1']:.6f}",
                    f"{s['std_0_1']:.6f}",
                ]
            )
    return rows


STATS_HEADER = [
    "class",
    "channel",
    "images",
    "mean",
    "std",
    "mean_of_image_means",
    "std_of_image_means",
    "mean_0_1",
    "std_0_1",
]


def _csv_bytes(stats: dict) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(STATS_HEADER)
    writer.writerows(_stats_rows(stats))
    return buf.getvalue().encode()


def _facts(summary: dict) -> list[tuple[str, str]]:
    """The headline facts shared by summary.md and summary.html, as (label, text) pairs."""
    pos = summary["positive_fraction"]
    checks, dup = summary["image_checks"], summary["duplicates"]
    norm = summary["colour_stats"]["normalisation_0_1"]
    facts = [
        ("Source", f"{summary['source']['kind']} at {summary['source']['path']}"),
        ("Patches", f"{summary['patches']:,}"),
        ("Labels", ", ".join(f"{k}: {v:,}" for k, v in summary["label_counts"].items())),
        ("Positive fraction", f"{100 * pos:.1f}% of labelled patches" if pos is not None else "-"),
        (
            "Image checks",
            f"{checks['ok']:,} of {checks['checked']:,} sampled patches decoded as 96x96x3 "
            f"uint8; {checks['problems']} problem(s); {checks['uniform']} blank/uniform",
        ),
        (
            "Exact duplicates",
            f"{dup['groups']} group(s) ({dup['images_in_groups']} patches) among the sample; "
            f"{dup['groups_across_splits']} across splits, "
            f"{dup['groups_with_conflicting_labels']} with conflicting labels",
        ),
    ]
    if summary["source_problems"]["count"]:
        facts.append(
            (
                "Folder problems",
                f"{summary['source_problems']['count']} (left out; see summary.json)",
            )
        )
    if norm is not None:
        facts.append(
            (
                "Normalisation constants (pixel / 255)",
                f"mean={tuple(norm['mean'])}, std={tuple(norm['std'])} (R, G, B)",
            )
        )
    return facts


def _notes(summary: dict) -> list[str]:
    """Caveats a reader needs to interpret the numbers correctly."""
    sample = summary["sample"]
    notes = []
    if sample["images"] < summary["patches"]:
        notes.append(
            f"Colour statistics, image checks and the duplicate search use a seeded sample of "
            f"{sample['images']:,} of {summary['patches']:,} patches, stratified by label so "
            "class proportions are kept."
        )
    else:
        notes.append("Colour statistics, image checks and duplicates cover every patch.")
    notes.append(
        "All patches have the same size, so mean_of_image_means equals the pixel mean; "
        "std_of_image_means is the spread between patches (stain and background variation)."
    )
    if summary["source"]["kind"] == "kaggle" and "valid" in summary["counts"]:
        notes.append(
            "'valid' for a Kaggle folder is histodetect's seeded stratified hold-out of train/, "
            "not a folder on disk."
        )
    return notes


def _markdown(summary: dict) -> str:
    synthetic = summary["synthetic"]
    lines = [f"# {_title('Data exploration', synthetic)}", ""]
    if synthetic:
        lines += [
            f"> **{SYNTHETIC_BANNER}**: these patches are generated, not real tissue; "
            "nothing here describes real histopathology.",
            "",
        ]
    lines += [f"- **{k}**: {v}" for k, v in _facts(summary)]
    lines += ["", "## Counts per split", "", "| split | label | patches |", "|---|---|---|"]
    for split, by_label in summary["counts"].items():
        lines += [f"| {split} | {lab} | {n:,} |" for lab, n in by_label.items()]
    lines += ["", "## Colour statistics (0..255 scale; `*_0_1` columns divided by 255)", ""]
    lines += ["| " + " | ".join(STATS_HEADER) + " |", "|" + "---|" * len(STATS_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _stats_rows(summary["colour_stats"])]
    lines += ["", "## Figures", ""]
    lines += [f"![{name[:-4]}]({name})" for name in FIGURES]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in _notes(summary)]
    return "\n".join(lines) + "\n"


def _html(summary: dict, pngs: dict[str, bytes]) -> str:
    synthetic = summary["synthetic"]
    esc = html.escape
    title = esc(_title("Data exploration", synthetic))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title>",
        "<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right}img{max-width:100%;display:block;margin:1em 0}"
        ".synthetic{background:#c00;color:#fff;padding:.6em 1em;font-weight:bold}</style>",
        "</head><body>",
        f"<h1>{title}</h1>",
    ]
    if synthetic:
        parts.append(
            f'<p class="synthetic">{SYNTHETIC_BANNER}: these patches are generated, not real '
            "tissue; nothing here describes real histopathology.</p>"
        )
    parts.append("<ul>")
    parts += [f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in _facts(summary)]
    parts += ["</ul>", "<h2>Counts per split</h2>", "<table>"]
    parts.append("<tr><th>split</th><th>label</th><th>patches</th></tr>")
    for split, by_label in summary["counts"].items():
        parts += [
            f"<tr><td>{esc(split)}</td><td>{esc(lab)}</td><td>{n:,}</td></tr>"
            for lab, n in by_label.items()
        ]
    parts += [
        "</table>",
        "<h2>Colour statistics (0..255 scale; *_0_1 columns divided by 255)</h2>",
        "<table>",
    ]
    parts.append("<tr>" + "".join(f"<th>{h}</th>" for h in STATS_HEADER) + "</tr>")
    for row in _stats_rows(summary["colour_stats"]):
        parts.append("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>")
    parts += ["</table>", "<h2>Figures</h2>"]
    for name in FIGURES:
        data = base64.b64encode(pngs[name]).decode("ascii")
        parts.append(f'<img alt="{name[:-4]}" src="data:image/png;base64,{data}">')
    parts += (
        ["<h2>Notes</h2>", "<ul>"] + [f"<li>{esc(n)}</li>" for n in _notes(summary)] + ["</ul>"]
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


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
        "positive_fraction": _positive_fraction(label_counts),
        "positive_fraction_by_split": {s: _positive_fraction(c) for s, c in counts.items()},
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

    pngs = {
        "class_balance.png": _class_balance_png(counts, source.synthetic, len(source)),
        "samples.png": _samples_png(
            _pick_examples(source, per_class, seed), per_class, source.synthetic
        ),
        "colour_hist.png": _colour_hist_png(scan.hist, source.synthetic),
    }
    for name, blob in pngs.items():
        write_atomic(out / name, blob)
    write_atomic(out / "colour_stats.csv", _csv_bytes(stats))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["files"] = [*FIGURES, "colour_stats.csv", "summary.json", "summary.md", "summary.html"]
    write_atomic(out / "summary.md", _markdown(summary).encode())
    write_atomic(out / "summary.html", _html(summary, pngs).encode())
    write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary
