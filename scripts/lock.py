"""The locks of the tested set: one per virtual environment, written by pip, checked by lint.

    python scripts/lock.py write      `make lock`: re-resolve both locks within pyproject's ranges
    python scripts/lock.py check      `make lint`: the locks still match pyproject.toml, and the
                                      running environment holds exactly the lock's versions
    python scripts/lock.py compare    `make test-latest`: how the running environment differs
                                      from pylock.toml (what a `make lock` would change)

`pylock.toml` pins `.venv` (the project's build requirements, `dependencies` and the `dev`
extra); `pylock.airflow.toml` pins Airflow's environment (`dependencies` and the `airflow`
extra). Both are PEP 751 locks that pip itself writes (`pip lock`) and installs (`pip install
-r pylock.toml`, every file checked against its sha256), so pip's own configuration, which
serves PyTorch from this machine's disk, decides what is locked; pip-compile does not apply a
`constraint` from pip's configuration. A lock is for the Linux x86-64 CPython that wrote it.

pip cannot lock an editable project (there is no file to hash), so the locks hold its
requirements, not the project, which `make install` then adds with `--no-deps`. Each lock
begins with the requirements it was resolved from (`# input:` lines), which is how `check`
knows that pyproject.toml has not changed since: an edited range, a new dependency, or a lock
edited by hand all fail it, each with the line to fix.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib.metadata import distributions
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
PROJECT = "transfer-learning"
INSTALLER = "pip"  # pinned by the Makefile, which installs it before it reads a lock
# lock file → the pyproject extras it adds to `dependencies`, and whether the project's build
# requirements join them (for .venv's editable install, which runs without build isolation).
LOCKS = {
    "pylock.toml": (("dev",), True),
    "pylock.airflow.toml": (("airflow",), False),
}
INPUT = "# input: "
HEADER = (
    "# The tested set: written by `make lock` (scripts/lock.py) from pyproject.toml; do not edit.\n"
)


class LockError(RuntimeError):
    """A lock is missing, stale, or the environment differs from it."""


def lock_inputs(pyproject: dict, extras: tuple[str, ...], build: bool) -> list[str]:
    """The requirements a lock is resolved from, in pyproject's order."""
    project = pyproject["project"]
    inputs = list(pyproject["build-system"]["requires"]) if build else []
    inputs += project["dependencies"]
    for extra in extras:
        inputs += project["optional-dependencies"][extra]
    return inputs


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares it (no third-party import: `make lock` runs
    with pip alone)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> tuple[list[str], dict[str, str]]:
    """(its `# input:` lines, locked name → version) of a lock file."""
    text = path.read_text(encoding="utf-8")
    inputs = [line[len(INPUT) :] for line in text.splitlines() if line.startswith(INPUT)]
    packages = tomllib.loads(text).get("packages", [])
    return inputs, {canonical(p["name"]): p["version"] for p in packages}


def stale_inputs(name: str, wanted: list[str], recorded: list[str]) -> list[str]:
    """What differs between pyproject's requirements and those a lock was resolved from."""
    added = [f"{name}: pyproject.toml requires {r!r}, the lock not" for r in wanted]
    removed = [f"{name}: locked from {r!r}, no longer in pyproject.toml" for r in recorded]
    return [p for p, r in zip(added, wanted, strict=True) if r not in recorded] + [
        p for p, r in zip(removed, recorded, strict=True) if r not in wanted
    ]


def unsatisfied(name: str, wanted: list[str], locked: dict[str, str]) -> list[str]:
    """The requirements (for this interpreter) that the lock's versions do not meet."""
    from packaging.requirements import Requirement

    problems = []
    for line in wanted:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        version = locked.get(canonical(requirement.name))
        if version is None:
            problems.append(f"{name}: {requirement.name} is required but not locked")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{name}: {requirement.name}=={version} does not meet {line!r}")
    return problems


def check_locks(pyproject: dict, root: Path = ROOT) -> list[str]:
    """Every way the locks under `root` disagree with `pyproject` (empty: they match)."""
    problems = []
    for name, (extras, build) in LOCKS.items():
        path = root / name
        if not path.exists():
            problems.append(f"{name} is missing")
            continue
        wanted = lock_inputs(pyproject, extras, build)
        recorded, locked = read_lock(path)
        problems += stale_inputs(name, wanted, recorded)
        problems += unsatisfied(name, wanted, locked)
    return problems


def environment_differences(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """How an environment differs from a lock (the project and pip are not locked)."""
    installed = {k: v for k, v in installed.items() if k not in (PROJECT, INSTALLER)}
    problems = [
        f"{name}=={version} installed, the lock has {locked[name]}"
        for name, version in sorted(installed.items())
        if name in locked and locked[name] != version
    ]
    problems += [f"{n} is locked but not installed" for n in sorted(set(locked) - set(installed))]
    problems += [f"{n} is installed but not locked" for n in sorted(set(installed) - set(locked))]
    return problems


def installed_versions() -> dict[str, str]:
    """name → version of every distribution this interpreter sees."""
    return {canonical(d.metadata["Name"]): d.version for d in distributions()}


def write_lock(name: str, inputs: list[str], root: Path = ROOT) -> None:
    """Resolve `inputs` with this interpreter's pip and write the lock, inputs first."""
    with tempfile.TemporaryDirectory() as scratch:
        requirements = Path(scratch) / "requirements.in"
        requirements.write_text("\n".join(inputs) + "\n", encoding="utf-8")
        output = Path(scratch) / "pylock.toml"
        subprocess.run(
            [sys.executable, "-m", "pip", "lock", "--quiet", "-r", str(requirements)]
            + ["-o", str(output)],
            check=True,
        )
        lines = "".join(f"{INPUT}{line}\n" for line in inputs)
        # Written beside and renamed: an interrupted `make lock` leaves the old lock whole.
        partial = root / f".{name}.partial"
        partial.write_text(HEADER + lines + output.read_text(encoding="utf-8"), encoding="utf-8")
        partial.replace(root / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("write", "check", "compare"))
    args = parser.parse_args(argv)
    pyproject = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    if args.command == "write":
        for name, (extras, build) in LOCKS.items():
            write_lock(name, lock_inputs(pyproject, extras, build))
            print(f"wrote {name}")
        return 0
    if args.command == "compare":
        _, locked = read_lock(ROOT / "pylock.toml")
        differences = environment_differences(locked, installed_versions())
        print("This environment against pylock.toml:\n  " + "\n  ".join(differences or ["same"]))
        return 0
    problems = check_locks(pyproject)
    if not problems:
        _, locked = read_lock(ROOT / "pylock.toml")
        problems = [f".venv: {p}" for p in environment_differences(locked, installed_versions())]
    if problems:
        print("The locks do not match:\n  " + "\n  ".join(problems), file=sys.stderr)
        print(
            "Run `make lock` after changing pyproject.toml's requirements (it is the only way a "
            "lock changes), then `make install`.",
            file=sys.stderr,
        )
        return 1
    print("pylock.toml and pylock.airflow.toml match pyproject.toml; .venv holds pylock.toml.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
