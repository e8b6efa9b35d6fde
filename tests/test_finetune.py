"""Fine-tuning on small real data: determinism, kill-and-resume, freezing, clear failures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from transfer_learning.backbones import BackboneSettings
from transfer_learning.finetune import (
    FinetuneSettings,
    TrainingError,
    _layer_groups,
    build_classifier,
    train_classifier,
)
from transfer_learning.image_index import DataSettings, build_image_index

TINY = BackboneSettings(image_size=32)


def digits(n_train: int = 96, n_val: int = 48):
    index, _, _ = build_image_index(DataSettings(), seed=0)
    train = index[index["split"] == "train"].head(n_train)
    val = index[index["split"] == "val"].head(n_val)
    return (train["location"].tolist(), val["location"].tolist()), (
        train["label"].to_numpy(),
        val["label"].to_numpy(),
    )


def settings(tmp_path: Path, **overrides) -> FinetuneSettings:
    values = dict(
        epochs=3,
        batch_size=16,
        progress=False,
        hflip=False,
        patience=None,
        checkpoint_dir=str(tmp_path),
    )
    return FinetuneSettings(**{**values, **overrides})


def train(tmp_path, name="run", **overrides):
    locations, labels = digits()
    return train_classifier(
        locations, labels, 10, TINY, settings(tmp_path, **overrides), 0, torch.device("cpu"), name
    )


def test_same_seed_same_result(tmp_path):
    first = train(tmp_path, "a")
    second = train(tmp_path, "b")
    assert [r["val_loss"] for r in first.history] == [r["val_loss"] for r in second.history]
    for key, tensor in first.state_dict.items():
        assert torch.equal(tensor, second.state_dict[key]), key


def test_pretrained_weights_learn_and_history_is_kept(tmp_path):
    result = train(tmp_path, epochs=3)
    assert len(result.history) == 3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_accuracy == max(r["val_accuracy"] for r in result.history)
    assert result.history[0]["lr"] > 0


def test_linear_probe_freezes_backbone_and_batchnorm_statistics(tmp_path):
    model, _ = build_classifier(TINY, FinetuneSettings(), 10, seed=0)
    before = {k: v.clone() for k, v in model.features.state_dict().items()}
    result = train(tmp_path, strategy="linear_probe", epochs=1)
    after = {
        k[len("features.") :]: v for k, v in result.state_dict.items() if k.startswith("features.")
    }
    for key, tensor in before.items():
        assert torch.equal(tensor, after[key]), f"{key} changed under linear_probe"
    assert result.trainable_parameters == 1280 * 10 + 10


def test_layer_decay_gives_earlier_layers_smaller_rates():
    model, _ = build_classifier(TINY, FinetuneSettings(), 10, seed=0)
    groups = _layer_groups(model, FinetuneSettings(lr=1.0, layer_decay=0.5), "all")
    rates = [group["lr"] for group in groups]
    assert rates[-1] == 1.0 and rates == sorted(rates) and rates[0] < 1e-3
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_non_finite_loss_names_epoch_step_and_learning_rate(tmp_path):
    with pytest.raises(
        TrainingError, match=r"Non-finite loss .* at epoch 1, step \d+, learning rate"
    ):
        train(tmp_path, lr=1e12, grad_clip=None, epochs=1, optimizer="sgd", warmup_epochs=0)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"strategy": "partial"}, "finetune.strategy='partial'"),
        ({"epochs": 0}, "finetune.epochs=0"),
        ({"learning_rate": 1}, "finetune.learning_rate"),
    ],
)
def test_bad_finetune_settings(params, message):
    with pytest.raises(TrainingError, match=message):
        FinetuneSettings.from_params(params)


RUNNER = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_finetune import digits, settings, TINY
    from transfer_learning.finetune import train_classifier
    locations, labels = digits()
    result = train_classifier(
        locations, labels, 10, TINY,
        settings(__import__("pathlib").Path({checkpoints!r}), epochs=4, resume={resume}),
        0, torch.device("cpu"), "killed",
    )
    torch.save(result.state_dict, {output!r})
    print(json.dumps({{"resumed_from": result.resumed_from_epoch, "history": result.history}}))
    """
)


def run_training(tmp_path: Path, resume: bool, output: Path) -> subprocess.Popen:
    script = RUNNER.format(
        tests=str(Path(__file__).parent),
        checkpoints=str(tmp_path / "checkpoints"),
        resume=resume,
        output=str(output),
    )
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path):
    reference = train_classifier(
        *digits(),
        10,
        TINY,
        settings(tmp_path / "reference", epochs=4),
        0,
        torch.device("cpu"),
        "killed",
    )

    process = run_training(tmp_path, resume=False, output=tmp_path / "never.pt")
    checkpoint = tmp_path / "checkpoints" / "killed" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, (
        "training finished before it could be killed: " + process.stderr.read()
    )
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 2 <= killed_at < 4

    resumed = run_training(tmp_path, resume=True, output=tmp_path / "resumed.pt")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["resumed_from"] == killed_at
    assert [r["val_loss"] for r in report["history"]] == [r["val_loss"] for r in reference.history]
    final = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for key, tensor in reference.state_dict.items():
        assert torch.equal(tensor, final[key]), key


def test_resuming_another_run_is_refused(tmp_path):
    train(tmp_path, "shared", epochs=1)
    with pytest.raises(TrainingError, match="written by a run with other data or settings"):
        train(tmp_path, "shared", epochs=1, lr=0.5, resume=True)
