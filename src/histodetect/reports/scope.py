"""The report's out-of-scope section: how the run's scope scores spread over evaluated patches."""

from __future__ import annotations

from histodetect.reports.markup import esc, missing, num, table

# Plot box of the histograms, in SVG user units.
WIDTH, HEIGHT, MARGIN = 560, 200, 36
COLOURS = {"normal": "#1a7f37", "tumour": "#b00000"}

WHAT_IT_MEANS = (
    "<p>Every patch also gets an <b>out-of-scope score</b>: how unlike the run's training "
    "patches it looks in the model's own early features and in its texture. Patches above the "
    "threshold (set so that 95 % of validation patches are in scope) are flagged: other "
    "tissue, another stain or scanner, or an artefact. A flag is a <b>warning</b> that the "
    "probability is not to be trusted, not a diagnosis; being in scope does not make an answer "
    "right, and an unfamiliar lymph node can be flagged too.</p>"
)


def section_scope(evals: dict[str, dict]) -> list[str]:
    """The section: what the flag means, then per evaluated split its histogram and metrics."""
    parts = ['<h2 id="scope">Out of scope</h2>', WHAT_IT_MEANS]
    scored = {s: ev["scope"] for s, ev in evals.items() if (ev.get("scope") or {}).get("histogram")}
    if not scored:
        why = (
            next((ev["scope"]["unavailable"] for ev in evals.values() if ev.get("scope")), None)
            or "no evaluation has out-of-scope scores yet (histodetect evaluate RUN --data DATA)"
        )
        return [*parts, missing(f"No out-of-scope scores: {why}.")]
    rows = []
    for split, scope in scored.items():
        inside = scope.get("in_scope") or {}
        everything = evals[split].get("metrics") or {}
        rows.append(
            [
                esc(split),
                num(scope["threshold"], 2),
                f"{num(100 * scope['out_of_scope'], 1)} %",
                num(everything.get("auc")),
                num(inside.get("auc")),
            ]
        )
    header = ["split", "threshold", "out of scope", "ROC AUC, all", "ROC AUC, in scope"]
    parts.append(table(header, rows))
    for split, scope in scored.items():
        parts.append(f"<h3>{esc(split)}: out-of-scope scores</h3>")
        parts.append(histogram_svg(scope["histogram"], scope["threshold"], split))
    return parts


def histogram_svg(hist: dict, threshold: float, split: str) -> str:
    """Inline SVG: the score histogram of normal and tumour patches, the threshold dashed."""
    edges = hist["edges"]
    lo, hi = edges[0], edges[-1]
    top = max(max(hist["normal"], default=0), max(hist["tumour"], default=0), 1)

    def x(v: float) -> float:
        return MARGIN + (v - lo) / max(hi - lo, 1e-9) * (WIDTH - 2 * MARGIN)

    def y(count: float) -> float:
        return HEIGHT - MARGIN - count / top * (HEIGHT - 2 * MARGIN)

    shapes = []
    for name, colour in COLOURS.items():
        # A step outline per class, so that the two overlap readably.
        points = [(x(lo), y(0))]
        for k, count in enumerate(hist[name]):
            points += [(x(edges[k]), y(count)), (x(edges[k + 1]), y(count))]
        points.append((x(hi), y(0)))
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in points)
        shapes.append(
            f'<polyline points="{path}" fill="{colour}" fill-opacity="0.15" '
            f'stroke="{colour}" stroke-width="1.5"/>'
        )
    tx = x(threshold)
    labels = [
        f'<line x1="{tx:.1f}" y1="{MARGIN - 8}" x2="{tx:.1f}" y2="{HEIGHT - MARGIN}" '
        'stroke="#333" stroke-dasharray="5,4"/>',
        f'<text x="{tx + 4:.1f}" y="{MARGIN - 10}" font-size="11">threshold '
        f"{threshold:.2f}: out of scope to the right</text>",
        f'<text x="{MARGIN}" y="{HEIGHT - 10}" font-size="11">{lo:.1f}</text>',
        f'<text x="{WIDTH - MARGIN}" y="{HEIGHT - 10}" font-size="11" text-anchor="end">'
        f"{hi:.1f}</text>",
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 10}" font-size="11" text-anchor="middle">'
        "out-of-scope score</text>",
        f'<text x="{WIDTH - MARGIN}" y="{MARGIN + 4}" font-size="11" text-anchor="end" '
        f'fill="{COLOURS["normal"]}">normal patches</text>',
        f'<text x="{WIDTH - MARGIN}" y="{MARGIN + 18}" font-size="11" text-anchor="end" '
        f'fill="{COLOURS["tumour"]}">tumour patches</text>',
    ]
    return (
        f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="out-of-scope score histogram of the {esc(split)} split">'
        + "".join(shapes + labels)
        + "</svg><figcaption>Counts of patches by out-of-scope score (peak "
        f"{top:,}), per class.</figcaption></figure>"
    )
