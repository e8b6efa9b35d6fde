"""The one training engine: every gradient step of the project runs in `Trainer`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from transfer_learning.core.distributed import (
    SINGLE_PROCESS,
    DistributedSettings,
    ProcessContext,
    gather_in_rank_order,
    launch,
    sum_over_ranks,
    synchronise_batchnorm,
)
from transfer_learning.core.runtime import autocast_dtype, cpu_threads, keep_freed_memory
from transfer_learning.core.tasks import MISSING
from transfer_learning.data.loading import Normaliser
from transfer_learning.models.backbones import (
    AUTO,
    Backbone,
    build_backbone,
)
from transfer_learning.models.classifier import Classifier, build_classifier
from transfer_learning.training.checkpoint import (
    Checkpointer,
    TrainingState,
    cpu_state_dict,
    fingerprint,
)
from transfer_learning.training.data import TrainingData, build_training_data
from transfer_learning.training.losses import (
    MultiTaskLoss,
    TrainingLoss,
    batch_mixing,
    training_criterion,
)
from transfer_learning.training.optim import (
    early_layers,
    make_optimizer,
    set_trainable,
    trainable_parameter_count,
    training_phase,
)
from transfer_learning.training.recipe import (
    FinetuneSettings,
    Recipe,
    TrainingError,
    TrainingRunSettings,
    TrainValImages,
)

logger = logging.getLogger(__name__)


def backward(loss: torch.Tensor, where: str, hint: str, weight: float = 1.0) -> None:
    """Backpropagate `loss` × `weight`: the one `.backward()` of the project. A non-finite loss is
    refused, saying where it happened and (`hint`) what to change."""
    if not torch.isfinite(loss):
        raise TrainingError(f"Non-finite loss ({loss.item()}) at {where}{hint}")
    (loss * weight).backward()


def apply_gradients(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
) -> None:
    """Clip the gradients of every optimised parameter to `grad_clip` (if set), step, schedule."""
    if grad_clip:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def train_steps(  # noqa: PLR0913 (the batches, the loss, the optimiser and how to step)
    batches: Iterable[Any],
    loss_of: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    name: str,
    hint: str,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
) -> list[dict[str, float]]:
    """Steps of a short training that is not an epoch loop (TENT, MCC): for each batch, the loss
    (`loss_of(batch)` → loss and values to log) under the device's autocast, the same backward,
    clipping and optimiser step as fine-tuning, and a progress bar. Returns every step's logged
    values."""
    dtype = autocast_dtype(device)
    history = []
    bar = tqdm(batches, desc=name, unit="step", leave=False, disable=None)  # on a terminal only
    for step, batch in enumerate(bar, start=1):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, logged = loss_of(batch)
        backward(loss, f"{name} step {step}", hint)
        apply_gradients(optimizer, scheduler, grad_clip)
        history.append({"step": step, "loss": loss.item(), **logged})
    return history


@dataclass
class Trainer:
    """Runs the steps of an epoch and the validation pass of one model in one process."""

    model: nn.Module  # the network as called in training: DDP-wrapped, torch.compile'd when asked
    eval_model: nn.Module  # the same weights, called alone (validation is not synchronised)
    normalise: Normaliser
    criterion: TrainingLoss
    context: ProcessContext
    grad_clip: float | None
    batch_size: int  # the global batch
    progress: bool
    mix: nn.Module | None = None  # mixup / cutmix of each training batch
    micro_batch_size: int | None = None

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.device)

    def train_epoch(self, loader: DataLoader, optimizer, scheduler, description: str) -> float:
        """One pass over `loader`; returns the mean training loss over all processes."""
        total, count = 0.0, 0
        hidden = self._hidden() or not self.context.is_main
        bar = tqdm(loader, desc=description, unit="batch", leave=False, disable=hidden)
        with bar:
            for step, (images, targets) in enumerate(bar):
                targets = targets.to(self.device, non_blocking=True)
                loss = self._step(
                    images, targets, optimizer, scheduler, f"{description}, step {step + 1}"
                )
                total += loss * len(targets)
                count += len(targets)
                bar.set_postfix(loss=f"{total / count:.4f}")
        total, count = sum_over_ranks(self.context, [total, count])
        return total / max(count, 1)

    def _step(self, images, targets, optimizer, scheduler, where: str) -> float:
        try:
            inputs = self.normalise(images)
            if self.mix is not None:
                inputs, targets = self.mix(inputs, targets)  # targets become class probabilities
            # This process's part of the global batch's mean loss: DDP averages gradients over
            # the processes, so each weighs its images by (its images × processes / batch).
            share = len(targets) * self.context.world_size / self.batch_size
            optimizer.zero_grad(set_to_none=True)
            pieces = _micro_batches(len(targets), self.micro_batch_size)
            total = 0.0
            for number, piece in enumerate(pieces):
                # Gradients are synchronised once, on the last piece (accumulation).
                last = number == len(pieces) - 1
                sync = (
                    nullcontext() if last or not self.context.distributed else self.model.no_sync()
                )
                with sync:
                    with torch.autocast(
                        self.device.type, dtype=self.dtype, enabled=self.dtype is not None
                    ):
                        loss = self.criterion(self.model(inputs[piece]), targets[piece])
                    hint = (
                        f", learning rate {optimizer.param_groups[-1]['lr']:.3g}: lower "
                        "finetune.lr or set finetune.grad_clip."
                    )
                    weight = share * (piece.stop - piece.start) / len(targets)
                    backward(loss, where, hint, weight)  # weight 1 with one process: exact
                total += loss.item() * (piece.stop - piece.start)
            if self.context.distributed:
                # The learned task weights live outside the DDP module: average them as DDP does.
                for parameter in self.criterion.parameters():
                    if parameter.grad is not None:
                        torch.distributed.all_reduce(parameter.grad)
                        parameter.grad /= self.context.world_size
            apply_gradients(optimizer, scheduler, self.grad_clip)
        except torch.cuda.OutOfMemoryError as error:
            pieces = self.micro_batch_size or max(1, self.batch_size // self.context.world_size)
            raise TrainingError(
                f"CUDA ran out of memory at {where} with finetune.batch_size={self.batch_size} "
                f"({pieces} images at a time in each process); set training.micro_batch_size="
                f"{max(1, pieces // 2)} to accumulate gradients over smaller pieces (the "
                "recipe stays the same)."
            ) from error
        return total / len(targets)

    @torch.inference_mode()
    def validate(self, loader: DataLoader, labels: torch.Tensor) -> tuple[float, list[float]]:
        """(val loss with the training criterion's smoothing, val accuracy of every task) over
        all of val: each process scores its slice, the logits are gathered in order.

        With several tasks, each task's loss and accuracy are over the images with its label,
        and the loss is their mean.
        """
        self.eval_model.eval()
        sizes = self.criterion.task_sizes
        outputs = [torch.empty(0, sum(sizes))]
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            for images in loader:
                outputs.append(self.eval_model(self.normalise(images)).float().cpu())
        logits = torch.cat(gather_in_rank_order(self.context, torch.cat(outputs)))
        smoothing = self.criterion.label_smoothing
        labels = labels.reshape(len(labels), -1)
        losses, accuracies = [], []
        for task, part in enumerate(logits.split(sizes, 1)):
            labelled = labels[:, task] != MISSING
            if not labelled.any():  # a given val split may lack a task: it cannot select
                losses.append(float("nan"))
                accuracies.append(float("nan"))
                continue
            target = labels[labelled, task]
            losses.append(
                float(
                    nn.functional.cross_entropy(part[labelled], target, label_smoothing=smoothing)
                )
            )
            accuracies.append(float((part[labelled].argmax(1) == target).float().mean()))
        return float(np.nanmean(losses)), accuracies

    def _hidden(self) -> bool | None:
        return None if self.progress else True  # None: shown on a terminal only


def _micro_batches(n_images: int, micro_batch_size: int | None) -> list[slice]:
    size = micro_batch_size or n_images
    return [slice(first, min(first + size, n_images)) for first in range(0, n_images, size)]


def build_trainer(
    model: Classifier,
    backbone: Backbone,
    data: TrainingData,
    recipe: FinetuneSettings,
    run: TrainingRunSettings,
    context: ProcessContext,
    criterion: TrainingLoss | MultiTaskLoss,
) -> Trainer:
    """The trainer of `model` in this process (call `set_trainable` first: DDP synchronises
    the parameters that require gradients when it wraps the model). `criterion`: the training
    loss, which may carry parameters (learned task weights) and persists across phases."""
    network = network_as_called(model, run, context)
    return Trainer(
        model=network,
        eval_model=model if context.distributed else network,
        normalise=Normaliser(backbone.preprocessing).to(context.device),
        criterion=criterion.to(context.device),
        context=context,
        grad_clip=recipe.grad_clip,
        batch_size=recipe.batch_size,
        progress=run.progress,
        # Mixing acts on one labelling: a multi-task criterion has none to mix (refused earlier).
        mix=batch_mixing(recipe, criterion.task_sizes[0])
        if isinstance(criterion, TrainingLoss)
        else None,
        micro_batch_size=run.micro_batch_size,
    )


def network_as_called(model: Classifier, run: TrainingRunSettings, context: ProcessContext):
    """`model` wrapped for training: DDP over the processes (when several), then compiled."""
    network: nn.Module = model
    if context.distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        network = DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(network) if run.compile else network


@dataclass
class TrainingResult:
    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_val_accuracy: float
    history: list[dict[str, float]]
    fit_seconds: float
    trainable_parameters: int
    images_per_second: float
    resumed_from_epoch: int = 0
    stopped_early: bool = False
    task_weights: list[float] | None = None  # several tasks: each task's loss weight at the end


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch's shuffling, augmentation and dropout depend on (seed, epoch) only."""
    return seed * 1000 + epoch


def train_classifier(
    images: TrainValImages,
    n_classes: int | Mapping[str, int],
    recipe: Recipe,
    run: TrainingRunSettings,
    seed: int,
    device: torch.device,
    run_name: str,
    distributed: DistributedSettings = SINGLE_PROCESS,
) -> TrainingResult:
    """Train on train and select the best epoch on val; `run_name` keys the checkpoint folder.

    `n_classes`: the number of classes, or with several label columns task → its classes (the
    labels then have one column per task): one shared network, one head per task, and the best
    epoch is the one with the best mean of the tasks' val accuracies.

    With `distributed` over several processes, each trains on its share of every batch (DDP)
    and this returns rank 0's result. Torch's global RNG and thread count are the caller's again
    when this returns.
    """
    unresolved = [k for k, v in recipe.to_dict()["finetune"].items() if v == AUTO]
    if unresolved or recipe.backbone.image_size == AUTO:
        raise TrainingError(
            f"The recipe still has 'auto' values ({', '.join(unresolved) or 'image_size'}): "
            "resolve it from the data profile first (Recipe.resolve)."
        )
    if isinstance(n_classes, Mapping):
        _require_multi_task_recipe(recipe.finetune, list(n_classes))
    if distributed.world_size > 1:
        if distributed.world_size > recipe.finetune.batch_size:
            raise TrainingError(
                f"finetune.batch_size={recipe.finetune.batch_size} is smaller than the "
                f"{distributed.world_size} processes (distributed.nnodes × nproc_per_node): "
                "every process needs at least one image a step."
            )
        build_backbone(recipe.backbone, seed)  # downloads the weights once, before the workers
    return launch(
        distributed, device, _train_process, images, n_classes, recipe, run, seed, run_name
    )


def _require_multi_task_recipe(settings: FinetuneSettings, tasks: list[str]) -> None:
    """Mixing and class-balanced draws act on one labelling: refused with several tasks."""
    single_task_only = {
        "mixup": settings.mixup > 0,
        "cutmix": settings.cutmix > 0,
        "sampling": settings.sampling != "uniform",
    }
    for key, used in single_task_only.items():
        if used:
            raise TrainingError(
                f"finetune.{key}={getattr(settings, key)!r} works on one label column; with "
                f"several (data.label_columns={tasks}) set it back to its default, or train "
                "one task at a time."
            )


def _train_process(
    context: ProcessContext,
    images: TrainValImages,
    n_classes: int,
    recipe: Recipe,
    run: TrainingRunSettings,
    seed: int,
    run_name: str,
) -> TrainingResult | None:
    """One process's training; rank 0's result is the run's (the others return None)."""
    if context.device.type == "cpu":
        keep_freed_memory()  # 1.5x faster steps on a CPU: no page faults for activations
    with isolated_randomness_and_threads(context.device):
        result = _epoch_loop(images, n_classes, recipe, run, seed, context, run_name)
    return result if context.is_main else None


@contextmanager
def isolated_randomness_and_threads(device: torch.device) -> Iterator[None]:
    """Training on a forked RNG and (on CPU) the training thread count: torch's global RNG and
    thread count are the caller's again afterwards."""
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    threads = cpu_threads() if device.type == "cpu" else nullcontext()
    with threads, torch.random.fork_rng(devices=rng_devices):
        yield


@dataclass
class _Session:
    """What one training process holds while its epochs run."""

    model: Classifier
    backbone: Backbone
    data: TrainingData
    criterion: TrainingLoss | MultiTaskLoss
    trainer: Trainer
    checkpointer: Checkpointer
    state: TrainingState
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start_epoch: int
    context: ProcessContext
    n_classes: int | Mapping[str, int]
    frozen_layers: list[str]  # kept as pretrained in every phase (finetune.freeze_stride)


def _start(images, n_classes, recipe: Recipe, run, seed, context, run_name) -> _Session:
    """Build model, data and trainer; restore the checkpoint when resuming."""
    settings, device = recipe.finetune, context.device
    n_outputs = sum(n_classes.values()) if isinstance(n_classes, Mapping) else n_classes
    model, backbone = build_classifier(recipe.backbone, n_outputs, seed)
    if context.distributed:
        # BatchNorm statistics over the global batch, as one process would compute them.
        model = synchronise_batchnorm(model, device)
    model = model.to(device).to(memory_format=torch.channels_last)
    freeze_stride = settings.freeze_stride
    frozen_layers = early_layers(model.features, backbone.preprocessing.image_size, freeze_stride)
    if frozen_layers:
        logger.info(
            "%s: %s keep their pretrained weights (finetune.freeze_stride=%s; null trains them)",
            run_name,
            ", ".join(frozen_layers),
            freeze_stride,
        )
    data = build_training_data(images, backbone, settings, run, context)
    criterion = training_criterion(data.train_labels, n_classes, settings).to(device)
    checkpointer = Checkpointer(
        Path(run.checkpoint_dir) / run_name / "last.pt",
        fingerprint(recipe, n_classes, seed, images),
        writes=context.is_main,
    )
    state = TrainingState(training_phase(settings, 0), cpu_state_dict(model))
    checkpoint = checkpointer.restore(run.resume)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        criterion.load_state_dict(checkpoint.get("criterion", criterion.state_dict()))
        state = TrainingState(**checkpoint["state"])
        logger.info("Resuming %s after epoch %d", run_name, checkpoint["epoch"])
    set_trainable(model, state.phase, frozen_layers)  # first: the optimiser skips frozen ones
    optimizer, scheduler = make_optimizer(
        model, settings, state.phase, data.steps_per_epoch, criterion
    )
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    trainer = build_trainer(model, backbone, data, settings, run, context, criterion)
    start_epoch = int(checkpoint["epoch"]) if checkpoint else 0
    return _Session(
        model,
        backbone,
        data,
        criterion,
        trainer,
        checkpointer,
        state,
        optimizer,
        scheduler,
        start_epoch,
        context,
        n_classes,
        frozen_layers,
    )


def _run_epoch(
    session: _Session, recipe: Recipe, run: TrainingRunSettings, seed: int, epoch: int, name: str
):
    """Train one epoch, validate, record it and write the checkpoint."""
    settings = recipe.finetune
    state, data = session.state, session.data
    phase = training_phase(settings, epoch)
    # also back to training mode after validation
    set_trainable(session.model, phase, session.frozen_layers)
    if phase != state.phase:
        state.phase = phase
        session.optimizer, session.scheduler = make_optimizer(
            session.model, settings, phase, data.steps_per_epoch, session.criterion
        )
        # DDP synchronises the parameters that require gradients when it wraps the model.
        session.trainer = build_trainer(
            session.model,
            session.backbone,
            data,
            settings,
            run,
            session.context,
            session.criterion,
        )
    # Augmentation is seeded per image (`EpochOrder`); dropout and mixing draw from the RNG as
    # this seed and the images decoded so far leave it: (seed, epoch, process) decide them.
    torch.manual_seed(epoch_seed(seed, epoch) + session.context.rank * 2**32)
    description = f"{name} epoch {epoch + 1}/{settings.epochs}"
    started = time.perf_counter()
    train_loss = session.trainer.train_epoch(
        data.train_loader(epoch_seed(seed, epoch)),
        session.optimizer,
        session.scheduler,
        description,
    )
    rate = data.steps_per_epoch * data.batch_size / (time.perf_counter() - started)
    val_loss, task_accuracies = session.trainer.validate(data.val_loader, data.val_labels)
    val_accuracy = float(np.nanmean(task_accuracies))  # one task: its accuracy
    record = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "lr": session.optimizer.param_groups[-1]["lr"],
        "train_images_per_second": rate,
    }
    if isinstance(session.n_classes, Mapping):
        for task, accuracy in zip(session.n_classes, task_accuracies, strict=True):
            record[f"val_accuracy.{task}"] = accuracy
    state.record(record, session.model)
    logger.info(
        "%s: train loss %.4f, val loss %.4f, val accuracy %.4f",
        description,
        train_loss,
        val_loss,
        val_accuracy,
    )
    session.checkpointer.save(
        epoch + 1, session.model, session.criterion, session.optimizer, session.scheduler, state
    )


def _epoch_loop(images, n_classes, recipe, run, seed, context, run_name) -> TrainingResult:
    settings = recipe.finetune
    session = _start(images, n_classes, recipe, run, seed, context, run_name)
    started = time.perf_counter()
    for epoch in range(session.start_epoch, settings.epochs):
        _run_epoch(session, recipe, run, seed, epoch, run_name)
        if session.state.out_of_patience(settings.patience):
            logger.info(
                "%s: no better val accuracy for %d epochs, stopping", run_name, settings.patience
            )
            session.state.stopped_early = True
            break
    seconds = time.perf_counter() - started
    state, data = session.state, session.data
    trained = (len(state.history) - session.start_epoch) * data.steps_per_epoch * data.batch_size
    return TrainingResult(
        state_dict=state.best_state,
        best_epoch=state.best_epoch,
        best_val_accuracy=state.best_val_accuracy,
        history=state.history,
        fit_seconds=seconds,
        trainable_parameters=trainable_parameter_count(session.model),
        images_per_second=trained / seconds if seconds else 0.0,
        resumed_from_epoch=session.start_epoch,
        stopped_early=state.stopped_early,
        task_weights=(
            session.criterion.task_weights()
            if isinstance(session.criterion, MultiTaskLoss)
            else None
        ),
    )
