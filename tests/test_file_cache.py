"""Per-file facts reused between runs while a file is unchanged (path, size, mtime, ctime)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_image
from transfer_learning.core.file_cache import cached_file_facts
from transfer_learning.data.duplicates import image_hashes
from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings


class CountingSize:
    """A fact per file (its first byte and length), counting which files it was asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, locations: list[str]) -> dict[str, np.ndarray]:
        self.asked += locations
        data = [Path(location).read_bytes() for location in locations]
        return {
            "first": np.array([d[:1].hex() for d in data]),
            "length": np.array([len(d) for d in data]),
        }


@pytest.fixture
def files(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    return [str(write_image(tmp_path / "images" / f"{i}.png", rng)) for i in range(5)]


def test_unchanged_files_are_not_read_again_and_changed_ones_are(files, tmp_path):
    cache = tmp_path / "cache"
    first = CountingSize()
    stored = cached_file_facts("sizes", files, first, cache)
    assert first.asked == files and len(list(cache.iterdir())) == 1

    again = CountingSize()
    reused = cached_file_facts("sizes", files, again, cache)
    assert again.asked == []
    for name in ("first", "length"):
        np.testing.assert_array_equal(reused[name], stored[name])

    Path(files[2]).write_bytes(b"\x01" + b"longer than it was" * 100)
    changed = CountingSize()
    facts = cached_file_facts("sizes", files, changed, cache)
    assert changed.asked == [files[2]]
    assert facts["length"][2] == 1801 and facts["first"][2] == "01"
    np.testing.assert_array_equal(np.delete(facts["length"], 2), np.delete(stored["length"], 2))


def test_a_chmod_or_a_new_file_is_a_miss_and_removed_files_leave_the_store(files, tmp_path):
    cache = tmp_path / "cache"
    cached_file_facts("sizes", files, CountingSize(), cache)
    os.chmod(files[0], 0o600)  # same bytes and mtime, new ctime: permissions may have changed
    rng = np.random.default_rng(1)
    added = str(write_image(Path(files[0]).parent / "new.png", rng))
    counted = CountingSize()
    cached_file_facts("sizes", [*files[:3], added], counted, cache)
    assert counted.asked == [files[0], added]
    (store,) = cache.iterdir()
    assert sorted(np.load(store)["location"].tolist()) == sorted([*files[:3], added])


def test_a_damaged_store_is_rebuilt_and_other_kinds_are_kept_apart(files, tmp_path):
    cache = tmp_path / "cache"
    cached_file_facts("sizes", files, CountingSize(), cache)
    (store,) = cache.iterdir()
    store.write_bytes(b"not an npz")
    counted = CountingSize()
    facts = cached_file_facts("sizes", files, counted, cache)
    assert counted.asked == files and len(facts["length"]) == 5
    other = CountingSize()
    cached_file_facts("other", files, other, cache)
    assert other.asked == files and len(list(cache.iterdir())) == 2


def test_no_cache_dir_or_no_files_always_computes(files):
    counted = CountingSize()
    cached_file_facts("sizes", files, counted, None)
    cached_file_facts("sizes", files, counted, None)
    assert counted.asked == files + files


def test_cached_hashes_equal_freshly_computed_ones(files, tmp_path):
    fresh = image_hashes(files)
    cache = str(tmp_path / "cache")
    image_hashes(files, cache)
    reused = image_hashes(files, cache)
    assert reused.content == fresh.content
    np.testing.assert_array_equal(reused.perceptual, fresh.perceptual)
    np.testing.assert_array_equal(reused.grey, fresh.grey)
    np.testing.assert_array_equal(reused.comparable, fresh.comparable)


def test_a_truncated_file_replaced_by_a_whole_one_is_indexed_on_the_next_run(tmp_path):
    rng = np.random.default_rng(0)
    for class_name in ("a", "b"):
        for i in range(5):
            write_image(tmp_path / "images" / class_name / f"{i}.png", rng)
    whole = (tmp_path / "images" / "b" / "4.png").read_bytes()
    (tmp_path / "images" / "b" / "4.png").write_bytes(whole[: len(whole) // 2])
    settings = DataSettings.from_params(
        {
            "source": "imagefolder",
            "path": str(tmp_path / "images"),
            "on_corrupt": "skip",
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    _, _, skipped = build_image_index(settings, seed=0)
    assert [Path(p).name for p in skipped["location"]] == ["4.png"]
    (tmp_path / "images" / "b" / "4.png").write_bytes(whole)
    index, _, skipped = build_image_index(settings, seed=0)
    assert skipped.empty and len(index) == 10
