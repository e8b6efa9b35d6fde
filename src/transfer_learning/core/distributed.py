"""Running one job on several processes (and nodes) with torch.distributed, from inside a node.

A DDP launcher that re-executes the script (torchrun, Lightning's DDP) would run the whole Kedro
session once per process: N copies of every output, N MLflow runs. Here the Kedro pipeline runs
once; a node that has a big job (fine-tuning, feature extraction) calls `launch`, which starts
the worker processes through torch.distributed's elastic launch API and returns rank 0's result.
Only rank 0's result reaches the catalog and MLflow; only rank 0 writes checkpoints.

Multi-node: the node that runs Kedro is node 0; every other node runs
`python -m transfer_learning.core.distributed --node-rank K ...` with the same settings. Its workers
receive the job from rank 0 over the process group, so they need the project installed and the
images (and cache directory) at the same paths, not the Kedro configuration.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from transfer_learning.core.config import check_known_keys

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")

AUTO_ENDPOINT = "auto"


class DistributedError(RuntimeError):
    """The distributed settings are unusable, or a worker process failed."""


@dataclass(frozen=True)
class DistributedSettings:
    """The `distributed` block of parameters.yml: how many processes a big job runs on."""

    nproc_per_node: int = 1  # 1: in the Kedro process itself, as without torch.distributed
    nnodes: int = 1
    node_rank: int = 0  # this machine's place; the one that runs `kedro run` is 0
    rdzv_endpoint: str = AUTO_ENDPOINT  # host:port of node 0; auto: a free local port (one node)
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> DistributedSettings:
        params = params or {}
        check_known_keys(cls, params, "distributed", DistributedError)
        settings = cls(**params)
        for name in ("nproc_per_node", "nnodes"):
            value = getattr(settings, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DistributedError(f"distributed.{name}={value!r} must be an integer ≥ 1.")
        if not isinstance(settings.node_rank, int) or not 0 <= settings.node_rank < settings.nnodes:
            raise DistributedError(
                f"distributed.node_rank={settings.node_rank!r} must be between 0 and "
                f"distributed.nnodes - 1 = {settings.nnodes - 1}."
            )
        if settings.backend not in BACKENDS:
            raise DistributedError(
                f"distributed.backend={settings.backend!r} must be one of {', '.join(BACKENDS)}."
            )
        if settings.nnodes > 1 and settings.rdzv_endpoint == AUTO_ENDPOINT:
            raise DistributedError(
                f"distributed.nnodes={settings.nnodes} needs distributed.rdzv_endpoint: the "
                "host:port of node 0 that every node can reach, e.g. 10.0.0.1:29500."
            )
        if settings.rdzv_endpoint != AUTO_ENDPOINT and not _is_host_port(settings.rdzv_endpoint):
            raise DistributedError(
                f"distributed.rdzv_endpoint={settings.rdzv_endpoint!r} must be host:port "
                "(e.g. 10.0.0.1:29500) or auto."
            )
        return settings

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def backend_for(self, device_type: str) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if device_type == "cuda" else "gloo"


SINGLE_PROCESS = DistributedSettings()


def _is_host_port(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    return bool(host) and port.isdigit()


@dataclass(frozen=True)
class ProcessContext:
    """Where one worker process stands: its rank among all, and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class _Job:
    """What every worker runs: `task(context, *args)`; None on nodes other than node 0 until
    rank 0 sends it."""

    task: Callable[..., Any]
    args: tuple[Any, ...]


def launch(
    settings: DistributedSettings,
    device: torch.device,
    task: Callable[..., Any],
    *args: Any,
) -> Any:
    """`task(context, *args)` on every process of the job; returns rank 0's result.

    `task` must be a module-level function (it is pickled to the workers). With one process it
    runs here, in the calling process, on `device`.
    """
    if settings.world_size == 1:
        return task(ProcessContext(0, 1, device), *args)
    return _launch_workers(settings, device.type, _Job(task, args))


def _launch_workers(settings: DistributedSettings, device_type: str, job: _Job | None) -> Any:
    # Imported here: the elastic agent is heavy and single-process runs never need it.
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if device_type == "cuda" and settings.nproc_per_node > torch.cuda.device_count():
        raise DistributedError(
            f"distributed.nproc_per_node={settings.nproc_per_node} but this machine has "
            f"{torch.cuda.device_count()} CUDA GPU(s): use at most one process per GPU."
        )
    endpoint = settings.rdzv_endpoint
    if endpoint == AUTO_ENDPOINT:
        endpoint = f"127.0.0.1:{_free_port()}"
    config = LaunchConfig(
        min_nodes=settings.nnodes,
        max_nodes=settings.nnodes,
        nproc_per_node=settings.nproc_per_node,
        run_id="transfer_learning",
        rdzv_backend="static",  # torchrun's default: node ranks as given, node 0 hosts the store
        rdzv_endpoint=endpoint,
        rdzv_configs={"rank": settings.node_rank},
        max_restarts=0,  # a failed job fails the Kedro node; `training.resume` restarts it
        start_method="spawn",  # forking a process that holds CUDA or many threads is unsafe
    )
    logger.info(
        "Starting %d worker processes (%d node(s) x %d, %s) at %s",
        settings.world_size,
        settings.nnodes,
        settings.nproc_per_node,
        settings.backend_for(device_type),
        endpoint,
    )
    worker_settings = asdict(settings)
    try:
        results = elastic_launch(config, _worker)(job, worker_settings, device_type)
    except ChildFailedError as error:
        raise DistributedError(_root_cause(error.failures)) from None
    return results.get(0)


# What a worker's exception says, for the launcher: "<marker>rank R: Type: message".
_CAUSE = "distributed job failed on "


def _root_cause(failures: Mapping[int, Any]) -> str:
    """The first failure of the job, as the workers recorded it (see `_first_failure`)."""
    rank, failure = min(failures.items())
    message = failure.message
    if isinstance(message, dict):  # the error file's record: the exception's own message
        message = message.get("message", message)
    message = str(message).strip() or f"exit code {failure.exitcode}"
    if _CAUSE in message:
        return "The " + message[message.index(_CAUSE) :]
    return f"The {_CAUSE}rank {rank}: {message}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(job: _Job | None, settings: dict[str, Any], device_type: str) -> Any:
    """One worker process: join the group, take the job from rank 0, run it, leave.

    (The elastic agent records a worker's exception for `ChildFailedError` itself.)
    """
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size, local_world = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    device = _worker_device(device_type, local_rank, local_world)
    dist.init_process_group(DistributedSettings(**settings).backend_for(device_type))
    try:
        # Node 0's workers were handed the job; the others get it from rank 0.
        shared = [job if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        job = shared[0]
        try:
            return job.task(ProcessContext(rank, world_size, device), *job.args)
        except Exception as error:
            cause = _first_failure(f"rank {rank}: {type(error).__name__}: {error}")
            raise RuntimeError(_CAUSE + cause) from error
    finally:
        dist.destroy_process_group()


def _first_failure(cause: str) -> str:
    """The first failure any process of the job recorded: this one's, if it is first.

    When one process raises, the others fail a moment later in a collective ("connection
    closed by peer"), and the launcher may report any of them: each reports the first.
    """
    try:
        store = dist.distributed_c10d._get_default_store()
        return store.compare_set("transfer_learning/first_failure", "", cause).decode()
    except Exception:  # no store to record in: this process's own failure
        return cause


def _worker_device(device_type: str, local_rank: int, local_world: int) -> torch.device:
    """cuda:<local rank> on GPUs; on CPU, this process's own slice of the cores.

    Each CPU process keeps to its slice (affinity), so the thread counts that extraction and
    training take from the usable cores divide the machine instead of oversubscribing it.
    """
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        mine = cores[local_rank::local_world] or [cores[local_rank % len(cores)]]
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(len(mine))
    return torch.device("cpu")


# ---- collective helpers for tasks ---------------------------------------------------------------


def gather_in_rank_order(context: ProcessContext, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (one process: `[value]`)."""
    if not context.distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def sum_over_ranks(context: ProcessContext, values: list[float]) -> list[float]:
    """Element-wise sums of `values` over all ranks."""
    if not context.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device(context))
    dist.all_reduce(tensor)
    return tensor.tolist()


def _collective_device(context: ProcessContext) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    return context.device if dist.get_backend() == "nccl" else torch.device("cpu")


def contiguous_shard(n_items: int, context: ProcessContext, multiple: int = 1) -> range:
    """This rank's contiguous share of range(n_items); boundaries on multiples of `multiple`
    (a batch size), so every batch is the same as one process would form."""
    blocks = -(-n_items // multiple)
    first = blocks * context.rank // context.world_size
    last = blocks * (context.rank + 1) // context.world_size
    return range(min(n_items, first * multiple), min(n_items, last * multiple))


# ---- BatchNorm over the global batch ------------------------------------------------------------


def synchronise_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with every BatchNorm computing its training statistics over the global batch of
    all processes, as one process with the whole batch would.

    CUDA: torch's SyncBatchNorm (timm's conversion keeps its norm+activation layers whole).
    Elsewhere SyncBatchNorm refuses to run, so each BatchNorm module becomes a
    `GlobalBatchStatistics` variant of its own class: same parameters, buffers and state-dict
    keys; timm's BatchNormAct2d keeps its dropout and activation after the normalisation.
    """
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, GlobalBatchStatistics
        ):
            module.__class__ = _global_variant(type(module))
    return model


class GlobalBatchStatistics(nn.Module):
    """Mixin before a BatchNorm class: in training, with several processes, BatchNorm over all
    processes' images (`_GlobalBatchNorm`); otherwise the class's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        weight = self.weight if self.affine else torch.ones(x.shape[1], device=x.device)
        bias = self.bias if self.affine else torch.zeros(x.shape[1], device=x.device)
        y, mean, variance, n = _GlobalBatchNorm.apply(x, weight, bias, self.eps)
        if self.track_running_stats:
            self._update_running_statistics(mean, variance * n / (n - 1))
        # timm's BatchNormAct2d: dropout and activation follow the normalisation.
        if hasattr(self, "act"):
            y = self.act(self.drop(y))
        return y

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, variance: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(variance.to(self.running_var.dtype), factor)


class _GlobalBatchNorm(torch.autograd.Function):
    """Batch normalisation whose statistics span every process's batch, with the compact
    backward formula torch's SyncBatchNorm uses: autograd through the statistics would add up
    large terms that cancel, and lose several digits in fp32.

    Forward: each process's per-channel mean and variance (one pass each), all-gathered and
    combined. Backward: the per-channel sums of dy and dy·x̂ are all-reduced, then
    dx = w / σ · (dy − Σdy / N − x̂ · Σ(dy·x̂) / N).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        channels, reduced = x.shape[1], [0, *range(2, x.ndim)]
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision: in fp32
        variance, mean = torch.var_mean(wide, dim=reduced, correction=0)
        count = torch.full((1,), x.numel() / channels, dtype=wide.dtype, device=x.device)
        local = torch.cat([mean, variance, count])
        gathered = local.new_empty(dist.get_world_size() * local.numel())
        dist.all_gather_single(gathered, local)
        gathered = gathered.view(dist.get_world_size(), local.numel())
        means, variances, counts = (
            gathered[:, :channels],
            gathered[:, channels:-1],
            gathered[:, -1:],
        )
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        variance = (counts * (variances + (means - mean) ** 2)).sum(0) / n
        shape = [1, channels] + [1] * (x.ndim - 2)
        inverse_std = torch.rsqrt(variance + eps)
        normalised = (wide - mean.view(shape)) * inverse_std.view(shape)
        ctx.save_for_backward(normalised, inverse_std, weight)
        ctx.n = n
        y = normalised * weight.view(shape) + bias.view(shape)
        return y.to(x.dtype), mean, variance, n

    @staticmethod
    def backward(ctx, grad_y, *_):
        normalised, inverse_std, weight = ctx.saved_tensors
        channels, reduced = grad_y.shape[1], [0, *range(2, grad_y.ndim)]
        shape = [1, channels] + [1] * (grad_y.ndim - 2)
        grad = grad_y.to(normalised.dtype)
        sum_grad = grad.sum(reduced)
        sum_grad_normalised = (grad * normalised).sum(reduced)
        # The parameters' gradients are this process's own: DDP averages them.
        grad_weight, grad_bias = sum_grad_normalised.to(weight.dtype), sum_grad.to(weight.dtype)
        sums = torch.cat([sum_grad, sum_grad_normalised])
        dist.all_reduce(sums)
        mean_grad, mean_grad_normalised = (sums / ctx.n).split(channels)
        grad_x = (
            (grad - mean_grad.view(shape) - normalised * mean_grad_normalised.view(shape))
            * (inverse_std * weight).view(shape)
        ).to(grad_y.dtype)
        return grad_x, grad_weight, grad_bias, None


@functools.cache
def _global_variant(batchnorm_class: type) -> type:
    return type(f"Global{batchnorm_class.__name__}", (GlobalBatchStatistics, batchnorm_class), {})


# ---- nodes other than node 0 ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Join a distributed job started by `kedro run` on node 0 (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m transfer_learning.core.distributed",
        description="Run this node's worker processes of a job that `kedro run` on node 0 "
        "started with the same distributed.* settings.",
    )
    parser.add_argument("--nnodes", type=int, required=True)
    parser.add_argument("--node-rank", type=int, required=True)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--rdzv-endpoint", required=True, help="host:port of node 0")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    options = parser.parse_args(argv)
    settings = DistributedSettings.from_params(
        {
            "nproc_per_node": options.nproc_per_node,
            "nnodes": options.nnodes,
            "node_rank": options.node_rank,
            "rdzv_endpoint": options.rdzv_endpoint,
            "backend": options.backend,
        }
    )
    if settings.node_rank == 0:
        parser.error("node 0 is the one that runs `kedro run`; give this node --node-rank ≥ 1")
    logging.basicConfig(level=logging.INFO)
    device_type = options.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    _launch_workers(settings, device_type, None)


if __name__ == "__main__":
    main()
