"""The README's `kedro run` (no arguments: the digits, all three strategies and the comparison),
timed wall-clock in a fresh copy of the project, with the subprocesses it starts counted.

Baseline in the same run: the same command on the project as it was at `--baseline REV` (a git
revision), so a change's effect is measured side by side on the same machine, minutes apart.
MLflow's requirement inference (a subprocess that imports torch for every saved model) shows up
as `mlflow.utils._capture_modules` subprocesses.

    python benchmarks/default_run.py --baseline dcc845f

With a baseline it also compares the two runs' test metrics (every `<strategy>_metrics.json`
value but the timings): a change that should not alter behaviour must leave them identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("conf", "src", "pyproject.toml", ".telemetry")
# Imported by every Python process of the run: logs each subprocess it starts.
AUDIT_HOOK = """
import os, sys
def _log_subprocess(event, args):
    if event == "subprocess.Popen":
        with open(os.environ["SUBPROCESS_LOG"], "a") as log:
            log.write(" ".join(map(str, args[1]))[:300].replace("\\n", " ") + "\\n")
sys.addaudithook(_log_subprocess)
"""


def project_copy(target: Path, revision: str | None) -> Path:
    """The project's code and configuration (at `revision`, or as it is now) in `target`."""
    target.mkdir(parents=True)
    if revision:
        archive = subprocess.run(
            ["git", "archive", revision, *PROJECT_FILES], cwd=PROJECT, capture_output=True,
            check=True,
        )  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    else:
        for name in PROJECT_FILES:
            source = PROJECT / name
            if source.is_dir():
                ignore = shutil.ignore_patterns("local", "__pycache__", "*.egg-info")
                shutil.copytree(source, target / name, ignore=ignore)
            else:
                shutil.copy(source, target / name)
    (target / "conf" / "local").mkdir(exist_ok=True)
    return target


def timed_run(project: Path, hooks: Path) -> dict[str, float]:
    log = project / "subprocesses.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        KEDRO_DISABLE_TELEMETRY="true",
        SUBPROCESS_LOG=str(log),
        # This copy's code, not the installed project's; the hook in every process.
        PYTHONPATH=os.pathsep.join([str(project / "src"), str(hooks)]),
    )
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "kedro", "run"], cwd=project, env=env, capture_output=True,
        text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(completed.stdout[-3000:] + completed.stderr[-3000:])
    started = log.read_text().splitlines() if log.exists() else []
    return {
        "seconds": seconds,
        "subprocesses": len(started),
        "requirement_inference": sum("_capture_modules" in line for line in started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git revision to compare with (e.g. HEAD~3)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        hooks = Path(scratch) / "hooks"
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(AUDIT_HOOK)
        versions = ([args.baseline] if args.baseline else []) + [None]
        metrics: dict[str, dict] = {}
        print("| project | run | wall (s) | subprocesses | of them MLflow requirement inference |")
        print("|---|---|---|---|---|")
        for repeat in range(args.repeats):
            for revision in versions:
                name = revision or "working tree"
                copy = project_copy(Path(scratch) / f"{repeat}-{name}", revision)
                result = timed_run(copy, hooks)
                print(
                    f"| {name} | {repeat + 1} | {result['seconds']:.1f} | "
                    f"{result['subprocesses']} | {result['requirement_inference']} |",
                    flush=True,
                )
                metrics[name] = run_metrics(copy)
        if args.baseline:
            differences = metric_differences(metrics[args.baseline], metrics["working tree"])
            print(f"\nTest metrics of {args.baseline} and the working tree: ", end="")
            print("identical" if not differences else "DIFFERENT\n" + "\n".join(differences))


# Values that measure the run, not the model: they differ between any two runs.
TIMING_KEYS = ("fit_seconds", "seconds", "images_per_second")


def run_metrics(project: Path) -> dict[str, dict]:
    """Every strategy's metrics file of the run in `project`, timings left out."""
    reports = project / "data" / "08_reporting"
    return {
        path.name: {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING_KEYS}
        for path in sorted(reports.glob("*_metrics.json"))
    }


def metric_differences(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    differences = [f"{name}: only in one run" for name in sorted(set(before) ^ set(after))]
    for name in sorted(set(before) & set(after)):
        for key in sorted(set(before[name]) | set(after[name])):
            if before[name].get(key) != after[name].get(key):
                differences.append(
                    f"{name} {key}: {before[name].get(key)} → {after[name].get(key)}"
                )
    return differences


if __name__ == "__main__":
    main()
