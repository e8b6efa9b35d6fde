"""The `data` block: where the images come from and how they are split and checked."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer_learning.core.config import check_known_keys
from transfer_learning.data.duplicates import ON_DUPLICATE
from transfer_learning.data.label_issues import ON_LABEL_ISSUE

logger = logging.getLogger(__name__)


SPLITS = ("train", "val", "test")
# The split of images without labels (a manifest's unlabelled rows, data.unlabelled_path): never
# val or test, and never in the image index that training and evaluation read.
POOL = "unlabelled"


SOURCES = ("digits", "imagefolder", "torchvision", "manifest")


MANIFEST_FORMATS = (".csv", ".parquet")


OFFLINE_ALTERNATIVES = (
    "Offline, use data.source=imagefolder with data.path=<folder of class sub-folders>, "
    "or the bundled data.source=digits."
)


# Sources whose images change meaning when mirrored (digits, letters, house numbers).
NOT_MIRROR_SYMMETRIC = frozenset(
    {"MNIST", "EMNIST", "KMNIST", "QMNIST", "SVHN", "USPS", "Omniglot"}
)


class DataSourceError(ValueError):
    """The configured data source cannot be turned into an image index."""


@dataclass(frozen=True)
class DataSettings:
    """The `data` block of parameters_data_ingestion.yml."""

    source: str = "digits"
    path: str | None = None
    # source: manifest — a CSV or parquet table of image paths and labels.
    manifest: str | None = None
    path_column: str = "path"  # relative paths resolve against the manifest's folder
    label_columns: Sequence[str] | str = ("label",)
    split_column: str | None = None  # train / val / test per row; otherwise a seeded split
    name: str | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    on_corrupt: str = "error"
    # Each file's readability verdict and hashes, reused while the file is unchanged (None: off).
    cache_dir: str | None = None
    # Test images duplicating train/val ones: warn | drop_from_test | error.
    on_duplicate: str = "warn"
    # Train/val images the latest data_quality run flagged as label issues: keep | drop.
    on_label_issue: str = "keep"
    download_dir: str = "data/01_raw/torchvision"
    # imagefolder or manifest: a folder of images without labels (any depth), the unlabelled pool
    unlabelled_path: str | None = None
    target_path: str | None = None  # domain_adaptation: images of the domain to adapt to
    target_test_fraction: float = 0.5  # of labelled target images, held out for evaluation
    # Experiments on long-tailed data: train+val subsampled so that class counts fall off
    # exponentially from the first class to the last, max/min = the ratio (as CIFAR-10-LT).
    imbalance_ratio: float | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> DataSettings:
        check_known_keys(cls, params, "data", DataSourceError)
        settings = cls(**params)
        settings.validate()
        return settings

    def data_name(self) -> str:
        """What people call this data: the folder's or the manifest's name, or the dataset's."""
        if self.source == "imagefolder":
            return Path(self.path).resolve().name
        if self.source == "manifest":
            return Path(self.manifest).stem
        return self.name if self.source == "torchvision" else self.source

    def origin(self) -> str:
        """Where the images come from: the folder or manifest (absolute path), or the source."""
        if self.source == "imagefolder":
            return str(Path(self.path).resolve())
        if self.source == "manifest":
            return str(Path(self.manifest).resolve())
        if self.source == "torchvision":
            return f"torchvision.datasets.{self.name}"
        return "sklearn.datasets.load_digits"

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise DataSourceError(
                f"data.source={self.source!r} is not a known source; use one of {', '.join(SOURCES)}."
            )
        if self.source == "imagefolder" and not self.path:
            raise DataSourceError(
                "data.source=imagefolder needs data.path, e.g. "
                '--params="data.source=imagefolder,data.path=/path/to/images".'
            )
        if self.source == "manifest" and not self.manifest:
            raise DataSourceError(
                "data.source=manifest needs data.manifest, the CSV or parquet table of image "
                'paths and labels, e.g. --params="data.source=manifest,data.manifest=labels.csv".'
            )
        if self.unlabelled_path is not None and self.source not in ("imagefolder", "manifest"):
            raise DataSourceError(
                f"data.unlabelled_path is for data.source=imagefolder or manifest, not "
                f"{self.source!r}."
            )
        if self.source == "torchvision" and not self.name:
            raise DataSourceError(
                "data.source=torchvision needs data.name, e.g. data.name=CIFAR10."
            )
        for key in ("val_fraction", "test_fraction", "target_test_fraction"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or not 0 < value < 1:
                raise DataSourceError(f"data.{key}={value!r} must be a number between 0 and 1.")
        ratio = self.imbalance_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio < 1
        ):
            raise DataSourceError(
                f"data.imbalance_ratio={ratio!r} must be null or a number ≥ 1 (e.g. 100: the "
                "largest class keeps 100x the images of the smallest)."
            )
        self._check_policies()

    def _check_policies(self) -> None:
        """What to do with unreadable files, leaked test images and flagged labels."""
        if self.on_corrupt not in ("error", "skip"):
            raise DataSourceError(f"data.on_corrupt={self.on_corrupt!r} must be 'error' or 'skip'.")
        for key, choices in (("on_duplicate", ON_DUPLICATE), ("on_label_issue", ON_LABEL_ISSUE)):
            if getattr(self, key) not in choices:
                raise DataSourceError(
                    f"data.{key}={getattr(self, key)!r} must be one of {', '.join(choices)}."
                )
