"""`kedro run --pipelines=data_ingestion` on an image folder, timed wall-clock in a fresh copy of
the project: indexing with the per-file cache off (the baseline: every file read, as before the
cache), then on for a first run (every file read, the facts stored) and a re-run of the same,
unchanged images (the facts reused).

    python benchmarks/ingestion.py --data data/01_raw/cifar10_jpeg
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from default_run import project_copy


def ingest(project: Path, data: Path, cache: bool) -> float:
    params = f"data.source=imagefolder,data.path={data.resolve()}"
    if not cache:
        params += ",data.cache_dir=null"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(KEDRO_DISABLE_TELEMETRY="true", PYTHONPATH=str(project / "src"))
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--pipelines=data_ingestion", f"--params={params}"],
        cwd=project, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(completed.stdout[-3000:] + completed.stderr[-3000:])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an image folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        project = project_copy(Path(scratch) / "project", None)
        # The first pass also warms the operating system's file cache for all three.
        runs = [
            ("cache off (every file read)", False),
            ("cache on, first run (every file read, facts stored)", True),
            ("cache on, re-run of unchanged images", True),
        ]
        print("| run | wall (s) |\n|---|---|")
        for name, cache in runs:
            print(f"| {name} | {ingest(project, args.data, cache):.1f} |", flush=True)


if __name__ == "__main__":
    main()
