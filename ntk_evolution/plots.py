"""Pictures written next to the pickles (PNG, no screen needed)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ntk_evolution.attacks import VARIANT_NAMES  # noqa: E402
from utils import atomic_file, is_writer  # noqa: E402


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


_save = save_figure  # the name this module's figures use


def kernel_title(record: dict) -> str:
    """What a kernel pickle of calculate_kernel.py is: run (its checkpoint's folder), epoch,
    model, dataset, N and logit."""
    model_path = record.get("model_path") or ""
    run = os.path.basename(os.path.dirname(model_path)) or "?"
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
    _save(fig, path)


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
    _save(fig, path)


def _show_image(ax, image: np.ndarray, caption: str = "", colour: str = "black") -> None:
    """An (H, W, C) image in [0, 1] without ticks, its caption above it."""
    image = np.clip(image, 0, 1)
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if caption:
        ax.set_title(caption, fontsize=8, color=colour)


def _image_rows(
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
            _show_image(ax, images[c], text.lstrip("!"), "red" if wrong else "black")
            if c == 0:
                ax.set_ylabel(label, fontsize=9)


def plot_image_grid(
    rows: dict[str, np.ndarray],
    title: str,
    path: str,
    captions: dict[str, list[str]] | None = None,
) -> None:
    """One row per entry of `rows` (label -> images (n, H, W, C) in [0, 1]), each image
    captioned from `captions` (see _image_rows)."""
    n_cols = max(len(images) for images in rows.values())
    fig = plt.figure(figsize=(1.45 * n_cols + 0.6, 1.75 * len(rows) + 0.8))
    _image_rows(fig, rows, captions)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


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
            _show_image(ax, images[c], captions[key][c])
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    ax = fig.add_subplot(grid[:, n])
    _show_image(ax, w, captions["w"][0])
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


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
    _image_rows(left, rows, captions)
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
    _save(fig, path)


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
    _save(fig, path)


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
        _show_image(axes[0, c], images[c], f"label {record['labels'][c]}")
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
    _save(fig, path)


def _epoch_axis(ax) -> None:
    """Epochs from 0 (and fractions) to hundreds: linear below 1, logarithmic above."""
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("epoch")
    ax.grid(True, which="both", alpha=0.3)


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
        _epoch_axis(ax)
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
    _save(fig, path)


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
    _save(fig, path)


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
    _save(fig, path)


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
    _save(fig, path)


CELL_VALUES_UP_TO = 12  # CKA heatmaps print each cell's value up to this many rows/columns


def short_layer_name(index: int, name: str) -> str:
    """'3: stage1_block0/relu_1' for 'resnet18/~/stage1_block0/~/relu_1' (index as in
    --model0_layers)."""
    parts = name.split("/~/")
    return f"{index}: {'/'.join(parts[1:] if len(parts) > 1 else parts)}"


def plot_cka(result: dict, sides: list[str], path: str, layer_indices=None) -> None:
    """Heatmaps of linear and debiased CKA: rows are side 0's layers, columns side 1's; cell
    values printed up to CELL_VALUES_UP_TO layers a side. `sides`: each side's name (run name
    and input kind); `layer_indices`: (rows, columns) indices of the layers shown."""
    rows, cols = layer_indices or (range(len(result["layers0"])), range(len(result["layers1"])))
    names0 = [short_layer_name(i, n) for i, n in zip(rows, result["layers0"], strict=True)]
    names1 = [short_layer_name(j, n) for j, n in zip(cols, result["layers1"], strict=True)]
    size = max(len(names0), len(names1))
    tick = 9 if size <= 12 else 7 if size <= 30 else 6
    every = -(-size // 40)  # a tick label every `every` layers beyond 40 a side
    estimators = [e for e in ("linear", "debiased") if result.get(e) is not None]
    panels = len(estimators)
    width = min(0.55 * len(names1), 0.2 * len(names1) + 4, 13)  # the figure grows, then caps
    height = min(0.4 * len(names0), 0.15 * len(names0) + 4, 11)
    fig, axes = plt.subplots(
        1, panels, figsize=(4 * panels + width * panels, 3.5 + height), squeeze=False
    )
    fig.subplots_adjust(wspace=0.55, top=0.9)
    for ax, estimator in zip(axes[0], estimators, strict=True):
        values = np.asarray(result[estimator])
        image = ax.imshow(values, origin="lower", cmap="magma", vmin=0, vmax=1, aspect="auto")
        fig.colorbar(image, ax=ax, fraction=0.046, label=f"{estimator} CKA")
        if size <= CELL_VALUES_UP_TO:
            for (i, j), v in np.ndenumerate(values):
                colour = "black" if v > 0.6 else "white"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=colour)
        ax.set_title(f"{estimator} CKA", fontsize=10)
        shown0, shown1 = range(0, len(names0), every), range(0, len(names1), every)
        ax.set_yticks(shown0, [names0[i] for i in shown0], fontsize=tick)
        ax.set_xticks(shown1, [names1[j] for j in shown1], fontsize=tick, rotation=70, ha="right")
        ax.set_ylabel(f"{sides[0]}: layer", fontsize=10)
        ax.set_xlabel(f"{sides[1]}: layer", fontsize=10)
    fig.suptitle(
        f"CKA between the layers of {sides[0]} and {sides[1]}, {result['n_images']} test images"
        + (
            f" (online: {result['dataset_passes']} pass{'es' * (result['dataset_passes'] > 1)}, "
            f"batches of {result['batch_size']})"
            if "batch_size" in result
            else ""
        ),
        fontsize=11,
    )
    _save(fig, path)


def plot_cka_panels(panels: list[tuple[str, dict]], title: str, path: str) -> None:
    """The CKA project's summary figure: one heatmap per (title, cka result) side by side on one
    colour scale (the debiased CKA, else the linear), layer index on both axes, layers counted
    from the input at the bottom left."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.2, 4.0), squeeze=False)
    image = None
    fig.subplots_adjust(wspace=0.25)
    for k, (ax, (name, result)) in enumerate(zip(axes[0], panels, strict=True)):
        estimator = "debiased" if result.get("debiased") is not None else "linear"
        values = np.asarray(result[estimator])
        image = ax.imshow(values, origin="lower", cmap="inferno", vmin=0, vmax=1)
        step = max(1, -(-max(values.shape) // 5))
        ax.set_xticks(range(0, values.shape[1], step))
        ax.set_yticks(range(0, values.shape[0], step))
        ax.set_title(f"{name}\n({estimator} CKA, {result['n_images']} images)", fontsize=10)
        ax.set_xlabel("layer (second network)", fontsize=9)
        if k == 0:
            ax.set_ylabel("layer (first network)", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="CKA")
    fig.suptitle(title, fontsize=11)
    _save(fig, path)


def plot_attack_table(
    rows: dict[str, list[float]], columns: tuple[str, ...], title: str, path: str
) -> None:
    """Grouped bars: one group per column (clean, each attack, worst case), one bar per row."""
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 3, 4.4))
    width = 0.8 / len(rows)
    positions = np.arange(len(columns))
    for i, (label, values) in enumerate(rows.items()):
        bars = ax.bar(positions + (i - (len(rows) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks(positions, columns)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(title, fontsize=10)
    _save(fig, path)


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
    _save(fig, path)
