"""The data-quality report: what confident learning, the outlier scores and the duplicate check
found, in words a person can act on, and a montage of the most suspect images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

MONTAGE_IMAGES = 24


def data_quality_markdown(
    label_issues: pd.DataFrame,
    test_label_issues: pd.DataFrame,
    outliers: pd.DataFrame,
    duplicates: pd.DataFrame,
    noise_rates: pd.DataFrame,
) -> str:
    """data_quality.md: counts, each class's estimated noise rate, the worst images, what to do."""
    flagged = label_issues[label_issues["is_label_issue"]]
    test_flagged = test_label_issues[test_label_issues["is_label_issue"]]
    conflicts = (
        duplicates[~duplicates["same_class"].astype(bool)] if len(duplicates) else duplicates
    )
    lines = [
        "# Data quality",
        "",
        f"- **{len(flagged)} of {len(label_issues)} train+val labels look wrong** "
        f"({_share(len(flagged), len(label_issues))}): confident learning on the frozen-feature head's "
        "out-of-fold probabilities (`label_issues.csv`, most suspect first).",
        f"- **{len(test_flagged)} of {len(test_label_issues)} test labels look wrong** "
        f"({_share(len(test_flagged), len(test_label_issues))}), by a head fitted on train+val "
        "(`test_label_issues.csv`). They are never changed or dropped automatically: a wrong test "
        "label makes every strategy's test accuracy wrong, so look at them first.",
        f"- **{int(outliers['is_outlier'].sum())} outliers** of {len(outliers)} images: far from "
        "every class in feature space (`outliers.csv`, farthest first).",
        f"- **{len(duplicates)} pairs of train/val images are the same picture**, "
        f"{len(conflicts)} of them with two different labels (`train_val_duplicates.csv`).",
        "",
        "## Estimated label noise per class (train+val)",
        "",
        "| class | images | flagged | estimated noise rate |",
        "|---|---:|---:|---:|",
        *(
            f"| {row.class_name} | {row.images} | {row.flagged} | {row.noise_rate:.1%} |"
            for row in noise_rates.itertuples()
        ),
        "",
        "## The most suspect train+val labels",
        "",
        "| image | given | suggested | label quality |",
        "|---|---|---|---:|",
        *(
            f"| {row.path} | {row.given_label} | {row.suggested_label} | {row.label_quality:.3f} |"
            for row in flagged.head(20).itertuples()
        ),
        "",
        "## What to do",
        "",
        "Look at each flagged image (`label_issues.png` shows the worst). If the label is wrong, "
        "fix it at the source: move the file to the right class folder, or correct its row in "
        "your manifest, and run again. If the label is right, leave it: the model was unsure, "
        "not the labeller. Nothing here changes your data: every strategy still trains on the "
        "labels as given until you fix them. Outliers are images of none of the classes, or of a class seen from an "
        "unusual angle: remove those that do not belong. A duplicate pair with two labels is a "
        "certain mistake in one of them.",
    ]
    return "\n".join(lines) + "\n"


def _share(count: int, total: int) -> str:
    return f"{count / total:.1%}" if total else "–"


def label_issue_montage(
    flagged: pd.DataFrame, read_image: Callable[[str], np.ndarray], columns: int = 6
) -> Figure:
    """The most suspect images, each titled with its given and suggested label."""
    shown = flagged.head(MONTAGE_IMAGES)
    return image_montage(
        [
            (row.path, f"given: {row.given_label}\nsuggested: {row.suggested_label}")
            for row in shown.itertuples()
        ],
        read_image,
        "Most suspect labels (train+val)",
        "No label issues found",
        columns,
    )


def labelling_montage(
    batch: pd.DataFrame, method: str, read_image: Callable[[str], np.ndarray]
) -> Figure:
    """The images to label next (label_next's table), each with its rank and suggested label."""
    return image_montage(
        [
            (row.location, f"#{row.rank}: {row.suggested_label}? ({row.confidence:.0%})")
            for row in batch.itertuples()
        ],
        read_image,
        f"Label next ({method}): the suggested label is the current model's guess",
        "Nothing to label",
    )


def image_montage(
    images: Sequence[tuple[str, str]],
    read_image: Callable[[str], np.ndarray],
    title: str,
    when_empty: str,
    columns: int = 6,
) -> Figure:
    """A grid of images (location, caption), read by `read_image`, under `title`."""
    rows = max(1, -(-len(images) // columns))
    figure = Figure(figsize=(2.2 * columns, 2.5 * rows))
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axis in axes:
        axis.axis("off")
    for axis, (location, caption) in zip(axes, images, strict=False):
        axis.imshow(read_image(location))
        axis.set_title(caption, fontsize=8, color="#333")
    if not images:
        axes[0].text(0.5, 0.5, when_empty, ha="center", va="center")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def noise_rate_table(
    label_issues: pd.DataFrame, noise_rates: Sequence[float], class_names: Sequence[str]
) -> pd.DataFrame:
    """Per class: images, flagged images and the estimated noise rate."""
    counts = label_issues["given_label"].value_counts()
    flagged = label_issues[label_issues["is_label_issue"]]["given_label"].value_counts()
    return pd.DataFrame(
        {
            "class_name": list(class_names),
            "images": [int(counts.get(name, 0)) for name in class_names],
            "flagged": [int(flagged.get(name, 0)) for name in class_names],
            "noise_rate": [float(rate) for rate in noise_rates],
        }
    )
