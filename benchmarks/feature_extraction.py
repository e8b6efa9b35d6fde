"""Feature-extraction throughput: the project's extractor, by each engine, against a naive loop
and the compute bound.

    python benchmarks/feature_extraction.py --data data/01_raw/cifar10_jpeg/test --image-size 64 --limit 10000
    python benchmarks/feature_extraction.py --data data/01_raw/flowers/train --image-size 64 128 224 --limit 1000

(a) project: transfer_learning.features.extraction.extract_features (cache off), end to end from
             files, once per `extraction.engine` (--engines; default torch and onnxruntime);
(b) naive:   torchvision ImageFolder + PIL transforms, DataLoader(num_workers=2), fp32 NCHW, batch 64;
(c) bound:   forward passes of the same network on batches already in memory. PyTorch: the best
             of both layouts and, on CPU, of one stream on all cores or one single-threaded stream
             per core. ONNX Runtime (the project's checked export, normalisation included, uint8
             input): the better of one session on all cores' intra-op threads or one
             single-threaded session run from one thread per core (what the extractor does).
This machine's speed drifts by ±15 % from minute to minute (a shared VM), so the engines and
bounds run interleaved for --rounds rounds and the medians are compared.
The last lines read, per image size and engine: project X img/s | bound Y img/s | project/bound,
and the default engine's speed over PyTorch's.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from transfer_learning.core.runtime import autocast_dtype, resolve_device, usable_cores
from transfer_learning.data.loading import uint8_input
from transfer_learning.features.extraction import ExtractionSettings, extract_features
from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.models.onnx_network import ONNXRUNTIME, TORCH, onnx_forward, resolve_engine


def image_files(root: str, limit: int) -> tuple[datasets.ImageFolder, list[int]]:
    folder = datasets.ImageFolder(root)
    # The first `limit` images across classes, in a fixed interleaved order (every class present).
    by_class: dict[int, list[int]] = {}
    for position, (_, label) in enumerate(folder.samples):
        by_class.setdefault(label, []).append(position)
    interleaved = [p for group in zip(*by_class.values(), strict=False) for p in group]
    return folder, interleaved[:limit]


def project(
    backbone, files: list[str], batch_size: int, device: torch.device, engine: str, cache: str
) -> float:
    """End to end from files, features not cached (the export is: it is made once per network)."""
    settings = ExtractionSettings(
        batch_size=batch_size, cache_dir=cache, progress=False, engine=engine
    )
    start = time.perf_counter()
    result = extract_features(backbone, files, settings, device)
    for leftover in Path(cache).glob("*.npy"):  # the next round computes them again
        leftover.unlink()
    assert result.engine == engine, f"{engine} fell back to {result.engine}"
    return len(files) / (time.perf_counter() - start)


def naive(backbone, folder, positions: list[int], device: torch.device) -> float:
    p = backbone.preprocessing
    folder.transform = transforms.Compose(
        [
            transforms.Resize(p.image_size),
            transforms.CenterCrop(p.image_size),
            transforms.ToTensor(),
            transforms.Normalize(p.mean, p.std),
        ]
    )
    loader = DataLoader(Subset(folder, positions), batch_size=64, num_workers=2)
    network = backbone.features.to(device).to(memory_format=torch.contiguous_format).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for images, _ in loader:
            network(images.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(positions) / (time.perf_counter() - start)


def _forward_rate(
    network, batch, seconds: float, device: torch.device, dtype, _stream: int = 0
) -> float:
    """Images/s through `network` over `seconds`, one batch after another, in the calling
    thread; the warm-up batches before are not timed (at 224 px they take seconds)."""
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
    ):
        for _ in range(3):
            network(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            network(batch)
            done += len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def bound(backbone, batch_size: int, device: torch.device, seconds: float = 10.0) -> float:
    """Best compute-only rate over layouts and, on CPU, over how the cores are used: one stream
    on every core, or one single-threaded stream per core (what the project's extractor does;
    the streams run at once, so their rates add up)."""
    size = backbone.preprocessing.image_size
    dtype = autocast_dtype(device)
    cores = torch.get_num_threads()
    best = 0.0
    for layout in (torch.channels_last, torch.contiguous_format):
        network = backbone.features.to(device).to(memory_format=layout).eval()
        batch = torch.randn(batch_size, 3, size, size, device=device).contiguous(
            memory_format=layout
        )
        best = max(best, _forward_rate(network, batch, seconds, device, dtype))
        if device.type == "cpu" and cores > 1:
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(cores) as pool:
                    stream = partial(_forward_rate, network, batch, seconds, device, dtype)
                    best = max(best, sum(pool.map(stream, range(cores))))
            finally:
                torch.set_num_threads(cores)
    return best


def onnx_bound(backbone, batch_size: int, cache: str, seconds: float = 10.0) -> float:
    """Compute-only rate of the project's ONNX export: one session on every core, or one
    single-threaded session called from one thread per core (rates add up); the better."""
    size = backbone.preprocessing.image_size
    network = uint8_input(backbone.features, backbone.preprocessing)
    batch = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    cores = usable_cores()
    best = 0.0
    for threads, streams in ((cores, 1), (1, cores)):
        forward = onnx_forward(network, size, Path(cache) / "onnx", backbone.name, threads)

        def rate(_stream: int, forward=forward) -> float:
            for _ in range(2):
                forward(batch)
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                forward(batch)
                done += batch_size
            return done / (time.perf_counter() - start)

        with ThreadPoolExecutor(streams) as pool:
            measured = sum(pool.map(rate, range(streams)))
        print(
            f"  onnxruntime bound, {threads} thread(s) x {streams} stream(s): {measured:.0f} img/s"
        )
        best = max(best, measured)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", required=True, help="an image folder (one sub-folder per class)")
    parser.add_argument("--image-size", type=int, nargs="+", default=[64])
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="project batch (default: 64 on CPU, 512 on GPU)",
    )
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=[TORCH, ONNXRUNTIME])
    parser.add_argument("--no-naive", action="store_true", help="skip the naive loop")
    args = parser.parse_args()

    device = resolve_device(args.device)
    batch_size = args.batch_size or (512 if device.type == "cuda" else 64)
    if device.type == "cpu":
        torch.set_num_threads(usable_cores())
    folder, positions = image_files(args.data, args.limit)
    files = [folder.samples[p][0] for p in positions]
    card = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"{args.backbone}, {len(files)} images from {args.data}, device {device} ({card}), "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    summary = []
    with tempfile.TemporaryDirectory(prefix="extraction-benchmark-") as cache:
        for size in args.image_size:
            summary += measure_size(args, size, files, folder, positions, batch_size, device, cache)
    print("\n".join(summary))


def measure_size(args, size, files, folder, positions, batch_size, device, cache) -> list[str]:  # noqa: PLR0913
    backbone = build_backbone(BackboneSettings(name=args.backbone, image_size=size))
    pixels = len(files) * size**2
    default = resolve_engine("auto", device, pixels)
    print(f"\n@ {size}px (extraction.engine=auto resolves to {default} here)")
    for engine in args.engines:  # warm-up, and the one-time ONNX export
        project(
            backbone, files[: min(len(files), 4 * batch_size)], batch_size, device, engine, cache
        )
    rates: dict[str, list[float]] = {engine: [] for engine in args.engines}
    bounds: dict[str, list[float]] = {engine: [] for engine in args.engines}
    for round_ in range(args.rounds):
        for engine in args.engines:
            rates[engine].append(project(backbone, files, batch_size, device, engine, cache))
            bounds[engine].append(
                onnx_bound(backbone, batch_size, cache)
                if engine == ONNXRUNTIME
                else bound(backbone, batch_size, device)
            )
            print(
                f"round {round_ + 1}: {engine} project {rates[engine][-1]:.0f} img/s, "
                f"bound {bounds[engine][-1]:.0f} img/s",
                flush=True,
            )
    lines = []
    if not args.no_naive:
        naive_rate = naive(backbone, folder, positions, device)
        lines.append(f"@{size}px naive: {naive_rate:.0f} img/s")
    for engine in args.engines:
        rate, ceiling = statistics.median(rates[engine]), statistics.median(bounds[engine])
        lines.append(
            f"@{size}px {engine}: project {rate:.0f} img/s | bound {ceiling:.0f} img/s "
            f"| project/bound {rate / ceiling:.2f}"
        )
    if TORCH in rates and default in rates:
        speedup = statistics.median(rates[default]) / statistics.median(rates[TORCH])
        lines.append(f"@{size}px default engine ({default}) / torch: {speedup:.2f}x")
    return lines


if __name__ == "__main__":
    main()
