"""The project's own Kedro datasets: versioned, atomic, and safe to load."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DatasetError, Version

from transfer_learning.core.files import write_atomically
from transfer_learning.kedro_io.datasets import (
    ArraysDataset,
    MarkdownDataset,
    TableDataset,
    TorchCheckpointDataset,
)


def test_arrays_round_trip_and_versions_never_overwrite(tmp_path):
    path = str(tmp_path / "features.npz")
    first = {
        "features": np.arange(6, dtype=np.float32).reshape(2, 3),
        "split": np.array(["a", "b"]),
    }
    ArraysDataset(path, version=Version(None, "2026-01-01T00.00.00.000Z")).save(first)
    second = {"features": np.zeros((1, 3), dtype=np.float32), "split": np.array(["c"])}
    ArraysDataset(path, version=Version(None, "2026-01-02T00.00.00.000Z")).save(second)

    latest = ArraysDataset(path, version=Version(None, None)).load()
    older = ArraysDataset(path, version=Version("2026-01-01T00.00.00.000Z", None)).load()
    np.testing.assert_array_equal(latest["features"], second["features"])
    np.testing.assert_array_equal(older["features"], first["features"])
    assert older["split"].tolist() == ["a", "b"]
    with pytest.raises(DatasetError):  # a version is written once
        ArraysDataset(path, version=Version(None, "2026-01-02T00.00.00.000Z")).save(first)


def test_arrays_that_need_pickle_are_refused_on_load(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, payload=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DatasetError, match="allow_pickle"):
        ArraysDataset(str(path)).load()


def test_a_failed_write_keeps_the_earlier_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"earlier")

    def broken(stream):
        stream.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(target, broken)
    assert target.read_bytes() == b"earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no partial file left


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    payload = _RunsCode()
    payload.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": payload}, path)
    assert pickle.loads(pickle.dumps(payload)) is None and marker.exists()  # the payload works
    marker.unlink()
    with pytest.raises(DatasetError, match="Weights only load failed"):
        TorchCheckpointDataset(str(path)).load()
    assert not marker.exists()


def test_checkpoints_round_trip(tmp_path):
    data = {"state_dict": {"w": torch.ones(2, 2)}, "n_classes": 3, "backbone_name": "x"}
    dataset = TorchCheckpointDataset(str(tmp_path / "model.pt"))
    dataset.save(data)
    loaded = dataset.load()
    assert loaded["n_classes"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.ones(2, 2))


def test_table_dataset_is_versioned_and_optional_before_the_first_save(tmp_path):
    path = str(tmp_path / "ranking.csv")
    assert TableDataset(path, Version(None, None), missing_ok=True).load() is None
    with pytest.raises(DatasetError):
        TableDataset(path, Version(None, None)).load()
    table = pd.DataFrame({"candidate": ["a@224", "b@160"], "logme": [0.5, -0.1]})
    for save_version in ("2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"):
        TableDataset(path, Version(None, save_version)).save(table.assign(run=save_version))
    latest = TableDataset(path, Version(None, None), missing_ok=True).load()
    pd.testing.assert_frame_equal(latest, table.assign(run="2026-01-02T00.00.00.000Z"))
    assert len(list((tmp_path / "ranking.csv").iterdir())) == 2  # the first one is kept


def test_tables_and_reports_preview_in_kedro_viz(tmp_path):
    """kedro-viz shows a table's first rows (empty cells as null) and a Markdown report rendered,
    with any HTML from the user's data (class or folder names) escaped."""
    table = TableDataset(str(tmp_path / "t.csv"), version=Version(None, "v1"))
    table.save(pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg"], "score": [0.5, None, 1.0]}))
    preview = TableDataset(str(tmp_path / "t.csv"), version=Version(None, None)).preview(nrows=2)
    assert preview == {
        "index": [0, 1],
        "columns": ["path", "score"],
        "data": [["a.jpg", 0.5], ["b.jpg", None]],
    }
    report = MarkdownDataset(filepath=str(tmp_path / "r.md"))
    report.save("# Comparison\n\n| class | n |\n|---|---|\n| <img src=x onerror=alert(1)> | 3 |\n")
    html = report.preview()
    assert "<h1>Comparison</h1>" in html and "<table>" in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
