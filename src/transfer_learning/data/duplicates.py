"""Leakage check: test images that duplicate, or nearly duplicate, a train or val image.

A test image that also sits (re-encoded, resized, shifted a little, recoloured) in the training
data is a question the model has seen the answer to: every accuracy measured on it is inflated.

Two steps, both on a 32 x 32 greyscale copy of every image:
1. Candidates: each test image's train/val images whose 64-bit perceptual hash (pHash: signs of
   the 8 x 8 lowest DCT frequencies against their median) differs in at most `CANDIDATE_BITS`
   bits (unrelated images differ in about 32). XOR + popcount in blocks: 10,000 x 50,000 pairs
   take about a second. A candidate with the same SHA-256 is an exact duplicate.
2. Verification: a candidate is a near-duplicate when the two images' normalised
   cross-correlation, at the best shift of up to `MAX_SHIFT` pixels, is at least
   `MIN_CORRELATION` — the same picture, not merely a similar layout (which pHash alone also
   matches; measured on CIFAR-10 in docs/benchmarks.md, "Leakage check"). Images smaller than
   32 x 32 (e.g. scikit-learn's 8 x 8 digits) hold too little to tell the same picture from the
   same digit written twice: for them only identical files count.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from scipy.fft import dctn

from transfer_learning.core.file_cache import cached_file_facts
from transfer_learning.data.images import DIGITS_SCHEME, digit_pixels

logger = logging.getLogger(__name__)

ON_DUPLICATE = ("warn", "drop_from_test", "error")
HASH_SIDE = 32  # the greyscale copy both steps compare
CANDIDATE_BITS = 12  # of 64
CANDIDATES_PER_IMAGE = 16  # the nearest by pHash, at most
MAX_SHIFT = 2  # pixels of 32: crops and shifts of a few per cent
MIN_CORRELATION = 0.9
DUPLICATE_COLUMNS = [
    "test_location",
    "test_class",
    "match_location",
    "match_split",
    "match_class",
    "kind",
    "distance_bits",
    "correlation",
    "n_matches",
]


class LeakageError(ValueError):
    """Test images duplicate train/val images and `data.on_duplicate` is `error`."""


@dataclass(frozen=True)
class ImageHashes:
    """Per image: SHA-256 of the bytes (hex), the 64-bit pHash, the greyscale copy and whether
    the image is large enough (≥ 32 px a side) for near-duplicate matching."""

    content: list[str]
    perceptual: np.ndarray  # (N,) uint64
    grey: np.ndarray  # (N, 32, 32) uint8
    comparable: np.ndarray  # (N,) bool


def image_hashes(locations: list[str], cache_dir: str | None = None) -> ImageHashes:
    """Both hashes of every image (files are read once; JPEGs decode at reduced scale), reusing
    those of unchanged files stored under `cache_dir` (see `file_cache`)."""
    facts = cached_file_facts("file_hashes", locations, _read_hashes, cache_dir)
    return ImageHashes(
        facts["content"].tolist(),
        perceptual_hashes(facts["grey"]),
        facts["grey"],
        facts["short_side"] >= HASH_SIDE,
    )


def _read_hashes(locations: list[str], workers: int = 8) -> dict[str, np.ndarray]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_hash_one, locations, chunksize=256))
    return {
        "content": np.array([digest for digest, _, _ in results]),
        "grey": np.stack([pixels for _, pixels, _ in results]),
        "short_side": np.array([short_side for _, _, short_side in results], dtype=np.int64),
    }


def _hash_one(location: str) -> tuple[str, np.ndarray, int]:
    try:
        return _hashed(location)
    except Exception as error:  # ingestion already left unreadable files out; never crash here
        logger.warning("Leakage check: cannot hash %s (%r); it is not compared", location, error)
        return f"unhashed:{location}", np.zeros((HASH_SIDE, HASH_SIDE), np.uint8), 0


def _hashed(location: str) -> tuple[str, np.ndarray, int]:
    if location.startswith(DIGITS_SCHEME):
        pixels = digit_pixels(location)
        image = Image.fromarray(pixels)
        short_side = min(pixels.shape)
        digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    else:
        with open(location, "rb") as stream:
            data = stream.read()
        digest = hashlib.sha256(data).hexdigest()
        image = Image.open(io.BytesIO(data))
        short_side = min(image.size)  # before draft() scales the decode down
        image.draft("L", (HASH_SIDE * 2, HASH_SIDE * 2))  # JPEG: decode at 1/2 … 1/8 scale
        image = ImageOps.exif_transpose(image)
    grey = image.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX)
    return digest, np.asarray(grey), short_side


def perceptual_hashes(grey: np.ndarray, block: int = 4096) -> np.ndarray:
    """pHash of each (32, 32) greyscale image of `grey` (N, 32, 32), as uint64 (in blocks:
    the DCT's float64 copies of 60,000 images would take gigabytes)."""
    hashes = np.empty(len(grey), dtype=np.uint64)
    for start in range(0, len(grey), block):
        part = grey[start : start + block].astype(np.float64)
        low = dctn(part, type=2, axes=(1, 2))[:, :8, :8].reshape(len(part), 64)
        bits = low > np.median(low, axis=1, keepdims=True)
        hashes[start : start + block] = np.packbits(bits, axis=1).view(">u8").ravel()
    return hashes


def candidate_pairs(
    queries: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, candidate, bits) for each query's nearest candidates within CANDIDATE_BITS."""
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    keep = min(CANDIDATES_PER_IMAGE, len(candidates))
    block = max(1, (1 << 24) // max(len(candidates), 1))  # 128 MiB of XORed hashes at a time
    for start in range(0, len(queries) if keep else 0, block):
        bits = np.bitwise_count(queries[start : start + block, None] ^ candidates[None, :])
        nearest = np.argpartition(bits, keep - 1, axis=1)[:, :keep]
        nearest_bits = np.take_along_axis(bits, nearest, axis=1)
        rows, columns = np.nonzero(nearest_bits <= CANDIDATE_BITS)
        found.append((rows + start, nearest[rows, columns], nearest_bits[rows, columns]))
    if not found:
        return (np.zeros(0, dtype=np.int64),) * 3
    return tuple(np.concatenate(parts).astype(np.int64) for parts in zip(*found, strict=True))


def aligned_correlation(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of each pair of (P, 32, 32) images at the best shift of up
    to MAX_SHIFT pixels (on the overlap): 1 for the same picture up to brightness and contrast."""
    first, second = first.astype(np.float32), second.astype(np.float32)
    best = np.full(len(first), -1.0, dtype=np.float32)
    side = first.shape[1]
    for dy in range(-MAX_SHIFT, MAX_SHIFT + 1):
        for dx in range(-MAX_SHIFT, MAX_SHIFT + 1):
            a = first[:, max(dy, 0) : side + min(dy, 0), max(dx, 0) : side + min(dx, 0)]
            b = second[:, max(-dy, 0) : side + min(-dy, 0), max(-dx, 0) : side + min(-dx, 0)]
            a = a - a.mean(axis=(1, 2), keepdims=True)
            b = b - b.mean(axis=(1, 2), keepdims=True)
            norm = np.sqrt((a * a).sum(axis=(1, 2)) * (b * b).sum(axis=(1, 2)))
            correlation = (a * b).sum(axis=(1, 2)) / np.maximum(norm, 1e-6)
            # Flat images (no texture) correlate with nothing: they are compared by hash alone.
            correlation[norm < 1e-6] = 0.0
            np.maximum(best, correlation, out=best)
    return best


def _verified_pairs(hashes: ImageHashes, query_at: np.ndarray, seen_at: np.ndarray) -> pd.DataFrame:
    """(query, match, bits, correlation, exact) of the query images' duplicates among the seen
    images (positions into `query_at` and `seen_at`): identical files, and candidates whose
    correlation confirms the same picture."""
    queries, matches, bits = candidate_pairs(
        hashes.perceptual[query_at], hashes.perceptual[seen_at]
    )
    correlation = aligned_correlation(hashes.grey[query_at[queries]], hashes.grey[seen_at[matches]])
    content = np.asarray(hashes.content, dtype=object)
    identical = content[query_at[queries]] == content[seen_at[matches]]
    pairs = pd.DataFrame(
        {
            "query": queries,
            "match": matches,
            "bits": bits,
            "correlation": np.where(identical, 1.0, correlation),
            "exact": identical,
        }
    )
    comparable = hashes.comparable[query_at[queries]] & hashes.comparable[seen_at[matches]]
    return pairs[pairs["exact"] | (comparable & (pairs["correlation"] >= MIN_CORRELATION))]


def find_duplicates(index: pd.DataFrame, cache_dir: str | None = None) -> pd.DataFrame:
    """One row per test image with an exact or near duplicate among the train and val images:
    its closest such image, the kind (`exact`: an identical file; `near`), the pHash
    distance, the correlation and how many train/val images matched. Hashes of files unchanged
    since a run that stored them under `cache_dir` are reused."""
    test = index["split"].to_numpy() == "test"
    if not test.any() or test.all():
        return pd.DataFrame(columns=DUPLICATE_COLUMNS)
    hashes = image_hashes(index["location"].tolist(), cache_dir)
    test_at, seen_at = np.flatnonzero(test), np.flatnonzero(~test)
    pairs = _verified_pairs(hashes, test_at, seen_at)
    counts = pairs.groupby("query").size()
    closest = pairs.sort_values(["exact", "correlation"], ascending=False).drop_duplicates("query")
    tested, seen = index.iloc[test_at], index.iloc[seen_at]
    return pd.DataFrame(
        {
            "test_location": tested["location"].to_numpy()[closest["query"]],
            "test_class": tested["class_name"].to_numpy()[closest["query"]],
            "match_location": seen["location"].to_numpy()[closest["match"]],
            "match_split": seen["split"].to_numpy()[closest["match"]],
            "match_class": seen["class_name"].to_numpy()[closest["match"]],
            "kind": np.where(closest["exact"], "exact", "near"),
            "distance_bits": closest["bits"].to_numpy(),
            "correlation": closest["correlation"].round(4).to_numpy(),
            "n_matches": counts[closest["query"]].to_numpy(),
        },
        columns=DUPLICATE_COLUMNS,
    ).sort_values("test_location", ignore_index=True)


def pool_duplicates_of_test(
    index: pd.DataFrame, pool: pd.DataFrame, cache_dir: str | None = None
) -> pd.DataFrame:
    """One row per unlabelled pool image that is the same picture (exact or near, as
    `find_duplicates` decides) as a test image, in `find_duplicates`' columns (`match_*`: the
    pool image): such images are left out of the pool, since test images are never trained on,
    labelled or not."""
    test = index[index["split"] == "test"]
    if test.empty or pool.empty:
        return pd.DataFrame(columns=DUPLICATE_COLUMNS)
    locations = pool["location"].tolist() + test["location"].tolist()
    hashes = image_hashes(locations, cache_dir)
    pool_at, test_at = np.arange(len(pool)), len(pool) + np.arange(len(test))
    pairs = _verified_pairs(hashes, pool_at, test_at)
    closest = pairs.sort_values(["exact", "correlation"], ascending=False).drop_duplicates("query")
    counts = pairs.groupby("query").size()
    return pd.DataFrame(
        {
            "test_location": test["location"].to_numpy()[closest["match"]],
            "test_class": test["class_name"].to_numpy()[closest["match"]],
            "match_location": pool["location"].to_numpy()[closest["query"]],
            "match_split": pool["split"].to_numpy()[closest["query"]],
            "match_class": "",
            "kind": np.where(closest["exact"], "exact", "near"),
            "distance_bits": closest["bits"].to_numpy(),
            "correlation": closest["correlation"].round(4).to_numpy(),
            "n_matches": counts[closest["query"]].to_numpy(),
        },
        columns=DUPLICATE_COLUMNS,
    ).sort_values("match_location", ignore_index=True)


def leave_out_of_pool(pool: pd.DataFrame, duplicates: pd.DataFrame) -> pd.DataFrame:
    """The pool without its images that duplicate test images (logged, with where to look)."""
    if duplicates.empty:
        return pool
    listing = "\n".join(
        f"  {row.match_location} ~ {row.test_location} ({row.kind})"
        for row in duplicates.head(20).itertuples()
    )
    more = f"\n  … and {len(duplicates) - 20} more" if len(duplicates) > 20 else ""
    logger.warning(
        "%d unlabelled pool image(s) duplicate test images and are left out of the pool (test "
        "images are never trained on, labelled or not; see data/08_reporting/duplicates.csv):"
        "\n%s%s",
        len(duplicates),
        listing,
        more,
    )
    return pool[~pool["location"].isin(duplicates["match_location"])].reset_index(drop=True)


def same_picture_check(
    locations: list[str], cache_dir: str | None = None
) -> Callable[[np.ndarray], list[tuple[int, int]]]:
    """A check for any set of these images (positions into `locations`): the pairs that are the
    same picture, exact or near, as `find_duplicates` decides. Every file is hashed once, here
    (or its hashes reused from `cache_dir`)."""
    if not locations:
        return lambda positions: []
    hashes = image_hashes(locations, cache_dir)

    def same_pictures(positions: np.ndarray) -> list[tuple[int, int]]:
        positions = np.asarray(positions, dtype=int)
        pairs = _verified_pairs(hashes, positions, positions)
        return [
            (int(positions[query]), int(positions[match]))
            for query, match in zip(pairs["query"], pairs["match"], strict=True)
            if query < match
        ]

    return same_pictures


WITHIN_COLUMNS = [
    "location",
    "class_name",
    "split",
    "match_location",
    "match_class",
    "match_split",
    "kind",
    "distance_bits",
    "correlation",
    "same_class",
]


def find_duplicates_within(index: pd.DataFrame, cache_dir: str | None = None) -> pd.DataFrame:
    """Every pair of train/val images that are the same picture (exact or near, as
    `find_duplicates` decides), once each: a pair with two classes is a label conflict, a pair
    with one class an image counted twice."""
    seen_at = np.flatnonzero(index["split"].to_numpy() != "test")
    if len(seen_at) < 2:
        return pd.DataFrame(columns=WITHIN_COLUMNS)
    hashes = image_hashes(index["location"].tolist(), cache_dir)
    pairs = _verified_pairs(hashes, seen_at, seen_at)
    pairs = pairs[pairs["query"] < pairs["match"]]  # not itself; each pair once
    seen = index.iloc[seen_at]
    first, second = seen.iloc[pairs["query"].to_numpy()], seen.iloc[pairs["match"].to_numpy()]
    classes = first["class_name"].to_numpy(), second["class_name"].to_numpy()
    return pd.DataFrame(
        {
            "location": first["location"].to_numpy(),
            "class_name": classes[0],
            "split": first["split"].to_numpy(),
            "match_location": second["location"].to_numpy(),
            "match_class": classes[1],
            "match_split": second["split"].to_numpy(),
            "kind": np.where(pairs["exact"], "exact", "near"),
            "distance_bits": pairs["bits"].to_numpy(),
            "correlation": pairs["correlation"].round(4).to_numpy(),
            "same_class": classes[0] == classes[1],
        },
        columns=WITHIN_COLUMNS,
    ).sort_values(["same_class", "location"], ignore_index=True)


def apply_duplicate_policy(
    index: pd.DataFrame, duplicates: pd.DataFrame, on_duplicate: str
) -> pd.DataFrame:
    """`data.on_duplicate`: warn (keep, log), drop_from_test (remove those test rows) or error."""
    if duplicates.empty:
        return index
    n_test = int((index["split"] == "test").sum())
    listing = "\n".join(
        f"  {row.test_location} ~ {row.match_location} ({row.match_split}, {row.kind})"
        for row in duplicates.head(20).itertuples()
    )
    more = f"\n  … and {len(duplicates) - 20} more" if len(duplicates) > 20 else ""
    summary = (
        f"{len(duplicates)} of {n_test} test images ({len(duplicates) / n_test:.1%}) duplicate "
        f"or nearly duplicate a train/val image:\n{listing}{more}\n"
    )
    if on_duplicate == "error":
        raise LeakageError(
            f"{summary}Accuracy on them would be inflated. Remove them from the test images, "
            "or set data.on_duplicate=drop_from_test to leave them out of the test split "
            "(data.on_duplicate=warn keeps them)."
        )
    if on_duplicate == "drop_from_test":
        logger.warning("%sLeft out of the test split (data.on_duplicate=drop_from_test).", summary)
        leaked = index["location"].isin(duplicates["test_location"]) & (index["split"] == "test")
        return index[~leaked].reset_index(drop=True)
    logger.warning(
        "%sThey stay in the test split, so test accuracy is inflated: see "
        "data/08_reporting/duplicates.csv; data.on_duplicate=drop_from_test leaves them out.",
        summary,
    )
    return index
