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
from transfer_learning.data.loading import (
    EvalCollate,
    ImageDataset,
    Normaliser,
    image_loader,
    uint8_input,
)
from transfer_learning.models.backbones import Backbone
from transfer_learning.models.onnx_network import (
    ENGINES,
    ONNXRUNTIME,
    TORCH,
    EngineError,
    Forward,
    onnx_forward,
    resolve_engine,
)

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
    engine: str = "auto"  # auto: ONNX Runtime on a CPU when installed, PyTorch otherwise

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ExtractionSettings:
        check_known_keys(cls, params, "extraction", ExtractionError)
        settings = cls(**params)
        if not isinstance(settings.batch_size, int) or settings.batch_size < 1:
            raise ExtractionError(f"extraction.batch_size={settings.batch_size!r} must be ≥ 1.")
        if settings.engine not in ENGINES:
            raise ExtractionError(
                f"extraction.engine={settings.engine!r} must be one of {', '.join(ENGINES)}."
            )
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
    engine: str = TORCH  # what ran the network (or would have, for cached features)


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
    engine, cache_file = _engine_and_cache_file(backbone, locations, settings, device)
    key = cache_file.stem if cache_file else None
    if cache_file is not None and cache_file.exists():
        features = np.load(cache_file, mmap_mode="r", allow_pickle=False)
        logger.info("Features unchanged since an earlier run: reusing %s", cache_file)
        return ExtractionResult(features, 0.0, True, key, engine)
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
        launch(
            distributed,
            device,
            _extract_shard,
            backbone,
            list(locations),
            replace(settings, engine=engine),
            target,
        )
        seconds = time.perf_counter() - start
        if partial is None:
            return ExtractionResult(target, seconds, False, key, engine)
        if cache_file is None:
            features = np.load(partial, allow_pickle=False)
            return ExtractionResult(features, seconds, False, key, engine)
        os.replace(partial, cache_file)
    features = np.load(cache_file, mmap_mode="r", allow_pickle=False)
    return ExtractionResult(features, seconds, False, key, engine)


def _engine_and_cache_file(
    backbone: Backbone, locations: Sequence[str], settings: ExtractionSettings, device
) -> tuple[str, Path | None]:
    """The engine that runs the network and where its features are cached (None: no cache).

    ONNX Runtime's export is made and checked here, before anything is computed: a network the
    exporter cannot handle falls back to PyTorch, and its features are keyed as PyTorch's.
    """
    gpu_decode = device.type == "cuda" and settings.decode != "cpu"
    pixels = len(locations) * backbone.preprocessing.image_size**2
    try:
        engine = resolve_engine(settings.engine, device, pixels)
    except EngineError as error:
        raise ExtractionError(str(error)) from error

    def cache_file(engine: str) -> Path | None:
        if not settings.cache_dir:
            return None
        key = feature_cache_key(backbone, locations, device, gpu_decode, engine)
        return Path(settings.cache_dir) / f"{key}.npy"

    cached = cache_file(engine)
    if engine == ONNXRUNTIME and not (cached and cached.exists()):
        if _onnx_forward(backbone, settings, threads=1) is None:
            return TORCH, cache_file(TORCH)
    return engine, cached


def _onnx_forward(backbone: Backbone, settings: ExtractionSettings, threads: int) -> Forward | None:
    """The backbone with its normalisation, uint8 images in, as one ONNX Runtime forward pass
    (exported once, beside the feature cache), or None where it must stay in PyTorch."""
    network = uint8_input(backbone.features, backbone.preprocessing)
    folder = Path(settings.cache_dir) / "onnx" if settings.cache_dir else None
    return onnx_forward(network, backbone.preprocessing.image_size, folder, backbone.name, threads)


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
    if settings.engine == ONNXRUNTIME:  # resolved by `extract_features`, export checked there
        forward = _onnx_forward(backbone, settings, threads=1)
    else:
        forward = _torch_forward(network, normalise, device)
    if device.type == "cpu" and settings.num_workers == "auto":
        batches = _cpu_streams(forward, dataset, collate, settings.batch_size)
    elif device.type == "cuda" and settings.decode != "cpu":  # as `extract_features` keys it
        batches = _gpu_decoded_batches(network, normalise, locations, collate, settings, device)
    else:
        batches = _loader_batches(forward, dataset, collate, settings, device)
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


def _torch_forward(network, normalise, device: torch.device) -> Forward:
    """uint8 batch → features as numpy, under autocast on a GPU."""
    dtype = autocast_dtype(device)

    def forward(images: torch.Tensor) -> np.ndarray:
        # inference_mode is thread-local: entered in the calling stream.
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
        ):
            return network(normalise(images)).float().cpu().numpy()

    return forward


def _loader_batches(forward: Forward, dataset, collate, settings, device):
    """GPU (or explicit workers): worker processes decode while the device computes."""
    loader = image_loader(
        dataset,
        settings.batch_size,
        resolve_num_workers(settings.num_workers, device),
        device,
        collate_fn=collate,
    )
    with cpu_threads():
        for batch in loader:
            yield forward(batch)


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


def _cpu_streams(forward: Forward, dataset, collate, batch_size):
    """CPU: one single-threaded decode → forward stream per core, results in order.

    Measured on 2 cores: two independent single-threaded streams run the network ~1.6x faster
    than one stream on two threads (no barrier after every operator), and each stream's
    decoding overlaps the other's compute. Torch ops and ONNX Runtime sessions release the
    GIL, so threads suffice; one ONNX Runtime session serves every stream.
    """
    streams = usable_cores()

    def features_of(start: int) -> np.ndarray:
        positions = range(start, min(start + batch_size, len(dataset)))
        return forward(collate([dataset[p] for p in positions]))

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
    backbone: Backbone,
    locations: Sequence[str],
    device: torch.device,
    gpu_decode: bool = False,
    engine: str = TORCH,
) -> str:
    """A digest of everything the features depend on: images, weights, preprocessing, precision,
    the JPEG decoder (the GPU's rounds pixels differently) and the engine (ONNX Runtime's
    features equal PyTorch's to 1e-4, not bit for bit: a cached run repeats the same engine's)."""
    digest = hashlib.sha256()
    settings = backbone.settings
    variant = ("gpu-decode",) if gpu_decode else ()
    variant += (engine,) if engine != TORCH else ()
    digest.update(
        repr(
            (
                "v2",  # v2: EXIF orientation applied
                backbone.name,
                settings.pretrained,
                backbone.preprocessing,
                str(autocast_dtype(device)),
                *variant,
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
