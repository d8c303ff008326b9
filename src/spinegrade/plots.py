"""Figures of the evaluation, written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from spinegrade.constants import PROBABILITY_COLUMNS, SEVERITIES, level_title  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def training_curves(histories: dict[int, pd.DataFrame], title: str, path: Path) -> Path:
    """Per fold: loss, accuracy and competition loss per epoch, training and held-out."""
    panels = [("loss", "train_loss", "val_loss"), ("accuracy", "train_accuracy", "val_accuracy"),
              ("competition loss", "train_competition", "val_competition")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colours = plt.cm.tab10.colors
    for ax, (label, train_col, val_col) in zip(axes, panels):
        for k, (fold, h) in enumerate(sorted(histories.items())):
            epochs = h["epoch"] + 1
            if train_col in h:
                ax.plot(epochs, h[train_col], "--", color=colours[k % 10], alpha=0.7)
            ax.plot(epochs, h[val_col], "-", color=colours[k % 10], label=f"fold {fold}")
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="solid: held-out\ndashed: training", title_fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def confusion_matrix(counts: np.ndarray, title: str, path: Path) -> Path:
    counts = np.asarray(counts)
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for i in range(3):
        for j in range(3):
            ax.text(j, i, f"{counts[i, j]}\n{normalised[i, j]:.0%}", ha="center", va="center",
                    color="white" if normalised[i, j] > 0.6 else "black", fontsize=9)
    ax.set_xticks(range(3), SEVERITIES)
    ax.set_yticks(range(3), SEVERITIES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def one_vs_rest(matrices: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """One 2x2 matrix per grade: [[TN, FP], [FN, TP]]."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    for ax, (grade, m) in zip(axes, matrices.items()):
        m = np.asarray(m)
        ax.imshow(m / max(m.sum(), 1), cmap="Greens", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=11)
        ax.set_xticks([0, 1], ["other", grade])
        ax.set_yticks([0, 1], ["other", grade])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(grade, fontsize=10)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def reliability(table: pd.DataFrame, title: str, path: Path, xlabel: str = "confidence (top probability)",
                ylabel: str = "accuracy") -> Path:
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    shown = table[table["count"] > 0]
    ax.plot(shown["confidence"], shown["accuracy"], "o-")
    for r in shown.itertuples():
        ax.annotate(str(r.count), (r.confidence, r.accuracy), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def per_level(table: pd.DataFrame, title: str, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(len(table))
    for k, name in enumerate(PROBABILITY_COLUMNS):
        axes[0].bar(x + (k - 1) * 0.27, table[f"f1_{name}"], width=0.27, label=SEVERITIES[k])
    axes[0].set_xticks(x, [level_title(lv) for lv in table["level"]])
    axes[0].set_ylabel("F1")
    axes[0].set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    axes[0].set_title("F1 per grade")
    axes[1].bar(x, table["loss"], color="tab:red", alpha=0.8)
    axes[1].set_xticks(x, [level_title(lv) for lv in table["level"]])
    axes[1].set_title("weighted log loss (lower is better)")
    for i, s in enumerate(table["support"]):
        axes[1].text(i, 0, f"n={s}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def compare_backbones(summary: pd.DataFrame, path: Path) -> Path:
    """Every backbone (and the prior) on the competition loss and macro F1."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(summary) + 2))
    names = [f"{n} ({g})" for n, g in zip(summary["name"], summary["group"])] if "group" in summary else summary["name"].tolist()
    y = np.arange(len(names))
    colours = ["tab:grey" if n == "class_prior" else "tab:blue" for n in summary["name"]]
    axes[0].barh(y, summary["score"], xerr=summary.get("score_fold_std"), color=colours)
    axes[0].set_yticks(y, names)
    axes[0].set_xlabel("OOF competition loss (lower is better)")
    axes[1].barh(y, summary["f1_macro"], color=colours)
    axes[1].set_yticks(y, names)
    axes[1].set_xlabel("OOF macro F1")
    axes[1].set_xlim(0, 1)
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def examples(images: list[np.ndarray], captions: list[str], path: Path, columns: int = 6) -> Path:
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.8 * rows))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, image, caption in zip(np.atleast_1d(axes).ravel(), images, captions):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(caption, fontsize=7)
    return _save(fig, path)

