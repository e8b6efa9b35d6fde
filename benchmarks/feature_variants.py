"""Can richer frozen features lift feature_transfer? Resolution, mirror averaging, several backbones.

    python benchmarks/feature_variants.py --data data/01_raw/flowers
    python benchmarks/feature_variants.py --data data/01_raw/cifar10_jpeg --per-class 300 --sizes 128

The baseline is the default: EfficientNet-Lite0 at the first `--sizes` value. Against it, on the
same images in the same run: Lite0 at the other sizes; Lite0 with each image's features averaged
with its mirror image's (train and test alike: test-time mirror averaging for a frozen head);
Lite1 and Lite2 at their native sizes; and every size's and network's features side by side in
one vector. Every variant gets the same head: standardised features, logistic regression, C chosen by
5-fold cross-validation on train/ (printed, the figure to choose by), then scored once on test/.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from transfer_learning.features.extraction import ExtractionSettings, extract_features
from transfer_learning.models.backbones import BackboneSettings, build_backbone

NATIVE = {"efficientnet_lite1": 240, "efficientnet_lite2": 260}


class Mirrored(nn.Module):
    """The network applied to the mirror image."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(torch.flip(images, dims=[3]))


def split(root: Path, name: str, per_class: int | None) -> tuple[list[str], np.ndarray]:
    locations, labels = [], []
    for label, folder in enumerate(sorted(p for p in (root / name).iterdir() if p.is_dir())):
        files = sorted(folder.iterdir())[:per_class]
        locations += [str(f) for f in files]
        labels += [label] * len(files)
    return locations, np.array(labels)


def features(name: str, size: int, locations: list[str], cache: str, mirrored=False):
    backbone = build_backbone(BackboneSettings(name=name, image_size=size))
    if mirrored:  # its own cache: the feature cache key does not see the flip
        backbone = replace(backbone, features=Mirrored(backbone.features), name=f"{name}+mirror")
        cache = tempfile.mkdtemp(prefix="mirrored-")
    result = extract_features(
        backbone,
        locations,
        ExtractionSettings(cache_dir=cache, progress=False),
        torch.device("cpu"),
    )
    return np.asarray(result.features)


def score(train: np.ndarray, labels: np.ndarray, test: np.ndarray, truth: np.ndarray):
    search = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
        {"logisticregression__C": [0.003, 0.01, 0.03, 0.1, 0.3]},
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
    )
    search.fit(train, labels)
    return search.best_score_, float((search.predict(test) == truth).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="train/ and test/ class folders")
    parser.add_argument("--per-class", type=int, default=None, help="first N per class and split")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 256, 288])
    parser.add_argument("--cache-dir", default="data/04_feature/cache")
    args = parser.parse_args()
    train, labels = split(args.data, "train", args.per_class)
    test, truth = split(args.data, "test", args.per_class)
    everything = train + test
    base = args.sizes[0]
    print(f"{len(train)} train, {len(test)} test images; {platform.machine()}, CPU")

    sets = {f"lite0@{size}": ("efficientnet_lite0", size, False) for size in args.sizes}
    sets[f"lite0@{base} mirror only"] = ("efficientnet_lite0", base, True)
    for name, size in NATIVE.items():
        native = size if base >= 224 else round(size * base / 224)
        sets[f"{name.replace('efficientnet_', '')}@{native}"] = (name, native, False)
    vectors = {
        label: features(name, size, everything, args.cache_dir, mirrored)
        for label, (name, size, mirrored) in sets.items()
    }
    original, mirror = vectors[f"lite0@{base}"], vectors.pop(f"lite0@{base} mirror only")
    vectors["every size and network side by side"] = np.hstack(list(vectors.values()))
    vectors[f"lite0@{base} mirror-averaged"] = (original + mirror) / 2

    n = len(train)
    _, baseline_test = score(original[:n], labels, original[n:], truth)
    print("| features | cv accuracy (train/) | test accuracy | test − baseline |")
    print("|---|---:|---:|---:|")
    for label, matrix in vectors.items():
        cv, accuracy = score(matrix[:n], labels, matrix[n:], truth)
        print(
            f"| {label}{' (baseline)' if label == f'lite0@{base}' else ''} | {cv:.2%} "
            f"| {accuracy:.2%} | {100 * (accuracy - baseline_test):+.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
