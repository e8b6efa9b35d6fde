"""What every MLflow run records of itself: the data's name and source, the git commit."""

from __future__ import annotations

import subprocess

import pytest
from kedro.io import DataCatalog, MemoryDataset

from transfer_learning.kedro_io.run_metadata import git_commit, image_sources


def catalog(**blocks) -> DataCatalog:
    return DataCatalog({f"params:{name}": MemoryDataset(block) for name, block in blocks.items()})


def test_each_image_table_is_named_after_its_folder_manifest_or_dataset(tmp_path):
    photos, target, new = (tmp_path / name for name in ("site_a", "site_b", "new"))
    sources = image_sources(
        catalog(
            data={"source": "imagefolder", "path": str(photos), "target_path": str(target)},
            predict={"path": str(new)},
        )
    )
    assert sources == {
        "image_index": ("site_a", str(photos)),
        "target_index": ("site_b", str(target)),
        "images_to_label": ("new", str(new)),
    }
    manifest = image_sources(catalog(data={"source": "manifest", "manifest": "labels/pets.csv"}))
    assert manifest["image_index"][0] == "pets"
    named = image_sources(catalog(data={"source": "torchvision", "name": "CIFAR10"}))
    assert named == {"image_index": ("CIFAR10", "torchvision.datasets.CIFAR10")}
    # Bad `data` is the pipeline's own first node's to report; no `predict.path`, no predict set.
    assert image_sources(catalog(data={"source": "kaggle"}, predict={"path": None})) == {}
    assert image_sources(DataCatalog()) == {}


def test_the_git_commit_of_a_checkout_and_none_elsewhere(tmp_path):
    assert git_commit(tmp_path) is None and git_commit(None) is None
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    try:
        subprocess.run([*git, "init", "-q"], check=True)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    (tmp_path / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_commit(tmp_path) == head.strip() and len(head.strip()) == 40
