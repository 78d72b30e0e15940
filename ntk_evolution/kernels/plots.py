"""Figures of the kernel work: kernels as heatmaps, their evolution and spectra, NTK
eigen-features and their gradients, robustified support images."""

from __future__ import annotations

import os

import matplotlib.colors
import numpy as np

from ntk_evolution.attacks.pgd import VARIANT_NAMES
from ntk_evolution.figures import epoch_axis, image_rows, plt, save_figure, show_image


def kernel_title(record: dict) -> str:
    """What a kernel pickle of calculate_kernel.py is: run (its checkpoint's meta, or folder),
    epoch,
    model, dataset, N and logit."""
    model_path = record.get("model_path") or ""
    run = record.get("run") or os.path.basename(os.path.dirname(model_path)) or "?"
    epoch = record.get("epoch")
    at = f"epoch {epoch:g}" if epoch is not None else os.path.basename(model_path)
    if record.get("use_linear_params"):
        at += " (lin_params)"
    c = record.get("class_index", -1)
    logit = f"logit {c}" if c >= 0 else "averaged over logits"
    if record.get("full"):
        logit = f"full: all {record['n_logits']} x {record['n_logits']} logit pairs"
    return (
        f"empirical NTK of {run}, {at}\n{record.get('model')} on {record.get('dataset')}, "
        f"N = {len(record['labels']) if record.get('full') else len(record['kernel'])}, {logit}"
    )


def _kernel_heatmap(ax, kernel, labels, vmin=None, vmax=None, ticks=True):
    """The kernel with images ordered by class, class blocks outlined and ticked by class; a
    full kernel ((C N, C N) for N labels, logit-major) ordered by logit, then class, its logit
    blocks outlined and ticked."""
    n_logits = len(kernel) // len(labels)
    logit = np.repeat(np.arange(n_logits), len(labels))
    tiled = np.tile(labels, n_logits)
    order = np.lexsort((tiled, logit))  # by logit, then by class; stable
    groups = (logit if n_logits > 1 else tiled)[order]
    image = ax.imshow(
        kernel[np.ix_(order, order)], cmap="viridis", interpolation="nearest", vmin=vmin, vmax=vmax
    )
    bounds = np.flatnonzero(np.diff(groups)) + 0.5
    for b in bounds:
        ax.axhline(b, color="white", lw=0.4)
        ax.axvline(b, color="white", lw=0.4)
    edges = np.concatenate([[-0.5], bounds, [len(groups) - 0.5]])
    centres = (edges[:-1] + edges[1:]) / 2
    names = [str(g) for g in groups[np.concatenate([[0], np.ceil(bounds).astype(int)])]]
    what = "logit (images by class within)" if n_logits > 1 else "training image (by class)"
    if ticks:
        ax.set_xticks(centres, names, fontsize=8)
        ax.set_yticks(centres, names, fontsize=8)
        ax.set_xlabel(what)
        ax.set_ylabel(what)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return image


def plot_kernel(kernel: np.ndarray, labels: np.ndarray, title: str, path: str) -> None:
    """Heatmap of the kernel with images ordered by class (ticks: class; a full kernel: by
    logit, then class), and its eigen-spectrum (log scale)."""
    eigenvalues = np.linalg.eigvalsh(kernel)[::-1]
    fig, (ax_k, ax_s) = plt.subplots(1, 2, figsize=(11.5, 4.9))
    fig.subplots_adjust(wspace=0.4, top=0.84)
    image = _kernel_heatmap(ax_k, kernel, labels)
    fig.colorbar(image, ax=ax_k, fraction=0.046, label="K(x, x')")
    full = len(kernel) > len(labels)
    blocks = "logit pairs, images by class" if full else "images ordered by class"
    ax_k.set_title(f"kernel, {blocks}", fontsize=10)
    positive = eigenvalues[eigenvalues > 0]
    ax_s.semilogy(np.arange(1, len(positive) + 1), positive, ".-", ms=3)
    ax_s.set_xlabel("eigenvalue index (decreasing)")
    ax_s.set_ylabel("eigenvalue")
    ax_s.set_title("eigen-spectrum", fontsize=10)
    ax_s.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


KERNEL_GRID_COLUMNS = 10  # at most this many epochs per run in kernel_grid.png


def plot_kernel_grid(
    panels: dict[str, list[tuple[float, np.ndarray, np.ndarray]]], title: str, path: str
) -> None:
    """The kernels of each run (one row per run: (epoch, kernel, labels) ordered by epoch) on
    one colour scale per run, images ordered by class; runs with more than
    KERNEL_GRID_COLUMNS kernels show that many, evenly spread from the first to the last."""
    shown = {}
    for run, kernels in panels.items():
        pick = np.unique(np.linspace(0, len(kernels) - 1, KERNEL_GRID_COLUMNS).round().astype(int))
        shown[run] = [kernels[i] for i in pick]
    n_cols = max(len(kernels) for kernels in shown.values())
    fig, axes = plt.subplots(
        len(shown), n_cols, figsize=(2.2 * n_cols + 1.5, 2.45 * len(shown) + 0.9), squeeze=False
    )
    for r, (run, kernels) in enumerate(shown.items()):
        values = np.concatenate([k.ravel() for _, k, _ in kernels])
        vmin, vmax = np.percentile(values, [0.5, 99.5])
        image = None
        for c in range(n_cols):
            ax = axes[r, c]
            if c >= len(kernels):
                ax.axis("off")
                continue
            epoch, kernel, labels = kernels[c]
            image = _kernel_heatmap(ax, kernel, labels, vmin, vmax, ticks=False)
            ax.set_title(f"epoch {epoch:g}", fontsize=9)
            if c == 0:
                ax.set_ylabel(run, fontsize=9)
        fig.colorbar(image, ax=axes[r, :].tolist(), fraction=0.02, pad=0.01, label="K(x, x')")
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def plot_eigen_feature_images(
    pos: np.ndarray,
    neg: np.ndarray,
    w: np.ndarray,
    captions: dict[str, list[str]],
    title: str,
    path: str,
) -> None:
    """Images that maximise the cosine with each top eigenvector's feature (+ row) and its
    negative (- row), one column per eigenvector, and the regression weights' image on the
    right spanning both rows."""
    n = len(pos)
    fig = plt.figure(figsize=(max(2.1 * (n + 1.4) + 0.6, 8.5), 5.6))
    grid = fig.add_gridspec(
        2, n + 1, width_ratios=[1] * n + [1.4], wspace=0.2, hspace=0.45, top=0.76, bottom=0.03
    )
    for row, (label, images) in enumerate((("+ eigenvector", pos), ("- eigenvector", neg))):
        key = "pos" if row == 0 else "neg"
        for c in range(n):
            ax = fig.add_subplot(grid[row, c])
            show_image(ax, images[c], captions[key][c])
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    ax = fig.add_subplot(grid[:, n])
    show_image(ax, w, captions["w"][0])
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def plot_robustified(
    original: np.ndarray,
    optimised: np.ndarray,
    history: dict,
    title: str,
    path: str,
    labels: np.ndarray | None = None,
) -> None:
    """Left: original and optimised support images (captioned with their labels) and their
    difference (grey = none, scaled to the largest change). Right: the clean and adversarial
    loss on each step's targets (the loss the optimisation uses), and both accuracies."""
    delta = optimised - original
    scale = max(float(np.abs(delta).max()), 1e-12)
    rows = {"original": original, "optimised": optimised, "change": 0.5 + 0.5 * delta / scale}
    n_cols = len(original)
    fig = plt.figure(figsize=(1.6 * n_cols + 5, 5.4))
    left, right = fig.subfigures(1, 2, width_ratios=[1.6 * n_cols, 5])
    captions = None if labels is None else {"original": [f"label {int(c)}" for c in labels]}
    image_rows(left, rows, captions)
    left.suptitle(f"change scaled by 1/{scale:.3f}", fontsize=9, y=0.02)
    ax_loss, ax_acc = right.subplots(2, 1, sharex=True)
    steps = np.arange(1, len(history["adversarial_loss"]) + 1)
    for kind, style in (("adversarial", "-"), ("clean", "--")):
        ax_loss.plot(steps, history[f"{kind}_loss"], style, color="C0", lw=0.9, label=kind)
        ax_acc.plot(steps, history[f"{kind}_accuracy"], style, color="C1", lw=0.9, label=kind)
    ax_loss.set_ylabel("loss on the targets")
    ax_acc.set(xlabel="step", ylabel="accuracy on the targets", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_eigen_features(result: dict, path: str) -> None:
    """Left: accuracy of each top eigen-component alone (clean, PGD) and its eigenvalue. Right:
    accuracy of the cumulative top-k predictor against k (clean for every k, PGD where run)."""
    rows = result["rows"]
    single = [r for r in rows if r["kind"] == "component"]
    top = [r for r in rows if r["kind"] == "top_k"]
    attack = VARIANT_NAMES[result.get("attack_variant", "pgd")].split(" (")[0] + "-Linf"
    attacked = any("linf" in r for r in rows)
    fig, (ax_c, ax_k) = plt.subplots(1, 2, figsize=(12, 4.8))
    fig.subplots_adjust(wspace=0.4, top=0.82)
    if single:
        index = np.array([r["k"] for r in single])
        ax_c.bar(index - 0.2, [r["clean"] for r in single], 0.4, label="clean")
        if "linf" in single[0]:
            ax_c.bar(index + 0.2, [r["linf"] for r in single], 0.4, label=attack)
        ax_e = ax_c.twinx()
        ax_e.semilogy(index, [r["eigenvalue"] for r in single], "k.-", label="eigenvalue")
        ax_e.set_ylabel("eigenvalue")
        ax_c.set_xlabel("eigen-component i (decreasing eigenvalue)")
        ax_c.set_ylabel("test accuracy")
        handles = ax_c.get_legend_handles_labels()
        twin = ax_e.get_legend_handles_labels()
        ax_c.legend(handles[0] + twin[0], handles[1] + twin[1], loc="upper right", fontsize=8)
    ax_c.set_title("single eigen-components")
    clean = np.array(result["clean_cumulative"])
    ax_k.semilogx(np.arange(1, len(clean) + 1), clean, "-", label="clean (every k)")
    if top and "linf" in top[0]:
        ax_k.semilogx([r["k"] for r in top], [r["linf"] for r in top], "o-", label=attack)
    ax_k.set_xlabel("top-k eigen-components")
    ax_k.set_ylabel("test accuracy")
    ax_k.set_ylim(0, 1)
    ax_k.grid(True, which="both", alpha=0.3)
    ax_k.legend()
    ax_k.set_title("cumulative top-k")
    fig.suptitle(
        f"kernel regression restricted to eigen-components: {result['kernel']}, "
        f"{result['dataset']}\n{result['support_size']} support images, {result['n_test']} test "
        + (
            f"images, {VARIANT_NAMES[result.get('attack_variant', 'pgd')]}-Linf eps "
            f"{result['eps']:g}/255 "
            f"({1 if result.get('attack_variant') == 'fgsm' else result['pgd_steps']} steps)"
            if attacked
            else "images, clean accuracy only"
        ),
        fontsize=11,
        wrap=True,
    )
    save_figure(fig, path)


MAX_GRADIENT_ROWS = 12  # components drawn in the gradient figure, evenly spread


def plot_component_gradients(record: dict, kernel: str, path: str) -> None:
    """The test images (top row) and, per eigen-component (one row each, at most
    MAX_GRADIENT_ROWS spread over the chosen ones), the magnitude of the input gradient of its
    predictor's true-class output, summed over channels, each panel scaled to its own maximum."""
    gradients, images = record["gradients"], record["images"]
    rows = np.unique(np.linspace(0, len(gradients) - 1, MAX_GRADIENT_ROWS).round().astype(int))
    n_cols = len(images)
    fig, axes = plt.subplots(
        len(rows) + 1, n_cols, figsize=(1.7 * n_cols + 1.6, 1.7 * (len(rows) + 1) + 0.9),
        squeeze=False,
    )  # fmt: skip
    for c in range(n_cols):
        show_image(axes[0, c], images[c], f"label {record['labels'][c]}")
    axes[0, 0].set_ylabel("image", fontsize=8)
    for r, g in enumerate(rows, start=1):
        for c in range(n_cols):
            magnitude = np.abs(gradients[g, c]).sum(-1)
            ax = axes[r, c]
            image = ax.imshow(magnitude / max(magnitude.max(), 1e-30), cmap="magma", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(
            f"component {record['components'][g]}\nλ = {record['eigenvalues'][g]:.3g}", fontsize=8
        )
    fig.suptitle(
        f"input gradients of single eigen-component predictors: {kernel}\n|d F_i(z)_y / dz| "
        "summed over channels, each panel scaled to its maximum",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    bar = fig.add_axes((0.93, 0.1, 0.015, 0.6))
    fig.colorbar(image, cax=bar, label="|gradient| / its panel's maximum")
    save_figure(fig, path)


# the kernel-evolution measures drawn against epoch: (column, title, log scale)
EVOLUTION_PANELS = (
    ("distance_to_first", "distance to first kernel", False),
    ("distance_to_last", "distance to last kernel", False),
    ("velocity", "kernel velocity (distance / epoch)", True),
    ("alignment", "centered kernel-target alignment", False),
    ("energy_top10", "spectral energy in top 10", False),
)


def plot_kernel_evolution(table: dict[str, list[dict]], path: str) -> None:
    """Distance to first / last kernel, velocity, alignment, top-10 energy against epoch, and the
    polar view; one line per run."""
    panels = EVOLUTION_PANELS
    fig = plt.figure(figsize=(15, 9.5))
    fig.subplots_adjust(wspace=0.32, hspace=0.45, top=0.9)
    for i, (key, title, log_y) in enumerate(panels):
        ax = fig.add_subplot(2, 3, i + 1)
        for label, rows in table.items():
            points = [(r["epoch"], r[key]) for r in rows if r[key] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), ".-", label=label)
        epoch_axis(ax)
        if log_y:
            ax.set_yscale("log")
        ax.set_ylabel(title.split(" (")[0])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    ax = fig.add_subplot(2, 3, 6, projection="polar")
    for label, rows in table.items():
        points = [
            (r["polar_angle"], r["polar_radius"]) for r in rows if r["polar_radius"] is not None
        ]
        if points:
            ax.plot(*zip(*points, strict=True), ".-", label=label)
    ax.set_thetamin(0)
    ax.set_thetamax(90)
    ax.set_title("polar view", fontsize=10, pad=6)
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.1, 1.12))
    ax.text(
        0.5, -0.12,
        "angle = arccos(alignment); radius = d(first, t) / d(first, last):\n"
        "1 at the last kernel, above 1 where a kernel was farther from the\n"
        "first than the last one is",
        transform=ax.transAxes, ha="center", va="top", fontsize=8,
    )  # fmt: skip
    fig.suptitle(f"kernel evolution of {', '.join(table)}", fontsize=12)
    save_figure(fig, path)


def plot_polar_dynamics(table: dict[str, list[dict]], path: str) -> None:
    """The adversarial-NTK code's polar dynamics (kernel_analysis): radius |K_t - K_0|_F /
    |K_final - K_0|_F at angle arccos(cos(K_t, K_0)), for the whole kernel and its top and
    bottom eigenspaces; one line per run, markers from light (early) to dark (late)."""
    spaces = ["", "_top", "_bottom"]
    fig = plt.figure(figsize=(5.2 * len(spaces), 5.4))
    fig.subplots_adjust(wspace=0.35, top=0.8)
    for p, space in enumerate(spaces):
        ax = fig.add_subplot(1, len(spaces), p + 1, projection="polar")
        for label, rows in table.items():
            points = [
                (r[f"tk_angle{space}"], r[f"tk_radius{space}"])
                for r in rows
                if r[f"tk_radius{space}"] is not None
            ]
            if points:
                (line,) = ax.plot(*zip(*points, strict=True), "-", lw=1.2, label=label)
                shades = np.linspace(0.3, 1.0, len(points))
                colour = np.array(matplotlib.colors.to_rgb(line.get_color()))
                for (angle, radius), shade in zip(points, shades, strict=True):
                    ax.plot(angle, radius, "o", ms=4, color=1 - shade * (1 - colour))
        ax.set_thetamin(0)
        ax.set_thetamax(90)
        which = "whole kernel"
        if space:  # the subspace sizes of the runs (each kernel's own eigenvectors)
            sizes = sorted({rows[0][f"{space[1:]}_space"] for rows in table.values()})
            which = f"{space[1:]} {'/'.join(map(str, sizes))} eigenvalues"
        ax.set_title(which, fontsize=10, pad=8)
        ax.text(
            0.5, -0.1,
            "angle arccos cos(K_t, K_0) (degrees on the arc)\n"
            "radius |K_t - K_0|_F / |K_final - K_0|_F (markers: light early, dark late)",
            transform=ax.transAxes, ha="center", va="top", fontsize=8,
        )  # fmt: skip
        if p == 0:
            ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.15, 1.15))
    fig.suptitle(
        "polar dynamics of the kernel, as the adversarial-NTK code measures it (eigenspaces: "
        "each kernel's own)",
        fontsize=11,
    )
    save_figure(fig, path)


def plot_distance_matrices(distances: dict[str, dict], path: str) -> None:
    """The epoch-by-epoch distance 1 - cos(K_s, K_t) of each run, one panel per run, on one
    colour scale."""
    vmax = max(max(map(max, d["distance"])) for d in distances.values()) or 1.0
    fig, axes = plt.subplots(
        1, len(distances), figsize=(5.0 * len(distances) + 1.0, 4.6), squeeze=False
    )
    image = None
    for ax, (label, d) in zip(axes[0], distances.items(), strict=True):
        epochs = d["epochs"]
        image = ax.imshow(
            np.asarray(d["distance"]), origin="lower", cmap="magma", vmin=0, vmax=vmax
        )
        step = max(1, len(epochs) // 8)
        ticks = list(range(0, len(epochs), step))
        ax.set_xticks(ticks, [f"{epochs[t]:g}" for t in ticks], fontsize=8)
        ax.set_yticks(ticks, [f"{epochs[t]:g}" for t in ticks], fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
        ax.set_title(label, fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="1 - cos(K_s, K_t)")
    fig.suptitle("kernel distance between every pair of epochs", fontsize=11)
    save_figure(fig, path)


def plot_kernel_spectra(
    spectra: dict[str, tuple[list[float], list[np.ndarray]]], path: str
) -> None:
    """Eigen-spectra of each run (one panel per run), coloured from early (light) to late."""
    fig, axes = plt.subplots(1, len(spectra), figsize=(5.5 * len(spectra), 4.2), squeeze=False)
    for ax, (label, (epochs, values)) in zip(axes[0], spectra.items(), strict=True):
        colours = plt.cm.viridis(np.linspace(0.0, 0.9, len(epochs)))
        for epoch, eigenvalues, colour in zip(epochs, values, colours, strict=True):
            positive = eigenvalues[eigenvalues > 0]
            ax.loglog(
                np.arange(1, len(positive) + 1),
                positive,
                color=colour,
                lw=1,
                label=f"epoch {epoch:g}",
            )
        ax.set_xlabel("eigenvalue index (decreasing)")
        ax.set_ylabel("eigenvalue")
        ax.set_title(f"eigen-spectra of {label}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)
