"""Kedro datasets this project needs beyond kedro-datasets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from kedro.io import AbstractVersionedDataset, Version


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to an .npz file atomically: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    # allow_pickle=False: an .npz from elsewhere can never run code on load.
    with np.load(path, allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files}


class ArraysDataset(AbstractVersionedDataset[dict[str, np.ndarray], dict[str, np.ndarray]]):
    """A dict of named numpy arrays in one versioned, atomically written .npz file."""

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(PurePosixPath(filepath), version)
        self.metadata = metadata  # e.g. the kedro-viz layer

    def load(self) -> dict[str, np.ndarray]:
        return load_arrays(Path(self._get_load_path()))

    def save(self, data: dict[str, np.ndarray]) -> None:
        save_arrays(Path(self._get_save_path()), data)

    def _exists(self) -> bool:
        return Path(self._get_load_path()).exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}


class TorchCheckpointDataset(AbstractVersionedDataset[dict[str, Any], dict[str, Any]]):
    """A dict of tensors and plain values (a model checkpoint), versioned and written atomically.

    Loaded with ``torch.load(weights_only=True)``: a checkpoint file can never run code on load.
    """

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(PurePosixPath(filepath), version)
        self.metadata = metadata  # e.g. the kedro-viz layer

    def load(self) -> dict[str, Any]:
        import torch

        return torch.load(Path(self._get_load_path()), map_location="cpu", weights_only=True)

    def save(self, data: dict[str, Any]) -> None:
        import torch

        path = Path(self._get_save_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save(data, partial)
        os.replace(partial, path)

    def _exists(self) -> bool:
        return Path(self._get_load_path()).exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}
