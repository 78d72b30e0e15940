"""Pictures of a study over seeds (scripts/reproduce.py): each figure's mean with its 95%
interval as an error bar and the seeds' values as dots, and each claim's effect against zero.

`figures` maps a figure's name to intervals.interval()'s summary of it (per_seed, mean,
interval); a name that is absent is left out of the picture."""

from __future__ import annotations

import math

import numpy as np

from ntk_evolution.figures import plt, save_figure
from ntk_evolution.kernels.plots import EVOLUTION_PANELS

VERDICT_COLOURS = {"holds": "tab:green", "contradicted": "tab:red", "not resolved": "tab:grey"}
UNIT_LABELS = {
    "accuracy": "accuracy difference (fraction of test images)",
    "ratio": "difference of robust/clean accuracy ratios",
    "epochs": "difference of settling epochs",
    "relative": "relative measure (see the effect)",
}


def _bar_errors(summaries: list[dict]) -> np.ndarray:
    """(2, n) asymmetric error bars from mean to the interval's ends (0 where undefined)."""
    errors = np.zeros((2, len(summaries)))
    for i, s in enumerate(summaries):
        lo, hi = s["interval"]
        if math.isfinite(lo) and math.isfinite(hi):
            errors[:, i] = s["mean"] - lo, hi - s["mean"]
    return errors


def _seeds_caption(n_seeds: int) -> str:
    if n_seeds < 2:
        return "1 seed (no interval)"
    return f"mean over {n_seeds} seeds, error bars: 95% interval, dots: seeds"


def plot_claims(claims: list[dict], n_seeds: int, path: str) -> None:
    """Each claim's effect (> 0: the claimed direction) with its interval against zero, one
    panel per unit, coloured by verdict."""
    units = [u for u in UNIT_LABELS if any(c["unit"] == u for c in claims)]
    groups = [[c for c in claims if c["unit"] == u] for u in units]
    fig, axes = plt.subplots(
        len(units), 1, figsize=(9, 1.2 + 0.42 * len(claims) + 0.6 * len(units)),
        gridspec_kw={"height_ratios": [len(g) + 0.8 for g in groups]}, squeeze=False,
    )  # fmt: skip
    for ax, unit, group in zip(axes[:, 0], units, groups, strict=True):
        for row, c in enumerate(group):
            y = len(group) - 1 - row
            colour = VERDICT_COLOURS[c["verdict"]]
            lo, hi = c["interval"]
            if math.isfinite(lo) and math.isfinite(hi):
                ax.plot([lo, hi], [y, y], color=colour, linewidth=3, solid_capstyle="butt")
            ax.plot(c["mean"], y, "o", color=colour, markersize=7, zorder=3)
            ax.plot(c["per_seed"], [y] * len(c["per_seed"]), "x", color="black", markersize=5,
                    zorder=4)  # fmt: skip
        ax.axvline(0, color="black", linewidth=1)
        ax.set_yticks(range(len(group)))
        ax.set_yticklabels([f"{c['id']}: {c['label']}" for c in reversed(group)], fontsize=9)
        ax.set_ylim(-0.7, len(group) - 0.3)
        ax.set_xlabel(UNIT_LABELS[unit], fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    handles = [
        plt.Line2D([], [], color=c, linewidth=3, marker="o", label=v)
        for v, c in VERDICT_COLOURS.items()
    ] + [plt.Line2D([], [], color="black", marker="x", linestyle="", label="one seed")]
    axes[0, 0].legend(handles=handles, fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.02),
                      ncol=4, frameon=False)  # fmt: skip
    fig.suptitle(
        "Effects the abstracts' claims rest on (> 0: the claimed direction)\n"
        f"{_seeds_caption(n_seeds)}; ids as in REPORT.md",
        fontsize=11, y=1.0 + 0.25 / fig.get_figheight(),
    )  # fmt: skip
    fig.tight_layout()
    save_figure(fig, path)


def _line_with_errors(ax, x, summaries, label, log_y=False, shift=0.0, **style):
    """Means joined by a line, 95% error bars, the seeds' values as faint dots; `shift` moves the
    points sideways (a fraction of x on a log axis, else in x units) so that series sharing x
    stay apart."""
    x = np.asarray(x, dtype=np.float64)
    x = x * (1 + shift) if ax.get_xscale() == "log" else x + shift
    means = np.array([s["mean"] for s in summaries])
    errors = _bar_errors(summaries)
    if log_y:  # an interval reaching zero or below is drawn down to the smallest seed value
        floor = min(v for s in summaries for v in s["per_seed"] if v > 0) / 2
        errors[0] = np.minimum(errors[0], means - floor)
    style = {"linestyle": "-", **style}
    line = ax.errorbar(x, means, yerr=errors, fmt=".", capsize=3, label=label, **style)
    colour = line[0].get_color()
    for xi, s in zip(x, summaries, strict=True):
        ax.plot([xi] * len(s["per_seed"]), s["per_seed"], ".", color=colour, alpha=0.35,
                markersize=4)  # fmt: skip


def plot_evolution_over_seeds(
    figures: dict, kinds: list[str], epochs: list[float], n_seeds: int, path: str
) -> None:
    """Kernel distances, velocity, alignment and top-10 energy against epoch per run, and the
    settling epochs."""
    panels = EVOLUTION_PANELS
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    for ax, (key, title, log_y) in zip(axes.flat, panels, strict=False):
        for kind in kinds:
            names = [(e, f"kernel/{kind}/epoch {e:g}/{key}") for e in epochs]
            present = [(e, figures[n]) for e, n in names if n in figures]
            if present:
                xs, summaries = zip(*present, strict=True)
                _line_with_errors(ax, list(xs), list(summaries), kind, log_y=log_y)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(title.split(" (")[0])
        if log_y:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes.flat[5]
    settling = [figures[f"kernel/{kind}/settling epoch"] for kind in kinds]
    ax.bar(range(len(kinds)), [s["mean"] for s in settling], yerr=_bar_errors(settling),
           capsize=5, color=["tab:blue", "tab:orange"][: len(kinds)], alpha=0.8)  # fmt: skip
    for i, s in enumerate(settling):
        ax.plot([i] * len(s["per_seed"]), s["per_seed"], "k.", markersize=6)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds)
    ax.set_ylabel("epoch")
    ax.set_title("settling epoch: distance to the last kernel\nstays below 10% of its start",
                 fontsize=10)  # fmt: skip
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(
        f"Kernel evolution under benign and adversarial training: {_seeds_caption(n_seeds)}"
    )
    fig.tight_layout()
    save_figure(fig, path)


def _grouped_bars(ax, groups: list[str], series: list[tuple[str, list[dict | None]]]) -> None:
    """Bars per group, one per series, with error bars and the seeds' values."""
    width = 0.8 / len(series)
    for j, (label, summaries) in enumerate(series):
        x = np.arange(len(groups)) + (j - (len(series) - 1) / 2) * width
        kept = [(xi, s) for xi, s in zip(x, summaries, strict=True) if s is not None]
        if not kept:
            continue
        xs, ss = zip(*kept, strict=True)
        bars = ax.bar(xs, [s["mean"] for s in ss], width, yerr=_bar_errors(list(ss)), capsize=2,
                      label=label, alpha=0.85)  # fmt: skip
        for xi, s in kept:
            ax.plot([xi] * len(s["per_seed"]), s["per_seed"], "k.", markersize=3)
        del bars
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series),
              frameon=False)  # fmt: skip


def plot_robustness_over_seeds(
    figures: dict, models: list[tuple[str, str]], attacks: list[tuple[str, str]], eps: float,
    n_seeds: int, path: str,
) -> None:  # fmt: skip
    """Clean, PGD and AutoAttack accuracy of every network and phase-2 model (top), and the
    NTK attacks' kernel-regression accuracy and transfer to the networks (bottom)."""
    width = max(15.0, 1.5 * len(models))  # room for each model's four-line label
    fig, (ax_m, ax_t) = plt.subplots(2, 1, figsize=(width, 10), gridspec_kw={"hspace": 0.55})
    series = [
        (label, [figures.get(f"{prefix}/{key}") for prefix, _ in models])
        for label, key in (
            ("clean", "clean"),
            ("PGD-Linf (100 steps)", "pgd_linf"),
            ("AutoAttack", "autoattack"),
        )
    ]
    _grouped_bars(ax_m, [label for _, label in models], series)
    ax_m.set_title(f"networks and phase-2 models, L-inf eps {eps:g}/255", fontsize=10, pad=22)
    series = [
        (label, [figures.get(f"ntk_attack/{name}/{key}") for name, _ in attacks])
        for label, key in (
            ("kernel regression, clean", "clean"),
            ("kernel regression, PGD", "pgd"),
            ("kernel regression, AutoAttack", "autoattack"),
            ("benign network on the PGD examples", "benign_net"),
            ("adversarial network on the PGD examples", "adversarial_net"),
        )
    ]
    _grouped_bars(ax_t, [label for _, label in attacks], series)
    ax_t.set_title("training-free NTK adversarial examples: kernel regression and transfer",
                   fontsize=10, pad=22)  # fmt: skip
    fig.suptitle(f"Robust accuracy: {_seeds_caption(n_seeds)}", fontsize=12)
    save_figure(fig, path)


def plot_eigen_over_seeds(
    figures: dict, kinds: list[str], components: int, top_ks: list[int], n_seeds: int, path: str
) -> None:
    """Accuracy of each single eigen-component (clean and PGD) and of the cumulative top-k
    predictors, per kernel."""
    fig, (ax_c, ax_k) = plt.subplots(1, 2, figsize=(13, 5))
    ax_k.set_xscale("log")
    colours = dict(zip(kinds, ("tab:blue", "tab:orange"), strict=False))
    for i, kind in enumerate(kinds):
        for j, (key, style) in enumerate((("clean", "--"), ("pgd", "-"))):
            shift = (2 * i + j - 1.5) * 0.06  # four series side by side around each x
            for ax, part, ks in ((ax_c, "component", range(1, components + 1)),
                                 (ax_k, "top_k", top_ks)):  # fmt: skip
                present = [(k, figures[n]) for k in ks
                           if (n := f"eigen/{kind}/{part}/{k}/{key}") in figures]  # fmt: skip
                if present:
                    xs, ss = zip(*present, strict=True)
                    label = f"{kind} kernel, {'PGD-Linf' if key == 'pgd' else key}"
                    _line_with_errors(ax, list(xs), list(ss), label, shift=shift,
                                      linestyle=style, color=colours.get(kind))  # fmt: skip
    ax_c.set(xlabel="eigen-component i (decreasing eigenvalue)", ylabel="test accuracy",
             title="single eigen-components", ylim=(0, 1.05))  # fmt: skip
    ax_k.set(xlabel="top-k eigen-components", ylabel="test accuracy", title="cumulative top-k",
             ylim=(0, 1.05))  # fmt: skip
    for ax in (ax_c, ax_k):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Kernel regression restricted to eigen-components of the final kernels: "
                 f"{_seeds_caption(n_seeds)}", fontsize=11)  # fmt: skip
    fig.tight_layout()
    save_figure(fig, path)
