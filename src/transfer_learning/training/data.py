"""Training images: labelled datasets, the epoch order (class-balanced or uniform), augmentation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from transfer_learning.core.distributed import (
    ProcessContext,
    contiguous_shard,
)
from transfer_learning.core.runtime import resolve_num_workers
from transfer_learning.data.loading import EvalCollate, ImageDataset, image_loader
from transfer_learning.models.backbones import (
    Backbone,
)
from transfer_learning.training.recipe import FinetuneSettings, TrainingRunSettings, TrainValImages


class LabelledImages(Dataset):
    """Images with their labels: (uint8 image, label) pairs."""

    def __init__(self, images: ImageDataset, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`item`: a position, or (position, augmentation seed) as `EpochOrder` draws them.

        A seeded draw is augmented the same whichever process or worker decodes it: one
        process and N distributed ones see the same crops.
        """
        if isinstance(item, tuple):
            item, seed = item
            # Reseeding the CPU generator costs 1 µs, a fork_rng around it 125 µs an image;
            # training runs on a forked RNG (`isolated_randomness_and_threads`), so the
            # caller's state is untouched either way.
            torch.default_generator.manual_seed(seed)
        return self.images[item], self.labels[item]


class EpochOrder(Sampler[list[tuple[int, int]]]):
    """One process's batches of an epoch: lists of (image position, augmentation seed).

    The epoch's order depends on its seed alone (a shuffle, or class-balanced draws with
    replacement), is cut to whole global batches, and global batch k is split over the
    processes by position (as torch's DistributedSampler interleaves): the N processes'
    step k together hold exactly the images one process's step k holds.
    """

    def __init__(
        self,
        n_images: int,
        global_batch: int,
        epoch_seed: int,
        context: ProcessContext,
        draw_weights: torch.Tensor | None = None,
    ) -> None:
        self.n_images, self.global_batch, self.epoch_seed = n_images, global_batch, epoch_seed
        self.rank, self.world_size = context.rank, context.world_size
        self.draw_weights = draw_weights

    def __len__(self) -> int:
        return self.n_images // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.epoch_seed)
        if self.draw_weights is None:
            order = torch.randperm(self.n_images, generator=generator)
        else:
            order = torch.multinomial(
                self.draw_weights, self.n_images, replacement=True, generator=generator
            )
        order = order.tolist()
        for step in range(len(self)):
            first = step * self.global_batch
            positions = range(first + self.rank, first + self.global_batch, self.world_size)
            yield [(order[p], self._augmentation_seed(p)) for p in positions]

    def _augmentation_seed(self, position: int) -> int:
        return (self.epoch_seed * 2**32 + position) % 2**63


@dataclass
class TrainingData:
    """The augmented train set (a new loader per epoch) and this process's share of val."""

    train: Dataset
    val_loader: DataLoader
    val_labels: torch.Tensor  # all of val's labels (every process gathers all val logits)
    train_labels: torch.Tensor
    batch_size: int  # the global batch: the images of one optimiser step over all processes
    workers: int
    device: torch.device
    sampling: str = "uniform"
    context: ProcessContext | None = None  # None: one process

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.train) // self.batch_size)

    def train_loader(self, epoch_seed: int) -> DataLoader:
        """This process's batches, drawn by `EpochOrder` from a seed for this epoch alone
        (resume relies on it).

        `class_balanced`: each draw picks a class uniformly, then one of its images (with
        replacement), so an epoch of the same length sees every class about equally often.
        """
        weights = None
        if self.sampling == "class_balanced":
            counts = torch.bincount(self.train_labels).double()
            weights = (1.0 / counts)[self.train_labels]
        order = EpochOrder(
            len(self.train),
            self.batch_size,
            epoch_seed,
            self.context or ProcessContext(0, 1, self.device),
            weights,
        )
        return image_loader(self.train, None, self.workers, self.device, batch_sampler=order)


def train_augmentation(settings: FinetuneSettings, size: int) -> v2.Compose:
    """Random resized crops (and flips when the recipe has them) to `size` px, on uint8 images."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=settings.crop_scale, antialias=True),
            *([v2.RandomHorizontalFlip()] if settings.hflip else []),
        ]
    )


def build_training_data(
    images: TrainValImages,
    backbone: Backbone,
    settings: FinetuneSettings,
    run: TrainingRunSettings,
    context: ProcessContext,
) -> TrainingData:
    """The loaders of one process: its share of every training batch, its slice of val."""
    device = context.device
    # On CPU a training step is ~30x the cost of decoding its images, so decoding in the main
    # process wastes little and saves a worker start per epoch; GPUs need the workers.
    workers = (
        0
        if run.num_workers == "auto" and device.type == "cpu"
        else resolve_num_workers(run.num_workers, device)
    )
    size = backbone.preprocessing.image_size
    augment = train_augmentation(settings, size)
    train_labels = torch.tensor(np.asarray(images.train_labels), dtype=torch.long)
    val_slice = contiguous_shard(len(images.val_locations), context)
    val_loader = image_loader(
        ImageDataset([images.val_locations[i] for i in val_slice], min_size=size),
        settings.batch_size,
        workers,
        device,
        collate_fn=EvalCollate(backbone.preprocessing),
    )
    return TrainingData(
        train=LabelledImages(
            ImageDataset(images.train_locations, augment, min_size=size), train_labels
        ),
        val_loader=val_loader,
        val_labels=torch.tensor(np.asarray(images.val_labels), dtype=torch.long),
        train_labels=train_labels,
        batch_size=settings.batch_size,
        workers=workers,
        device=device,
        sampling=settings.sampling,
        context=context,
    )
