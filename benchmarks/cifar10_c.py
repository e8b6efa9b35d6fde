"""The 15 CIFAR-10-C corruptions at severity 5 (Hendrycks & Dietterich 2019), on 32×32 images.

Parameters are CIFAR-10-C's severity-5 values (the paper's `make_cifar_c.py`), not ImageNet-C's
(which the `imagecorruptions` package uses). Two approximations, as every re-implementation
without ImageMagick has: motion blur (in `motion_blur` and `snow`) is a line kernel blurred by a
Gaussian instead of ImageMagick's motion blur; frost uses the six frost photographs shipped with
the `imagecorruptions` package (the originals), which is all this module takes from it.

Needs opencv-python and scikit-image: `pip install imagecorruptions` brings both and the frost
images. Each corruption draws from the generator it is given: same seed, same images.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import map_coordinates
from scipy.ndimage import zoom as nd_zoom
from skimage.color import hsv2rgb, rgb2hsv
from skimage.filters import gaussian

SIZE = 32
Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # uint8 HWC → float 0..255


def _unit(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


def _to_255(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0, 1) * 255


def gaussian_noise(x, rng):
    return _to_255(_unit(x) + rng.normal(scale=0.10, size=x.shape))


def shot_noise(x, rng):
    return _to_255(rng.poisson(_unit(x) * 50) / 50)


def impulse_noise(x, rng):
    # Salt and pepper on 7 % of the values (each channel on its own, as skimage's random_noise).
    image = _unit(x).copy()
    hit = rng.random(image.shape) < 0.07
    image[hit] = (rng.random(int(hit.sum())) < 0.5).astype(np.float64)
    return _to_255(image)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    span = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    xx, yy = np.meshgrid(span, span)
    kernel = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    kernel /= kernel.sum()
    return cv2.GaussianBlur(kernel, (3, 3), alias_blur)


def defocus_blur(x, rng):
    kernel = _disk(1.5, 0.1)
    image = _unit(x).astype(np.float32)
    return _to_255(np.stack([cv2.filter2D(image[..., c], -1, kernel) for c in range(3)], -1))


def glass_blur(x, rng):
    sigma, delta, iterations = 0.4, 1, 2
    image = np.uint8(gaussian(_unit(x), sigma=sigma, channel_axis=-1) * 255)
    for _ in range(iterations):
        for h in range(SIZE - delta, delta, -1):
            for w in range(SIZE - delta, delta, -1):
                dx, dy = rng.integers(-delta, delta, size=2)
                hp, wp = h + dy, w + dx
                image[h, w], image[hp, wp] = image[hp, wp].copy(), image[h, w].copy()
    return _to_255(gaussian(image / 255.0, sigma=sigma, channel_axis=-1))


def _motion_kernel(length: float, sigma: float, angle: float) -> np.ndarray:
    size = int(length * 1.5 + sigma * 2 + 2) | 1
    centre = size // 2
    line = np.zeros((size, size), np.float32)
    start = centre - int(length) // 2
    line[centre, start : start + max(1, int(length))] = 1.0
    rotation = cv2.getRotationMatrix2D((centre, centre), angle, 1)
    kernel = cv2.warpAffine(line, rotation, (size, size))
    if sigma > 0:
        blur = int(sigma * 4 + 1) | 1
        kernel = cv2.GaussianBlur(kernel, (blur, blur), sigma)
    return kernel / kernel.sum()


def motion_blur(x, rng):
    kernel = _motion_kernel(9, 2.5, rng.uniform(-45, 45))
    return np.clip(cv2.filter2D(np.asarray(x, np.float32), -1, kernel), 0, 255)


def _clipped_zoom(image: np.ndarray, factor: float) -> np.ndarray:
    h = image.shape[0]
    crop = int(np.ceil(h / factor))
    top = (h - crop) // 2
    zoomed = nd_zoom(image[top : top + crop, top : top + crop], (factor, factor, 1), order=1)
    trim = (zoomed.shape[0] - h) // 2
    return zoomed[trim : trim + h, trim : trim + h]


def zoom_blur(x, rng):
    image = _unit(x).astype(np.float32)
    factors = np.arange(1, 1.26, 0.01)
    total = sum(_clipped_zoom(image, f) for f in factors)
    return _to_255((image + total) / (len(factors) + 1))


def _plasma(rng: np.random.Generator, size: int = 32, decay: float = 1.75) -> np.ndarray:
    """Diamond-square fractal noise in [0, 1] (the fog layer)."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def jitter(values):
        return values / 4 + wibble * rng.uniform(-wibble, wibble, values.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        grid[half:size:step, half:size:step] = jitter(square)
        centres = grid[half:size:step, half:size:step]
        corners = grid[0:size:step, 0:size:step]
        row = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[0:size:step, half:size:step] = jitter(row)
        column = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half:size:step, 0:size:step] = jitter(column)
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def fog(x, rng):
    strength = 1.5
    image = _unit(x)
    peak = image.max()
    image = image + strength * _plasma(rng)[..., None]
    return _to_255(image * peak / (peak + strength))


def _frost_images() -> list[np.ndarray]:
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or spec.origin is None:
        raise SystemExit("frost needs the frost photographs of `pip install imagecorruptions`.")
    folder = Path(spec.origin).parent / "frost"
    pictures = []
    for path in sorted(folder.iterdir()):
        picture = np.asarray(Image.open(path).convert("RGB"))
        pictures.append(cv2.resize(picture, (0, 0), fx=0.2, fy=0.2))
    return pictures


_FROST: list[np.ndarray] = []


def frost(x, rng):
    if not _FROST:
        _FROST.extend(_frost_images())
    # The original draws one of the first five pictures.
    picture = _FROST[rng.integers(5)]
    top = rng.integers(0, picture.shape[0] - SIZE)
    left = rng.integers(0, picture.shape[1] - SIZE)
    patch = picture[top : top + SIZE, left : left + SIZE].astype(np.float64)
    return np.clip(0.75 * np.asarray(x, np.float64) + 0.45 * patch, 0, 255)


def snow(x, rng):
    mean, spread, zoom, threshold, length, sigma, blend = 0.3, 0.3, 1.25, 0.65, 14, 12, 0.8
    image = _unit(x).astype(np.float32)
    layer = rng.normal(loc=mean, scale=spread, size=(SIZE, SIZE))
    layer = _clipped_zoom(layer[..., None], zoom)[..., 0]
    layer[layer < threshold] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)
    kernel = _motion_kernel(length, sigma, rng.uniform(-135, -45))
    layer = cv2.filter2D(layer, -1, kernel).astype(np.float32)[..., None] / 255.0
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
    image = blend * image + (1 - blend) * np.maximum(image, grey * 1.5 + 0.5)
    return _to_255(image + layer + np.rot90(layer, k=2))


def brightness(x, rng):
    hsv = rgb2hsv(_unit(x))
    hsv[..., 2] = np.clip(hsv[..., 2] + 0.3, 0, 1)
    return _to_255(hsv2rgb(hsv))


def contrast(x, rng):
    image = _unit(x)
    means = image.mean(axis=(0, 1), keepdims=True)
    return _to_255((image - means) * 0.15 + means)


def elastic_transform(x, rng):
    alpha, sigma, affine = SIZE * 0.1, SIZE * 0.03, SIZE * 0.03
    image = _unit(x).astype(np.float32)
    centre = np.float32([SIZE, SIZE]) // 2
    square = SIZE // 3
    points = np.float32(
        [centre + square, [centre[0] + square, centre[1] - square], centre - square]
    )
    moved = points + rng.uniform(-affine, affine, size=points.shape).astype(np.float32)
    warp = cv2.getAffineTransform(points, moved)
    image = cv2.warpAffine(image, warp, (SIZE, SIZE), borderMode=cv2.BORDER_REFLECT_101)
    dx, dy = (
        gaussian(rng.uniform(-1, 1, size=(SIZE, SIZE)), sigma, mode="reflect", truncate=3) * alpha
        for _ in range(2)
    )
    xs, ys, zs = np.meshgrid(np.arange(SIZE), np.arange(SIZE), np.arange(3))
    coordinates = (
        np.reshape(ys + dy[..., None], (-1, 1)),
        np.reshape(xs + dx[..., None], (-1, 1)),
        np.reshape(zs, (-1, 1)),
    )
    warped = map_coordinates(image, coordinates, order=1, mode="reflect").reshape(image.shape)
    return _to_255(warped)


def pixelate(x, rng):
    small = int(SIZE * 0.65)
    image = Image.fromarray(np.asarray(x, np.uint8)).resize((small, small), Image.BOX)
    return np.asarray(image.resize((SIZE, SIZE), Image.BOX), np.float64)


def jpeg_compression(x, rng):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(x, np.uint8)).save(buffer, "JPEG", quality=40)
    return np.asarray(Image.open(buffer).convert("RGB"), np.float64)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}


def corrupt(image: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """A 32×32 uint8 RGB image with corruption `name` at severity 5, as uint8."""
    return np.uint8(np.round(np.clip(CORRUPTIONS[name](image, rng), 0, 255)))
