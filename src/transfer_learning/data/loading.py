"""Images into batches: the evaluation resize and crop, datasets read lazily, loaders, normalisation."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from transfer_learning.data.images import load_rgb_tensor


@dataclass(frozen=True)
class Preprocessing:
    """How images must look when they enter the network."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"


class ImageReadError(ValueError):
    """An indexed image cannot be decoded any more."""


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
            raise ImageReadError(
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


def uint8_input(network: torch.nn.Module, preprocessing: Preprocessing) -> torch.nn.Module:
    """`network` behind its normalisation: uint8 NCHW batches in, as `EvalCollate` makes them
    (the form an ONNX export of the network takes)."""
    return torch.nn.Sequential(Normaliser(preprocessing), network).eval()
