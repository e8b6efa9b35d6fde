"""The served image model under concurrent load and abuse: `mlflow models serve` on localhost.

    python benchmarks/serving_load.py --clients 8 --requests 200 --image-size 224
    (--engines torch onnxruntime: the default; each engine serves the same load in turn)

A packaged ImageClassifier (EfficientNet-Lite0, ImageNet weights, a 5-class head) is saved and
served by a real `mlflow models serve` (one worker). `--clients` threads each send `--requests`
requests, drawn with a fixed seed: 70 % one photo, 10 % a batch of 32 photos, 20 % a batch with
one good photo among hostile rows (bad base64, text bytes, an oversized image, a server path, a
row without an image). Every good row must come back with a class and no error; every hostile
row with its error code. Reported: p50/p95/p99 latency per request kind, throughput, failed good
rows, and the server's resident memory (its whole process group) averaged over the first and the
last quarter of the run. Baseline in the same run: the same model's `predict` on one photo in
this process (no HTTP, no JSON).
The model is served once per engine (`TRANSFER_LEARNING_ENGINE`: torch, then onnxruntime, the
packaged `model.onnx`), the same requests each time. Per engine the report ends: single p95: X ms |
in-process: Y ms | good rows failed: N of M | memory first/last quarter: A / B MiB; the last line
compares the engines' good images/s.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_sample_images

from transfer_learning.models.backbones import BackboneSettings
from transfer_learning.models.classifier import build_classifier
from transfer_learning.models.onnx_network import ONNXRUNTIME, TORCH
from transfer_learning.serving.classifier import (
    ENGINE_VARIABLE,
    MAX_PIXELS_VARIABLE,
    ImageClassifier,
)
from transfer_learning.serving.packaging import save_image_model

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
SERVER_MAX_PIXELS = 4_000_000


def jpeg(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def photos(count: int, rng: random.Random) -> list[str]:
    """Phone-sized crops (640 x 480 at most) of the two bundled photos, JPEG, base64."""
    sources = [Image.fromarray(pixels) for pixels in load_sample_images().images]
    crops = []
    for _ in range(count):
        source = rng.choice(sources)
        left, top = rng.randrange(0, 100), rng.randrange(0, 100)
        crops.append(jpeg(source.crop((left, top, left + 320, top + 240)).resize((640, 480))))
    return crops


def hostile_rows() -> list[dict]:
    oversized = jpeg(Image.new("RGB", (2600, 2000), (90, 120, 30)))  # 5.2 MP > the limit
    return [
        {"image": "%%% not base64 %%%"},
        {"image": base64.b64encode(b"just some text, not a picture").decode()},
        {"image": oversized},
        {"path": "/etc/passwd"},
        {"image": None},
    ]


HOSTILE_CODES = ["bad_base64", "not_an_image", "too_large", "path_not_allowed", "missing_input"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir: Path, log: Path, engine: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env[MAX_PIXELS_VARIABLE] = str(SERVER_MAX_PIXELS)
    env[ENGINE_VARIABLE] = engine
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir)]
    process = subprocess.Popen(
        [*command, "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "-w", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115 (closed with the process)
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                if answer.status == 200:
                    return process, url
        except (urllib.error.URLError, ConnectionError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start:\n" + log.read_text()[-3000:])
        time.sleep(1)


def group_rss_mib(group: int) -> float:
    """Resident memory of every process in process group `group` (the server and its workers)."""
    total_kib = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != group:  # field 5 of /proc/<pid>/stat: the process group
                continue
            status = (entry / "status").read_text()
            total_kib += int(status.split("VmRSS:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return total_kib / 1024


class MemorySampler(threading.Thread):
    def __init__(self, group: int, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.group, self.every = group, every
        self.samples: list[tuple[float, float]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append((time.monotonic(), group_rss_mib(self.group)))
            time.sleep(self.every)


def post(url: str, rows: list[dict]) -> tuple[float, list[dict] | None]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps({"dataframe_records": rows}).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            predictions = json.loads(answer.read())["predictions"]
    except (urllib.error.URLError, ConnectionError, ValueError):
        predictions = None
    return time.perf_counter() - started, predictions


def plan(clients: int, requests: int, pool: list[str], seed: int) -> list[list[tuple[str, list]]]:
    """Each client's requests: (kind, rows, expected error codes); drawn with a fixed seed."""
    rng = random.Random(seed)
    hostile = hostile_rows()
    work = []
    for _ in range(clients):
        mine = []
        for _ in range(requests):
            draw = rng.random()
            if draw < 0.7:
                mine.append(("single", [{"image": rng.choice(pool)}], [""]))
            elif draw < 0.8:
                mine.append(
                    ("batch32", [{"image": rng.choice(pool)} for _ in range(32)], [""] * 32)
                )
            else:
                bad = rng.sample(range(len(hostile)), 3)
                rows = [{"image": rng.choice(pool)}] + [hostile[i] for i in bad]
                mine.append(("hostile", rows, [""] + [HOSTILE_CODES[i] for i in bad]))
        work.append(mine)
    return work


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def save_model(folder: Path, image_size: int) -> Path:
    settings = BackboneSettings(image_size=image_size)
    network, _ = build_classifier(settings, len(CLASSES), seed=0)
    model = ImageClassifier(
        "parameter_transfer", CLASSES, settings.name, image_size, network.state_dict()
    )
    save_image_model(model, folder / "model")
    return folder / "model"


def in_process_seconds(model_dir: Path, image: str, engine: str) -> float:
    """The baseline: the same model's predict on one photo, in this process."""
    os.environ[ENGINE_VARIABLE] = engine  # read when the model builds its network
    local = mlflow.pyfunc.load_model(str(model_dir))
    frame = pd.DataFrame([{"image": image}])
    local.predict(frame)
    return statistics.median(_time(lambda: local.predict(frame)) for _ in range(20))


def run_load(url: str, work: list[list[tuple[str, list, list]]]) -> tuple[list, float]:
    """Every client's requests, concurrently. Rows of the results: kind, seconds, good rows,
    good rows failed, hostile rows answered with another code than theirs."""
    results: list[tuple[str, float, int, int, int]] = []
    lock = threading.Lock()

    def client(requests: list) -> None:
        for kind, rows, expected in requests:
            seconds, predictions = post(url, rows)
            good = expected.count("")
            if predictions is None:  # no answer at all: every row of it failed
                failed, miscoded = good, len(expected) - good
            else:
                pairs = list(zip(predictions, expected, strict=True))
                failed = sum(
                    1
                    for p, code in pairs
                    if code == "" and (p["error"] != "" or p["predicted_class"] not in CLASSES)
                )
                miscoded = sum(1 for p, code in pairs if code != "" and p["error"] != code)
            with lock:
                results.append((kind, seconds, good, failed, miscoded))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(work)) as clients:
        list(clients.map(client, work))
    return results, time.perf_counter() - started


def report(results: list, wall: float, memory: list[float], in_process: float) -> float:
    """Prints the engine's figures; returns its good images/s."""
    for kind in ("single", "batch32", "hostile"):
        times = [seconds for k, seconds, *_ in results if k == kind]
        print(
            f"{kind:8s} {len(times):5d} requests: p50 {percentile(times, 50):7.1f} ms, "
            f"p95 {percentile(times, 95):7.1f} ms, p99 {percentile(times, 99):7.1f} ms"
        )
    good_rows = sum(row[2] for row in results)
    failed_rows = sum(row[3] for row in results)
    miscoded_rows = sum(row[4] for row in results)
    images = sum(32 if row[0] == "batch32" else 1 for row in results)
    quarter = max(1, len(memory) // 4)
    first, last = statistics.mean(memory[:quarter]), statistics.mean(memory[-quarter:])
    single = [seconds for k, seconds, *_ in results if k == "single"]
    print(
        f"{len(results)} requests ({images} good images) in {wall:.1f} s: "
        f"{len(results) / wall:.1f} requests/s, {images / wall:.1f} good images/s; "
        f"hostile rows answered with another code: {miscoded_rows}"
    )
    print(
        f"single p95: {percentile(single, 95):.0f} ms | in-process: {in_process * 1000:.0f} ms | "
        f"good rows failed: {failed_rows} of {good_rows} | memory first/last quarter: "
        f"{first:.0f} / {last:.0f} MiB (peak {max(memory):.0f})"
    )
    return images / wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", nargs="+", default=[TORCH, ONNXRUNTIME])
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", flush=True)

    folder = Path(tempfile.mkdtemp(prefix="serving-load-"))
    model_dir = save_model(folder, args.image_size)
    pool = photos(64, random.Random(args.seed))
    rates = {}
    for engine in args.engines:
        print(f"\n{ENGINE_VARIABLE}={engine}", flush=True)
        in_process = in_process_seconds(model_dir, pool[0], engine)
        process, url = start_server(model_dir, folder / f"server-{engine}.log", engine)
        sampler = MemorySampler(process.pid)
        try:
            sampler.start()
            results, wall = run_load(url, plan(args.clients, args.requests, pool, args.seed))
            sampler.stopped.set()
            sampler.join()
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
        rates[engine] = report(results, wall, [rss for _, rss in sampler.samples], in_process)
    if TORCH in rates and ONNXRUNTIME in rates:
        print(
            f"good images/s: torch {rates[TORCH]:.1f} | onnxruntime {rates[ONNXRUNTIME]:.1f} | "
            f"onnxruntime/torch {rates[ONNXRUNTIME] / rates[TORCH]:.2f}x"
        )


def _time(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
