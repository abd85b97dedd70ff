"""Tumour regions: connected cells above the threshold, traced as polygons with measurements."""

from __future__ import annotations

import contextlib

import numpy as np


def _trace_rings(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Outlines of a 4-connected cell mask along cell edges, as closed rings of (x, y) corners.

    Every boundary edge is walked with the cells on its right (clockwise on screen, where y
    grows downwards); at a corner where two cells touch only diagonally the walk turns right,
    which keeps such cells apart as 4-connectivity does. Outer rings have a positive shoelace
    area, holes a negative one. Collinear corners are dropped.
    """
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1]
    nxt: dict[tuple[int, int, int, int], tuple[int, int, int, int]] = {}
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    sides = (
        (m[:-2, 1:-1], (0, 0), (1, 0)),  # top edge, walked east
        (m[1:-1, 2:], (1, 0), (1, 1)),  # right edge, walked south
        (m[2:, 1:-1], (1, 1), (0, 1)),  # bottom edge, walked west
        (m[1:-1, :-2], (0, 1), (0, 0)),  # left edge, walked north
    )
    for neighbour, (ax, ay), (bx, by) in sides:
        rr, cc = np.nonzero(inner & ~neighbour)
        for r, c in zip(rr.tolist(), cc.tolist(), strict=True):
            edges.setdefault((c + ax, r + ay), []).append((c + bx, r + by))
    for (x0, y0), ends in list(edges.items()):
        for x1, y1 in ends:
            dx, dy = x1 - x0, y1 - y0
            options = edges[(x1, y1)]
            # Right turn first (heading (dx, dy), right is (-dy, dx) with y down), then ahead.
            for want in ((-dy, dx), (dx, dy), (dy, -dx)):
                end = (x1 + want[0], y1 + want[1])
                if end in options:
                    nxt[(x0, y0, x1, y1)] = (x1, y1, *end)
                    break
    rings = []
    seen: set[tuple[int, int, int, int]] = set()
    for start in nxt:
        if start in seen:
            continue
        ring = []
        edge = start
        while edge not in seen:
            seen.add(edge)
            ring.append(edge)
            edge = nxt[edge]
        points = [(e[0], e[1]) for e in ring]
        corners = [
            p
            for i, p in enumerate(points)
            if (points[i - 1][0] - p[0], points[i - 1][1] - p[1])
            != (p[0] - points[(i + 1) % len(points)][0], p[1] - points[(i + 1) % len(points)][1])
        ]
        rings.append([*corners, corners[0]])
    return rings


def _shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2)


def longest_diameter(points: np.ndarray) -> float:
    """Largest distance between two outline points (on their convex hull when there are many)."""
    if len(points) > 64:
        from scipy.spatial import ConvexHull, QhullError

        with contextlib.suppress(QhullError):  # collinear points: keep them all
            points = points[ConvexHull(points).vertices]
    d = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((d**2).sum(-1)).max()) if len(points) else 0.0


def find_regions(
    prob: np.ndarray,
    tissue: np.ndarray,
    threshold: float,
    cell: float,
    *,
    bounds: tuple[float, float],
    mpp: float | None = None,
) -> list[dict]:
    """Connected (4-neighbour) tissue cells with ``prob >= threshold``, as region records.

    Args:
        prob: Cell probabilities.
        tissue: Cells that were predicted.
        threshold: Region threshold.
        cell: Output pixels per cell side (stride x level-0 scale for slides).
        bounds: (width, height) in output pixels; outlines are clipped to it.
        mpp: µm per output pixel, for areas in mm² and diameters in mm.

    Returns:
        Regions sorted by max probability (then area), ids from 1; see ``RegionMap``.
    """
    from scipy import ndimage

    labels, _ = ndimage.label(tissue & (prob >= threshold))
    regions = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        own = labels[sl] == k
        rings = []
        for ring in _trace_rings(own):
            pts = np.asarray(ring, np.float64)
            pts[:, 0] = np.minimum((pts[:, 0] + sl[1].start) * cell, bounds[0])
            pts[:, 1] = np.minimum((pts[:, 1] + sl[0].start) * cell, bounds[1])
            rings.append(pts)
        rings.sort(key=_shoelace, reverse=True)  # the outer ring first, holes after
        area = sum(_shoelace(r) for r in rings)
        values = prob[sl][own]
        diameter = longest_diameter(rings[0][:-1])
        cy, cx = ndimage.center_of_mass(own)
        regions.append(
            {
                "area_px": area,
                "area_mm2": area * mpp**2 / 1e6 if mpp else None,
                "max_prob": float(values.max()),
                "mean_prob": float(values.mean()),
                "cells": int(own.sum()),
                "centroid": [(cx + sl[1].start + 0.5) * cell, (cy + sl[0].start + 0.5) * cell],
                "longest_diameter_px": diameter,
                "longest_diameter_mm": diameter * mpp / 1000 if mpp else None,
                "polygon": rings[0].tolist(),
                "holes": [r.tolist() for r in rings[1:]],
            }
        )
    regions.sort(key=lambda r: (-r["max_prob"], -r["area_px"]))
    for i, region in enumerate(regions, start=1):
        region["id"] = i
    return [{"id": r.pop("id"), **r} for r in regions]
