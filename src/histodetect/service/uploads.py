"""Uploaded files: recognise the format by content, check sizes from the header, then decode."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histodetect import PATCH_SIZE
from histodetect.data.patchio import PatchDecodeError, check_patch, decode_patch

MAX_NAME = 200  # characters of an uploaded file name echoed back
_MAGIC = {
    b"II*\x00": "tif",
    b"MM\x00*": "tif",
    b"II+\x00": "tif",  # BigTIFF
    b"MM\x00+": "tif",
    b"\x89PNG": "png",
    b"\xff\xd8\xff": "jpg",
}


class UploadError(Exception):
    """An upload the service cannot use: an HTTP status and a message naming the file."""

    def __init__(self, status: int, file: str, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.status, self.file, self.problem = status, file, problem


def display_name(name: str | None) -> str:
    """The uploaded file's base name, shortened: echoed back only, never used as a path."""
    # Browsers may send "C:\\dir\\x.tif".
    name = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    return name[:MAX_NAME] or "upload"


def sniff_format(data: bytes) -> str | None:
    """``"tif"``, ``"png"`` or ``"jpg"`` from the file's first bytes, else None."""
    for magic, kind in _MAGIC.items():
        if data.startswith(magic):
            return kind
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def image_size(data: bytes, kind: str) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels.

    Raises:
        PatchDecodeError: when the header cannot be read.
    """
    try:
        if kind == "tif":
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages[0]
                # Width x height bounds the decoded size only with a few samples per pixel.
                if page.samplesperpixel > 4 or page.imagedepth > 1:
                    raise PatchDecodeError(
                        f"not an RGB image: {page.samplesperpixel} samples per pixel, "
                        f"depth {page.imagedepth}"
                    )
                return int(page.imagewidth), int(page.imagelength)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except PatchDecodeError:
        raise
    except Exception as exc:  # any parser failure means a corrupt file
        raise PatchDecodeError(f"corrupt or truncated image ({_first_line(exc)})") from None


def decode_rgb(data: bytes, kind: str, allow_alpha: bool = False) -> np.ndarray:
    """Decode a whole TIFF/PNG/JPEG into an (H, W, 3) uint8 array.

    Args:
        data: the file's bytes.
        kind: what :func:`sniff_format` returned.
        allow_alpha: drop a fourth (alpha) channel instead of rejecting the image.

    Raises:
        PatchDecodeError: corrupt, not 8-bit, or not RGB.
    """
    try:
        if kind == "tif":
            import tifffile

            image = tifffile.imread(io.BytesIO(data), key=0)
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                if im.mode == "RGBA" and allow_alpha:
                    im = im.convert("RGB")
                if im.mode != "RGB":
                    raise PatchDecodeError(f"not an RGB image: colour mode {im.mode}")
                image = np.asarray(im)
    except PatchDecodeError:
        raise
    except Exception as exc:
        raise PatchDecodeError(f"corrupt or truncated image ({_first_line(exc)})") from None
    image = np.asarray(image)
    if allow_alpha and image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        raise PatchDecodeError(f"pixel type is {image.dtype}, expected 8-bit (uint8)")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise PatchDecodeError(f"not an RGB image: array shape {image.shape}")
    return np.ascontiguousarray(image)


@dataclass(frozen=True)
class Patch:
    """One decoded upload: the 96x96 patch the model sees and what was uploaded."""

    file: str
    image: np.ndarray
    width: int
    height: int

    @property
    def cropped(self) -> bool:
        """Whether the upload was larger than a patch and centre-cropped."""
        return (self.width, self.height) != (PATCH_SIZE, PATCH_SIZE)


def _checked_header(data: bytes, name: str, max_side: int | None, max_pixels: int | None):
    kind = sniff_format(data)
    if kind is None:
        raise UploadError(415, name, "not a TIFF, PNG or JPEG image")
    try:
        width, height = image_size(data, kind)
    except PatchDecodeError as exc:
        raise UploadError(422, name, str(exc)) from None
    if max_side is not None and max(width, height) > max_side:
        raise UploadError(
            413, name, f"{width}x{height} px is larger than the limit of {max_side} px a side"
        )
    if max_pixels is not None and width * height > max_pixels:
        raise UploadError(
            413,
            name,
            f"{width}x{height} px = {width * height:,} pixels is more than the limit of "
            f"{max_pixels:,}",
        )
    if min(width, height) < PATCH_SIZE:
        raise UploadError(
            422,
            name,
            f"{width}x{height} px is smaller than a {PATCH_SIZE}x{PATCH_SIZE} patch "
            "(larger images are centre-cropped, smaller ones rejected)",
        )
    return kind, width, height


def decode_patch_upload(data: bytes, name: str, workdir: Path, max_side: int) -> Patch:
    """Decode one uploaded patch the way ``histodetect predict`` decodes a file.

    A 96x96 upload is written under ``workdir`` (a private temp folder) with a name chosen here
    from its detected format and read with :func:`~histodetect.patchio.decode_patch`, so its
    pixels are exactly those ``predict`` reads from the same file. A larger one is decoded whole
    and centre-cropped to 96x96.

    Raises:
        UploadError: 415 not an image, 413 too large, 422 corrupt, not RGB or too small.
    """
    name = display_name(name)
    kind, width, height = _checked_header(data, name, max_side, None)
    try:
        if (width, height) == (PATCH_SIZE, PATCH_SIZE):
            fd, path = tempfile.mkstemp(suffix=f".{kind}", dir=workdir)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            image = decode_patch(path)
        else:
            whole = decode_rgb(data, kind)
            top, left = (whole.shape[0] - PATCH_SIZE) // 2, (whole.shape[1] - PATCH_SIZE) // 2
            image = check_patch(
                np.ascontiguousarray(whole[top : top + PATCH_SIZE, left : left + PATCH_SIZE])
            )
    except PatchDecodeError as exc:
        raise UploadError(422, name, str(exc)) from None
    return Patch(name, np.array(image), width, height)


def decode_patch_uploads(
    uploads: list[tuple[str, bytes]], max_side: int
) -> tuple[list[Patch], list[UploadError]]:
    """Decode every upload in a private temp folder (removed afterwards); collect the bad ones."""
    patches, bad = [], []
    with tempfile.TemporaryDirectory(prefix="histodetect-upload-") as tmp:
        for name, data in uploads:
            try:
                patches.append(decode_patch_upload(data, name, Path(tmp), max_side))
            except UploadError as exc:
                bad.append(exc)
    return patches, bad


def decode_region_upload(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Decode an uploaded region (RGB, alpha dropped) after checking its size from the header.

    Raises:
        UploadError: 415 not an image, 413 too many pixels, 422 corrupt, not RGB or too small.
    """
    name = display_name(name)
    kind, _, _ = _checked_header(data, name, None, max_pixels)
    try:
        return decode_rgb(data, kind, allow_alpha=True)
    except PatchDecodeError as exc:
        raise UploadError(422, name, str(exc)) from None
