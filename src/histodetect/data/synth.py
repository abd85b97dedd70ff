"""Synthetic PatchCamelyon-like H&E patches: noise and nucleus banks, tissue layers, rendering."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from histodetect import CENTRE, PATCH_SIZE

# Ruifrok & Johnston-style optical-density vectors (R, G, B). Mixing stains in OD space
# (Beer-Lambert) is what makes overlaps, pale and dark areas come out in plausible H&E colours.
_HAEMATOXYLIN = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_EOSIN = np.array([0.10, 0.95, 0.30], dtype=np.float32)

_LO, _HI = CENTRE
_N_PX = PATCH_SIZE * PATCH_SIZE
# Nuclei are splatted onto a padded canvas so that stencils hanging over the patch edge need
# no bounds checks; the padding is cropped away at the end.
_PAD = 20
_W = PATCH_SIZE + 2 * _PAD
_CANVAS = _W * _W
_YY, _XX = np.mgrid[0:PATCH_SIZE, 0:PATCH_SIZE].astype(np.float32)
_IN_BOX = np.zeros((_W, _W), dtype=bool)
_IN_BOX[_PAD + _LO : _PAD + _HI, _PAD + _LO : _PAD + _HI] = True
_IN_BOX = _IN_BOX.ravel()

_LYMPH_HALF, _SPINDLE_HALF, _TUMOUR_HALF = 4, 7, 16
_SUBPIXEL = 4  # small nuclei are pre-rendered at 1/4 px offsets; big ones snap to whole px
_BANK_SEED = 0x5EED  # the template banks are fixed; every random choice per patch is from rng

PLAIN, POSITIVE, DECOY = 0, 1, 2


# --------------------------------------------------------------------------- noise


_NOISE_BANK = 384  # side of each pre-rendered noise field that patches crop from


@functools.cache
def _noise_bank(k: int) -> np.ndarray:
    """A fixed, unit-variance smooth noise field with blobs about PATCH_SIZE / k px across.

    Built once by Gaussian-kernel upsampling of lattice noise (a bilinear kernel would leave
    visible lattice creases). Patches crop it rather than upsampling their own: per-patch
    matrix products were both the slowest step and, through multi-threaded BLAS, the one that
    collapsed when other processes shared the CPU.
    """
    step = PATCH_SIZE / k
    centres = (np.arange(-2, math.ceil(_NOISE_BANK / step) + 2) + 0.5) * step
    x = np.arange(_NOISE_BANK) + 0.5
    w = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / (0.7 * step)) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    z = np.random.default_rng([_BANK_SEED, 100 + k]).standard_normal((centres.size,) * 2)
    field = w @ z @ w.T
    return ((field - field.mean()) / field.std()).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, k: int, size: int = PATCH_SIZE) -> np.ndarray:
    """A random ``size`` x ``size`` crop of ``_noise_bank(k)``, randomly flipped/transposed.

    Returns a read-only view; callers build new arrays from it and never write into it.
    """
    bank = _noise_bank(k)
    oy, ox = rng.integers(0, _NOISE_BANK - size + 1, 2)
    view = bank[oy : oy + size, ox : ox + size]
    t = int(rng.integers(0, 8))
    if t & 1:
        view = view.T
    if t & 2:
        view = view[::-1]
    if t & 4:
        view = view[:, ::-1]
    return view


@functools.cache
def _grain_bank() -> np.ndarray:
    """A fixed pool of Gaussian camera noise; each patch takes a random slice of it.

    Drawing 27k fresh normals per patch would cost more than rendering the rest of it.
    """
    return np.random.default_rng(_BANK_SEED).standard_normal(1 << 20, dtype=np.float32)


# --------------------------------------------------------------------------- nucleus templates


def _offsets(half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x and y offsets of a (2 half + 1)^2 stencil, flattened, and their padded-canvas index."""
    oy, ox = np.mgrid[-half : half + 1, -half : half + 1]
    ox, oy = ox.ravel(), oy.ravel()
    return ox.astype(np.float32), oy.astype(np.float32), oy * _W + ox


def _ellipse(
    dx: np.ndarray,
    dy: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    angle: np.ndarray,
    wobble: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased coverage (0..1) and depth (px inside the outline) of rotated ellipses.

    ``dx``/``dy`` are (n, m) offsets from each centre; ``wobble`` is (n, 3, 2): amplitude and
    phase of the 2nd-4th angular harmonics that make tumour outlines irregular.
    """
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    u = (dx * c + dy * s) / a[:, None]
    v = (dy * c - dx * s) / b[:, None]
    rho = np.sqrt(u * u + v * v)
    if wobble is not None:
        phi = np.arctan2(v, u)
        scale = np.ones_like(rho)
        for k in range(3):
            amp, phase = wobble[:, k, 0, None], wobble[:, k, 1, None]
            scale += amp * np.cos((k + 2) * phi + phase)
        rho = rho / scale
    # Depth in px via the geometric-mean radius: good enough for a 1 px anti-aliased edge.
    depth = (1.0 - rho) * np.sqrt(a * b)[:, None]
    return np.clip(depth + 0.5, 0.0, 1.0), depth


@dataclass(frozen=True)
class _SmallBank:
    """Pre-rendered small nuclei: ``cover[shape, subpixel_phase, stencil_pixel]``."""

    cover: np.ndarray
    flat: np.ndarray  # padded-canvas index offset of each stencil pixel


@dataclass(frozen=True)
class _TumourBank:
    """Pre-rendered tumour nuclei, sorted by radius, in all 8 flips/rotations of the stencil."""

    cover: np.ndarray  # (shapes * stencil,) flattened so one gather serves many nuclei
    detail: np.ndarray  # membrane rim and nucleolus, optical density per unit stain
    cyto: np.ndarray  # halo of cytoplasm around the nucleus (0..1)
    radius: np.ndarray  # (shapes,) geometric-mean radius, ascending
    flat: np.ndarray  # padded-canvas index offset of each stencil pixel
    dihedral: np.ndarray  # (8, stencil): stencil permutations for flips and 90° rotations


@functools.cache
def _small_bank(kind: str) -> _SmallBank:
    """Lymphocyte (round) or spindle (stromal) templates, 64 shapes x 16 subpixel phases.

    Rendering ellipses per nucleus dominated the run time; looking them up costs one gather.
    """
    rng = np.random.default_rng([_BANK_SEED, 1 if kind == "lymph" else 2])
    n = 64
    if kind == "lymph":
        half = _LYMPH_HALF
        r = rng.uniform(2.2, 3.4, n)
        a, b = r, r * rng.uniform(0.85, 1.0, n)
    else:
        half = _SPINDLE_HALF
        a, b = rng.uniform(3.5, 6.0, n), rng.uniform(1.0, 1.6, n)
    angle = rng.uniform(0.0, np.pi, n)
    ox, oy, flat = _offsets(half)
    phases = np.arange(_SUBPIXEL) / _SUBPIXEL
    fy, fx = (g.ravel() for g in np.meshgrid(phases, phases, indexing="ij"))
    covers = []
    for p in range(fx.size):
        cover, _ = _ellipse(ox[None] - fx[p], oy[None] - fy[p], a, b, angle)
        covers.append(cover)
    return _SmallBank(np.stack(covers, axis=1).astype(np.float32), flat)


@functools.cache
def _tumour_bank() -> _TumourBank:
    """512 irregular tumour-nucleus shapes (x8 symmetries), radius 3.4-8.4 px."""
    rng = np.random.default_rng([_BANK_SEED, 3])
    n = 512
    r = np.sort(rng.uniform(3.4, 8.4, n))
    aspect = rng.uniform(0.6, 1.0, n)
    a, b = r / np.sqrt(aspect), r * np.sqrt(aspect)
    wobble = np.stack(
        [rng.uniform(0.0, [0.1, 0.07, 0.03], (n, 3)), rng.uniform(0.0, 2 * np.pi, (n, 3))],
        axis=-1,
    )
    ox, oy, flat = _offsets(_TUMOUR_HALF)
    cover, depth = _ellipse(ox[None], oy[None], a, b, rng.uniform(0.0, np.pi, n), wobble)
    # A slightly darker nuclear membrane, and a nucleolus in some nuclei.
    rim = np.clip(1.0 - depth / 1.5, 0.0, 1.0)
    nx, ny = rng.normal(0.0, 1.2, (2, n, 1))
    has_nucleolus = rng.random((n, 1)) < 0.4
    nucleolus = has_nucleolus * np.exp(-((ox - nx) ** 2 + (oy - ny) ** 2) / 1.5)
    detail = cover * (0.25 * rim + 0.6 * nucleolus)
    cyto = np.clip((depth + 3.5) / 2.5, 0.0, 1.0) * (1.0 - cover)

    size = 2 * _TUMOUR_HALF + 1
    grid = np.arange(size * size).reshape(size, size)
    views = [np.rot90(g, k) for g in (grid, grid.T) for k in range(4)]
    return _TumourBank(
        cover=cover.astype(np.float32).ravel(),
        detail=detail.astype(np.float32).ravel(),
        cyto=cyto.astype(np.float32).ravel(),
        radius=np.sqrt(a * b),
        flat=flat,
        dihedral=np.stack([v.ravel() for v in views]),
    )


# --------------------------------------------------------------------------- tissue layers


@dataclass
class _Layer:
    """One family of nuclei as padded-canvas pixel indices with per-pixel weights."""

    idx: np.ndarray
    od: np.ndarray  # haematoxylin optical density
    cover: np.ndarray  # how much of the stroma underneath it hides (0..1)


def _canvas_index(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Flat padded-canvas index of the pixel containing each patch coordinate (x, y)."""
    return (np.floor(y).astype(np.int64) + _PAD) * _W + np.floor(x).astype(np.int64) + _PAD


def _greedy_spacing(x: np.ndarray, y: np.ndarray, r: np.ndarray, overlap: float) -> np.ndarray:
    """Keep nuclei in order, dropping any closer than ``overlap`` x (r_i + r_j) to a kept one.

    Crowded tumour nuclei touch and overlap a little in real tissue, but whole-nucleus overlap
    would merge them into one shapeless blob.
    """
    limit = overlap * (r[:, None] + r[None, :])
    too_close = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) < limit
    keep = np.zeros(len(x), dtype=bool)
    blocked = np.zeros(len(x), dtype=bool)
    for i in range(len(x)):
        if not blocked[i]:
            keep[i] = True
            blocked |= too_close[i]
    return keep


def _tumour_cluster(
    rng: np.random.Generator, centre: tuple[float, float], pin_in_box: bool, size: float
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float]:
    """One cluster of crowded, enlarged tumour nuclei: (x, y, bank shape index), and its spread."""
    bank = _tumour_bank()
    n = int(rng.integers(8, 45))
    spread = size * rng.uniform(1.0, 2.6)
    x = centre[0] + rng.normal(0.0, spread, n)
    y = centre[1] + rng.normal(0.0, spread, n)
    if pin_in_box:
        # The cluster may straddle the box edge; one nucleus centre strictly inside the box
        # guarantees the label-1 rule whatever happens to the others.
        x[0], y[0] = rng.uniform(_LO + 1, _HI - 1, 2)
    else:
        x[0], y[0] = centre
    # Pleomorphism: sizes vary around the patch's typical size; pick bank shapes to match.
    want = size * rng.uniform(0.8, 1.25, n)
    shape = np.searchsorted(bank.radius, want) + rng.integers(-8, 9, n)
    shape = np.clip(shape, 0, bank.radius.size - 1)
    # The padded canvas fits stencils of centres up to 4 px outside the patch.
    keep = (x > -4) & (x < PATCH_SIZE + 3) & (y > -4) & (y < PATCH_SIZE + 3)
    return (x[keep], y[keep], shape[keep]), spread


def _draw_clusters(
    rng: np.random.Generator, kind: int, size: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[float, float, float]]]:
    """One draw of 1-2 tumour clusters: nucleus x, y and bank shape, spaced; cluster areas.

    A positive patch's first cluster is pinned over the centre box; decoy (and extra) clusters
    start in the border ring.
    """
    bank = _tumour_bank()
    parts, regions = [], []
    for j in range(1 + int(rng.random() < 0.3)):
        if kind == POSITIVE and j == 0:
            cx, cy = rng.uniform(_LO - 4, _HI + 4, 2)
            part, spread = _tumour_cluster(rng, (cx, cy), True, size)
            parts.append(part)
            regions.append((cx, cy, spread))
            continue
        # Decoy (and extra) clusters start in the border ring so that some cells survive
        # the centre-box exclusion; they still often reach right up to the box edge.
        while True:
            cx, cy = rng.uniform(2, PATCH_SIZE - 2, 2)
            if max(abs(cx - 48), abs(cy - 48)) > 26:
                break
        part, spread = _tumour_cluster(rng, (cx, cy), False, size)
        parts.append(part)
        regions.append((cx, cy, spread))
    x, y, shape = (np.concatenate(v) for v in zip(*parts, strict=True))
    # Spacing across all clusters at once, so that a second cluster cannot pile onto the
    # first; the greedy pass always keeps nucleus 0, the one pinned inside the box.
    keep = _greedy_spacing(x, y, bank.radius[shape], 0.8)
    return x[keep], y[keep], shape[keep], regions


def _stamp_nuclei(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, shape: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canvas index, bank index and coverage of every stencil pixel of every nucleus.

    Each nucleus takes its bank shape in one of the 8 flips/rotations, at random.
    """
    bank = _tumour_bank()
    stencil = bank.flat.size
    # Whole-pixel centres (rint): at this size nobody can see a half-pixel snap.
    centre_idx = _canvas_index(np.rint(x), np.rint(y))
    idx = centre_idx[:, None] + bank.flat[None, :]
    src = shape[:, None] * stencil + bank.dihedral[rng.integers(0, 8, len(x))]
    return idx, src, bank.cover[src]


def _tumour_layer(
    rng: np.random.Generator, kind: int, chromatin: np.ndarray
) -> tuple[_Layer, np.ndarray, np.ndarray, list[tuple[float, float, float]]]:
    """Tumour nuclei with cytoplasm, tumour-mask canvas indices, nucleus circles, cluster areas.

    Plain patches get an empty layer. For decoys every nucleus whose mask reaches into the
    centre box is removed, and the draw repeats in the rare case that none is left.
    """
    empty = np.zeros(0, dtype=np.int64)
    if kind == PLAIN:
        return (
            _Layer(empty, empty.astype(np.float32), empty.astype(np.float32)),
            empty,
            np.zeros((0, 3)),
            [],
        )
    bank = _tumour_bank()
    size = rng.uniform(4.5, 6.5)  # per patch: some tumours have bigger nuclei than others
    tone = rng.uniform(0.7, 1.3)  # per patch: vesicular (pale) to hyperchromatic (dark)
    while True:
        x, y, shape, regions = _draw_clusters(rng, kind, size)
        idx, src, cover = _stamp_nuclei(rng, x, y, shape)
        inside = cover >= 0.5
        if kind == DECOY:
            keep = ~(inside & _IN_BOX[idx]).any(axis=1)
            if not keep.any():
                continue
            x, y, shape, idx, src = x[keep], y[keep], shape[keep], idx[keep], src[keep]
            cover, inside = cover[keep], inside[keep]
        break

    cyto = bank.cyto[src]
    dens = (tone * rng.uniform(0.8, 1.2, len(x))).astype(np.float32)[:, None]
    # Clumped chromatin: the texture is what sets these apart from flat, dark lymphocytes.
    tex = np.clip(0.8 + 0.55 * chromatin[idx], 0.25, 1.8)
    od = cover * dens * tex + bank.detail[src] + 0.12 * cyto
    # Zero-weight stencil pixels are kept: bincount ignores them more cheaply than a filter.
    layer = _Layer(idx.ravel(), od.ravel(), np.maximum(cover, 0.6 * cyto).ravel())
    circles = np.stack([x, y, bank.radius[shape]], axis=1)
    return layer, idx[inside], circles, regions


def _normal_layer(
    rng: np.random.Generator, tissue: np.ndarray, tumours: np.ndarray, chromatin: np.ndarray
) -> _Layer:
    """Lymphocytes (small, round, dark, dense) and a few spindle-shaped stromal nuclei."""
    # Per patch: anything from sparse stroma to packed lymphoid tissue.
    n_target = int(rng.integers(8, 50) if rng.random() < 0.4 else rng.integers(50, 220))
    density = 1.0 / (1.0 + np.exp(-(1.6 * _smooth_noise(rng, 5) + rng.uniform(-0.5, 1.5))))
    density *= tissue  # none in fat or gaps
    n_cand = 2 * n_target
    x = rng.uniform(-2, PATCH_SIZE + 2, n_cand)
    y = rng.uniform(-2, PATCH_SIZE + 2, n_cand)
    ix = np.clip(x.astype(np.int64), 0, PATCH_SIZE - 1)
    iy = np.clip(y.astype(np.int64), 0, PATCH_SIZE - 1)
    keep = rng.random(n_cand) < density[iy, ix]
    if len(tumours):
        # Tumour cells displace the lymphocytes rather than sit on top of them.
        dist = np.hypot(x[:, None] - tumours[None, :, 0], y[:, None] - tumours[None, :, 1])
        keep &= (dist > tumours[None, :, 2] + 2.5).all(axis=1)
    x, y = x[keep][:n_target], y[keep][:n_target]
    spindle = rng.random(len(x)) < rng.uniform(0.0, 0.25)

    idx_parts, od_parts, cover_parts = [], [], []
    for kind, sel, dens_range in (
        ("lymph", ~spindle, (1.2, 1.8)),
        ("spindle", spindle, (0.8, 1.2)),
    ):
        bank = _small_bank(kind)
        xs, ys = x[sel], y[sel]
        n = len(xs)
        phase = ((ys % 1.0) * _SUBPIXEL).astype(np.int64) * _SUBPIXEL + (
            (xs % 1.0) * _SUBPIXEL
        ).astype(np.int64)
        cover = bank.cover[rng.integers(0, bank.cover.shape[0], n), phase]
        idx = _canvas_index(xs, ys)[:, None] + bank.flat[None, :]
        dens = rng.uniform(*dens_range, n).astype(np.float32)[:, None]
        idx_parts.append(idx.ravel())
        # Dense, nearly uniform chromatin: only a faint mottling, unlike tumour nuclei.
        od_parts.append((cover * dens * (1.0 + 0.1 * chromatin[idx])).ravel())
        cover_parts.append(cover.ravel())
    return _Layer(*(np.concatenate(p) for p in (idx_parts, od_parts, cover_parts)))


def _stroma(
    rng: np.random.Generator, tumour_regions: list[tuple[float, float, float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Eosin concentration of wavy collagen fibres, and the tissue map (0 in fat/white gaps).

    ``tumour_regions`` are (x, y, spread) of tumour clusters: solid tissue, never fat.
    """
    fibres = np.zeros((PATCH_SIZE, PATCH_SIZE), dtype=np.float32)
    for weight in (1.0, rng.uniform(0.0, 0.7)):  # a second, crossing fibre family, sometimes
        theta = rng.uniform(0.0, np.pi)
        period = rng.uniform(3.5, 8.0)
        # The phase warp keeps the bundles wavy rather than ruled; math.cos, not np.cos,
        # because a numpy float64 scalar would promote the whole grid to float64.
        warp = _smooth_noise(rng, 6) * rng.uniform(2.0, 6.0) + _smooth_noise(rng, 14)
        phase = (_XX * math.cos(theta) + _YY * math.sin(theta)) * (2 * math.pi / period) + warp
        wave = 0.5 + 0.5 * np.sin(phase)
        fade = np.clip(0.5 + 0.5 * _smooth_noise(rng, 5), 0.0, 1.0)  # bundles come and go
        fibres += weight * fade * wave * wave
    fibres /= fibres.max() + 1e-6
    strength = rng.uniform(0.15, 0.5)
    mottle = 1.0 + rng.uniform(0.1, 0.25) * _smooth_noise(rng, 24)
    eosin = (1.0 - strength + strength * fibres) * mottle
    tissue = np.ones((PATCH_SIZE, PATCH_SIZE), dtype=np.float32)
    if rng.random() < 0.35:
        # Fat vacuoles and tears: smooth blobs thresholded with a soft edge.
        blobs = _smooth_noise(rng, int(rng.integers(3, 8)))
        for cx, cy, spread in tumour_regions:
            d2 = (_XX - np.float32(cx)) ** 2 + (_YY - np.float32(cy)) ** 2
            blobs = blobs - 4.0 * np.exp(d2 * np.float32(-0.5 / (spread + 6.0) ** 2))
        tissue = np.clip((rng.uniform(0.6, 1.6) - blobs) * 2.5, 0.0, 1.0)
    return eosin * tissue * rng.uniform(0.3, 0.65), tissue


_GREY = np.full((3, 3), 1.0 / 3.0)  # projection onto the grey axis (1, 1, 1) / sqrt(3)
_CROSS = np.array([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3)


def _colour_matrix(rng: np.random.Generator) -> list[list[float]]:
    """A 3x3 transform for row-vector RGB: hue rotation about grey, saturation, brightness."""
    theta = rng.uniform(-0.25, 0.25)
    # Rodrigues' rotation about the grey axis: a hue shift that leaves greys grey.
    rot = math.cos(theta) * (np.eye(3) - _GREY) + math.sin(theta) * _CROSS + _GREY
    sat = rng.uniform(0.7, 1.3)
    bright = rng.uniform(0.88, 1.08)
    return (bright * (_GREY + sat * (rot - _GREY))).T.tolist()


def _crop(canvas: np.ndarray) -> np.ndarray:
    """The patch-sized middle of a flat padded canvas, as a (PATCH_SIZE, PATCH_SIZE) view."""
    return canvas.reshape(_W, _W)[_PAD:-_PAD, _PAD:-_PAD]


# --------------------------------------------------------------------------- public API


def render_patch(
    rng: np.random.Generator, label: int, decoy: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic H&E lymph-node patch.

    Args:
        rng: Source of randomness; the patch is a pure function of its state.
        label: 1 puts at least one tumour nucleus over the centre box; 0 keeps the centre
            box free of tumour.
        decoy: With ``label=0``, still draw tumour cells, but only outside the centre box, so
            that "tumour anywhere in the patch" is not the label. Ignored when ``label=1``.

    Returns:
        ``(image, tumour_mask)``: a (96, 96, 3) uint8 RGB image and a (96, 96) bool mask,
        True on every pixel covered by a tumour nucleus.

    Raises:
        ValueError: if ``label`` is not 0 or 1.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    kind = POSITIVE if label == 1 else DECOY if decoy else PLAIN

    chromatin = _smooth_noise(rng, 40, _W).ravel()
    tumour, mask_idx, circles, regions = _tumour_layer(rng, kind, chromatin)
    eosin, tissue = _stroma(rng, regions)
    normal = _normal_layer(rng, tissue, circles, chromatin)

    haem = np.zeros(_CANVAS)
    covered = np.zeros(_CANVAS)
    for layer in (normal, tumour):
        haem += np.bincount(layer.idx, weights=layer.od, minlength=_CANVAS)
        covered += np.bincount(layer.idx, weights=layer.cover, minlength=_CANVAS)
    haem = np.minimum(_crop(haem), 2.2).astype(np.float32)
    haem += rng.uniform(0.03, 0.12) * tissue * (1.0 + 0.3 * _smooth_noise(rng, 16))
    # Nuclei and cytoplasm hide the fibres beneath them; without this they look pasted on.
    covered = np.minimum(_crop(covered), 1.0).astype(np.float32)
    eosin = eosin * (1.0 - 0.6 * covered) + 0.25 * float(eosin.mean()) * covered

    # Lab-to-lab variation: stain vectors, stain amounts, illumination and camera colour.
    # Channels go first here: numpy broadcasting over a trailing axis of 3 is ~10x slower.
    h_vec = np.abs(_HAEMATOXYLIN + rng.normal(0.0, 0.05, 3).astype(np.float32))
    e_vec = np.abs(_EOSIN + rng.normal(0.0, 0.05, 3).astype(np.float32))
    h_vec *= np.float32(rng.uniform(0.75, 1.25)) / np.linalg.norm(h_vec)
    e_vec *= np.float32(rng.uniform(0.75, 1.3)) / np.linalg.norm(e_vec)
    od = h_vec[:, None] * haem.reshape(1, _N_PX) + e_vec[:, None] * eosin.reshape(1, _N_PX)
    light = (rng.uniform(225.0, 255.0) * rng.uniform(0.96, 1.0, 3)).astype(np.float32)
    r, g, b = light[:, None] * np.exp(-od)
    matrix = _colour_matrix(rng)
    # Written out rather than a matmul: multi-threaded BLAS on tiny products stalls badly
    # when other processes share the CPU.
    rgb = np.empty((_N_PX, 3), dtype=np.float32)
    for c in range(3):
        rgb[:, c] = matrix[0][c] * r + matrix[1][c] * g + matrix[2][c] * b
    grain = _grain_bank()
    start = int(rng.integers(0, grain.size - 3 * _N_PX))
    rgb += np.float32(rng.uniform(1.0, 4.0)) * grain[start : start + 3 * _N_PX].reshape(_N_PX, 3)
    image = np.clip(rgb + 0.5, 0, 255).astype(np.uint8).reshape(PATCH_SIZE, PATCH_SIZE, 3)

    mask = np.zeros(_CANVAS, dtype=bool)
    mask[mask_idx] = True
    return image, np.ascontiguousarray(_crop(mask))
