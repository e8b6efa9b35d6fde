"""The image index: one row per image (where to read it, label, class name, split).

Every later stage reads images through this table only, so none of them needs to know whether
the images came from scikit-learn's digits, a folder on disk or a torchvision download.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from transfer_learning.config import check_known_keys
from transfer_learning.duplicates import ON_DUPLICATE
from transfer_learning.file_cache import cached_file_facts
from transfer_learning.images import (
    DIGITS_SCHEME,
    IMAGE_EXTENSIONS,
    image_size_of,
    unreadable_reason,
)
from transfer_learning.tasks import MISSING, SINGLE_TASK, Tasks, task_label_column

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SOURCES = ("digits", "imagefolder", "torchvision", "manifest")
MANIFEST_FORMATS = (".csv", ".parquet")
OFFLINE_ALTERNATIVES = (
    "Offline, use data.source=imagefolder with data.path=<folder of class sub-folders>, "
    "or the bundled data.source=digits."
)
SKIPPED_COLUMNS = ["location", "reason"]
# Sources whose images change meaning when mirrored (digits, letters, house numbers).
NOT_MIRROR_SYMMETRIC = frozenset(
    {"MNIST", "EMNIST", "KMNIST", "QMNIST", "SVHN", "USPS", "Omniglot"}
)
# Image sizes are read from at most this many training images' headers (a seeded sample).
PROFILE_SAMPLE = 1000


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
    download_dir: str = "data/01_raw/torchvision"
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
        if self.on_corrupt not in ("error", "skip"):
            raise DataSourceError(f"data.on_corrupt={self.on_corrupt!r} must be 'error' or 'skip'.")
        if self.on_duplicate not in ON_DUPLICATE:
            raise DataSourceError(
                f"data.on_duplicate={self.on_duplicate!r} must be one of {', '.join(ON_DUPLICATE)}."
            )


def build_image_index(
    settings: DataSettings, seed: int
) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """Index the configured source; returns (index, class names by label id, skipped files).

    With several label columns the class names are the first task's (see `build_task_index`).
    """
    frame, tasks, skipped = build_task_index(settings, seed)
    return frame, tasks.primary, skipped


def build_task_index(settings: DataSettings, seed: int) -> tuple[pd.DataFrame, Tasks, pd.DataFrame]:
    """Index the configured source; returns (index, its tasks and their classes, skipped files)."""
    if settings.source == "digits":
        frame, classes = _index_digits()
        tasks = Tasks({SINGLE_TASK: classes})
        skipped = pd.DataFrame(columns=SKIPPED_COLUMNS)
    else:
        if settings.source == "manifest":
            origin = Path(settings.manifest)
            frame, tasks = index_manifest(settings)
        else:
            origin = (
                Path(settings.path)
                if settings.source == "imagefolder"
                else export_torchvision_dataset(settings.name, Path(settings.download_dir))
            )
            frame, classes = _scan_image_folder(origin)
            tasks = Tasks({SINGLE_TASK: classes})
        frame, skipped = _drop_unreadable(frame, settings)
        _require_images_per_class(frame, tasks.primary, origin)
    frame = assign_splits(frame, settings.val_fraction, settings.test_fraction, seed)
    if settings.imbalance_ratio is not None:
        frame = long_tailed(frame, settings.imbalance_ratio, seed)
    return frame.reset_index(drop=True), tasks, skipped


def long_tailed(frame: pd.DataFrame, ratio: float, seed: int) -> pd.DataFrame:
    """The index with train+val thinned to an exponential long tail; test is left balanced.

    Class k of C (in label order) keeps n_max · ratio^(-k/(C-1)) of its train+val images (at
    least one), a seeded random subset that keeps each image's split: the CIFAR-10-LT profile
    (Cao et al. 2019) on whatever data is indexed.
    """
    labelled = frame[frame["split"].isin(["train", "val"])]
    n_classes = frame["label"].nunique()
    n_max = labelled["label"].value_counts().max()
    rng = np.random.default_rng(seed)
    keep = []
    for label, rows in labelled.groupby("label"):
        share = ratio ** (-int(label) / max(1, n_classes - 1))
        count = min(len(rows), max(1, round(n_max * share)))
        keep.extend(rng.choice(rows.index.to_numpy(), size=count, replace=False))
    kept = frame.index.isin(keep) | (frame["split"] == "test")
    logger.info(
        "data.imbalance_ratio=%s: train+val thinned from %d to %d images",
        ratio,
        len(labelled),
        len(keep),
    )
    return frame[kept]


def profile_images(frame: pd.DataFrame, settings: DataSettings, seed: int) -> dict[str, Any]:
    """What `auto` settings need to know of the data: typical image size, split sizes, symmetry.

    Sizes come from the headers of (a seeded sample of) the training images; no pixels are read.
    """
    train = frame[frame["split"] == "train"]
    sample = train["location"].sample(min(len(train), PROFILE_SAMPLE), random_state=seed)
    with ThreadPoolExecutor(max_workers=16) as pool:
        sizes = np.array(list(pool.map(image_size_of, sample)))
    val_labels = frame.loc[frame["split"] == "val", "label"]
    val_counts = val_labels[val_labels != MISSING].value_counts()
    # Folders and manifests hold the user's photos; of the named sources some are not symmetric.
    mirror_symmetric = settings.source in ("imagefolder", "manifest") or (
        settings.source == "torchvision" and settings.name not in NOT_MIRROR_SYMMETRIC
    )
    return {
        "typical_short_side": int(np.median(sizes.min(axis=1))),
        "typical_long_side": int(np.median(sizes.max(axis=1))),
        "n_train": len(train),
        "n_val": len(val_labels),
        "min_val_per_class": int(val_counts.min()) if len(val_counts) else 0,
        "mirror_symmetric": bool(mirror_symmetric),
    }


def index_target_images(
    settings: DataSettings, classes: Sequence[str], seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The target-domain images under `data.target_path` and the files skipped as unreadable.

    Columns as the image index; `split` is `adapt` (reaches adaptation, without labels) or
    `test` (read by evaluation alone). Class folders named like source classes — directly or
    under train/ val/ test/ — make the folder labelled: test/ (or else a stratified, seeded
    `data.target_test_fraction` draw) is the target test split and the rest is `adapt`. Any other
    layout is unlabelled (label -1): every image at any depth is `adapt`.
    """
    if not settings.target_path:
        raise DataSourceError(
            "domain_adaptation needs data.target_path: a folder of images from the domain to "
            'adapt to, e.g. --params="data.target_path=/data/new_camera".'
        )
    root = Path(settings.target_path)
    if not root.is_dir():
        raise DataSourceError(
            f"data.target_path={settings.target_path!r} is not a folder; point it at the folder "
            "of target-domain images (class folders optional)."
        )
    if _has_source_class_folders(root, classes):
        frame, _ = _scan_image_folder(root)
        label_of = {name: label for label, name in enumerate(classes)}
        frame["label"] = frame["class_name"].map(label_of).astype(np.int64)
        frame["split"] = frame["split"].map({"test": "test"}).astype(object)
    else:
        files = _image_files(root)
        if not files:
            raise DataSourceError(
                f"data.target_path={settings.target_path!r} holds no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))})."
            )
        frame = pd.DataFrame({"location": files, "label": -1, "class_name": "", "split": "adapt"})
    frame, skipped = _drop_unreadable(frame.reset_index(drop=True), settings)
    frame = frame.reset_index(drop=True)
    if frame["split"].isna().all():
        fraction = settings.target_test_fraction
        _draw(frame, frame.index, fraction, seed + 2, "test", "data.target_test_fraction")
    frame["split"] = frame["split"].fillna("adapt")
    return frame, skipped


def _has_source_class_folders(root: Path, classes: Sequence[str]) -> bool:
    top = _class_folders(root)
    if top and all(entry.name in SPLITS for entry in top):
        top = [folder for split in top for folder in _class_folders(split)]
    names = {entry.name for entry in top}
    if names and names <= set(classes):
        return True
    if names & set(classes):
        logger.warning(
            "%s: folders %s are not source classes, so its labels are not used (unlabelled "
            "target); name class folders exactly as the source's to get a target test split.",
            root,
            ", ".join(sorted(names - set(classes))),
        )
    return False


def _index_digits() -> tuple[pd.DataFrame, list[str]]:
    from sklearn.datasets import load_digits

    labels = load_digits().target
    frame = pd.DataFrame(
        {
            "location": [f"{DIGITS_SCHEME}{i}" for i in range(len(labels))],
            "label": labels.astype(np.int64),
            "class_name": [str(label) for label in labels],
            "split": None,
        }
    )
    return frame, [str(digit) for digit in range(10)]


def index_manifest(settings: DataSettings) -> tuple[pd.DataFrame, Tasks]:
    """The image index of a manifest table: one row per image, its label(s), optionally its split.

    One label column: rows without a label are left out (logged). Several (multi-task): a row
    is kept when it has at least one label, and a task ignores the rows without its label
    (`tasks.MISSING`). Every other problem is an error that names the manifest, the column and
    the rows (as numbered in a spreadsheet: the header is row 1).
    """
    manifest = Path(settings.manifest)
    table = _read_manifest(manifest)
    label_columns = _manifest_label_columns(manifest, table, settings)
    rows = pd.Series(np.arange(len(table)) + 2, index=table.index)  # spreadsheet row numbers
    paths = table[settings.path_column]
    _refuse_rows(manifest, rows[paths.isna()], f"have no {settings.path_column!r}")
    folder = manifest.resolve().parent
    table = table.assign(
        location=[os.path.normpath(os.path.join(folder, path)) for path in paths.astype(str)]
    )  # absolute paths stay as they are
    _refuse_rows(
        manifest,
        rows[table["location"].duplicated(keep=False)],
        f"name the same image ({settings.path_column!r}) more than once",
    )
    names = {
        column: table[column].astype("string").str.strip().replace("", pd.NA)
        for column in label_columns
    }
    unlabelled = pd.concat([names[c].isna() for c in label_columns], axis=1).all(axis=1)
    if unlabelled.any():
        logger.warning(
            "%s: %d row(s) without %s are left out (rows %s)",
            manifest,
            int(unlabelled.sum()),
            "a " + repr(label_columns[0]) + " label" if len(label_columns) == 1 else "any label",
            _row_list(rows[unlabelled]),
        )
    table, rows = table[~unlabelled], rows[~unlabelled]
    names = {column: values[~unlabelled] for column, values in names.items()}
    classes = {
        column: _manifest_classes(manifest, column, names[column]) for column in label_columns
    }
    split = _manifest_splits(manifest, table, rows, settings.split_column)
    ids = {}
    for column, values in names.items():
        label_of = {name: label for label, name in enumerate(classes[column])}
        ids[column] = values.map(label_of).fillna(MISSING).astype(np.int64).to_numpy()
        if values.isna().any():
            logger.info(
                "%s: task %r ignores %d row(s) without its label (rows %s)",
                manifest,
                column,
                int(values.isna().sum()),
                _row_list(rows[values.isna()]),
            )
    first = label_columns[0]
    frame = pd.DataFrame(
        {
            "location": table["location"].to_numpy(),
            "label": ids[first],
            "class_name": names[first].fillna("").to_numpy(dtype=object),
            "split": split.to_numpy(dtype=object) if split is not None else None,
        }
    )
    if len(label_columns) > 1:
        for column in label_columns:
            frame[task_label_column(column)] = ids[column]
    return frame, Tasks(classes)


def _manifest_classes(manifest: Path, column: str, names: pd.Series) -> list[str]:
    classes = sorted(names.dropna().unique())
    if len(classes) < 2:
        raise DataSourceError(
            f"{manifest}: column {column!r} (data.label_columns) has "
            f"{'one class, ' + repr(classes[0]) if classes else 'no labels'}; classification "
            "needs at least two."
        )
    return [str(name) for name in classes]


def _manifest_label_columns(
    manifest: Path, table: pd.DataFrame, settings: DataSettings
) -> list[str]:
    """The label columns (one per task), once every configured column is known to exist."""
    label_columns = (
        [settings.label_columns]
        if isinstance(settings.label_columns, str)
        else list(settings.label_columns)
    )
    if not label_columns or len(set(label_columns)) != len(label_columns):
        raise DataSourceError(
            f"data.label_columns={label_columns!r} must name one or more different columns."
        )
    if settings.path_column in label_columns or settings.split_column in label_columns:
        raise DataSourceError(
            f"data.label_columns={label_columns!r} must not hold data.path_column or "
            "data.split_column."
        )
    wanted = [("data.path_column", settings.path_column)]
    wanted += [("data.label_columns", column) for column in label_columns]
    if settings.split_column:
        wanted.append(("data.split_column", settings.split_column))
    missing = [(key, column) for key, column in wanted if column not in table.columns]
    if missing:
        raise DataSourceError(
            f"{manifest} has no column "
            + ", ".join(f"{column!r} ({key})" for key, column in missing)
            + f"; its columns are {', '.join(map(repr, table.columns))}."
        )
    return label_columns


def _manifest_splits(
    manifest: Path, table: pd.DataFrame, rows: pd.Series, split_column: str | None
) -> pd.Series | None:
    """The given split of every row (train / val / test), or None to draw one."""
    if not split_column:
        return None
    split = table[split_column].astype("string").str.strip().str.lower()
    unknown = ~split.isin(SPLITS) | split.isna()
    _refuse_rows(
        manifest,
        rows[unknown],
        f"have a {split_column!r} (data.split_column) other than {', '.join(SPLITS)}: "
        f"{sorted(set(table[split_column][unknown].astype(str)))}",
    )
    if not (split == "train").any():
        raise DataSourceError(
            f"{manifest}: no row has {split_column!r} = train; training needs some."
        )
    return split


def _read_manifest(manifest: Path) -> pd.DataFrame:
    if manifest.suffix.lower() not in MANIFEST_FORMATS:
        raise DataSourceError(f"data.manifest={str(manifest)!r} must be a .csv or .parquet file.")
    if not manifest.is_file():
        raise DataSourceError(f"data.manifest={str(manifest)!r} does not exist.")
    try:
        if manifest.suffix.lower() == ".csv":
            # Text as given: labels such as "01" or "1.0" keep their spelling.
            return pd.read_csv(manifest, dtype=str, skipinitialspace=True)
        return pd.read_parquet(manifest)
    except Exception as error:  # parser errors of either format
        raise DataSourceError(
            f"data.manifest={str(manifest)!r} cannot be read as a table: {error}"
        ) from error


def _refuse_rows(manifest: Path, rows: pd.Series, problem: str) -> None:
    if len(rows):
        raise DataSourceError(f"{manifest}: rows {_row_list(rows)} {problem}.")


def _row_list(rows: pd.Series, shown: int = 20) -> str:
    listed = ", ".join(str(row) for row in rows.head(shown))
    return listed + (f" and {len(rows) - shown} more" if len(rows) > shown else "")


def _class_folders(folder: Path) -> list[Path]:
    return sorted(
        (entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )


def _image_files(folder: Path) -> list[str]:
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        found.extend(
            os.path.join(directory, name)
            for name in sorted(files)
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        )
    return found


def _scan_image_folder(root: Path) -> tuple[pd.DataFrame, list[str]]:
    if not root.exists():
        raise DataSourceError(
            f"data.path={str(root)!r} does not exist. Point data.path at a folder with one "
            "sub-folder per class, or with train/, val/, test/ folders that each hold class folders."
        )
    if not root.is_dir():
        raise DataSourceError(
            f"data.path={str(root)!r} is a file; it must be a folder of class folders."
        )
    top = _class_folders(root)
    split_folders = {entry.name: entry for entry in top if entry.name in SPLITS}
    if split_folders and "train" not in split_folders:
        raise DataSourceError(
            f"{root} has {', '.join(sorted(split_folders))}/ but no train/ folder; "
            "a split layout needs train/ (val/ and test/ are optional)."
        )
    layout = split_folders or {None: root}

    classes = [entry.name for entry in _class_folders(layout.get("train", root))]
    if not classes:
        raise DataSourceError(
            f"{layout.get('train', root)} has no class folders. Put each class's images in a "
            "sub-folder named after the class."
        )
    if len(classes) < 2:
        raise DataSourceError(
            f"{layout.get('train', root)} has a single class ({classes[0]!r}); "
            "classification needs at least two class folders."
        )
    label_of = {name: label for label, name in enumerate(classes)}

    rows = []
    for split, folder in layout.items():
        for class_folder in _class_folders(folder):
            if class_folder.name not in label_of:
                raise DataSourceError(
                    f"{class_folder} is a class that {layout['train']} does not have; "
                    f"every split must use the train classes ({', '.join(classes)})."
                )
            files = _image_files(class_folder)
            if not files:
                raise DataSourceError(
                    f"Class folder {class_folder} holds no images "
                    f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder."
                )
            label = label_of[class_folder.name]
            rows.extend((path, label, class_folder.name, split) for path in files)
    frame = pd.DataFrame(rows, columns=["location", "label", "class_name", "split"])
    frame["label"] = frame["label"].astype(np.int64)
    return frame, classes


def _drop_unreadable(
    frame: pd.DataFrame, settings: DataSettings
) -> tuple[pd.DataFrame, pd.DataFrame]:
    reasons = cached_file_facts(
        "readability", frame["location"].tolist(), _unreadable_reasons, settings.cache_dir
    )["reason"]
    bad = reasons != ""
    skipped = pd.DataFrame(
        {"location": frame["location"][bad].tolist(), "reason": reasons[bad].tolist()},
        columns=SKIPPED_COLUMNS,
    )
    if skipped.empty:
        return frame, skipped
    listing = "\n".join(f"  {row.location}: {row.reason}" for row in skipped.itertuples())
    if settings.on_corrupt == "error":
        raise DataSourceError(
            f"{len(skipped)} image file(s) cannot be read:\n{listing}\n"
            "Fix or remove them, or set data.on_corrupt=skip to leave them out."
        )
    logger.warning("Skipped %d unreadable image file(s):\n%s", len(skipped), listing)
    return frame[~bad], skipped


def _unreadable_reasons(locations: list[str]) -> dict[str, np.ndarray]:
    """Why each file cannot be read ("" when it can)."""
    # Header checks are I/O bound: threads overlap the file opens.
    with ThreadPoolExecutor(max_workers=16) as pool:
        reasons = list(pool.map(unreadable_reason, locations, chunksize=256))
    return {"reason": np.array([reason or "" for reason in reasons])}


def _require_images_per_class(frame: pd.DataFrame, classes: list[str], root: Path) -> None:
    empty = sorted(set(classes) - set(frame["class_name"]))
    if empty:
        raise DataSourceError(
            f"After skipping unreadable files, class(es) {', '.join(empty)} in {root} have no images left."
        )


def assign_splits(
    frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.DataFrame:
    """Fill in missing splits with stratified, seeded draws; predefined splits are kept.

    Rows without a split are divided into train and test; then, if no predefined val split
    exists, val is drawn from train. Same seed, same split.
    """
    frame = frame.copy()
    unassigned = frame["split"].isna()
    if unassigned.any():
        frame.loc[unassigned, "split"] = "train"
        if not (frame["split"] == "test").any():
            _draw(frame, frame.index[unassigned], test_fraction, seed, "test", "data.test_fraction")
    if not (frame["split"] == "val").any():
        train = frame.index[frame["split"] == "train"]
        _draw(frame, train, val_fraction, seed + 1, "val", "data.val_fraction")
    return frame


def _draw(
    frame: pd.DataFrame, rows: pd.Index, fraction: float, seed: int, split: str, parameter: str
) -> None:
    labels = frame.loc[rows, "label"]
    counts = labels.value_counts()
    if counts.min() < 2:
        # With several label columns the draw follows the first; MISSING is one more stratum.
        name = frame.loc[labels.index[labels == counts.idxmin()][0], "class_name"]
        raise DataSourceError(
            f"Class {name or '(no first-column label)'!r} has "
            f"{counts.min()} image(s); a stratified {split} split ({parameter}) needs at least 2 per class."
        )
    try:
        _, drawn = train_test_split(rows, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as error:
        raise DataSourceError(
            f"Cannot draw a stratified {split} split with {parameter}={fraction}: {error} "
            f"Change {parameter} or add images."
        ) from error
    frame.loc[drawn, "split"] = split


def export_torchvision_dataset(name: str, download_dir: Path) -> Path:
    """Download torchvision dataset `name` and write it once as an image folder; return its path."""
    import torchvision.datasets

    folder = download_dir / f"{name}_images"
    if (folder / ".complete").exists():
        return folder
    dataset_class = getattr(torchvision.datasets, name, None)
    if dataset_class is None or "train" not in inspect.signature(dataset_class).parameters:
        raise DataSourceError(
            f"data.name={name!r} is not a torchvision dataset with train/test splits; use e.g. "
            f"CIFAR10, CIFAR100, MNIST, FashionMNIST, or data.source=imagefolder."
        )
    try:
        splits = {
            split: dataset_class(root=str(download_dir), train=split == "train", download=True)
            for split in ("train", "test")
        }
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise DataSourceError(
            f"Could not download torchvision dataset {name} into {download_dir}: {error}. "
            + OFFLINE_ALTERNATIVES
        ) from error
    # Written beside the final folder and renamed at the end: an interrupted export never
    # leaves a half-written folder that looks complete.
    partial = download_dir / f".{name}_images.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for split, dataset in splits.items():
        classes = [str(c).replace("/", "_") for c in dataset.classes]
        for class_name in classes:
            (partial / split / class_name).mkdir(parents=True, exist_ok=True)
        for position, (image, label) in enumerate(dataset):
            image.save(partial / split / classes[label] / f"{position:06d}.png")
    (partial / ".complete").touch()
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder
