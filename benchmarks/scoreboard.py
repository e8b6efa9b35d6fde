"""Every strategy with default settings on real data sets, next to published or measured anchors.

    python benchmarks/scoreboard.py --flowers data/01_raw/flowers --cifar10 data/01_raw/cifar10_jpeg \
        --output docs/scoreboard.md

Each data set is one `kedro run` (every strategy and the comparison) in a fresh copy of the
project, with no parameter but data.source / data.path: every other value is the default, `auto`
included. Subsets are folders of symbolic links made here:
- flowers 2-class: daisy vs dandelion, the first 150 training photos of each (120 train + 30 val
  after the default 20 % val draw), tested on all 307 test photos of the two classes; the
  stand-in for the "two classes, a few hundred photos" case (the PyTorch tutorial's ants/bees
  set cannot be downloaded here).
- flowers 20/class: the first 25 training photos per class (20 train + 5 val), the full test/.
- CIFAR-10 100/class: the first 125 training images per class (100 train + 25 val), the full
  10,000-image test/.
Rows are written to --output as they finish, so a long run leaves every finished row behind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
# Published anchors (PyTorch transfer-learning tutorial, ants/bees, ResNet-18) and the issue's.
ANCHORS = {
    "digits": "before the `auto` defaults: 92.8 / 95.8 / 96.4 %",
    "flowers 2-class": "tutorial (ants/bees): 94.8 % fixed features, 93.5 % fine-tuned; targets ≥ 95.5 / ≥ 95 %",
    "flowers 20/class": "no published anchor",
    "flowers": "issue 29: feature_transfer ≥ 94 %, parameter_transfer ≥ 96 %, ensemble ≥ both, ECE ≤ 0.03, run ≤ 60 min",
    "CIFAR-10 100/class": "linear probe of this project at 128 px, 100/class: 73.4 %",
}


def subset(source: Path, target: Path, per_class: int, classes: list[str] | None = None) -> Path:
    """train/<class>/ with the first `per_class` files of each class, and all of test/."""
    for split in ("train", "test"):
        for folder in sorted((source / split).iterdir()):
            if classes and folder.name not in classes:
                continue
            files = sorted(folder.iterdir())
            (target / split / folder.name).mkdir(parents=True, exist_ok=True)
            for file in files[:per_class] if split == "train" else files:
                (target / split / folder.name / file.name).symlink_to(file.resolve())
    return target


def run_default(data_params: str, workdir: Path) -> tuple[dict[str, dict], dict, str, float]:
    """`kedro run` in a fresh project copy; returns each strategy's metrics, the comparison
    record, the backbone it resolved and the wall time."""
    project = workdir / "project"
    for name in ("conf", "src", "pyproject.toml", ".telemetry"):
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(
                source, project / name, ignore=shutil.ignore_patterns("local", "__pycache__")
            )
        else:
            shutil.copy(source, project / name)
    (project / "conf" / "local").mkdir()
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "kedro", "run", f"--params={data_params}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    (workdir / "run.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise RuntimeError(f"kedro run failed; see {workdir / 'run.log'}")
    reports = project / "data" / "08_reporting"
    record = json.loads((reports / "comparison.json").read_text())
    metrics = {
        s: json.loads((reports / f"{s}_metrics.json").read_text()) for s in record["strategies"]
    }
    with sqlite3.connect(project / "mlflow.db") as tracking:
        resolved = dict(
            tracking.execute("SELECT key, value FROM params WHERE key LIKE 'backbone.resolved.%'")
        )
    backbone = (
        " at ".join(resolved.get(f"backbone.resolved.{key}", "?") for key in ("name", "image_size"))
        + f" px ({resolved.get('backbone.resolved.reason', '?')})"
    )
    return metrics, record, backbone, seconds


def percent(value: float, interval: list[float]) -> str:
    return f"{value * 100:.1f} % [{interval[0] * 100:.1f}, {interval[1] * 100:.1f}]"


def rows(
    name: str, metrics: dict[str, dict], record: dict, backbone: str, seconds: float
) -> list[str]:
    lines = []
    for strategy, m in metrics.items():
        lines.append(
            f"| {name} | {strategy} | {percent(m['accuracy'], m['accuracy_interval'])} "
            f"| {percent(m['balanced_accuracy'], m['balanced_accuracy_interval'])} "
            f"| {m['ece_uncalibrated']:.3f} → {m['ece']:.3f} | {m.get('image_size', '–')} "
            f"| {m['fit_seconds'] / 60:.1f} | {m['n_test']} |"
        )
    lines.append(f"| {name} | *whole `kedro run`* | | | | | {seconds / 60:.1f} | |")
    recommendation = record["recommendation"]
    lines.append(
        f"| {name} | *recommendation* | **{recommendation['strategy']}**: "
        f"{recommendation['reason']} | | | | | |"
    )
    lines.append(f"| {name} | *backbone* | {backbone} | | | | | |")
    lines.append(f"| {name} | *anchor* | {ANCHORS[name]} | | | | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--flowers", type=Path, help="the flowers folder (train/, test/)")
    parser.add_argument("--cifar10", type=Path, help="the CIFAR-10 JPEG folder (train/, test/)")
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    parser.add_argument("--output", type=Path, default=PROJECT / "docs" / "scoreboard.md")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="scoreboard-"))
    sets = {}
    if args.flowers:  # the full flowers first: the targets are on them
        few = subset(args.flowers, scratch / "flowers_20", 25)
        two = subset(args.flowers, scratch / "flowers_2class", 150, ["daisy", "dandelion"])
        sets["flowers"] = f"data.source=imagefolder,data.path={args.flowers.resolve()}"
        sets["flowers 2-class"] = f"data.source=imagefolder,data.path={two}"
        sets["flowers 20/class"] = f"data.source=imagefolder,data.path={few}"
    sets["digits"] = "data.source=digits"
    if args.cifar10:
        cifar = subset(args.cifar10, scratch / "cifar10_100", 125)
        sets["CIFAR-10 100/class"] = f"data.source=imagefolder,data.path={cifar}"
    header = [
        "| data | strategy | accuracy [95 % interval] | balanced accuracy [95 %] | ECE uncalibrated → calibrated | image size (px) | train time (min) | test images |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU"
    lines = [
        f"Machine: {machine}. Command: `python benchmarks/scoreboard.py {' '.join(sys.argv[1:])}`",
        "",
        *header,
    ]
    for name, params in sets.items():
        if args.only and name not in args.only:
            continue
        metrics, record, backbone, seconds = run_default(
            params, Path(tempfile.mkdtemp(dir=scratch))
        )
        lines += rows(name, metrics, record, backbone, seconds)
        print("\n".join(lines[-9:]), flush=True)
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
