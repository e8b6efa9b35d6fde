import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_image
from transfer_learning.images import load_rgb, load_rgb_tensor, to_rgb, unreadable_reason


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
    assert converted[..., 0].min() == 0 and converted[..., 0].max() == 255


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
def test_files_load_as_rgb_tensor(tmp_path, suffix, mode):
    path = write_image(tmp_path / f"x{suffix}", np.random.default_rng(1), mode)
    tensor = load_rgb_tensor(str(path))
    assert tensor.dtype.__str__() == "torch.uint8"
    assert tuple(tensor.shape) == (3, 20, 24)
    # The fast JPEG decoder and PIL agree to within JPEG rounding.
    reference = np.asarray(load_rgb(str(path))).transpose(2, 0, 1).astype(int)
    assert np.abs(tensor.numpy().astype(int) - reference).max() <= 3


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
