"""Frozen networks exported to ONNX and run by ONNX Runtime: on a CPU about twice PyTorch
eager's images per second, with the same outputs to 1e-4.

A network is exported once per weights and input size, checked against PyTorch, and kept in a
cache folder; a cached export that no longer loads or no longer matches is rebuilt. Whatever
the exporter cannot handle stays in PyTorch (one log line says so): the engine is a speed-up,
never a requirement.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

AUTO, TORCH, ONNXRUNTIME = "auto", "torch", "onnxruntime"
ENGINES = (AUTO, TORCH, ONNXRUNTIME)
OPSET = 18
# Largest difference allowed between the two engines, relative to the largest output:
# measured ~2e-6 on EfficientNet-Lite features; float32 kernels differ in summation order only.
RELATIVE_TOLERANCE = 1e-4
# Below this much input (images × side², here 300 photos at 224 px) `auto` keeps PyTorch: the
# one-time export and check (~5 s for EfficientNet-Lite on 2 cores) would cost more than ONNX
# Runtime saves (~0.018 s a photo at 224 px). Tiny jobs (the digits, tests) stay as fast as before.
WORTHWHILE_PIXELS = 300 * 224 * 224
_FORMAT = "v1"  # bump when the export itself changes, so older cached exports are not reused

Forward = Callable[[torch.Tensor], np.ndarray]

# Cached exports checked against PyTorch in this process (None: those that cannot be exported),
# by export key, file, threads and the file's size and modification time: extraction checks
# the export before it decides the feature cache key, then runs it, and the check need not run
# twice. The key is a digest of the weights, so an entry never stands for other weights; a
# file rewritten since is checked again.
_CHECKED: dict[tuple[str, str, int, tuple[int, int] | None], Forward | None] = {}
_UNCHECKED = object()


class EngineError(ValueError):
    """The requested inference engine cannot run here."""


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_engine(
    engine: str,
    device: torch.device,
    pixels: int | None = None,
    setting: str = "extraction.engine",
) -> str:
    """The engine that runs a frozen network on `device` for `pixels` of input (images × side²;
    None: an open-ended stream of requests, as a server answers).

    `auto` → ONNX Runtime on a CPU when it is installed and the work repays the one-time export
    (`WORTHWHILE_PIXELS`); PyTorch otherwise, GPUs included (there PyTorch runs under autocast,
    which ONNX Runtime's CPU provider cannot beat).
    """
    if engine not in ENGINES:
        raise EngineError(f"{setting}={engine!r} must be one of {', '.join(ENGINES)}.")
    if engine == ONNXRUNTIME:
        if device.type != "cpu":
            raise EngineError(
                f"{setting}=onnxruntime runs on the CPU, but the device is {device}: "
                f"set {setting}=auto or torch."
            )
        if not onnxruntime_installed():
            raise EngineError(
                f"{setting}=onnxruntime needs the onnxruntime package: pip install onnxruntime "
                f"onnx, or set {setting}=auto."
            )
        return ONNXRUNTIME
    worthwhile = pixels is None or pixels >= WORTHWHILE_PIXELS
    if engine == AUTO and device.type == "cpu" and worthwhile and onnxruntime_installed():
        return ONNXRUNTIME
    return TORCH


def onnx_forward(
    network: nn.Module, image_size: int, cache_dir: Path | None, name: str, threads: int = 1
) -> Forward | None:
    """`network` (uint8 NCHW images of `image_size` px → float outputs) as an ONNX Runtime
    forward pass, or None when it cannot be exported faithfully (then PyTorch runs it).

    The export is kept in `cache_dir` (None: a temporary folder, removed once loaded) and
    rebuilt there when it no longer loads or matches. `threads`: ONNX Runtime's intra-op
    threads. The session may be called from several threads at once (ONNX Runtime's `run` is
    thread-safe and releases the GIL).
    """
    network = network.eval()
    key = export_key(network, image_size)
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="onnx-") as folder:
            return _forward_of(network, image_size, Path(folder) / f"{key}.onnx", name, threads)
    path = cache_dir / f"{key}.onnx"
    checked = _CHECKED.get((key, str(path), threads, _stamp(path)), _UNCHECKED)
    if checked is not _UNCHECKED:
        return checked
    forward = _forward_of(network, image_size, path, name, threads)
    _CHECKED[key, str(path), threads, _stamp(path)] = forward  # the file as now written
    return forward


def export_checked(network: nn.Module, image_size: int, path: Path, name: str) -> bool:
    """Export `network` to `path` (a packaged model's file), checked against PyTorch; False,
    and no file, where it cannot be exported faithfully."""
    path.unlink(missing_ok=True)
    if _forward_of(network.eval(), image_size, path, name, threads=1) is None:
        path.unlink(missing_ok=True)
        return False
    return True


def packaged_forward(
    network: nn.Module, image_size: int, path: Path, name: str, threads: int
) -> Forward | None:
    """The export at `path` (a packaged model's, written by `export_checked`) as a forward pass
    if it loads and still matches `network` (the packaged weights, run by PyTorch); else None,
    with a log line, and PyTorch runs the network. Never rewrites the file: model folders may
    be read-only, and a mismatch means someone changed them."""
    check_batch, expected = _expected(network.eval(), image_size)
    return _checked_or_warn(
        path,
        threads,
        check_batch,
        expected,
        "%s does not load or does not match %s's weights: PyTorch runs the model instead",
        path,
        name,
    )


def _forward_of(
    network: nn.Module, image_size: int, path: Path, name: str, threads: int
) -> Forward | None:
    """The checked export at `path`, exported (again) there when it is missing or bad."""
    check_batch, expected = _expected(network, image_size)
    if path.exists():
        forward, _ = _checked_forward(path, threads, check_batch, expected)
        if forward is not None:
            return forward
        logger.warning(
            "Cached ONNX export %s does not load or match %s: rebuilding it.", path, name
        )
    try:
        _export_atomically(network, check_batch, path)
    except Exception as error:  # the exporter's errors have no common type
        first_line = next(iter(str(error).splitlines()), "")
        logger.warning(
            "%s cannot be exported to ONNX (%s: %s); it runs in PyTorch instead.",
            name,
            type(error).__name__,
            first_line,
        )
        return None
    return _checked_or_warn(
        path,
        threads,
        check_batch,
        expected,
        "%s exported to ONNX differs from PyTorch (allowed: %.0e); it runs in PyTorch instead",
        name,
        RELATIVE_TOLERANCE,
    )


def _checked_or_warn(  # noqa: PLR0913
    path: Path,
    threads: int,
    check_batch: torch.Tensor,
    expected: np.ndarray,
    message: str,
    *args: object,
) -> Forward | None:
    """`_checked_forward`, with `message % args` and the difference logged when it fails."""
    forward, difference = _checked_forward(path, threads, check_batch, expected)
    if forward is None:
        logger.warning(message + " (relative difference %.2g).", *args, difference)
    return forward


def _expected(network: nn.Module, image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """The fixed check batch and PyTorch's outputs on it."""
    check_batch = _check_batch(image_size)
    with torch.inference_mode():
        return check_batch, network(check_batch).float().numpy()


def export_key(network: nn.Module, image_size: int) -> str:
    """A digest of everything the export depends on: the network's class and every weight and
    buffer, the input size, the torch version and the opset."""
    digest = hashlib.sha256(
        repr((_FORMAT, type(network).__qualname__, image_size, torch.__version__, OPSET)).encode()
    )
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _check_batch(image_size: int) -> torch.Tensor:
    """Two seeded images with smooth structure and noise, as the exporter's example and the
    check against PyTorch (the same every time, so a cached export is judged alike)."""
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 255, image_size)
    smooth = (ramp[None, :] + ramp[:, None]) / 2
    noise = torch.randint(0, 64, (2, 3, image_size, image_size), generator=generator)
    return ((smooth + noise) % 256).to(torch.uint8)


def _export_atomically(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter announces its deprecation; it is still the one that
            # handles timm and torchvision networks without onnxscript.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network,
                (example,),
                str(partial),
                input_names=["images"],
                output_names=["outputs"],
                dynamic_axes={"images": {0: "batch"}, "outputs": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _session_or_none(path: Path, threads: int):
    """An ONNX Runtime session of the model in `path`, or None when the file is not a
    self-contained ONNX model. A model may name "external data" files to read its weights
    from; this project never writes those, and a file that names any is refused, so a model
    folder cannot make the server read other files."""
    import onnx
    import onnxruntime

    try:
        data = path.read_bytes()
        model = onnx.load_model_from_string(data)  # never reads external data itself
    except Exception:  # missing, truncated or foreign: onnx raises its own types
        return None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(model.graph)):
        logger.warning("%s refers to external data files: refused.", path)
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    try:
        return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception:  # an invalid graph: onnxruntime raises its own types
        return None


def _tensors(graph):
    """Every tensor stored in `graph`: initializers, and constants, in subgraphs as well."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _tensors(subgraph)


def _checked_forward(
    path: Path, threads: int, check_batch: torch.Tensor, expected: np.ndarray
) -> tuple[Forward | None, float]:
    """The export at `path` as a forward pass if it loads and matches PyTorch's `expected`
    outputs on `check_batch`, and the relative difference it showed."""
    session = _session_or_none(path, threads)
    if session is None:
        return None, float("nan")
    try:
        outputs = session.run(None, {"images": check_batch.numpy()})[0]
    except Exception:  # another network's inputs: onnxruntime raises its own types
        return None, float("nan")
    difference = _relative_difference(outputs, expected)
    if difference > RELATIVE_TOLERANCE:
        return None, difference

    def forward(images: torch.Tensor) -> np.ndarray:
        return session.run(None, {"images": images.numpy()})[0]

    return forward, difference


def _relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))
