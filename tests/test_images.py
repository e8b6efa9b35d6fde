import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_image
from transfer_learning.images import (
    decode_image_bytes,
    load_rgb,
    load_rgb_tensor,
    to_rgb,
    unreadable_reason,
)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_every_mode_becomes_8_bit_rgb(mode):
    image = (
        Image.new("RGB", (5, 4), (10, 200, 30)).convert(mode)
        if mode != "I;16"
        else Image.new("I;16", (5, 4), 4000)
    )
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    assert np.asarray(converted).shape == (4, 5, 3)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert np.asarray(to_rgb(image))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_range_is_stretched_not_clipped():
    pixels = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    converted = np.asarray(to_rgb(Image.fromarray(pixels)))
    # (value - 0) * 255 / 4000, truncated: computed by hand.
    assert converted[..., 0].tolist() == [[0, 63], [127, 255]]


def gradient(height: int = 20, width: int = 24) -> np.ndarray:
    """Smooth RGB pixels (JPEG keeps them to within a few levels)."""
    rows, columns = np.mgrid[0:height, 0:width]
    return np.stack(
        [rows * 255 // (height - 1), columns * 255 // (width - 1), (rows + columns) * 4 % 256],
        axis=-1,
    ).astype(np.uint8)


def written(path, pixels: np.ndarray, mode: str) -> tuple[str, np.ndarray, int]:
    """Save `pixels` in `mode`; return the path, the RGB expected back (computed here, not by
    the code under test) and the tolerance the format allows."""
    lossy = path.suffix == ".jpg"
    options = {".jpg": {"quality": 95, "subsampling": 0}, ".webp": {"lossless": True}}
    if mode == "RGB":
        Image.fromarray(pixels).save(path, **options.get(path.suffix, {}))
        return str(path), pixels, 10 if lossy else 0
    if mode == "L":
        grey = pixels[..., 0]
        Image.fromarray(grey).save(path, **options.get(path.suffix, {}))
        return str(path), np.repeat(grey[..., None], 3, axis=-1), 10 if lossy else 0
    if mode == "CMYK":
        cmyk = np.concatenate([255 - pixels, np.zeros_like(pixels[..., :1])], axis=-1)
        Image.fromarray(cmyk, mode="CMYK").save(path)
        return str(path), pixels, 0
    if mode == "RGBA":
        alpha = np.where(np.arange(pixels.shape[1]) < 8, 0, 255).astype(np.uint8)
        alpha = np.broadcast_to(alpha, pixels.shape[:2])
        Image.fromarray(np.dstack([pixels, alpha])).save(path)
        white = np.full_like(pixels, 255)
        return str(path), np.where(alpha[..., None] == 0, white, pixels), 0
    if mode == "P":
        palette = np.array([[200, 30, 40], [10, 250, 60], [0, 0, 255], [90, 90, 90]], np.uint8)
        indices = (np.arange(pixels.shape[0])[:, None] + np.arange(pixels.shape[1])) % 4
        image = Image.fromarray(indices.astype(np.uint8), mode="P")
        image.putpalette(palette.flatten().tolist())
        image.save(path)
        return str(path), palette[indices], 0
    raise ValueError(mode)


@pytest.mark.parametrize(
    "suffix,mode",
    [
        (".jpg", "RGB"),
        (".jpg", "L"),
        (".png", "RGBA"),
        (".gif", "P"),
        (".bmp", "RGB"),
        (".tiff", "CMYK"),
        (".webp", "RGB"),
    ],
)
def test_files_load_as_the_rgb_pixels_they_hold(tmp_path, suffix, mode):
    path, expected, tolerance = written(tmp_path / f"x{suffix}", gradient(), mode)
    tensor = load_rgb_tensor(path)
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, 20, 24)
    difference = np.abs(tensor.permute(1, 2, 0).numpy().astype(int) - expected.astype(int))
    assert difference.max() <= tolerance
    # Uploaded bytes decode exactly as the file does.
    assert torch.equal(decode_image_bytes(open(path, "rb").read()), tensor)


def test_digits_reference_loads_without_files():
    from sklearn.datasets import load_digits

    image = load_rgb("sklearn-digits:5")
    assert image.size == (8, 8) and image.mode == "RGB"
    expected = np.round(load_digits().images[5] * 255 / 16)
    assert np.array_equal(np.asarray(image)[..., 1], expected)


def test_garbage_file_has_a_reason(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    assert "cannot identify image file" in unreadable_reason(str(bad))
    good = write_image(tmp_path / "fine.png", np.random.default_rng(0))
    assert unreadable_reason(str(good)) is None
