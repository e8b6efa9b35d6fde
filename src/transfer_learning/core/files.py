"""Files written whole or not at all, and numpy arrays stored without pickle."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through `write` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_atomically(path, lambda stream: np.savez(stream, **arrays))


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    # allow_pickle=False: an .npz from elsewhere can never run code on load.
    with np.load(path, allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files}
