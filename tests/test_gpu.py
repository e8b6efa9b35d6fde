"""The CUDA path (GPU JPEG decoding, autocast, DDP over GPUs): skipped on machines without one.

`benchmarks/gpu_check.sh` runs these on a GPU machine together with the GPU benchmarks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from transfer_learning.core.distributed import DistributedSettings
from transfer_learning.features.extraction import ExtractionSettings, extract_features
from transfer_learning.models.backbones import BackboneSettings, build_backbone

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda") if torch.cuda.is_available() else None


@pytest.fixture
def photos(tmp_path) -> list[str]:
    """The two bundled sample photos as JPEG, a PNG copy, and a CMYK JPEG (nvJPEG refuses it)."""
    locations = []
    for number, pixels in enumerate(load_sample_images().images):
        image = Image.fromarray(pixels)
        for suffix, mode in ((".jpg", "RGB"), (".png", "RGB"), ("-cmyk.jpg", "CMYK")):
            path = tmp_path / f"photo{number}{suffix}"
            image.convert(mode).save(path)
            locations.append(str(path))
    return locations


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_gpu_decoded_features_match_cpu_decoded_ones(photos):
    backbone = build_backbone(BackboneSettings(image_size=224))
    on_gpu = ExtractionSettings(batch_size=4, cache_dir=None, progress=False)
    on_cpu = ExtractionSettings(batch_size=4, cache_dir=None, progress=False, decode="cpu")
    gpu = extract_features(backbone, photos, on_gpu, CUDA).features
    cpu = extract_features(backbone, photos, on_cpu, CUDA).features
    assert gpu.shape == (len(photos), backbone.feature_dim)
    # nvJPEG's IDCT and the GPU's resize round differently from libjpeg and the CPU's.
    assert cosine(gpu, cpu).min() > 0.99


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_extract_the_features_of_one(photos):
    backbone = build_backbone(BackboneSettings(image_size=224))
    settings = ExtractionSettings(batch_size=2, cache_dir=None, progress=False)
    one = extract_features(backbone, photos, settings, CUDA).features
    two = extract_features(
        backbone, photos, settings, CUDA, DistributedSettings(nproc_per_node=2)
    ).features
    assert cosine(one, two).min() > 0.999
