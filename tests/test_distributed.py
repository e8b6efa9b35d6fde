"""torch.distributed from inside a node: real worker processes (gloo on CPU), one result.

Every multi-process test here starts real processes through the elastic launch API.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from transfer_learning.core.distributed import (
    DistributedError,
    DistributedSettings,
    ProcessContext,
    contiguous_shard,
    launch,
    synchronise_batchnorm,
)
from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings
from transfer_learning.features.extraction import (
    ExtractionError,
    ExtractionSettings,
    extract_features,
)
from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.models.classifier import build_classifier
from transfer_learning.training.data import EpochOrder
from transfer_learning.training.recipe import (
    FinetuneSettings,
    Recipe,
    TrainingError,
    TrainingRunSettings,
    TrainValImages,
)
from transfer_learning.training.trainer import train_classifier

CPU = torch.device("cpu")
TWO_PROCESSES = DistributedSettings(nproc_per_node=2)
SINGLE = DistributedSettings()
PROBE = FinetuneSettings(
    mode="linear_probe",
    epochs=6,
    batch_size=64,
    lr=0.01,
    patience=None,
    hflip=True,
    freeze_stride=None,
)


def digits(n_train: int, n_val: int) -> TrainValImages:
    index, _, _ = build_image_index(DataSettings(), seed=0)
    train = index[index["split"] == "train"].head(n_train)
    val = index[index["split"] == "val"].head(n_val)
    return TrainValImages.from_index(train, val)


def context(rank: int, world_size: int) -> ProcessContext:
    return ProcessContext(rank, world_size, CPU)


# ---- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params,message",
    [
        ({"nproc_per_node": 0}, "distributed.nproc_per_node=0"),
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "distributed.node_rank=2"),
        ({"nnodes": 2}, "needs distributed.rdzv_endpoint"),
        ({"rdzv_endpoint": "node0"}, "distributed.rdzv_endpoint='node0' must be host:port"),
        ({"backend": "mpi"}, "distributed.backend='mpi'"),
        ({"nprocs": 2}, "Unknown parameter(s) distributed.nprocs"),
    ],
)
def test_bad_distributed_settings_name_the_parameter(params, message):
    with pytest.raises(DistributedError) as error:
        DistributedSettings.from_params(params)
    assert message in str(error.value)


def test_backend_auto_is_nccl_on_gpus_and_gloo_on_cpus():
    settings = DistributedSettings.from_params({"nproc_per_node": 2})
    assert (settings.backend_for("cuda"), settings.backend_for("cpu")) == ("nccl", "gloo")
    assert settings.world_size == 2
    assert DistributedSettings.from_params(None) == DistributedSettings()


# ---- how work is divided (no processes needed) ----------------------------------------------


def test_each_global_batch_is_split_over_the_processes_without_overlap():
    for weights in (None, torch.tensor([1.0] * 50 + [5.0] * 50)):
        one = list(EpochOrder(100, 16, 7, context(0, 1), weights))
        shares = [list(EpochOrder(100, 16, 7, context(r, 3), weights)) for r in range(3)]
        assert len(one) == 6  # whole global batches only: 100 // 16
        for step, batch in enumerate(one):
            parts = [draw for share in shares for draw in share[step]]
            assert sorted(parts) == sorted(batch)  # same images, same augmentation seeds
            assert [len(share[step]) for share in shares] == [6, 5, 5]
    shuffled = list(EpochOrder(100, 16, 7, context(0, 1)))
    assert list(EpochOrder(100, 16, 7, context(0, 1))) == shuffled  # the seed decides
    assert list(EpochOrder(100, 16, 8, context(0, 1))) != shuffled


def test_contiguous_shards_cover_every_item_once_on_batch_boundaries():
    for n_items, world_size, multiple in ((10, 3, 1), (1000, 2, 64), (5, 4, 64), (0, 2, 8)):
        shards = [contiguous_shard(n_items, context(r, world_size), multiple) for r in range(4)]
        shards = shards[:world_size]
        assert [i for shard in shards for i in shard] == list(range(n_items))
        assert all(shard.start % multiple == 0 for shard in shards)


# ---- real worker processes ---------------------------------------------------------------------


def _rank_and_cores(context: ProcessContext, offset: int) -> tuple[int, int, int]:
    import os

    return context.rank + offset, context.world_size, len(os.sched_getaffinity(0))


def _fail_on_rank_one(context: ProcessContext) -> None:
    if context.rank == 1:
        raise ValueError("image 17 is broken")
    torch.distributed.barrier()


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
def test_launch_returns_rank_zeros_result_and_reports_a_worker_failure():
    assert launch(TWO_PROCESSES, CPU, _rank_and_cores, 10)[:2] == (10, 2)
    assert launch(DistributedSettings(), CPU, _rank_and_cores, 10)[:2] == (10, 1)
    with pytest.raises(
        DistributedError,
        match="^The distributed job failed on rank 1: ValueError: image 17 is broken$",
    ):
        launch(TWO_PROCESSES, CPU, _fail_on_rank_one)


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
def test_two_processes_extract_the_same_features_as_one(tmp_path):
    backbone = build_backbone(BackboneSettings(image_size=48))
    index, _, _ = build_image_index(DataSettings(), seed=0)
    locations = index["location"].tolist()[:300]
    settings = ExtractionSettings(batch_size=64, cache_dir=None, progress=False)
    one = extract_features(backbone, locations, settings, CPU).features
    two = extract_features(backbone, locations, settings, CPU, TWO_PROCESSES).features
    assert one.shape == two.shape == (300, backbone.feature_dim)
    # Not two paths: shards start on batch boundaries and each batch runs on one thread in
    # either process count, so the same batches go through the same kernels: bit for bit.
    np.testing.assert_array_equal(one, two)

    cached = ExtractionSettings(batch_size=64, cache_dir=str(tmp_path), progress=False)
    written = extract_features(backbone, locations, cached, CPU, TWO_PROCESSES)
    assert not written.cached and list(tmp_path.glob("*.npy")) == [
        tmp_path / f"{written.cache_key}.npy"
    ]
    again = extract_features(backbone, locations, cached, CPU)  # one cache for any process count
    assert again.cached
    np.testing.assert_array_equal(again.features, one)


def _train(  # noqa: PLR0913 (the knobs these tests turn)
    images, finetune, tmp_path, name, distributed=SINGLE, resume=False, micro_batch_size=None
):
    return train_classifier(
        images,
        10,
        Recipe(BackboneSettings(image_size=32), finetune),
        TrainingRunSettings(
            checkpoint_dir=str(tmp_path),
            progress=False,
            resume=resume,
            micro_batch_size=micro_batch_size,
        ),
        0,
        CPU,
        name,
        distributed,
    )


@pytest.mark.slow
def test_linear_probe_on_two_processes_equals_one_process_weight_for_weight(tmp_path):
    images = digits(256, 64)
    probe = replace(PROBE, epochs=2)
    one = _train(images, probe, tmp_path, "one")  # 1 x 64 images a step
    two = _train(images, probe, tmp_path, "two", TWO_PROCESSES)  # 2 x 32
    assert len(one.history) == len(two.history) == 2
    # Two paths: one mean over 64 images against two over 32 averaged by the all-reduce, float32
    # sums in another order at every step: torch.testing's float32 atol, not bit equality.
    for key, weight in one.state_dict.items():
        assert torch.allclose(weight, two.state_dict[key], atol=1e-5, rtol=0), key
    initial, _ = build_classifier(BackboneSettings(image_size=32), 10, seed=0)
    moved = one.state_dict["head.weight"] - initial.head.weight.detach()
    assert moved.abs().max() > 1e-2  # training moved the weights these two runs agree on


def _one_training_step_gradients(context: ProcessContext) -> dict[str, torch.Tensor]:
    """Gradients of one training-mode step of Lite0 (BatchNorm on batch statistics) in float64,
    this process taking its share of 8 images."""
    torch.manual_seed(0)
    images = torch.randn(8, 3, 48, 48, dtype=torch.float64)
    network, _ = build_classifier(BackboneSettings(image_size=48), 10, seed=0)
    network = network.double().train().to(memory_format=torch.channels_last)
    mine = images[
        context.rank * 8 // context.world_size : (context.rank + 1) * 8 // context.world_size
    ]
    if context.distributed:
        network = torch.nn.parallel.DistributedDataParallel(synchronise_batchnorm(network, CPU))
    network(mine.contiguous(memory_format=torch.channels_last)).pow(2).sum(1).mean().backward()
    return {name: p.grad for name, p in network.named_parameters()}


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
def test_global_batchnorm_on_two_processes_gives_one_processs_gradients():
    # float64: the two computations are the same mathematics in another order; float32 rounding
    # (and ReLU6 masks at the kink) would blur the comparison.
    one = launch(SINGLE, CPU, _one_training_step_gradients)
    two = launch(TWO_PROCESSES, CPU, _one_training_step_gradients)
    for name, gradient in one.items():
        torch.testing.assert_close(two[f"module.{name}"], gradient, rtol=1e-9, atol=1e-11)


def test_gradient_accumulation_over_pieces_equals_the_whole_batch(tmp_path):
    images = digits(128, 32)
    probe = replace(PROBE, epochs=1)
    whole = _train(images, probe, tmp_path, "whole")
    pieces = _train(images, probe, tmp_path, "pieces", micro_batch_size=24)  # 24 + 24 + 16
    # Two paths: float32 forward passes and sums over other pieces of the batch; torch.testing's
    # float32 tolerance, not bit equality.
    for key, weight in whole.state_dict.items():
        assert torch.allclose(weight, pieces.state_dict[key], atol=1e-5, rtol=0), key
    assert whole.history[0]["train_loss"] == pytest.approx(
        pieces.history[0]["train_loss"], rel=1.3e-6, abs=1e-5
    )
    with pytest.raises(TrainingError, match="training.micro_batch_size=0"):
        TrainingRunSettings.from_params({"micro_batch_size": 0})


def test_a_batch_smaller_than_the_process_count_is_refused(tmp_path):
    finetune = FinetuneSettings(
        epochs=1, batch_size=2, patience=None, hflip=False, freeze_stride=None
    )
    with pytest.raises(TrainingError, match=r"finetune.batch_size=2 is smaller than the 3"):
        _train(digits(16, 8), finetune, tmp_path, "x", DistributedSettings(nproc_per_node=3))


KILLED_RUN = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_distributed import PROBE, TWO_PROCESSES, _train, digits
    _train(digits(256, 64), PROBE, {checkpoints!r}, "killed", TWO_PROCESSES)
    """
)


@pytest.mark.slow
def test_a_run_killed_on_two_processes_resumes_on_one_to_the_same_weights(tmp_path):
    images = digits(256, 64)
    reference = _train(images, PROBE, tmp_path / "reference", "killed")
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), checkpoints=str(tmp_path))
    # A session of its own, so that the kill takes the worker processes too.
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    checkpoint = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "training ended before it was killed: " + process.stderr.read()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 2 <= killed_at < PROBE.epochs

    resumed = _train(images, PROBE, tmp_path, "killed", resume=True)  # now on one process
    assert resumed.resumed_from_epoch == killed_at
    assert len(resumed.history) == PROBE.epochs
    # Two paths: the first epochs ran on two processes (see the two-process test above).
    for key, weight in reference.state_dict.items():
        assert torch.allclose(weight, resumed.state_dict[key], atol=1e-5, rtol=0), key


@pytest.mark.slow
def test_a_second_node_joins_with_the_module_command_and_extracts_its_shard(tmp_path):
    """Two "nodes" on this machine: this process is node 0 (as `kedro run` would be), a
    `python -m transfer_learning.core.distributed` process is node 1."""
    backbone = build_backbone(BackboneSettings(image_size=48))
    index, _, _ = build_image_index(DataSettings(), seed=0)
    locations = index["location"].tolist()[:200]
    settings = ExtractionSettings(batch_size=32, cache_dir=str(tmp_path), progress=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{probe.getsockname()[1]}"
    node_1 = subprocess.Popen(
        [sys.executable, "-m", "transfer_learning.core.distributed", "--nnodes", "2",
         "--node-rank", "1", "--rdzv-endpoint", endpoint, "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    two_nodes = DistributedSettings(nnodes=2, node_rank=0, rdzv_endpoint=endpoint)
    try:
        joint = extract_features(backbone, locations, settings, CPU, two_nodes)
        output, _ = node_1.communicate(timeout=120)
    finally:
        node_1.kill()
    assert node_1.returncode == 0, output[-3000:]
    alone = ExtractionSettings(batch_size=32, cache_dir=None, progress=False)
    # The same batches through the same kernels on either node: bit for bit (see above).
    np.testing.assert_array_equal(
        joint.features, extract_features(backbone, locations, alone, CPU).features
    )
    with pytest.raises(ExtractionError, match="needs extraction.cache_dir"):
        extract_features(backbone, locations, alone, CPU, two_nodes)
