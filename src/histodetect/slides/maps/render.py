"""Pictures: PNG encoding and the heatmap overlay with region outlines."""

from __future__ import annotations

import io
import math

import numpy as np

OVERLAY_SIDE = 2048  # longest side of overlay.png


def png_bytes(image) -> bytes:
    """PNG bytes of a PIL image or an array (uint8 RGB or grey, uint16 grey)."""
    from PIL import Image

    buf = io.BytesIO()
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.ascontiguousarray(image))
    image.save(buf, format="PNG")
    return buf.getvalue()


def render_overlay(
    base: np.ndarray,
    prob: np.ndarray,
    tissue: np.ndarray,
    cell: float,
    rings: list[list[list[list[float]]]],
    caption: str = "",
    ring_scale: float = 1.0,
    out_of_scope: np.ndarray | None = None,
):
    """A PIL image: the heatmap (jet) over ``base`` on tissue cells, regions outlined in cyan.

    Cells flagged in ``out_of_scope`` are greyed instead of coloured as tumour or normal.

    Args:
        base: RGB picture (thumbnail or image).
        prob: Cell probabilities.
        tissue: Cells to colour.
        cell: ``base`` pixels per cell side.
        rings: Per region, its rings of (x, y) points.
        caption: Text for the footer (with a colour bar for P(tumour)).
        ring_scale: Multiplies ring coordinates into ``base`` pixels.
        out_of_scope: Cells unlike the training data (same shape as ``prob``), if known.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    h, w = base.shape[:2]
    rows, cols = prob.shape
    heat = (colormaps["jet"](prob)[..., :3] * 255).astype(np.uint8)
    grey = None if out_of_scope is None else out_of_scope & tissue
    if grey is not None:
        heat[grey] = 128
    big = (max(w, math.ceil(cols * cell)), max(h, math.ceil(rows * cell)))
    box = (0, 0, big[0] / cell, big[1] / cell)
    heat_img = np.asarray(Image.fromarray(heat).resize(big, Image.Resampling.NEAREST, box=box))
    alpha = np.where(tissue, 0.25 + 0.5 * prob, 0.0).astype(np.float32)
    if grey is not None:
        alpha[grey] = 0.6
    alpha_img = Image.fromarray(alpha).resize(big, Image.Resampling.NEAREST, box=box)
    a = np.asarray(alpha_img)[:h, :w, None]
    mixed = base.astype(np.float32) * (1 - a) + heat_img[:h, :w].astype(np.float32) * a
    picture = Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    width = max(1, round(max(w, h) / 600))
    for region in rings:
        for ring in region:
            pts = [(x * ring_scale, y * ring_scale) for x, y in ring]
            if len(pts) > 1:
                draw.line(pts, fill=(0, 255, 255), width=width, joint="curve")
    if not caption:
        return picture
    # Footer: a colour bar for P(tumour) and the caption, wrapped to the picture's width.
    import textwrap

    lines = textwrap.wrap(caption, max(20, (w - 10) // 6))
    canvas = Image.new("RGB", (w, h + 32 + 12 * len(lines)), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    bar_w = min(200, max(w - 10, 40))
    ramp = (colormaps["jet"](np.linspace(0, 1, bar_w))[:, :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(ramp[None], 10, axis=0)), (5, h + 4))
    draw.text((5, h + 16), "0", fill=(0, 0, 0))
    draw.text((5 + bar_w // 2 - 27, h + 16), "P(tumour)", fill=(0, 0, 0))
    draw.text((bar_w, h + 16), "1", fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((5, h + 30 + 12 * i), line, fill=(0, 0, 0))
    return canvas
