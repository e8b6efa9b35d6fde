"""Reading one image from wherever the image index says it lives, always as 3-channel RGB."""

from __future__ import annotations

import io
import os
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Past this size a JPEG is probably a photo far larger than the network's input, and PIL's
# reduced-scale (draft) decoding beats a full-size decode.
_DRAFT_WORTHWHILE_BYTES = 64 * 1024

JPEG_MAGIC = b"\xff\xd8\xff"

_ORIENTATION_TAG = 0x0112

# scikit-learn's bundled digits have no files: the index points at them by position.
DIGITS_SCHEME = "sklearn-digits:"


@lru_cache(maxsize=1)
def _digits_pixels() -> np.ndarray:
    from sklearn.datasets import load_digits

    # 0..16 grey levels → 0..255 so that they look like any other 8-bit image.
    return np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)


def digit_pixels(location: str) -> np.ndarray:
    """The (8, 8) uint8 pixels a `sklearn-digits:<i>` location points at."""
    return _digits_pixels()[int(location[len(DIGITS_SCHEME) :])]


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (grey, palette, RGBA, CMYK, 16-bit, float) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        # 16/32-bit and float images: stretch the real range to 0..255 instead of clipping.
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        image = Image.fromarray(((pixels - low) * scale).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        # Transparent pixels become white rather than whatever colour they hide.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


THUMBNAIL = 128  # pixels on the longer side of a report's thumbnails


def thumbnail(location: str) -> np.ndarray:
    """The image at `location`, at most THUMBNAIL pixels a side, for a report's montage."""
    image = load_rgb(location, min_size=THUMBNAIL)
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(image)


def load_rgb(location: str, min_size: int | None = None) -> Image.Image:
    """Decode the image at `location` (a file path or a `sklearn-digits:<i>` reference) as RGB.

    With `min_size`, a JPEG much larger than needed is decoded at 1/2, 1/4 or 1/8 scale (never
    below `min_size` on its shorter side): far less work for photos bound for a small network.
    """
    if location.startswith(DIGITS_SCHEME):
        return Image.fromarray(digit_pixels(location)).convert("RGB")
    with Image.open(location) as image:
        return _decoded_rgb(image, min_size)


def _decoded_rgb(image: Image.Image, min_size: int | None) -> Image.Image:
    if min_size is not None and image.format == "JPEG" and image.mode in {"RGB", "L"}:
        image.draft(image.mode, (min_size, min_size))
    image.load()  # decode now: the file closes when the caller's block ends
    # Cameras store the pixels as the sensor read them and the upright orientation in EXIF: a
    # portrait phone photo would otherwise reach the network lying on its side.
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when already upright
    return to_rgb(image)


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag of encoded image bytes (1, upright, when absent or unreadable);
    from the header alone."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # no readable header: the decoder will say why
        return 1


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_image_bytes(data: bytes, min_size: int | None = None) -> torch.Tensor:
    """Encoded image bytes → uint8 (3, H, W) RGB tensor, upright (EXIF orientation applied);
    files and uploads decode alike.

    Small JPEGs go through torchvision's libjpeg-turbo decoder, about twice as fast as PIL's
    path here; everything else (large JPEGs, which `min_size` lets PIL decode at 1/2, 1/4 or 1/8
    scale, other formats, and any JPEG libjpeg-turbo refuses) goes through PIL.
    """
    if data[:3] == JPEG_MAGIC and (min_size is None or len(data) < _DRAFT_WORTHWHILE_BYTES):
        try:
            return decode_jpeg(
                torch.frombuffer(bytearray(data), dtype=torch.uint8),
                mode=ImageReadMode.RGB,
                apply_exif_orientation=True,
            )
        except RuntimeError:
            pass  # CMYK, progressive oddities, …: PIL knows more formats
    with Image.open(io.BytesIO(data)) as image:
        return _as_tensor(_decoded_rgb(image, min_size))


def load_rgb_tensor(location: str, min_size: int | None = None) -> torch.Tensor:
    """Like `load_rgb`, as a uint8 (3, H, W) tensor (see `decode_image_bytes`)."""
    if location.startswith(DIGITS_SCHEME):
        return _as_tensor(load_rgb(location))
    with open(location, "rb") as stream:
        return decode_image_bytes(stream.read(), min_size)


def image_size_of(location: str) -> tuple[int, int]:
    """(width, height) of the image at `location`, from its header alone."""
    if location.startswith(DIGITS_SCHEME):
        height, width = digit_pixels(location).shape
        return width, height
    with Image.open(location) as image:
        return image.size


def unreadable_reason(path: str) -> str | None:
    """Why the file at `path` is not an image PIL can open, or None when its header is fine.

    Only the header is read, so indexing a large tree stays fast; pixels are decoded later.
    """
    try:
        with Image.open(path) as image:
            if image.width < 1 or image.height < 1:
                return f"empty image ({image.width}x{image.height})"
            image_format = image.format
        end_marker = _END_MARKERS.get(image_format)
        if end_marker is not None and end_marker not in _tail(path):
            # A cut-off download or copy: the header is fine, the pixels stop half-way (and
            # libjpeg-turbo would fill the rest with grey and carry on).
            return f"truncated {image_format} file: its end-of-image marker is missing"
    except Exception as error:  # PIL raises many types for bad files; all mean the same here
        return f"{type(error).__name__}: {error}"
    return None


# Every complete JPEG ends with EOI and every PNG with its IEND chunk; some cameras append a
# few bytes after them, so the marker is looked for in the last 4 KiB.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 4096


def _tail(path: str) -> bytes:
    with open(path, "rb") as stream:
        stream.seek(max(0, os.fstat(stream.fileno()).st_size - _TAIL_BYTES))
        return stream.read()
