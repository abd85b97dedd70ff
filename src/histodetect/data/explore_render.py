"""Figures and write-ups of an exploration: PNGs, colour-statistics CSV, summary.md and .html."""

from __future__ import annotations

import base64
import csv
import html
import io

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from histodetect import CENTRE, PATCH_SIZE
from histodetect.data.source import SPLITS, UNLABELLED

SYNTHETIC_BANNER = "SYNTHETIC DATA"
CHANNELS = ("R", "G", "B")
CLASS_ORDER = (0, 1, UNLABELLED)
CLASS_COLOURS = {0: "#1f77b4", 1: "#d62728", UNLABELLED: "#7f7f7f"}
CLASS_TITLES = {
    0: "label 0: no tumour in the centre 32x32",
    1: "label 1: tumour in the centre 32x32",
    UNLABELLED: "unlabelled",
}
FIGURES = ("class_balance.png", "samples.png", "colour_hist.png")


def class_name(label: int) -> str:
    """The key used for a label class in the outputs.

    Args:
        label: 0, 1 or -1 (unlabelled).

    Returns:
        "0", "1" or "unlabelled".
    """
    return "unlabelled" if label == UNLABELLED else str(int(label))


def positive_fraction(counts: dict[str, int]) -> float | None:
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


def class_balance_png(counts: dict[str, dict[str, int]], synthetic: bool, total: int) -> bytes:
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
        pos = positive_fraction(counts[s])
        n = sum(counts[s].values())
        share = f"{100 * pos:.1f}% positive" if pos is not None else "unlabelled"
        ticks.append(f"{s}\n{n:,} patches, {share}")
    ax.set_xticks(np.arange(len(splits)), ticks)
    ax.set_ylim(0, top * 1.15)  # head-room for the count labels
    ax.set_ylabel("patches")
    ax.legend(loc="upper right", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    overall = positive_fraction(
        {key: sum(c.get(key, 0) for c in counts.values()) for key in ("0", "1", "unlabelled")}
    )
    headline = f"Class balance per split: {total:,} patches"
    if overall is not None:
        headline += f", {100 * overall:.1f}% of labelled are positive"
    fig.suptitle(_title(headline, synthetic), color="red" if synthetic else "black")
    return _png(fig)


def samples_png(examples: dict[int, np.ndarray], per_class: int, synthetic: bool) -> bytes:
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


def colour_hist_png(hist: dict[int, np.ndarray], synthetic: bool) -> bytes:
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


def stats_csv(stats: dict) -> bytes:
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


def summary_markdown(summary: dict) -> str:
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


def summary_html(summary: dict, pngs: dict[str, bytes]) -> str:
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
