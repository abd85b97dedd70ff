"""Cell inference: P(tumour) of every tissue cell, patch-wise or densely, streamed by tiles."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from histodetect import PATCH_SIZE
from histodetect.data.transforms import dihedral, to_model_input
from histodetect.errors import HistodetectError
from histodetect.inference.calibration import apply_temperature
from histodetect.inference.predictor import Predictor
from histodetect.models.dense import (
    DENSE_ARCH,
    dense_capable,
    dense_logits,
    dense_stride,
    patch_feature_size,
)
from histodetect.slides.tissue import in_focus

TILE_CELLS = 32  # cells per inference tile side: 1088 px at stride 32, ~150 MB peak in dense mode


def resolve_mode(predictor: Predictor, stride: int, mode: str) -> str:
    """``auto`` → ``dense`` when the model is padding-free and the stride fits, else ``patch``."""
    if mode not in ("auto", "dense", "patch"):
        raise HistodetectError(f"--mode must be auto, dense or patch, got {mode!r}.")
    if mode == "patch":
        return mode
    capable = dense_capable(predictor.model)
    step = dense_stride(predictor.model)
    # Stain normalisation measures each patch's own stains: a tile's would differ.
    per_patch = predictor.stain.method != "none"
    fits = capable and stride % step == 0 and not per_patch
    if mode == "dense" and not fits:
        why = (
            f"the model ({predictor.meta.get('arch')}) has zero padding; train --arch "
            f"{DENSE_ARCH} for dense maps"
            if not capable
            else f"the run normalises each patch's stain ({predictor.stain.method})"
            if per_patch
            else f"--stride must be a multiple of {step} for dense mode"
        )
        raise HistodetectError(f"dense mode impossible: {why}, or use --mode patch.")
    return "dense" if fits else "patch"


@dataclass
class InferenceStats:
    """What the inference loop did."""

    patches: int = 0
    tiles: int = 0
    tiles_skipped: int = 0
    out_of_focus: int = 0  # tissue cells left out because their window is blurred
    seconds: float = 0.0


def _tiles_with_tissue(
    tissue: np.ndarray, tile_cells: int, stats: InferenceStats
) -> list[tuple[int, int]]:
    """Top-left cells of the tiles that hold tissue; the others are counted and never read."""
    rows, cols = tissue.shape
    tiles = []
    for r0 in range(0, rows, tile_cells):
        for c0 in range(0, cols, tile_cells):
            if tissue[r0 : r0 + tile_cells, c0 : c0 + tile_cells].any():
                tiles.append((r0, c0))
            else:
                stats.tiles_skipped += 1
    stats.tiles = len(tiles)
    return tiles


def _prefetched(load: Callable, tiles: list, ahead: int = 2):
    """Yield ``(tile, load(tile))`` in order, reading the next tiles in a background thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        queue = [pool.submit(load, t) for t in tiles[:ahead]]
        for i, tile in enumerate(tiles):
            pixels = queue.pop(0).result()
            if i + ahead < len(tiles):
                queue.append(pool.submit(load, tiles[i + ahead]))
            yield tile, pixels


class _PatchBatches:
    """Patch-wise inference: tissue windows gathered across tiles into full batches."""

    def __init__(
        self,
        predictor: Predictor,
        prob: np.ndarray,
        tta: int,
        batch_size: int,
        scope: np.ndarray | None = None,
    ):
        self.predictor, self.prob, self.tta, self.batch_size = predictor, prob, tta, batch_size
        self.scope = scope  # filled with out-of-scope scores when given
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.count = 0

    def add(self, rr: np.ndarray, cc: np.ndarray, patches: np.ndarray) -> None:
        self.pending.append((rr, cc, patches))
        self.count += len(patches)
        if self.count >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        patches = np.concatenate([p for _, _, p in self.pending])
        if self.scope is None:
            out, scores = self.predictor.predict_proba(patches, self.tta, self.batch_size), None
        else:
            out, scores = self.predictor.predict_and_score(patches, self.tta, self.batch_size)
        k = 0
        for rr, cc, p in self.pending:
            self.prob[rr, cc] = out[k : k + len(p)]
            if scores is not None:
                self.scope[rr, cc] = scores[k : k + len(p)]
            k += len(p)
        self.pending.clear()
        self.count = 0


def predict_cells(
    read: Callable[[int, int, int, int], np.ndarray],
    tissue: np.ndarray,
    predictor: Predictor,
    stride: int,
    *,
    tta: int = 1,
    mode: str = "patch",
    batch_size: int = 256,
    tile_cells: int = TILE_CELLS,
    progress: bool = False,
    desc: str = "slide",
    scope: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, InferenceStats]:
    """P(tumour) of every tissue cell, streaming tiles of ``tile_cells`` x ``tile_cells`` cells.

    Each tile is read with the 96 px patch context around its cells (the next tiles are read
    in a background thread while the model runs); tiles without tissue are never read. Tissue
    cells whose window is out of focus (``tissue.in_focus``) are left out and counted. In
    ``patch`` mode the tissue cells' 96 px patches go to ``predictor.predict_proba`` in
    batches; in ``dense`` mode the whole tile goes through the padding-free model once.
    Memory: a couple of tiles and one batch, whatever the slide's size. In ``patch`` mode a
    given ``scope`` array (rows, cols) receives each analysed cell's out-of-scope score.

    Returns:
        ``(prob, analysed, stats)``: P(tumour) per cell (0 where not analysed), the cells the
        model saw (``tissue`` less the blurred ones), and what the loop did.
    """
    from tqdm.auto import tqdm

    if tta not in (1, 2, 4, 8):
        raise HistodetectError(f"--tta must be one of (1, 2, 4, 8), got {tta}.")
    rows, cols = tissue.shape
    prob = np.zeros((rows, cols), np.float32)
    analysed = tissue.copy()
    stats = InferenceStats()
    offset = stride // 2 - PATCH_SIZE // 2  # patch top-left of cell 0: centred on the cell
    tiles = _tiles_with_tissue(tissue, tile_cells, stats)

    def load(tile: tuple[int, int]) -> np.ndarray:
        r0, c0 = tile
        r1, c1 = min(r0 + tile_cells, rows), min(c0 + tile_cells, cols)
        w = (c1 - c0 - 1) * stride + PATCH_SIZE
        h = (r1 - r0 - 1) * stride + PATCH_SIZE
        return read(c0 * stride + offset, r0 * stride + offset, w, h)

    batches = _PatchBatches(predictor, prob, tta, batch_size, scope)
    t0 = time.perf_counter()
    bar = tqdm(total=int(tissue.sum()), unit="patch", desc=desc, disable=not progress)
    for (r0, c0), pixels in _prefetched(load, tiles):
        here = analysed[r0 : r0 + tile_cells, c0 : c0 + tile_cells]  # a view: updated in place
        blurred = here & ~in_focus(pixels, here.shape, stride)
        here &= ~blurred
        stats.out_of_focus += int(blurred.sum())
        bar.update(int(blurred.sum()))
        rr, cc = np.nonzero(here)
        if not len(rr):
            continue  # every tissue window of the tile is out of focus
        if mode == "dense":
            step = stride // dense_stride(predictor.model)
            out = dense_proba(predictor, pixels, tta, step)
            prob[rr + r0, cc + c0] = out[rr, cc]
        else:
            windows = sliding_window_view(pixels, (PATCH_SIZE, PATCH_SIZE), axis=(0, 1))
            windows = windows[::stride, ::stride]  # (rows, cols, 3, 96, 96) views
            patches = np.ascontiguousarray(windows[rr, cc].transpose(0, 2, 3, 1))
            batches.add(rr + r0, cc + c0, patches)
        stats.patches += len(rr)
        bar.update(len(rr))
    batches.flush()
    bar.close()
    stats.seconds = time.perf_counter() - t0
    return prob, analysed, stats


def _undo_dihedral(y: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``data.transforms.dihedral(., k)``: its three steps undone in reverse order."""
    if k & 1:
        y = y.flip(-1)
    if k & 2:
        y = y.flip(-2)
    if k & 4:
        y = y.transpose(-1, -2)
    return y


@torch.inference_mode()
def dense_proba(predictor, tile: np.ndarray, tta: int = 1, step: int = 1) -> np.ndarray:
    """P(tumour) of every patch in a uint8 RGB tile in one convolutional pass per TTA view.

    Equal (to float rounding) to ``predictor.predict_proba`` on the tile's 96 px patches at
    stride ``32 * step``, including the centre crop, dihedral TTA and temperature.

    Args:
        predictor: A ``histodetect.inference.predictor.Predictor`` whose model is dense-capable.
        tile: (32 (n - 1) step + 96, ...) uint8 RGB pixels, patch windows at stride 32 step.
        tta: 1, 2, 4 or 8 dihedral views of the whole tile, averaged as probabilities.
        step: Keep every ``step``-th output (cell strides that are multiples of 32).

    Returns:
        (rows, cols) float32 probabilities.
    """
    margin = (96 - predictor.crop) // 2 if predictor.crop < 96 else 0
    if margin:  # the model sees each patch's centre crop: the tile loses the same border
        tile = tile[margin:-margin, margin:-margin]
    # Readers may hand out read-only arrays; torch wants writable memory.
    x = torch.from_numpy(np.require(tile, requirements=["C", "W"]))[None].to(predictor.device)
    mean, std = predictor.meta["mean"], predictor.meta["std"]
    x = to_model_input(x, mean, std, predictor.channels_last, crop=max(x.shape[1:3]))
    k = getattr(predictor, "_dense_k", None)
    if k is None:
        k = predictor._dense_k = patch_feature_size(predictor.model, predictor.crop)
    probs = None
    for view in range(tta):
        y = torch.sigmoid(dense_logits(predictor.model, dihedral(x, view), k).float())
        y = _undo_dihedral(y, view)
        probs = y if probs is None else probs + y
    out = (probs[0] / tta)[::step, ::step].cpu().numpy()
    if predictor.temperature != 1.0:  # calibrated by `evaluate --calibrate`, as predict_proba
        out = apply_temperature(out, predictor.temperature)
    return out.astype(np.float32)
