import os

import numpy as np
import pytest
import torch

from tests.conftest import write_image
from transfer_learning.core.runtime import DeviceError, resolve_device
from transfer_learning.data.images import load_rgb_tensor
from transfer_learning.data.loading import EvalCollate, ImageReadError, Normaliser
from transfer_learning.features.extraction import (
    ExtractionError,
    ExtractionSettings,
    extract_features,
)
from transfer_learning.models.backbones import BackboneSettings, build_backbone


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(BackboneSettings(image_size=32))


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(24, 20), (40, 30), (24, 20), (32, 32), (50, 16)]
    return [str(write_image(tmp_path / f"{i}.png", rng, size=size)) for i, size in enumerate(sizes)]


def direct_features(backbone, files):
    """The reference: one image at a time, no DataLoader, no channels_last."""
    collate, normalise = EvalCollate(backbone.preprocessing), Normaliser(backbone.preprocessing)
    with torch.inference_mode():
        return np.concatenate(
            [backbone.features(normalise(collate([load_rgb_tensor(f)]))).numpy() for f in files]
        )


@pytest.mark.parametrize("workers", [0, 2])
def test_features_match_a_plain_forward_pass(backbone, files, workers):
    settings = ExtractionSettings(batch_size=2, num_workers=workers, cache_dir=None, progress=False)
    result = extract_features(backbone, files, settings, torch.device("cpu"))
    assert result.features.shape == (5, 1280) and not result.cached
    # Two paths through ~50 float32 layers: batches of 2 in channels_last against one image at a
    # time, other kernels summing in other orders (the engines' 1e-4, RELATIVE_TOLERANCE).
    np.testing.assert_allclose(
        result.features, direct_features(backbone, files), rtol=1e-4, atol=1e-4
    )


def test_unchanged_images_are_not_recomputed(backbone, files, tmp_path):
    settings = ExtractionSettings(batch_size=4, cache_dir=str(tmp_path / "cache"), progress=False)
    first = extract_features(backbone, files, settings, torch.device("cpu"))
    again = extract_features(backbone, files, settings, torch.device("cpu"))
    assert not first.cached and again.cached and first.cache_key == again.cache_key
    np.testing.assert_array_equal(first.features, again.features)

    # Rewriting one image changes the key: features are recomputed.
    write_image(tmp_path / "0.png", np.random.default_rng(9), size=(24, 20))
    os.utime(files[0], ns=(1, 1))
    changed = extract_features(backbone, files, settings, torch.device("cpu"))
    assert not changed.cached and changed.cache_key != first.cache_key

    # Another image size is another key: both coexist in the cache.
    bigger = build_backbone(BackboneSettings(image_size=48))
    other = extract_features(bigger, files, settings, torch.device("cpu"))
    assert other.cache_key != first.cache_key
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


def test_a_corrupt_file_names_itself(backbone, tmp_path, files):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    settings = ExtractionSettings(batch_size=2, num_workers=0, cache_dir=None, progress=False)
    with pytest.raises(ImageReadError, match="broken.png"):
        extract_features(backbone, [*files, str(broken)], settings, torch.device("cpu"))


def test_device_choices():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="device='tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="device=cuda but PyTorch sees no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    "params,message",
    [
        ({"batch_size": 0}, "extraction.batch_size=0"),
        ({"num_workers": -1}, "extraction.num_workers=-1"),
        ({"batchsize": 8}, "extraction.batchsize"),
    ],
)
def test_bad_extraction_settings(params, message):
    with pytest.raises(ExtractionError, match=message):
        ExtractionSettings.from_params(params)
