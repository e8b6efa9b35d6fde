"""Streaming images through a frozen backbone into a feature matrix, fast on CPU and GPU."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from transfer_learning.backbones import Backbone, Preprocessing
from transfer_learning.config import check_known_keys
from transfer_learning.distributed import (
    SINGLE_PROCESS,
    DistributedSettings,
    ProcessContext,
    contiguous_shard,
    launch,
)
from transfer_learning.images import (
    DIGITS_SCHEME,
    JPEG_MAGIC,
    decode_image_bytes,
    exif_orientation,
    load_rgb_tensor,
)

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


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


def resolve_device(device: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; asking for CUDA without one is an error."""
    if device not in DEVICES:
        raise ExtractionError(f"device={device!r} must be one of {', '.join(DEVICES)}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExtractionError("device=cuda but PyTorch sees no CUDA GPU; use device=auto or cpu.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers often narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def resolve_num_workers(num_workers: int | str, device: torch.device) -> int:
    if num_workers != "auto":
        return int(num_workers)
    cores = usable_cores()
    # On CPU the network needs the cores; one worker decodes while the forward pass runs.
    return min(8, cores) if device.type == "cuda" else 1


@contextmanager
def cpu_threads(count: int | None = None) -> Iterator[int]:
    """Run the block with `count` torch threads (default: every usable core), then restore.

    Yields the thread count; the caller's own setting is back when the block ends.
    """
    previous = torch.get_num_threads()
    count = usable_cores() if count is None else count
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)


# ---- decoding --------------------------------------------------------------------------------


class EvalTransform:
    """uint8 (…, 3, H, W) images → uint8 (…, 3, S, S): shorter side resized to S, centre-cropped.

    Working on uint8 tensors keeps resizing on torchvision's vectorised uint8 kernels, and
    normalisation happens later on whole batches (on the GPU when there is one): shipping uint8
    moves a quarter of the bytes of float32.
    """

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.size = preprocessing.image_size
        self.interpolation = InterpolationMode(preprocessing.interpolation)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) == (self.size, self.size):
            return images
        images = TF.resize(images, self.size, interpolation=self.interpolation, antialias=True)
        return TF.center_crop(images, [self.size, self.size])


class EvalCollate:
    """Collates decoded images into one uint8 batch, resizing same-sized images together.

    One resize call per distinct input size instead of one per image: on a data set of equal
    sizes (CIFAR, most camera folders) resizing costs a third of the per-image calls.
    """

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.transform = EvalTransform(preprocessing)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for position, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape), []).append(position)
        if len(by_shape) == 1:
            return self.transform(torch.stack(images))
        size = self.transform.size
        batch = torch.empty(
            (len(images), 3, size, size), dtype=torch.uint8, device=images[0].device
        )
        for positions in by_shape.values():
            batch[positions] = self.transform(torch.stack([images[p] for p in positions]))
        return batch


class ImageDataset(Dataset):
    """Images read lazily from their index locations as uint8 RGB (3, H, W) tensors.

    `transform`, if given, is applied to each image; `min_size` lets large JPEGs decode at
    reduced scale (see `load_rgb_tensor`).
    """

    def __init__(
        self,
        locations: Sequence[str],
        transform: Callable[[torch.Tensor], Any] | None = None,
        min_size: int | None = None,
    ) -> None:
        self.locations = list(locations)
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, position: int) -> Any:
        location = self.locations[position]
        try:
            image = load_rgb_tensor(location, self.min_size)
        except Exception as error:
            raise ExtractionError(
                f"Cannot decode image {location}: {error}. Fix or remove the file and re-run "
                "data_ingestion (data.on_corrupt=skip leaves unreadable files out)."
            ) from error
        return image if self.transform is None else self.transform(image)


def _worker_init(_: int) -> None:
    # Workers only decode: one thread each, and a lower priority so that on a machine with few
    # cores they fill the gaps the forward pass leaves instead of pre-empting it.
    torch.set_num_threads(1)
    if hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(19)


def image_loader(
    dataset: Dataset,
    batch_size: int | None,
    num_workers: int,
    device: torch.device,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    collate_fn: Callable[[list], Any] | None = None,
    batch_sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader that overlaps decoding with compute and pins memory for GPU copies.

    `sampler`: the order of the images (e.g. `shuffled`); None reads them in order.
    `batch_sampler`: whole batches instead (then `batch_size` is None).
    """
    return DataLoader(
        dataset,
        batch_size=1 if batch_sampler is not None else batch_size,
        sampler=sampler,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
        drop_last=drop_last,
        collate_fn=collate_fn,
    )


def shuffled(dataset: Dataset, seed: int) -> RandomSampler:
    """A random order of `dataset` that depends on `seed` alone."""
    return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))


class Normaliser(torch.nn.Module):
    """uint8 NCHW batch → normalised float batch in channels_last layout on `device`."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        super().__init__()
        mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(preprocessing.std).view(1, 3, 1, 1) * 255.0
        self.register_buffer("scale", 1.0 / std)
        self.register_buffer("shift", -mean / std)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.scale.device, non_blocking=True)
        batch = batch.contiguous(memory_format=torch.channels_last).float()
        return torch.addcmul(self.shift, batch, self.scale)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 (fp16 on older GPUs) under autocast on CUDA; None on CPU, where fp32 is fastest."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
