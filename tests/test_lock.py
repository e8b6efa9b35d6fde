"""The lock check of `make lint`: the locks match pyproject.toml, and .venv holds the lock."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import tomllib

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lock.py"
spec = importlib.util.spec_from_file_location("lock", SCRIPT)
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)

PYPROJECT = tomllib.loads(lock.PYPROJECT.read_text(encoding="utf-8"))


def test_the_committed_locks_match_pyproject():
    assert lock.check_locks(PYPROJECT) == []


def test_the_locks_pin_what_the_tests_need():
    _, dev = lock.read_lock(lock.ROOT / "pylock.toml")
    _, airflow = lock.read_lock(lock.ROOT / "pylock.airflow.toml")
    assert {"torch", "scikit-learn", "pytest", "setuptools"} <= set(dev)
    assert airflow["apache-airflow"] == "3.3.2" and "pytest" not in airflow
    # One resolution per environment, but the project's own requirements agree across both.
    assert dev["torch"] == airflow["torch"] and dev["numpy"] == airflow["numpy"]


def test_a_changed_range_is_found():
    changed = copy.deepcopy(PYPROJECT)
    dependencies = changed["project"]["dependencies"]
    position = next(i for i, d in enumerate(dependencies) if d.startswith("numpy"))
    dependencies[position] = "numpy>=99"
    problems = lock.check_locks(changed)
    for name in lock.LOCKS:
        assert f"{name}: pyproject.toml requires 'numpy>=99', the lock not" in problems
        assert f"{name}: locked from 'numpy>=1.26', no longer in pyproject.toml" in problems
        assert any(p.startswith(f"{name}: numpy==") and "'numpy>=99'" in p for p in problems)


def test_a_new_dependency_is_found():
    changed = copy.deepcopy(PYPROJECT)
    changed["project"]["optional-dependencies"]["dev"].append("not-a-locked-package>=1")
    problems = lock.check_locks(changed)
    assert "pylock.toml: not-a-locked-package is required but not locked" in problems
    assert not any(p.startswith("pylock.airflow.toml") for p in problems)  # not its extra


def test_a_lock_edited_by_hand_is_found(tmp_path):
    for name in lock.LOCKS:
        text = (lock.ROOT / name).read_text(encoding="utf-8")
        (tmp_path / name).write_text(text.replace("# input: torch>=2.4\n", ""), encoding="utf-8")
    assert "pylock.toml: pyproject.toml requires 'torch>=2.4', the lock not" in (
        lock.check_locks(PYPROJECT, root=tmp_path)
    )
    (tmp_path / "pylock.airflow.toml").unlink()
    assert "pylock.airflow.toml is missing" in lock.check_locks(PYPROJECT, root=tmp_path)


def test_an_environment_is_compared_version_by_version():
    locked = {"numpy": "2.4.6", "torch": "2.14.1"}
    assert lock.environment_differences(locked, {**locked, "pip": "1", lock.PROJECT: "0"}) == []
    assert lock.environment_differences(locked, {"numpy": "2.4.5", "extra": "1.0"}) == [
        "numpy==2.4.5 installed, the lock has 2.4.6",
        "torch is locked but not installed",
        "extra is installed but not locked",
    ]


def test_markers_for_another_platform_are_not_required():
    assert lock.unsatisfied("x", ['pywin32>=1; sys_platform == "win32"'], {}) == []
    assert lock.unsatisfied("x", ["pywin32>=1"], {}) == ["x: pywin32 is required but not locked"]
