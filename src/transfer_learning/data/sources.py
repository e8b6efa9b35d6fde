"""The image sources, each turned into index rows: the bundled digits, a folder of class folders,
a manifest (CSV or Parquet, one or several label columns), a torchvision data set exported to files."""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from transfer_learning.core.tasks import MISSING, Tasks, task_label_column
from transfer_learning.data.images import (
    DIGITS_SCHEME,
    IMAGE_EXTENSIONS,
)
from transfer_learning.data.settings import (
    MANIFEST_FORMATS,
    OFFLINE_ALTERNATIVES,
    POOL,
    SPLITS,
    DataSettings,
    DataSourceError,
)

logger = logging.getLogger(__name__)


def index_digits() -> tuple[pd.DataFrame, list[str]]:
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


def index_manifest(settings: DataSettings) -> tuple[pd.DataFrame, Tasks, pd.DataFrame]:
    """The image index of a manifest table: one row per image, its label(s), optionally its split;
    its tasks; and the unlabelled pool, the rows with no label at all (`unlabelled_rows`).

    Several label columns (multi-task): a row is kept when it has at least one label, and a task
    ignores the rows without its label (`tasks.MISSING`). Every other problem is an error that
    names the manifest, the column and the rows (as numbered in a spreadsheet: the header is
    row 1).
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
    pool = unlabelled_rows(manifest, table[unlabelled], rows[unlabelled], settings)
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
    return frame, Tasks(classes), pool


def unlabelled_rows(
    manifest: Path, table: pd.DataFrame, rows: pd.Series, settings: DataSettings
) -> pd.DataFrame:
    """The manifest's rows without any label, as pool rows (`pool_frame`): images to learn from
    without labels and to rank for labelling. A val or test row without a label is an error:
    model selection and evaluation read labelled images only."""
    if settings.split_column:
        split = table[settings.split_column].astype("string").str.strip().str.lower()
        _refuse_rows(
            manifest,
            rows[split.isin(["val", "test"]).fillna(False).to_numpy()],
            f"are in val or test ({settings.split_column!r}) but have no label; label them, or "
            "move them to train (or leave the split empty) to make them unlabelled pool images",
        )
    if len(table):
        logger.info(
            "%s: %d row(s) without a label form the unlabelled pool (rows %s)",
            manifest,
            len(table),
            _row_list(rows),
        )
    return pool_frame(table["location"].tolist(), table[settings.path_column].astype(str).tolist())


def pool_frame(locations: list[str], paths: list[str] | None = None) -> pd.DataFrame:
    """Index rows of unlabelled images: `location` (what is read), `path` (as the user gave it),
    no label, split `unlabelled`."""
    return pd.DataFrame(
        {
            "location": locations,
            "path": paths if paths is not None else locations,
            "label": np.full(len(locations), MISSING, dtype=np.int64),
            "class_name": "",
            "split": POOL,
        },
        columns=["location", "path", "label", "class_name", "split"],
    )


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


def class_folders(folder: Path) -> list[Path]:
    return sorted(
        (entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )


def image_files(folder: Path) -> list[str]:
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        found.extend(
            os.path.join(directory, name)
            for name in sorted(files)
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        )
    return found


def scan_image_folder(root: Path) -> tuple[pd.DataFrame, list[str]]:
    if not root.exists():
        raise DataSourceError(
            f"data.path={str(root)!r} does not exist. Point data.path at a folder with one "
            "sub-folder per class, or with train/, val/, test/ folders that each hold class folders."
        )
    if not root.is_dir():
        raise DataSourceError(
            f"data.path={str(root)!r} is a file; it must be a folder of class folders."
        )
    top = class_folders(root)
    split_folders = {entry.name: entry for entry in top if entry.name in SPLITS}
    if split_folders and "train" not in split_folders:
        raise DataSourceError(
            f"{root} has {', '.join(sorted(split_folders))}/ but no train/ folder; "
            "a split layout needs train/ (val/ and test/ are optional)."
        )
    layout = split_folders or {None: root}

    classes = [entry.name for entry in class_folders(layout.get("train", root))]
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
        for class_folder in class_folders(folder):
            if class_folder.name not in label_of:
                raise DataSourceError(
                    f"{class_folder} is a class that {layout['train']} does not have; "
                    f"every split must use the train classes ({', '.join(classes)})."
                )
            files = image_files(class_folder)
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
