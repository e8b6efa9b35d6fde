"""Training state and atomic per-epoch checkpoints, so a killed run resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_learning.core.files import write_atomically
from transfer_learning.training.recipe import Recipe, TrainingError, TrainValImages


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


@dataclass
class TrainingState:
    """Everything the epoch loop carries from one epoch to the next (and a resume restores)."""

    phase: str
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    stopped_early: bool = False

    def record(self, epoch_record: dict[str, float], model: nn.Module) -> None:
        """Append the epoch; keep the model's weights if its val accuracy is the best so far."""
        self.history.append(epoch_record)
        if epoch_record["val_accuracy"] > self.best_val_accuracy:
            self.best_val_accuracy = epoch_record["val_accuracy"]
            self.best_epoch = int(epoch_record["epoch"])
            self.best_state = cpu_state_dict(model)
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1

    def out_of_patience(self, patience: int | None) -> bool:
        return patience is not None and self.epochs_without_improvement >= patience


def fingerprint(recipe: Recipe, n_classes: int, seed: int, images: TrainValImages) -> str:
    """A digest of everything that decides the trained weights: a resume must match it."""
    digest = hashlib.sha256(
        json.dumps([recipe.to_dict(), n_classes, seed], sort_keys=True, default=str).encode()
    )
    for location in [*images.train_locations, *images.val_locations]:
        digest.update(location.encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpointer:
    """The last epoch's checkpoint of one run, written atomically after every epoch."""

    path: Path
    fingerprint: str
    writes: bool = True  # False in processes other than rank 0: they only read

    def restore(self, resume: bool) -> dict[str, Any] | None:
        """The checkpoint to resume from, or None; a fresh run deletes an older run's checkpoint."""
        if not self.path.exists():
            return None
        if not resume:
            if self.writes:
                self.path.unlink()  # a fresh run must not be resumed from an older one later
            return None
        checkpoint = torch.load(self.path, map_location="cpu", weights_only=True)
        if checkpoint["fingerprint"] != self.fingerprint:
            raise TrainingError(
                f"The checkpoint {self.path} was written by a run with other data or settings; "
                "resume only the same run, or set training.resume=false to start afresh."
            )
        return checkpoint

    def save(  # noqa: PLR0913 (everything a resume restores)
        self, epoch: int, model, criterion, optimizer, scheduler, state: TrainingState
    ) -> None:
        if not self.writes:
            return
        checkpoint = {
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "model": model.state_dict(),
            "criterion": criterion.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": asdict(state),
        }
        write_atomically(self.path, lambda stream: torch.save(checkpoint, stream))
