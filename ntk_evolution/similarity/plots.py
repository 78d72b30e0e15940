"""Figures of CKA: heatmaps between two networks' layers, and the CKA project's summary panels."""

from __future__ import annotations

import numpy as np

from ntk_evolution.figures import plt, save_figure

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
    save_figure(fig, path)


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
    save_figure(fig, path)
