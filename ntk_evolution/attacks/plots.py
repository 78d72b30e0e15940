"""Figures of attacks: accuracy under each attack as grouped bars."""

from __future__ import annotations

import numpy as np

from ntk_evolution.figures import plt, save_figure


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
    save_figure(fig, path)
