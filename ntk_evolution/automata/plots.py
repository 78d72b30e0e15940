"""Pictures of the automata work: RNN training curves, a DFA's state diagram, the studies."""

from __future__ import annotations

import numpy as np

from ntk_evolution.automata.languages import ALPHABET, DFA
from ntk_evolution.figures import plt, save_figure


def plot_rnn_training(history: dict, language: int, cell: str, path: str) -> None:
    """Loss, and train / held-out accuracy, per epoch; the epoch of convergence marked."""
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.semilogy(epochs, history["loss"], color="tab:blue")
    ax_loss.set(xlabel="epoch", ylabel="training loss (binary cross-entropy)", title="loss")
    ax_acc.plot(epochs, history["train_acc"], label="training strings")
    ax_acc.plot(epochs, history["test_acc"], label="held-out strings")
    ax_acc.set(xlabel="epoch", ylabel="accuracy over all prefixes", title="prefix accuracy",
               ylim=(0.4, 1.02))  # fmt: skip
    converged = history.get("converged_epoch")
    if converged is not None:  # marked in both panels, named in the legend (not over a curve)
        for ax in (ax_loss, ax_acc):
            ax.axvline(converged, color="grey", linestyle="--", linewidth=1,
                       label=f"100% held out (epoch {converged})")  # fmt: skip
    ax_acc.legend(loc="lower right", fontsize=9)
    name = {"vanilla": "Elman RNN"}.get(cell, cell.upper())
    fig.suptitle(f"{name} tagger trained on Tomita {language}")
    fig.tight_layout()
    save_figure(fig, path)


def plot_dfa(dfa: DFA, title: str, path: str) -> None:
    """The state diagram: states on a circle from the start state (arrow in), accepting states
    with a double ring, one arrow per (state, target) labelled by its symbols; self-loops as
    labels beside the state."""
    n = dfa.n_states
    angles = np.pi / 2 - 2 * np.pi * np.arange(n) / max(n, 1)
    radius = 0 if n == 1 else 1.0
    pos = np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
    size = 0.16
    fig, ax = plt.subplots(figsize=(4.5 + 0.4 * n, 4.5 + 0.4 * n))
    edges: dict[tuple[int, int], list[str]] = {}
    for q in range(n):
        for i, symbol in enumerate(ALPHABET):
            if dfa.delta[q][i] >= 0:  # a missing transition (rejects) is not drawn
                edges.setdefault((q, dfa.delta[q][i]), []).append(symbol)
    for (q, r), symbols in edges.items():
        text = ",".join(symbols)
        if q == r:  # a loop leaving and re-entering the state on its outer side
            out = pos[q] / (np.linalg.norm(pos[q]) or 1) if n > 1 else np.array([0, 1.0])
            rotate = np.array([[np.cos(0.5), -np.sin(0.5)], [np.sin(0.5), np.cos(0.5)]])
            ax.annotate(
                "", xy=pos[q] + rotate.T @ out * size, xytext=pos[q] + rotate @ out * size,
                arrowprops={"arrowstyle": "->", "connectionstyle": "arc3,rad=-2.2",
                            "shrinkA": 0, "shrinkB": 0},
            )  # fmt: skip
            ax.text(*(pos[q] + out * (size + 0.25)), text, ha="center", va="center",
                    fontsize=11, color="darkred")  # fmt: skip
            continue
        bend = 0.2 if (r, q) in edges else 0.0
        ax.annotate(
            "", xy=pos[r], xytext=pos[q],
            arrowprops={
                "arrowstyle": "->", "shrinkA": 22, "shrinkB": 22,
                "connectionstyle": f"arc3,rad={bend}",
            },
        )  # fmt: skip
        middle = (pos[q] + pos[r]) / 2
        normal = np.array([pos[r][1] - pos[q][1], pos[q][0] - pos[r][0]])
        middle = middle + bend * normal * 0.55  # the curve's middle: arc3 bends towards +normal
        ax.text(*middle, text, ha="center", va="center", fontsize=11, color="darkred",
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none"})  # fmt: skip
    for q in range(n):
        ax.add_patch(plt.Circle(pos[q], size, fill=True, fc="white", ec="black", zorder=3))
        if q in dfa.accepting:
            ax.add_patch(plt.Circle(pos[q], size * 0.8, fill=False, ec="black", zorder=4))
        ax.text(*pos[q], str(q), ha="center", va="center", fontsize=12, zorder=5)
    start = pos[dfa.start]
    ax.annotate(
        "start", xy=start - np.array([size, 0]), xytext=start - np.array([size + 0.45, 0]),
        arrowprops={"arrowstyle": "->"}, va="center", ha="right", fontsize=10,
    )  # fmt: skip
    ax.set_xlim(-1.8, 1.6)
    ax.set_ylim(-1.6, 1.7)
    ax.set_aspect("equal")
    ax.axis("off")
    note = "" if dfa.is_total else "; a missing arrow rejects"
    ax.set_title(f"{title}\n{n} state{'s' * (n != 1)}; double ring: accepting{note}", fontsize=11)
    save_figure(fig, path)


def _band(ax, x, values: np.ndarray, colour, label: str) -> None:
    """The median over seeds (rows of values) as a line, the quartiles as a band (the
    authors' plots)."""
    low, mid, high = np.nanpercentile(values, [25, 50, 75], axis=0)
    ax.fill_between(x, low, high, color=colour, alpha=0.2, linewidth=0)
    ax.plot(x, mid, color=colour, marker=".", label=label)


def plot_study_curves(
    x: list,
    curves: dict[int, dict[str, np.ndarray]],
    xlabel: str,
    title: str,
    path: str,
    xscale: str = "linear",
    marks: dict[int, float] | None = None,
) -> None:
    """Three panels against x, one line per Tomita language (median over seeds, quartile
    band): test accuracy against the RNN, states after merging, states after minimising.
    curves[language][key] is (seeds, len(x)) for key in accuracy, states, states_minimized;
    marks[language]: an x to mark on each line (e.g. the epoch of convergence)."""
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    panels = (
        ("accuracy", "test accuracy against the RNN (1000 strings, lengths 0-50)"),
        ("states", "states after merging"),
        ("states_minimized", "states after minimising"),
    )
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for i, (language, values) in enumerate(sorted(curves.items())):
            _band(ax, np.asarray(x, float), values[key], colours(i), f"Tomita {language}")
            if marks and marks.get(language) is not None and marks[language] in x:
                k = list(x).index(marks[language])
                ax.plot(x[k], np.nanmedian(values[key][:, k]), marker="*", markersize=13,
                        color=colours(i), markeredgecolor="black")  # fmt: skip
        ax.set(xlabel=xlabel, ylabel=ylabel, xscale=xscale)
        if xscale == "log":
            ax.set_xticks(x, [str(v) for v in x])
        if key != "accuracy":
            _plain_log_y(ax)
    axes[0].set_ylim(0.4, 1.02)
    if marks:
        axes[0].plot([], [], "*", color="grey", markeredgecolor="black", markersize=12,
                     label="100% held-out\naccuracy reached")  # fmt: skip
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=9)  # fmt: skip
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def _plain_log_y(ax) -> None:
    """A log y axis with plain numbers (1, 10, 100; 2, 3, 5 between), not 2x10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def plot_method_bars(
    results: dict[str, dict[int, dict[str, float]]], title: str, path: str
) -> None:
    """Two panels of grouped bars, one group per Tomita language, one bar per method (the
    mean over seeds): test accuracy against the true labels, and states after minimising
    (the true DFA's count as a black tick)."""
    methods = list(results)
    languages = sorted(next(iter(results.values())))
    width = 0.8 / len(methods)
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.4))
    x = np.arange(len(languages))
    for m, method in enumerate(methods):
        for ax, key in zip(axes, ("accuracy_labels", "states_minimized"), strict=True):
            values = [results[method][k][key] for k in languages]
            ax.bar(x + (m - (len(methods) - 1) / 2) * width, values, width, label=method,
                   color=colours(m))  # fmt: skip
    true_states = [next(iter(results.values()))[k]["true_states"] for k in languages]
    axes[1].scatter(x, true_states, marker="_", s=600, color="black", zorder=5,
                    label="true minimal DFA")  # fmt: skip
    for ax in axes:
        ax.set_xticks(x, [f"Tomita {k}" for k in languages])
    axes[0].set(ylabel="test accuracy against the true labels", ylim=(0.4, 1.02))
    axes[1].set(ylabel="states after minimising (the minimal DFA, no dead state)")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=9)  # fmt: skip
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
