"""Pictures written next to the pickles (PNG, no screen needed)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str) -> None:
    """Save atomically: render to a temporary file in the same folder, then rename."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp_{os.path.basename(path)}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(tmp, path)


def plot_kernel(kernel: np.ndarray, labels: np.ndarray, title: str, path: str) -> None:
    """Heatmap of the kernel with images ordered by class, and its eigen-spectrum (log scale)."""
    order = np.argsort(labels, kind="stable")
    eigenvalues = np.linalg.eigvalsh(kernel)[::-1]
    fig, (ax_k, ax_s) = plt.subplots(1, 2, figsize=(11, 4.6))
    fig.subplots_adjust(wspace=0.35)
    image = ax_k.imshow(kernel[np.ix_(order, order)], cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax_k, fraction=0.046)
    bounds = np.flatnonzero(np.diff(labels[order])) + 0.5
    for b in bounds:
        ax_k.axhline(b, color="white", lw=0.4)
        ax_k.axvline(b, color="white", lw=0.4)
    ax_k.set_title(f"{title}\n(ordered by class)")
    positive = eigenvalues[eigenvalues > 0]
    ax_s.semilogy(np.arange(1, len(positive) + 1), positive, ".-", ms=3)
    ax_s.set_xlabel("index")
    ax_s.set_ylabel("eigenvalue")
    ax_s.set_title("eigen-spectrum")
    ax_s.grid(True, which="both", alpha=0.3)
    _save(fig, path)


def plot_image_grid(rows: dict[str, np.ndarray], title: str, path: str) -> None:
    """One row per entry of `rows` (label -> images (n, H, W, C) in [0, 1])."""
    n_cols = max(len(images) for images in rows.values())
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(1.8 * n_cols, 1.9 * len(rows)), squeeze=False
    )
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                image = np.clip(images[c], 0, 1)
                ax.imshow(
                    image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1
                )
                ax.set_title(f"{label} {c}" if len(images) > 1 else label, fontsize=8)
            else:
                ax.axis("off")
    fig.suptitle(title)
    _save(fig, path)
