"""Streaming images through a frozen backbone into a feature matrix, fast on CPU and GPU."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from tqdm.auto import tqdm

from transfer_learning.core.config import check_known_keys
from transfer_learning.core.distributed import (
    SINGLE_PROCESS,
    DistributedSettings,
    ProcessContext,
    contiguous_shard,
    launch,
)
from transfer_learning.core.runtime import (
    autocast_dtype,
    cpu_threads,
    resolve_num_workers,
    usable_cores,
)
from transfer_learning.data.images import (
    DIGITS_SCHEME,
    JPEG_MAGIC,
    decode_image_bytes,
    exif_orientation,
)
from transfer_learning.data.loading import EvalCollate, ImageDataset, Normaliser, image_loader
from transfer_learning.models.backbones import Backbone

logger = logging.getLogger(__name__)


class ExtractionError(ValueError):
    """Feature extraction cannot run as configured."""


@dataclass(frozen=True)
class ExtractionSettings:
    """The `extraction` block of parameters_feature_extraction.yml."""

    batch_size: int = 64
    num_workers: int | str = "auto"
    cache_dir: str | None = "data/04_feature/cache"
    progress: bool = True
    decode: str = "auto"  # auto: JPEGs decoded on the GPU when extracting on CUDA; cpu: never

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ExtractionSettings:
        check_known_keys(cls, params, "extraction", ExtractionError)
        settings = cls(**params)
        if not isinstance(settings.batch_size, int) or settings.batch_size < 1:
            raise ExtractionError(f"extraction.batch_size={settings.batch_size!r} must be ≥ 1.")
        if settings.decode not in ("auto", "cpu"):
            raise ExtractionError(f"extraction.decode={settings.decode!r} must be auto or cpu.")
        if settings.num_workers != "auto" and (
            not isinstance(settings.num_workers, int) or settings.num_workers < 0
        ):
            raise ExtractionError(
                f"extraction.num_workers={settings.num_workers!r} must be 'auto' or an integer ≥ 0."
            )
        return settings


# ---- decoding --------------------------------------------------------------------------------


# ---- extraction ------------------------------------------------------------------------------


@dataclass
class ExtractionResult:
    features: np.ndarray  # (n_images, feature_dim) float32
    seconds: float
    cached: bool
    cache_key: str | None


def extract_features(
    backbone: Backbone,
    locations: Sequence[str],
    settings: ExtractionSettings,
    device: torch.device,
    distributed: DistributedSettings = SINGLE_PROCESS,
) -> ExtractionResult:
    """Features of every image in `locations`, in order; reused from the cache when unchanged.

    With `distributed` over several processes, each extracts a contiguous shard straight into
    its rows of one file; the result (and the cache entry) is the same as one process's.
    """
    gpu_decode = device.type == "cuda" and settings.decode != "cpu"
    key = feature_cache_key(backbone, locations, device, gpu_decode) if settings.cache_dir else None
    cache_file = Path(settings.cache_dir) / f"{key}.npy" if key else None
    if cache_file is not None and cache_file.exists():
        features = np.load(cache_file, mmap_mode="r", allow_pickle=False)
        logger.info("Features unchanged since an earlier run: reusing %s", cache_file)
        return ExtractionResult(features, 0.0, True, key)
    if distributed.nnodes > 1 and cache_file is None:
        raise ExtractionError(
            "distributed.nnodes > 1 needs extraction.cache_dir on a file system every node "
            "shares: the nodes write their shards of the features there."
        )

    shape = (len(locations), backbone.feature_dim)
    with _output_file(cache_file, distributed) as partial:
        if partial is None:  # one process, no cache: straight into memory
            target: np.ndarray | Path = np.empty(shape, dtype=np.float32)
        else:
            # On disk, written in chunks (RAM does not grow with the number of images); each
            # process writes its rows through its own map of the file.
            np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape).flush()
            target = partial
        start = time.perf_counter()
        launch(distributed, device, _extract_shard, backbone, list(locations), settings, target)
        seconds = time.perf_counter() - start
        if partial is None:
            return ExtractionResult(target, seconds, False, key)
        if cache_file is None:
            return ExtractionResult(np.load(partial, allow_pickle=False), seconds, False, key)
        os.replace(partial, cache_file)
    features = np.load(cache_file, mmap_mode="r", allow_pickle=False)
    return ExtractionResult(features, seconds, False, key)


@contextmanager
def _output_file(
    cache_file: Path | None, distributed: DistributedSettings
) -> Iterator[Path | None]:
    """Where the features are written while they are computed: a partial file next to the
    cache entry, a temporary file for several processes without a cache, or None (memory).
    A partial file left by a failure is removed."""
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.partial.npy")
        try:
            yield partial
        finally:
            partial.unlink(missing_ok=True)
    elif distributed.world_size > 1:
        with tempfile.TemporaryDirectory(prefix="features-") as folder:
            yield Path(folder) / "features.npy"
    else:
        yield None


def _extract_shard(
    context: ProcessContext,
    backbone: Backbone,
    locations: list[str],
    settings: ExtractionSettings,
    output: np.ndarray | Path,
) -> None:
    """This process's contiguous shard of `locations` into its rows of `output`.

    Shards start on batch boundaries, so every batch holds the images one process would put in
    it and the features are the same whatever the number of processes.
    """
    shard = contiguous_shard(len(locations), context, settings.batch_size)
    rows = np.lib.format.open_memmap(output, mode="r+") if isinstance(output, Path) else output
    settings = replace(settings, progress=settings.progress and context.is_main)
    batches = _stream_features(
        backbone, locations[shard.start : shard.stop], settings, context.device
    )
    for first, batch_features in batches:
        rows[shard.start + first : shard.start + first + len(batch_features)] = batch_features
    if isinstance(rows, np.memmap):
        rows.flush()


def _stream_features(
    backbone: Backbone,
    locations: Sequence[str],
    settings: ExtractionSettings,
    device: torch.device,
):
    network = backbone.features.to(device).eval().to(memory_format=torch.channels_last)
    normalise = Normaliser(backbone.preprocessing).to(device)
    dataset = ImageDataset(locations, min_size=backbone.preprocessing.image_size)
    collate = EvalCollate(backbone.preprocessing)
    if device.type == "cpu" and settings.num_workers == "auto":
        batches = _cpu_streams(network, normalise, dataset, collate, settings.batch_size)
    elif device.type == "cuda" and settings.decode != "cpu":  # as `extract_features` keys it
        batches = _gpu_decoded_batches(network, normalise, locations, collate, settings, device)
    else:
        batches = _loader_batches(network, normalise, dataset, collate, settings, device)
    first = 0
    with tqdm(
        total=len(locations),
        unit="img",
        desc=f"features {backbone.name}@{backbone.preprocessing.image_size}px",
        disable=None if settings.progress else True,  # None: only on a terminal
        mininterval=2.0,
    ) as progress:
        for output in batches:
            yield first, output
            first += len(output)
            progress.update(len(output))


def _loader_batches(network, normalise, dataset, collate, settings, device):
    """GPU (or explicit workers): worker processes decode while the device computes."""
    loader = image_loader(
        dataset,
        settings.batch_size,
        resolve_num_workers(settings.num_workers, device),
        device,
        collate_fn=collate,
    )
    dtype = autocast_dtype(device)
    with (
        cpu_threads(),
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
    ):
        for batch in loader:
            yield network(normalise(batch)).float().cpu().numpy()


class EncodedImages(Dataset):
    """For decoding on the GPU: a JPEG file's bytes as a 1-D uint8 tensor, read in a worker;
    any other image (PNG, digits, …) decoded on the CPU as a (3, H, W) tensor."""

    def __init__(self, locations: Sequence[str], min_size: int) -> None:
        self.images = ImageDataset(locations, min_size=min_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor]:
        location = self.images.locations[position]
        if not location.startswith(DIGITS_SCHEME):
            data = Path(location).read_bytes()
            # nvJPEG ignores EXIF orientation: rotated photos take the CPU decoder, which
            # applies it.
            if data[:3] == JPEG_MAGIC and exif_orientation(data) == 1:
                return position, torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return position, self.images[position]


def _gpu_decoded_batches(network, normalise, locations, collate, settings, device):
    """CUDA: workers only read files; JPEGs are decoded on the GPU in batches (nvJPEG), then
    resized, normalised and run there under autocast. A batch that nvJPEG refuses (CMYK,
    unusual sampling) is decoded image by image on the CPU instead."""
    loader = image_loader(
        EncodedImages(locations, collate.transform.size),
        settings.batch_size,
        resolve_num_workers(settings.num_workers, device),
        device,
        collate_fn=list,
    )
    dtype = autocast_dtype(device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        for items in loader:
            images = [image.to(device, non_blocking=True) for _, image in items]
            encoded = [i for i, (_, image) in enumerate(items) if image.ndim == 1]
            if encoded:
                decoded = _decode_on_gpu(items, encoded, locations, device)
                for i, image in zip(encoded, decoded, strict=True):
                    images[i] = image
            yield network(normalise(collate(images))).float().cpu().numpy()


def _decode_on_gpu(items, encoded: list[int], locations, device) -> list[torch.Tensor]:
    data = [items[i][1] for i in encoded]
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = []
        for i in encoded:
            position, encoded_bytes = items[i]
            try:
                decoded.append(decode_image_bytes(encoded_bytes.numpy().tobytes()).to(device))
            except Exception as error:
                raise ExtractionError(
                    f"Cannot decode image {locations[position]}: {error}. Fix or remove the "
                    "file and re-run data_ingestion (data.on_corrupt=skip leaves unreadable "
                    "files out)."
                ) from error
        return decoded


def _cpu_streams(network, normalise, dataset, collate, batch_size):
    """CPU: one single-threaded decode → forward stream per core, results in order.

    Measured on 2 cores: two independent single-threaded streams run the network ~1.6x faster
    than one stream on two threads (no barrier after every operator), and each stream's
    decoding overlaps the other's compute. Torch ops release the GIL, so threads suffice.
    """
    streams = usable_cores()

    def features_of(start: int) -> np.ndarray:
        with torch.inference_mode():  # thread-local: entered in each stream
            positions = range(start, min(start + batch_size, len(dataset)))
            images = collate([dataset[p] for p in positions])
            return network(normalise(images)).numpy()

    with cpu_threads(1), ThreadPoolExecutor(max_workers=streams) as pool:
        # Submitted a few batches ahead only, so memory stays bounded on huge indexes.
        starts = iter(range(0, len(dataset), batch_size))
        pending = deque(pool.submit(features_of, s) for s in islice(starts, 2 * streams))
        while pending:
            output = pending.popleft().result()
            for start in islice(starts, 1):
                pending.append(pool.submit(features_of, start))
            yield output


def feature_cache_key(
    backbone: Backbone, locations: Sequence[str], device: torch.device, gpu_decode: bool = False
) -> str:
    """A digest of everything the features depend on: images, weights, preprocessing, precision,
    and the JPEG decoder (the GPU's rounds pixels differently)."""
    digest = hashlib.sha256()
    settings = backbone.settings
    decoder = ("gpu-decode",) if gpu_decode else ()
    digest.update(
        repr(
            (
                "v2",  # v2: EXIF orientation applied
                backbone.name,
                settings.pretrained,
                backbone.preprocessing,
                str(autocast_dtype(device)),
                *decoder,
            )
        ).encode()
    )
    if settings.weights_path:
        digest.update(_file_digest(Path(settings.weights_path)).encode())
    for location in locations:
        digest.update(location.encode())
        if not location.startswith(DIGITS_SCHEME):
            # Size and modification time change whenever a file's content is rewritten.
            stat = os.stat(location)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
