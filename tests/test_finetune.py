"""Fine-tuning on small real data: determinism, kill-and-resume, freezing, clear failures."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings
from transfer_learning.models.backbones import BackboneError, BackboneSettings, build_backbone
from transfer_learning.models.classifier import build_classifier
from transfer_learning.training.optim import early_layers, parameter_groups
from transfer_learning.training.recipe import (
    FinetuneSettings,
    Recipe,
    TrainingError,
    TrainingRunSettings,
    TrainValImages,
)
from transfer_learning.training.trainer import train_classifier, train_steps

TINY = BackboneSettings(image_size=32)


def digits(n_train: int = 96, n_val: int = 48) -> TrainValImages:
    index, _, _ = build_image_index(DataSettings(), seed=0)
    train = index[index["split"] == "train"].head(n_train)
    val = index[index["split"] == "val"].head(n_val)
    return TrainValImages(
        train["location"].tolist(),
        train["label"].to_numpy(),
        val["location"].tolist(),
        val["label"].to_numpy(),
    )


def recipe(backbone: BackboneSettings = TINY, **overrides) -> Recipe:
    freeze_stride = FinetuneSettings().frozen_stride(backbone.pretrained)  # as `auto` resolves
    values = dict(epochs=3, batch_size=16, hflip=False, patience=None, freeze_stride=freeze_stride)
    return Recipe(backbone, FinetuneSettings(**{**values, **overrides}))


def run_settings(tmp_path: Path, resume: bool = False) -> TrainingRunSettings:
    return TrainingRunSettings(resume=resume, checkpoint_dir=str(tmp_path), progress=False)


def train(tmp_path, name="run", backbone=TINY, resume=False, **overrides):
    return train_classifier(
        digits(),
        10,
        recipe(backbone, **overrides),
        run_settings(tmp_path, resume),
        0,
        torch.device("cpu"),
        name,
    )


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
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
    model, _ = build_classifier(TINY, 10, seed=0)
    before = {k: v.clone() for k, v in model.features.state_dict().items()}
    result = train(tmp_path, mode="linear_probe", epochs=1)
    after = {
        k[len("features.") :]: v for k, v in result.state_dict.items() if k.startswith("features.")
    }
    for key, tensor in before.items():
        assert torch.equal(tensor, after[key]), f"{key} changed under linear_probe"
    assert result.trainable_parameters == 1280 * 10 + 10


def moved_and_kept(result, backbone=TINY) -> tuple[set[str], set[str]]:
    """The backbone's float tensors (weights and BatchNorm statistics) training changed / kept."""
    pretrained = build_backbone(backbone).features.state_dict()
    floats = {k for k, t in pretrained.items() if t.is_floating_point()}
    kept = {k for k in floats if torch.equal(pretrained[k], result.state_dict[f"features.{k}"])}
    return floats - kept, kept


def test_full_fine_tuning_without_freezing_moves_the_whole_backbone(tmp_path):
    result = train(tmp_path, epochs=1, freeze_stride=None)
    _, kept = moved_and_kept(result)
    assert not [k for k in kept if k.endswith((".weight", "running_mean"))], kept


def test_pretrained_early_layers_are_kept_and_the_rest_fine_tuned(tmp_path):
    # auto: the stem and the stages at 1/2 and 1/4 of the image keep their weights and
    # BatchNorm statistics; every later layer trains.
    result = train(tmp_path, epochs=1)
    moved, kept = moved_and_kept(result)
    early = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")
    assert {k for k in kept | moved if k.startswith(early)} <= kept
    later_kernels = {k for k in moved | kept if k.startswith("blocks.2.") and k.endswith("weight")}
    assert later_kernels and later_kernels <= moved
    model, _ = build_classifier(TINY, 10, seed=0)
    frozen = sum(p.numel() for n, p in model.features.named_parameters() if n.startswith(early))
    assert 0 < frozen < result.trainable_parameters
    assert result.trainable_parameters == sum(p.numel() for p in model.parameters()) - frozen


def test_random_weights_freeze_nothing(tmp_path):
    random = replace(TINY, pretrained=False)
    assert FinetuneSettings().frozen_stride(pretrained=False) is None
    result = train(tmp_path, backbone=random, epochs=1)
    model, _ = build_classifier(random, 10, seed=0)
    assert result.trainable_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,image_size,stride,expected",
    [
        ("efficientnet_lite0", 224, 4, ["conv_stem", "bn1", "blocks.0", "blocks.1"]),
        ("efficientnet_lite0", 32, 4, ["conv_stem", "bn1", "blocks.0", "blocks.1"]),
        ("efficientnet_lite0", 225, 8, ["conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2"]),
        ("torchvision/resnet18", 224, 4, ["conv1", "bn1", "layer1.0", "layer1.1"]),
        ("efficientnet_lite0", 224, None, []),
    ],
)
def test_early_layers_are_found_by_the_stride_of_their_outputs(name, image_size, stride, expected):
    backbone = build_backbone(BackboneSettings(name, image_size=image_size, pretrained=False))
    assert early_layers(backbone.features, image_size, stride) == expected
    assert not backbone.features.training  # the probe pass leaves the mode as it was


def test_a_vision_transformer_has_no_early_layers_to_freeze():
    backbone = build_backbone(
        BackboneSettings("timm/vit_tiny_patch16_224", image_size=224, pretrained=False)
    )
    assert early_layers(backbone.features, 224, 4) == []


def test_random_initialisation_starts_far_from_the_pretrained_weights():
    pretrained, _ = build_classifier(TINY, 10, seed=0)
    random, _ = build_classifier(replace(TINY, pretrained=False), 10, seed=0)
    again, _ = build_classifier(replace(TINY, pretrained=False), 10, seed=0)
    for key, tensor in pretrained.features.state_dict().items():
        if tensor.ndim == 4:  # every convolution kernel
            other = random.features.state_dict()[key]
            assert not torch.allclose(tensor, other), key
            # Not a scaled or shifted copy either: the two are uncorrelated.
            correlation = torch.corrcoef(torch.stack([tensor.flatten(), other.flatten()]))[0, 1]
            assert abs(float(correlation)) < 0.2, key
    # The random start is reproducible from the seed.
    for key, tensor in random.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key


def test_building_models_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_classifier(replace(TINY, pretrained=False), 10, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_training_restores_global_rng_and_thread_count(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(5)
        expected = torch.rand(3)
        torch.manual_seed(5)
        train(tmp_path, epochs=1)
        assert torch.equal(torch.rand(3), expected)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)  # later tests run with the machine's threads


def test_layer_decay_gives_earlier_layers_smaller_rates():
    model, _ = build_classifier(TINY, 10, seed=0)
    groups = parameter_groups(model, FinetuneSettings(lr=1.0, layer_decay=0.5), "all")
    rates = [group["lr"] for group in groups]
    assert rates[-1] == 1.0 and rates == sorted(rates) and rates[0] < 1e-3
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_no_weight_decay_on_biases_and_normalisation_weights():
    model, _ = build_classifier(TINY, 10, seed=0)
    groups = parameter_groups(model, FinetuneSettings(weight_decay=0.05), "all")
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, parameter in model.named_parameters():
        expected = 0.0 if parameter.ndim == 1 else 0.05
        assert decay_of[id(parameter)] == expected, name
    # BatchNorm weights and biases and the head's bias are among the undecayed.
    assert decay_of[id(model.head.bias)] == 0.0 and decay_of[id(model.head.weight)] == 0.05


def test_non_finite_loss_names_epoch_step_and_learning_rate(tmp_path):
    with pytest.raises(
        TrainingError, match=r"Non-finite loss .* at run epoch 1/1, step \d+, learning rate"
    ):
        train(tmp_path, lr=1e12, grad_clip=None, epochs=1, optimizer="sgd", warmup_epochs=0)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"mode": "partial"}, "finetune.mode='partial'"),
        ({"epochs": 0}, "finetune.epochs=0"),
        ({"learning_rate": 1}, "finetune.learning_rate"),
    ],
)
def test_bad_finetune_settings(params, message):
    with pytest.raises(TrainingError, match=message):
        FinetuneSettings.from_params(params)


RUNNER = textwrap.dedent(
    """
    import json, pathlib, sys, torch
    sys.path.insert(0, {tests!r})
    from test_finetune import digits, recipe, run_settings
    from transfer_learning.training.trainer import train_classifier
    result = train_classifier(
        digits(), 10, recipe(epochs=4),
        run_settings(pathlib.Path({checkpoints!r}), resume={resume}),
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


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path):
    reference = train_classifier(
        digits(),
        10,
        recipe(epochs=4),
        run_settings(tmp_path / "reference"),
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


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"finetune": {"epoch": 3}}, "Unknown parameter(s) structure_transfer.finetune.epoch"),
        (
            {"backbone": {"pretrain": False}},
            "Unknown parameter(s) structure_transfer.backbone.pretrain",
        ),
        ({"finetun": {}}, "Unknown parameter(s) structure_transfer.finetun"),
        ({"finetune": {"epochs": 0}}, "structure_transfer.finetune.epochs=0"),
        ({"backbone": {"image_size": 4}}, "structure_transfer.backbone.image_size=4"),
    ],
)
def test_strategy_overrides_are_checked_for_typos(overrides, message):
    with pytest.raises((TrainingError, BackboneError), match=re.escape(message)):
        Recipe.from_params({"name": "efficientnet_lite0"}, {}, overrides, "structure_transfer")


def test_a_typo_in_the_shared_block_names_the_shared_block():
    with pytest.raises(TrainingError, match=re.escape("Unknown parameter(s) finetune.lr_max")):
        Recipe.from_params({}, {"lr_max": 1}, {}, "parameter_transfer")


def test_strategy_overrides_win_over_the_shared_blocks():
    resolved = Recipe.from_params(
        {"image_size": 64},
        {"lr": 0.1, "epochs": 3},
        {"backbone": {"pretrained": False}, "finetune": {"lr": 0.5}},
        "structure_transfer",
    )
    assert resolved.backbone == BackboneSettings(image_size=64, pretrained=False)
    assert resolved.finetune.lr == 0.5 and resolved.finetune.epochs == 3


@pytest.mark.parametrize(
    "n_train,batch_size,epochs",
    [
        (40, 16, 60),  # 2 steps an epoch: 100 epochs would reach 200 steps; capped at 60
        (240, 16, 14),  # two classes of ~120 photos: 15 steps an epoch → 14 epochs ≥ 200 steps
        (1149, 64, 12),  # digits: 17 steps an epoch
        (50_000, 64, 3),  # 781 steps an epoch: the minimum 3 epochs, not 200 steps' worth
    ],
)
def test_the_step_budget_sets_batch_size_and_epochs(n_train, batch_size, epochs):
    resolved = FinetuneSettings(steps=200).resolve(n_train, mirror_symmetric=True, pretrained=True)
    assert (resolved.batch_size, resolved.epochs) == (batch_size, epochs)


@pytest.mark.parametrize("n_train,patience", [(1149, 4), (100, 12), (50_000, 3)])
def test_auto_patience_is_a_third_of_the_epochs(n_train, patience):
    assert (
        FinetuneSettings().resolve(n_train, mirror_symmetric=True, pretrained=True).patience
        == patience
    )


def test_an_unresolved_recipe_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="still has 'auto' values"):
        train_classifier(
            digits(),
            10,
            Recipe(TINY, FinetuneSettings()),
            run_settings(tmp_path),
            0,
            torch.device("cpu"),
            "x",
        )


def test_explicit_values_win_over_auto_and_flips_follow_the_data():
    settings = FinetuneSettings(epochs=5, batch_size=8, hflip="auto", patience=2)
    resolved = settings.resolve(10_000, mirror_symmetric=False, pretrained=True)
    assert resolved == replace(settings, hflip=False, freeze_stride=4)
    assert FinetuneSettings().resolve(100, mirror_symmetric=True, pretrained=True).hflip is True
    assert (
        FinetuneSettings(hflip=False).resolve(100, mirror_symmetric=True, pretrained=True).hflip
        is False
    )


def test_a_recipe_resolves_every_auto_from_the_data_profile():
    profile = {"typical_short_side": 32, "n_train": 800, "mirror_symmetric": True}
    recipe = Recipe.from_params({}, {}, {}, "parameter_transfer").resolve(profile)
    assert recipe.backbone.image_size == 128  # 32 px enlarged 4x
    assert recipe.finetune.batch_size == 32 and recipe.finetune.epochs == 8
    assert recipe.finetune.hflip is True


def test_short_trainings_step_clip_and_refuse_a_non_finite_loss_like_fine_tuning():
    """TENT and MCC take their steps through `train_steps`: the same clipping and the same
    refusal of a non-finite loss, naming the step and what to change."""
    weight = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    batches = [torch.tensor([10.0]), torch.tensor([float("inf")])]
    with pytest.raises(
        TrainingError, match=r"Non-finite loss \(inf\) at toy step 2: lower toy\.lr"
    ):
        train_steps(
            batches,
            lambda batch: ((weight * batch).sum(), {"batch": float(batch)}),
            optimizer,
            torch.device("cpu"),
            "toy",
            ": lower toy.lr.",
            grad_clip=0.5,
        )
    # The first step was taken with its gradient (10) clipped to norm 0.5: 1 - 0.1 × 0.5.
    assert weight.item() == pytest.approx(0.95)


PAGE_FAULTS_OF_REALLOCATING = """
import resource, sys, torch
from transfer_learning.core.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(60):  # one 64 MB activation a step, allocated, written and freed
    torch.empty(16 * 2**20).fill_(1.0)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_training_processes_reuse_freed_memory_instead_of_faulting_it_in_again():
    faults = {}
    for mode in ("default", "keep"):
        printed = subprocess.run(
            [sys.executable, "-c", PAGE_FAULTS_OF_REALLOCATING, mode],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        faults[mode] = int(printed[-1])
        assert printed[0] == {"default": "None", "keep": "True"}[mode]
    # Every fresh 64 MB mapping faults in its 16,384 pages; the kept heap only while it grows
    # (measured: 983,000 against 100,000).
    assert faults["default"] > 40 * 16_384, faults
    assert faults["keep"] < faults["default"] / 4, faults


@pytest.mark.parametrize(
    "short_side,pretrained,expected",
    [(240, True, 4), (8, True, None), (32, True, None), (240, False, None)],
)
def test_auto_freezing_is_for_pretrained_weights_on_photos_at_their_own_size(
    short_side, pretrained, expected
):
    # Flowers (240 px) keep their early layers; digits (8 px → 48) and CIFAR (32 px → 128) are
    # enlarged, and their early layers must learn the blur (measured on the digits: 81.7 %
    # frozen against 98.6 %); random weights have nothing to keep.
    backbone = BackboneSettings(pretrained=pretrained)
    profile = {"typical_short_side": short_side, "n_train": 500, "mirror_symmetric": True}
    resolved = Recipe(backbone, FinetuneSettings()).resolve(profile)
    assert resolved.finetune.freeze_stride == expected
