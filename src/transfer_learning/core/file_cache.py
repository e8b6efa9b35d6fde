"""Per-file facts kept between runs, keyed by each file's path, size and modification times.

Re-indexing a folder whose images have not changed should not read them again: ingestion's
readability check and the leakage check's hashes are computed once per file version and reused
while the file's size, mtime and ctime stay the same (ctime also moves on a chmod, which can make
an unreadable file readable). A changed, added or removed file is simply a miss.

One `.npz` store per kind of fact and folder of images, holding exactly the files of the last run
(so it never grows with files that are gone), written atomically: a run that is killed, or two
runs at once, leave the old store or a whole new one, never a partial file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from transfer_learning.core.files import load_arrays, save_arrays

logger = logging.getLogger(__name__)

FORMAT = 1  # bumped when a stored fact changes meaning
_KEYS = ("location", "size", "mtime_ns", "ctime_ns")

Facts = dict[str, np.ndarray]  # name → one value per file, in the order of the locations


def cached_file_facts(
    kind: str,
    locations: Sequence[str],
    compute: Callable[[list[str]], Facts],
    cache_dir: str | Path | None,
) -> Facts:
    """`compute(locations)`, reusing the stored facts of files whose size and mtime are those
    the store recorded. `kind` names the facts (and their version): stores of other kinds or
    versions are never read. Locations that are not files (e.g. `sklearn-digits:`) and a
    `cache_dir` of None always compute; `compute` is never called with an empty list."""
    locations = list(locations)
    stats = [_stat(location) for location in locations]
    statable = np.array([stat is not None for stat in stats], dtype=bool)
    if cache_dir is None or not statable.any():
        return compute(locations)
    store = Path(cache_dir) / f"{kind}-v{FORMAT}-{_folder_key(locations)}.npz"
    keys = {
        "location": np.array(locations),
        **{
            name: np.array([stat[i] if stat else -1 for stat in stats], dtype=np.int64)
            for i, name in enumerate(_KEYS[1:])
        },
    }
    stored = _load(store)
    hit = np.zeros(len(locations), dtype=bool)
    at = np.full(len(locations), -1, dtype=np.int64)
    if stored is not None:
        position = {location: i for i, location in enumerate(stored["location"].tolist())}
        at = np.array([position.get(location, -1) for location in locations], dtype=np.int64)
        known = statable & (at >= 0)
        hit[known] = np.all(
            [stored[name][at[known]] == keys[name][known] for name in _KEYS[1:]], axis=0
        )
    missing = [location for location, found in zip(locations, hit, strict=True) if not found]
    if missing:
        fresh = compute(missing)
        facts = {name: _merge(values, stored, name, at, hit) for name, values in fresh.items()}
        logger.info("%s: %d of %d files read, %d reused", kind, len(missing), len(hit), hit.sum())
    else:
        facts = {name: values[at] for name, values in stored.items() if name not in _KEYS}
    if missing or len(stored["location"]) != len(locations):
        save_arrays(store, {**keys, **facts})
    return facts


def _merge(
    fresh: np.ndarray, stored: Facts | None, name: str, at: np.ndarray, hit: np.ndarray
) -> np.ndarray:
    # The wider of the two dtypes: stored strings may be longer than the fresh ones.
    dtype = fresh.dtype if stored is None else np.result_type(fresh.dtype, stored[name].dtype)
    merged = np.empty((len(hit), *fresh.shape[1:]), dtype=dtype)
    merged[~hit] = fresh
    if hit.any() and stored is not None:
        merged[hit] = stored[name][at[hit]]
    return merged


def _stat(location: str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(location)
    except (OSError, ValueError):
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _folder_key(locations: Sequence[str]) -> str:
    """The files' common folder, hashed: one store per image folder (or manifest tree)."""
    folder = os.path.commonpath([os.path.abspath(location) for location in locations])
    return hashlib.sha1(folder.encode()).hexdigest()[:16]


def _load(store: Path) -> Facts | None:
    if not store.exists():
        return None
    try:
        return load_arrays(store)
    except Exception as error:  # a damaged store is a cache miss, never a failed run
        logger.warning("Ignoring the unreadable cache %s (%r); it is rebuilt", store, error)
        return None
