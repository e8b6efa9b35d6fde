"""Shared fixtures: small real image folders made on the fly, and the project root."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_ARCHIVE = PROJECT_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")


def write_image(path: Path, rng: np.random.Generator, mode: str = "RGB", size=(24, 20)) -> Path:
    """A random image in `mode`; classes differ by their mean colour so heads can learn them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


@pytest.fixture
def make_image_folder(tmp_path):
    """make_image_folder({'cat': 6, 'dog': 6}, splits=('train', 'test')) → folder path."""

    def make(classes: dict[str, int], splits: tuple[str, ...] | None = None, suffix=".png") -> Path:
        rng = np.random.default_rng(0)
        root = tmp_path / "images"
        for split in splits or (None,):
            base = root / split if split else root
            for class_name, count in classes.items():
                for i in range(count):
                    write_image(base / class_name / f"{i:03d}{suffix}", rng)
        return root

    return make


@pytest.fixture(scope="session")
def cifar10_tree(tmp_path_factory) -> Path:
    """The unpacked CIFAR-10 JPEG tree, or a skip when ../shared/datasets is absent."""
    unpacked = PROJECT_ROOT / "data" / "01_raw" / "cifar10_jpeg"
    if (unpacked / "train").is_dir():
        return unpacked
    if not CIFAR10_ARCHIVE.exists():
        # Skipped, since users who clone the project do not have it, but loudly: in the
        # warnings summary as well as the skip list.
        reason = (
            f"{CIFAR10_ARCHIVE} is absent (only the project's own machines have it): the "
            "60,000-image CIFAR-10 test did NOT run"
        )
        warnings.warn(reason, pytest.PytestWarning, stacklevel=1)
        pytest.skip(reason)
    import tarfile

    target = tmp_path_factory.mktemp("cifar10_jpeg")
    with tarfile.open(CIFAR10_ARCHIVE) as archive:
        archive.extractall(target, filter="data")
    return target


def backbone_choice_inputs(seed: int = 0) -> dict:
    """Catalog entries `resolve_backbone` reads besides `params:backbone`, as in a fresh project:
    no backbone ranking saved yet (the catalog's optional dataset), default selection settings."""
    from kedro.io import MemoryDataset

    from transfer_learning.kedro_io.datasets import TableDataset

    never_saved = PROJECT_ROOT / "tests" / "never_saved" / "backbone_ranking.csv"
    return {
        "backbone_ranking": TableDataset(str(never_saved), missing_ok=True),
        "params:selection": MemoryDataset({}),
        "params:seed": MemoryDataset(seed),
    }
