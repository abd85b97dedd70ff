"""Binary tumour mask images (Camelyon16 ``*_Mask.tif``, PNG) read as annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histodetect.errors import HistodetectError
from histodetect.slides.annotations.shapes import Annotation, bad_file, mask_geometry

MASK_SUFFIXES = (".tif", ".tiff", ".png", ".bmp")
MAX_MASK_PIXELS = 1 << 27  # the largest mask level read: 128 Mpx, one byte each


def _mask_pixels(path: Path, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The finest level of at most ``max_pixels`` of a mask image, and its largest (w, h)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        from PIL import Image

        with Image.open(path) as img:
            if img.width * img.height > max_pixels:
                size = f"{img.width}x{img.height}"
                raise bad_file(path, f"the mask is {size} px, over {max_pixels:,}.")
            return np.asarray(img), (img.width, img.height)
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        if not tif.series:
            raise bad_file(path, "a TIFF without any image.")
        levels = list(tif.series[0].levels)
        # Pyramids written page by page (ASAP's) are separate series to tifffile.
        levels += [s for s in tif.series[1:] if s.keyframe.is_reduced]
        levels.sort(key=lambda lv: -lv.shape[1])
        h0, w0 = levels[0].shape[:2]
        usable = [lv for lv in levels if lv.shape[0] * lv.shape[1] <= max_pixels]
        if not usable:
            raise bad_file(
                path,
                f"the mask is {w0}x{h0} px with no pyramid level under {max_pixels:,} px; "
                "save a downsampled copy (any level) and pass its downsample.",
            )
        return np.asarray(usable[0].asarray()), (w0, h0)


def read_mask_image(
    path: str | Path,
    *,
    slide_size: tuple[int, int] | None = None,
    downsample: float | None = None,
    max_pixels: int = MAX_MASK_PIXELS,
) -> Annotation:
    """Read a binary tumour mask (Camelyon16 ``*_Mask.tif``, any pyramid level, or a PNG).

    Nonzero pixels are tumour. The finest pyramid level of at most ``max_pixels`` is read
    (a Camelyon16 mask's level 0 has ~2e10 pixels). Its scale: ``downsample`` (level-0 slide
    px per pixel of the mask file's largest level) when given, else the slide's level-0
    width over the mask's (``slide_size``), else the mask is taken to be at level 0.

    Returns:
        The ``Annotation``, with the raster kept in ``mask`` and its pixels merged into exact
        polygons in ``tumour``; ``lesions`` are its 8-connected components.

    Raises:
        HistodetectError: for an unreadable or empty file, a mask too large to read, or one
            whose shape does not match the slide's.
    """
    from skimage.measure import label

    path = Path(path)
    try:
        pixels, (w0, h0) = _mask_pixels(path, max_pixels)
    except HistodetectError:
        raise
    except Exception as exc:  # PIL and tifffile raise many types for damaged files
        why = str(exc) or type(exc).__name__
        raise bad_file(path, f"cannot be read as a mask image ({why}).") from None
    if pixels.size == 0 or pixels.ndim < 2:
        raise bad_file(path, "the mask image has no pixels.")
    h, w = pixels.shape[:2]
    samples = pixels.reshape(h, w, -1)
    if samples.shape[-1] in (2, 4):  # LA or RGBA: the alpha channel says nothing of tumour
        samples = samples[..., :-1]
    mask = samples.any(axis=-1)  # grey, palette or RGB: any nonzero sample
    notes = []
    if downsample is None and slide_size is not None:
        downsample = slide_size[0] / w0
        if abs(slide_size[1] / h0 - downsample) > 0.02 * downsample + 1.0 / h0:
            raise bad_file(
                path,
                f"the mask is {w0}x{h0} px but the slide is {slide_size[0]}x{slide_size[1]}: "
                "not the same shape, so not this slide's mask.",
            )
    if downsample is None:
        downsample = 1.0
        notes.append("mask scale not given: taken to be the slide's level 0.")
    scale = float(downsample) * w0 / w
    geometry = mask_geometry(mask, scale)
    n = int(label(mask, connectivity=2).max())
    if not n:
        notes.append("the mask has no tumour pixels: the slide counts as normal.")
    return Annotation(
        source=path,
        format="mask",
        tumour=geometry,
        lesions=tuple(geometry.geoms),
        n_tumour=n,
        notes=tuple(notes),
        mask=mask,
        mask_downsample=scale,
    )
