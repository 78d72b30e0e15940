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
    note = "" if dfa.is_total else "; a missing arrow rejects"
    ax.set_title(
        f"{title}\n{n} state{'s' * (n != 1)}; double ring: accepting{note}", fontsize=11
    )
    _save(fig, path)


def plot_automata_studies(
    runs: list[dict], snapshots: list[int], hard_size: int, path: str
) -> None:
    """Three panels from scripts/automata_study.py's runs: equivalent extractions against the
    number of strings; hidden-state compression and equivalent extractions (from all strings;
    dashed: the mean from hard_size strings) against epochs trained past convergence. One line
    per Tomita language (mean over seeds), black the mean."""
    done = [r for r in runs if "main" in r]
    languages = sorted({r["language"] for r in done})
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x_snap = np.array(snapshots, float)

    def per_language(value):
        """{language: mean over its seeds of value(run)} -> arrays."""
        return {
            k: np.mean([value(r) for r in done if r["language"] == k], axis=0) for k in languages
        }

    sizes = sorted({s for r in done for s in r["data"] if s != "all"}) + ["all"]
    success = per_language(lambda r: [r["data"].get(s, np.nan) for s in sizes])

    def at_snapshots(key):
        return per_language(
            lambda r: [r["snapshots"][e][key] if e in r["snapshots"] else np.nan for e in snapshots]
        )

    compressions, whole, hard = (
        at_snapshots(key) for key in ("compression", "equivalent_all", "equivalent_hard")
    )
    for ax, x, values, ylabel, title in (
        (axes[0], np.arange(len(sizes)), success, "share equivalent to the true DFA",
         "more data"),
        (axes[1], x_snap, compressions, "within-state spread / between-state distance",
         "hidden-state compression"),
        (axes[2], x_snap, whole, "share equivalent to the true DFA",
         "training past convergence"),
    ):  # fmt: skip
        for i, k in enumerate(languages):
            ax.plot(x, values[k], marker="o", color=colours(i), alpha=0.7, label=f"Tomita {k}")
        ax.plot(x, np.nanmean(list(values.values()), axis=0), color="black", linewidth=2.5,
                label="mean")  # fmt: skip
        ax.set(ylabel=ylabel, title=title)
    axes[0].set(xlabel="training strings in the prefix tree", ylim=(-0.05, 1.05))
    axes[0].set_xticks(np.arange(len(sizes)), [str(s) for s in sizes])
    for ax in axes[1:]:
        ax.set(xscale="symlog", xlabel="epochs trained after 100% held-out accuracy")
        ax.set_xticks(snapshots, [str(s) for s in snapshots])
    axes[2].plot(x_snap, np.nanmean(list(hard.values()), axis=0), color="black", linestyle="--",
                 linewidth=2, label=f"mean, from {hard_size} strings")  # fmt: skip
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].legend(fontsize=8, loc="lower right", handles=axes[2].get_lines()[-2:])
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Automaton extraction from GRUs by state merging on the Tomita languages")
    fig.tight_layout()
    _save(fig, path)
