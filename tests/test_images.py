import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from tests.conftest import write_image
from transfer_learning.data.images import (
    decode_image_bytes,
    exif_orientation,
    load_rgb,
    load_rgb_tensor,
    to_rgb,
    unreadable_reason,
)
from transfer_learning.features.extraction import ExtractionSettings, extract_features
from transfer_learning.models.backbones import BackboneSettings, build_backbone

CPU = torch.device("cpu")


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


# EXIF orientation → the transpose that stores an upright photo so that a viewer applying the tag
# shows it upright again (the inverse of what PIL's exif_transpose does).
STORED_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def phone_photo(path, orientation: int) -> bytes:
    """A real photo (scikit-learn's china.jpg) stored as a camera would: pixels transposed,
    the EXIF tag saying how to show them upright."""
    upright = Image.fromarray(load_sample_images().images[0])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(STORED_AS[orientation]) if orientation > 1 else upright
    stored.save(path, quality=95, exif=exif)
    return path.read_bytes()


@pytest.mark.parametrize("min_size", [None, 100])  # torchvision's decoder; PIL's reduced-scale one
def test_exif_orientation_is_applied_when_decoding(tmp_path, min_size):
    upright = decode_image_bytes(phone_photo(tmp_path / "upright.jpg", 1), min_size).float()
    for orientation in STORED_AS:
        data = phone_photo(tmp_path / f"{orientation}.jpg", orientation)
        assert exif_orientation(data) == orientation
        decoded = decode_image_bytes(data, min_size).float()
        assert decoded.shape == upright.shape, orientation
        # Re-encoding a transposed photo moves JPEG's blocks: close, not equal (reduced-scale
        # decoding averages them differently again).
        assert (decoded - upright).abs().mean() < 6, orientation
    as_stored = torch.flip(upright, dims=(-2, -1))  # orientation 3 with its tag ignored
    assert (as_stored - upright).abs().mean() > 30
    assert exif_orientation(b"not an image") == 1


def test_a_rotated_phone_photo_gives_the_upright_photos_features(tmp_path):
    backbone = build_backbone(BackboneSettings(image_size=224))
    locations = [tmp_path / "upright.jpg", tmp_path / "portrait.jpg"]
    phone_photo(locations[0], 1)
    phone_photo(locations[1], 6)
    settings = ExtractionSettings(batch_size=2, cache_dir=None, progress=False)
    features = extract_features(backbone, [str(p) for p in locations], settings, CPU).features
    lying = Image.open(locations[1])
    lying.save(tmp_path / "no_tag.jpg", quality=95)  # the same pixels, the tag dropped
    on_its_side = extract_features(backbone, [str(tmp_path / "no_tag.jpg")], settings, CPU)

    def cosine(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    assert cosine(features[0], features[1]) > 0.98
    assert cosine(features[0], on_its_side.features[0]) < cosine(features[0], features[1]) - 0.05
