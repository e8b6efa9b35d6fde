"""Real users' folders: odd and hostile files, each with a named outcome.

Unreadable files are left out and listed (`data.on_corrupt: skip`) or named in an error
(`error`); odd but valid images are read as RGB. Nothing crashes, hangs or decodes a bomb.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from tests.conftest import write_image
from transfer_learning.data.images import load_rgb_tensor
from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings, DataSourceError


def photo() -> Image.Image:
    return Image.fromarray(load_sample_images().images[1])  # flower.jpg, 427 x 640


def folder_with(tmp_path: Path, name: str, write) -> tuple[Path, Path]:
    """Two classes of ordinary images, and `write(path)` making one more file in class b."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for class_name in ("a", "b"):
        for i in range(6):
            write_image(root / class_name / f"{i}.png", rng)
    odd = root / "b" / name
    write(odd)
    return root, odd


def index(root: Path, on_corrupt: str):
    settings = DataSettings.from_params(
        {"source": "imagefolder", "path": str(root), "on_corrupt": on_corrupt}
    )
    return build_image_index(settings, seed=0)


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    data = zlib.compress(b"\x00" * 64)
    idat = (
        struct.pack(">I", len(data))
        + b"IDAT"
        + data
        + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    )
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + end


def jpeg_header_claiming(width: int, height: int) -> bytes:
    """A real small JPEG with its frame header (SOF0) rewritten to claim width x height."""
    stream = io.BytesIO()
    photo().resize((64, 48)).save(stream, "JPEG")
    data = bytearray(stream.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def truncated_jpeg(path: Path) -> None:
    stream = io.BytesIO()
    photo().save(stream, "JPEG", quality=90)
    path.write_bytes(stream.getvalue()[: len(stream.getvalue()) // 2])


UNREADABLE = {
    "png_bomb.png": lambda p: p.write_bytes(png_header_claiming(100_000, 100_000)),
    "jpeg_bomb.jpg": lambda p: p.write_bytes(jpeg_header_claiming(65_000, 65_000)),
    "truncated.jpg": truncated_jpeg,
    "empty.jpg": lambda p: p.write_bytes(b""),
    "notes.jpg": lambda p: p.write_text("these are my notes, not a picture\n"),
    "dangling.jpg": lambda p: p.symlink_to(p.parent / "no-such-file.jpg"),
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_an_unreadable_file_is_skipped_with_its_reason_or_named_in_the_error(tmp_path, name):
    root, odd = folder_with(tmp_path, name, UNREADABLE[name])
    frame, _, skipped = index(root, "skip")
    assert len(frame) == 12
    assert skipped["location"].tolist() == [str(odd)]
    assert skipped["reason"].iloc[0]
    with pytest.raises(DataSourceError) as error:
        index(root, "error")
    assert name in str(error.value) and "data.on_corrupt=skip" in str(error.value)


def animated(path: Path, kind: str) -> None:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue", "green")]
    frames[0].save(path, kind, save_all=True, append_images=frames[1:], duration=100, loop=0)


ODD_BUT_VALID = {
    "cmyk.jpg": lambda p: photo().convert("CMYK").save(p, "JPEG"),
    "sixteen_bit.png": lambda p: Image.fromarray(
        np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50
    ).save(p),
    "animated.gif": lambda p: animated(p, "GIF"),
    "animated.webp": lambda p: animated(p, "WEBP"),
    "Fotos vom Strand — été 2024 🏖.jpg": lambda p: photo().save(p, "JPEG"),
}


@pytest.mark.parametrize("name", sorted(ODD_BUT_VALID))
def test_an_odd_but_valid_image_is_indexed_and_read_as_rgb(tmp_path, name):
    root, odd = folder_with(tmp_path, name, ODD_BUT_VALID[name])
    frame, _, skipped = index(root, "error")
    assert skipped.empty and str(odd) in frame["location"].tolist()
    image = load_rgb_tensor(str(odd), min_size=224)
    assert image.dtype.is_floating_point is False and image.shape[0] == 3
    if name.startswith("animated"):
        first_pixel = image[:, 0, 0].int()
        assert (first_pixel - torch.tensor([255, 0, 0])).abs().max() <= 8  # frame 1 (red)
    if name == "cmyk.jpg":
        # The colours of the RGB photo it was made from (PIL writes C = 255 - R, ..., K = 0):
        # inverted or swapped channels would be off by about a hundred levels.
        original = photo().resize((image.shape[2], image.shape[1]), Image.Resampling.BOX)
        expected = torch.from_numpy(np.asarray(original)).permute(2, 0, 1).int()
        assert (image.int() - expected).abs().float().mean(dim=(1, 2)).max() < 6


def test_a_symlink_loop_in_the_tree_does_not_hang_the_index(tmp_path):
    root, _ = folder_with(tmp_path, "x.png", lambda p: write_image(p, np.random.default_rng(1)))
    (root / "b" / "loop").symlink_to(root / "b", target_is_directory=True)
    frame, _, skipped = index(root, "error")
    assert len(frame) == 13 and skipped.empty


# Indexes the folder given as argv[1] with on_corrupt=skip; prints the skipped files.
INDEX_AND_LIST_SKIPPED = """
import sys
from transfer_learning.data.index import DataSettings, build_image_index
settings = DataSettings.from_params({"source": "imagefolder", "path": sys.argv[1], "on_corrupt": "skip"})
print("\\n".join(build_image_index(settings, seed=0)[2]["location"]))
"""


def as_unprivileged_user() -> list[str]:
    """The command prefix that runs a process as `nobody` (root reads files whatever their
    permissions, so the check must run as someone else); empty when not root already."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
def test_a_file_without_read_permission_is_skipped():
    reachable = subprocess.run(
        [*as_unprivileged_user(), sys.executable, "-c", "import transfer_learning.data.index"],
        capture_output=True, text=True, timeout=300, cwd="/",
    )  # fmt: skip
    if reachable.returncode != 0:  # e.g. a checkout in a folder only root may enter
        reason = f"the unprivileged user cannot run this checkout: {reachable.stderr[-300:]}"
        warnings.warn(reason, pytest.PytestWarning, stacklevel=1)
        pytest.skip(reason)
    # Outside pytest's private tmp folder, so that the unprivileged user can reach the images.
    with tempfile.TemporaryDirectory() as scratch:
        os.chmod(scratch, 0o755)
        root, odd = folder_with(
            Path(scratch), "locked.png", lambda p: write_image(p, np.random.default_rng(1))
        )
        for folder in (root, root / "a", root / "b"):
            folder.chmod(0o755)
        odd.chmod(0)
        completed = subprocess.run(
            [*as_unprivileged_user(), sys.executable, "-c", INDEX_AND_LIST_SKIPPED, str(root)],
            capture_output=True, text=True, timeout=300, cwd=scratch,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert completed.stdout.split() == [str(odd)]


# The decoding process's own peak resident memory (VmHWM: ru_maxrss would carry the forking
# test process's peak over the exec).
HUGE_PHOTO_RSS = """
import sys
from transfer_learning.data.images import load_rgb_tensor
image = load_rgb_tensor(sys.argv[1], min_size=224)
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print(image.shape[1], image.shape[2], status)
"""


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
def test_a_12000_by_9000_photo_is_decoded_at_reduced_scale_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.jpg"
    # A smooth 108-megapixel photo (upscaled from a real one) compresses to a few MB.
    photo().resize((12_000, 9_000), Image.Resampling.BILINEAR).save(path, quality=85)
    completed = subprocess.run(
        [sys.executable, "-c", HUGE_PHOTO_RSS, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    height, width, peak_kib = map(int, completed.stdout.split())
    assert min(height, width) >= 224 and max(height, width) <= 12_000 // 4
    # Peak resident memory under 1 GB, torch's import (about 0.5 GB) included; decoding at full
    # size would hold 324 MB of pixels more, at reduced scale 5 MB.
    assert peak_kib < 1024 * 1024
