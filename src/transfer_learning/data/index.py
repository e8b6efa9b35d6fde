"""The image index: one row per image (where to read it, label, class name, split).

Every later stage reads images through this table only, so none of them needs to know whether
the images came from scikit-learn's digits, a folder on disk or a torchvision download.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from transfer_learning.core.file_cache import cached_file_facts
from transfer_learning.core.tasks import MISSING, SINGLE_TASK, Tasks
from transfer_learning.data.images import (
    IMAGE_EXTENSIONS,
    image_size_of,
    unreadable_reason,
)
from transfer_learning.data.settings import (
    NOT_MIRROR_SYMMETRIC,
    SPLITS,
    DataSettings,
    DataSourceError,
)
from transfer_learning.data.sources import (
    class_folders,
    export_torchvision_dataset,
    image_files,
    index_digits,
    index_manifest,
    pool_frame,
    scan_image_folder,
)

logger = logging.getLogger(__name__)

SKIPPED_COLUMNS = ["location", "reason"]
# Image sizes are read from at most this many training images' headers (a seeded sample).
PROFILE_SAMPLE = 1000


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
    indexed = build_indexes(settings, seed)
    return indexed.index, indexed.tasks, indexed.skipped


@dataclass(frozen=True)
class IndexedImages:
    """What ingestion finds: the image index (labelled train / val / test), its tasks, the
    unlabelled pool (`sources.pool_frame` rows, not in the index) and the files left out as
    unreadable (of both)."""

    index: pd.DataFrame
    tasks: Tasks
    pool: pd.DataFrame
    skipped: pd.DataFrame


def build_indexes(settings: DataSettings, seed: int) -> IndexedImages:
    """Index the configured source and its unlabelled pool (a manifest's rows without a label,
    and the images under `data.unlabelled_path`)."""
    pool = pool_frame([])
    if settings.source == "digits":
        frame, classes = index_digits()
        tasks = Tasks({SINGLE_TASK: classes})
        skipped = pd.DataFrame(columns=SKIPPED_COLUMNS)
    else:
        if settings.source == "manifest":
            origin = Path(settings.manifest)
            frame, tasks, pool = index_manifest(settings)
        else:
            origin = (
                Path(settings.path)
                if settings.source == "imagefolder"
                else export_torchvision_dataset(settings.name, Path(settings.download_dir))
            )
            frame, classes = scan_image_folder(origin)
            tasks = Tasks({SINGLE_TASK: classes})
        frame, skipped = _drop_unreadable(frame, settings)
        _require_images_per_class(frame, tasks.primary, origin)
    frame = assign_splits(frame, settings.val_fraction, settings.test_fraction, seed)
    if settings.imbalance_ratio is not None:
        frame = long_tailed(frame, settings.imbalance_ratio, seed)
    pool, skipped_pool = _readable_pool(pool, frame, settings)
    return IndexedImages(
        frame.reset_index(drop=True),
        tasks,
        pool,
        pd.concat([skipped, skipped_pool]) if len(skipped_pool) else skipped,
    )


def _readable_pool(
    pool: pd.DataFrame, index: pd.DataFrame, settings: DataSettings
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pool with `data.unlabelled_path`'s images added, less the images the index already
    holds, less unreadable files (always skipped and reported: a pool is many files nobody
    checked), and the files skipped."""
    if settings.unlabelled_path:
        pool = pd.concat([pool, pool_frame(_unlabelled_folder_images(settings.unlabelled_path))])
    pool = pool[~pool["location"].isin(index["location"])].drop_duplicates("location")
    if pool.empty:
        return pool.reset_index(drop=True), pd.DataFrame(columns=SKIPPED_COLUMNS)
    pool, skipped = _drop_unreadable(
        pool.reset_index(drop=True), replace(settings, on_corrupt="skip")
    )
    if pool.empty:
        logger.warning(
            "None of the %d unlabelled pool image(s) can be read: the pool is empty.", len(skipped)
        )
    return pool.reset_index(drop=True), skipped


def _unlabelled_folder_images(path: str) -> list[str]:
    root = Path(path)
    if not root.is_dir():
        raise DataSourceError(
            f"data.unlabelled_path={path!r} is not a folder; point it at a folder of images "
            "without labels (any depth, no class folders needed)."
        )
    found = image_files(root)
    if not found:
        logger.warning(
            "data.unlabelled_path=%r holds no images (%s): the unlabelled pool is empty.",
            path,
            ", ".join(sorted(IMAGE_EXTENSIONS)),
        )
    return found


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
        frame, _ = scan_image_folder(root)
        label_of = {name: label for label, name in enumerate(classes)}
        frame["label"] = frame["class_name"].map(label_of).astype(np.int64)
        frame["split"] = frame["split"].map({"test": "test"}).astype(object)
    else:
        files = image_files(root)
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
    top = class_folders(root)
    if top and all(entry.name in SPLITS for entry in top):
        top = [folder for split in top for folder in class_folders(split)]
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


def data_fingerprint(rows: pd.DataFrame) -> str:
    """16 hex digits of which images, with which labels, in which splits: the same fingerprint,
    the same data (a saved backbone ranking is reused on it; MLflow runs record it)."""
    digest = hashlib.sha256()
    for location, label, split in rows[["location", "label", "split"]].itertuples(index=False):
        digest.update(f"{location}\0{label}\0{split}\n".encode())
    return digest.hexdigest()[:16]
