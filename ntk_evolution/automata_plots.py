"""Pictures of the automata work: RNN training curves, a DFA's state diagram, the studies."""

from __future__ import annotations

import numpy as np

from ntk_evolution.automata import ALPHABET, DFA
from ntk_evolution.plots import _save, plt


def plot_rnn_training(history: dict, language: int, cell: str, path: str) -> None:
    """Loss, and train / held-out accuracy, per epoch; the epoch of convergence marked."""
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.semilogy(epochs, history["loss"], color="tab:blue")
    ax_loss.set(xlabel="epoch", ylabel="training loss (binary cross-entropy)", title="loss")
    ax_acc.plot(epochs, history["train_acc"], label="training strings")
    ax_acc.plot(epochs, history["test_acc"], label="held-out strings")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0.4, 1.02))
    converged = history.get("converged_epoch")
    for ax in (ax_loss, ax_acc):
        if converged is not None:
            ax.axvline(converged, color="grey", linestyle="--", linewidth=1)
    if converged is not None:
        ax_acc.text(converged, 0.45, f" 100% held out\n at epoch {converged}", fontsize=8)
    ax_acc.legend(loc="lower right")
    fig.suptitle(f"{cell.upper()} trained on Tomita {language}")
    fig.tight_layout()
    _save(fig, path)


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
        middle = middle - bend * normal * 0.55
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
    ax.set_title(f"{title}\n{n} state{'s' * (n != 1)}; double ring: accepting", fontsize=11)
    _save(fig, path)
