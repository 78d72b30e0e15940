"""Figures written next to the pickles (PNG, no screen needed): the one `save_figure` every
system's figures go through, image grids, and run_exp.py's training curves. Each system draws its
own figures beside it: attacks/plots.py, kernels/plots.py, similarity/plots.py, automata/plots.py,
study/plots.py."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ntk_evolution.utils import atomic_file, is_writer  # noqa: E402


def save_figure(fig, path: str) -> None:
    """Save atomically: render to a temporary file in the same folder, then rename (process 0
    only, when there are several)."""
    if not is_writer():
        plt.close(fig)
        return
    try:
        with atomic_file(path) as f:
            fig.savefig(f, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)


def show_image(ax, image: np.ndarray, caption: str = "", colour: str = "black") -> None:
    """An (H, W, C) image in [0, 1] without ticks, its caption above it."""
    image = np.clip(image, 0, 1)
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if caption:
        ax.set_title(caption, fontsize=8, color=colour)


def image_rows(
    fig, rows: dict[str, np.ndarray], captions: dict[str, list[str]] | None = None
) -> None:
    """One row of axes per entry of `rows` (label -> images (n, H, W, C) in [0, 1]) in `fig`
    (a figure or subfigure): the row's label on the left, each image captioned by
    `captions[label][i]` (a caption starting with '!' is drawn in red: a wrong prediction)."""
    n_cols = max(len(images) for images in rows.values())
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        texts = (captions or {}).get(label, [""] * len(images))
        for c in range(n_cols):
            ax = axes[r, c]
            if c >= len(images):
                ax.axis("off")
                continue
            text = texts[c]
            wrong = text.startswith("!")
            show_image(ax, images[c], text.lstrip("!"), "red" if wrong else "black")
            if c == 0:
                ax.set_ylabel(label, fontsize=9)


def plot_image_grid(
    rows: dict[str, np.ndarray],
    title: str,
    path: str,
    captions: dict[str, list[str]] | None = None,
) -> None:
    """One row per entry of `rows` (label -> images (n, H, W, C) in [0, 1]), each image
    captioned from `captions` (see image_rows)."""
    n_cols = max(len(images) for images in rows.values())
    fig = plt.figure(figsize=(1.45 * n_cols + 0.6, 1.75 * len(rows) + 0.8))
    image_rows(fig, rows, captions)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def epoch_axis(ax) -> None:
    """Epochs from 0 (and fractions) to hundreds: linear below 1, logarithmic above."""
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("epoch")
    ax.grid(True, which="both", alpha=0.3)


def plot_training_curves(rows: list[dict], title: str, path: str) -> None:
    """metrics.csv of run_exp.py (TrainingLog.numeric rows): training loss, training and test
    accuracy, and learning rate against epoch; phase 2's epochs follow phase 1's (dashed line
    at the switch)."""
    trained = [r for r in rows if r["loss"] is not None]
    tests = [r for r in rows if r["test_clean"] is not None]
    phase1_end = max((r["epoch"] for r in trained if r["phase"] == 1), default=0.0)

    def x_of(r):
        return (r["epoch"] or 0.0) + (phase1_end if r["phase"] == 2 else 0.0)

    fig, (ax_l, ax_a, ax_r) = plt.subplots(1, 3, figsize=(15, 4.3))
    fig.subplots_adjust(wspace=0.3, top=0.83)
    for phase, style in ((1, "C0"), (2, "C1")):
        part = [r for r in trained if r["phase"] == phase]
        if not part:
            continue
        xs = [x_of(r) for r in part]
        label = f"phase {phase}"
        ax_l.plot(xs, [r["loss"] for r in part], ".-", color=style, ms=3, label=label)
        ax_a.plot(
            xs, [r["train_accuracy"] for r in part], ".-", color=style, ms=3,
            label=f"{label} train",
        )  # fmt: skip
        ax_r.plot(xs, [r["lr"] for r in part], ".-", color=style, ms=3, label=label)
    for key, marker, name in (("test_clean", "o", "clean"), ("test_linf", "s", "PGD-Linf"),
                              ("test_l2", "^", "PGD-L2")):  # fmt: skip
        points = [(x_of(r), r[key]) for r in tests if r[key] is not None]
        if points:
            ax_a.plot(*zip(*points, strict=True), marker, color="k", mfc="none",
                      label=f"test {name}")  # fmt: skip
    both = phase1_end > 0 and any(r["phase"] == 2 for r in trained)
    for ax in (ax_l, ax_a, ax_r):
        if both:
            ax.axvline(phase1_end, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("epoch (phase 2 after phase 1)" if both else "epoch")
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    ax_l.set_ylabel("mean training loss")
    ax_l.set_yscale("log")
    ax_l.set_title("training loss", fontsize=10)
    ax_a.set_ylabel("accuracy")
    ax_a.set_ylim(0, 1.02)
    ax_a.set_title("accuracy (test: after each phase)", fontsize=10)
    ax_r.set_ylabel("learning rate")
    ax_r.set_yscale("log")
    ax_r.set_title("learning rate", fontsize=10)
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)
