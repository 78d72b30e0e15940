"""The study of scripts/reproduce.py over seeds, as values: one seed's results flattened into
named figures, the effects the abstracts' claims rest on, their aggregation over seeds
(intervals and verdicts, ntk_evolution.intervals), the pictures and REPORT.md.

`settings` is the study's flags as a dict (OUT/settings.json); a seed's record is
{'seed', 'figures': {name: value}, 'warnings': {model: [text]}, 'timings': {step: s},
'wall_s'} (OUT/seed_<s>/figures.json). Figure names are '/'-separated paths, e.g.
'phase1/benign/autoattack', 'kernel/adversarial/epoch 5/velocity',
'phase2/benign data/adversarial kernel/epoch 20/pgd_linf', 'ntk_attack/relu/benign_net',
'eigen/benign/component/3/pgd', 'cka/benign_vs_adversarial/layer 0 conv1'.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ntk_evolution.study import intervals
from ntk_evolution.study.plots import (
    plot_claims,
    plot_eigen_over_seeds,
    plot_evolution_over_seeds,
    plot_robustness_over_seeds,
)
from ntk_evolution.study.reports import table
from ntk_evolution.utils import atomic_file

KINDS = (("benign", "C"), ("adversarial", "A"))
EVOLUTION_KEYS = ("distance_to_first", "distance_to_last", "velocity", "alignment", "energy_top10")


def epochs_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def kernel_epochs(settings: dict) -> list[float]:
    """The phase-1 epochs whose kernels are computed (those within --epochs)."""
    return [e for e in epochs_list(settings["kernel_epochs"]) if e <= settings["epochs"]]


def phase2_from(settings: dict) -> list[float]:
    """The phase-1 epochs phase 2 starts from (those within --epochs)."""
    return [e for e in epochs_list(settings["phase2_from"]) if e <= settings["epochs"]]


NTK_ATTACK_LABELS = {
    "relu": "infinite-width ReLU NTK",
    "init": "empirical NTK at init",
    "benign_final": "empirical NTK of the final benign network",
}


def top_ks(settings: dict) -> str:
    """eigen_features.py's --top_k: 1 to 100 in rough halvings, below the kernel's size, and
    the whole kernel."""
    n = settings["kernel_size"]
    return ",".join(str(k) for k in [k for k in (1, 2, 5, 10, 20, 50, 100) if k < n] + [n])


def settle_epoch(rows: list[dict], share: float = 0.1) -> float:
    """First epoch after which the distance to the final kernel stays below `share` of its
    initial value."""
    start = rows[0]["distance_to_last"]
    for i, r in enumerate(rows):
        if all(q["distance_to_last"] <= share * start for q in rows[i:]):
            return r["epoch"]
    return rows[-1]["epoch"]


def velocity_drop(rows: list[dict]) -> float:
    """Kernel velocity over the first interval over that of the last."""
    velocities = [r["velocity"] for r in rows if r["velocity"]]
    return velocities[0] / velocities[-1] if len(velocities) > 1 else math.nan


def flatten(results: dict) -> dict[str, float]:
    """One seed's figures by name: every accuracy (clean, PGD, AutoAttack), kernel measure,
    transfer, eigen-feature and CKA figure of the study."""
    f = {}
    for kind, r in results["phase1"].items():
        f |= network_figures(f"phase1/{kind}", r)
    for kind, rows in results["evolution"].items():
        for r in rows:
            for key in EVOLUTION_KEYS:
                if r[key] is not None:
                    f[f"kernel/{kind}/epoch {r['epoch']:g}/{key}"] = r[key]
        f[f"kernel/{kind}/settling epoch"] = settle_epoch(rows)
        f[f"kernel/{kind}/velocity fall"] = velocity_drop(rows)
    for end, distance in results["between"].items():
        f[f"kernel/{end} benign vs adversarial distance"] = distance
    for kind, epoch, data, r in results["phase2"]:
        f |= network_figures(f"phase2/{data} data/{kind} kernel/epoch {epoch:g}", r)
    for name, row in results["transfer"].items():
        for key, value in row.items():
            f[f"ntk_attack/{name}/{key}"] = value
    for kind, result in results["eigen"].items():
        for r in result["rows"]:
            for key in ("eigenvalue", "clean", "linf", "autoattack"):
                if key in r:
                    f[f"eigen/{kind}/{r['kind']}/{r['k']}/{key.replace('linf', 'pgd')}"] = r[key]
    for suffix, result in results["cka"].items():
        for i, (name, value) in enumerate(
            zip(result["layers0"], np.diag(result["linear"]), strict=True)
        ):
            f[f"cka/{suffix}/layer {i} {name}"] = value
    return {k: float(v) for k, v in f.items()}


def network_figures(prefix: str, r: dict) -> dict[str, float]:
    aa = r["aa"]
    return {
        f"{prefix}/clean": r["clean"],
        f"{prefix}/pgd_linf": r["linf"],
        f"{prefix}/pgd_l2": r["l2"],
        f"{prefix}/pgd_linf on the AutoAttack images": aa["acc_dirty"],
        f"{prefix}/autoattack before square": aa["acc_after_fab_t"],
        f"{prefix}/autoattack": aa["acc_autoattack"],
    }


def warnings_of(results: dict) -> dict[str, list[str]]:
    """The reference AutoAttack's gradient-masking warnings, by model."""
    named = {f"phase1/{kind}": r["aa"] for kind, r in results["phase1"].items()}
    for kind, epoch, data, r in results["phase2"]:
        named[f"phase2/{data} data/{kind} kernel/epoch {epoch:g}"] = r["aa"]
    return {name: list(aa["warnings"]) for name, aa in named.items()}


# ----------------------------------------------------------------------------- the claims


def claim_effects(f: dict[str, float], settings: dict) -> list[dict]:
    """The effects the abstracts' claims rest on, from one seed's figures: each oriented so that
    a positive value is the claimed direction."""
    starts = phase2_from(settings)
    late = f"epoch {starts[-1]:g}"
    fixed = sorted({f"epoch {e:g}" for e in (starts[0], starts[-1])})
    attacks = (("PGD", "pgd_linf"), ("AutoAttack", "autoattack"))
    eigen_attacks = (("PGD", "pgd"), ("AutoAttack", "autoattack"))
    if not settings["predictor_autoattack"]:
        eigen_attacks = eigen_attacks[:1]
    effects = []

    def add(claim, part, attack, effect, value):
        effects.append(
            {
                "id": f"{claim}{part}" + (f" {attack}" if attack else ""),
                "claim": claim,
                "attack": attack,
                "label": LABELS[(claim, part)],
                "effect": effect,
                "unit": unit_of(claim, part),
                "value": float(value),
            }
        )

    for part, kind in (("a", "benign"), ("b", "adversarial")):
        fall = math.log10(f[f"kernel/{kind}/velocity fall"]) - 1
        add(1, part, None, f"log10 of the {kind} kernel velocity's fall from the first to the "
            "last interval, minus 1 (> 0: it falls more than tenfold)", fall)  # fmt: skip
    last = f"epoch {last_kernel_epoch(settings):g}"
    movement = min(f[f"kernel/{k}/{last}/distance_to_first"] for k in ("benign", "adversarial"))
    apart = f["kernel/final benign vs adversarial distance"] / movement - 0.5
    add(2, "a", None, "distance between the final benign and adversarial kernels over the "
        "smaller run's total movement, minus 0.5 (> 0: a different kernel)", apart)  # fmt: skip
    sooner = f["kernel/benign/settling epoch"] - f["kernel/adversarial/settling epoch"]
    add(2, "b", None, "benign settling epoch minus adversarial (> 0: the adversarial kernel "
        "settles sooner)", sooner)  # fmt: skip
    for attack, key in attacks:
        on_adversarial = f[f"phase2/benign data/adversarial kernel/{late}/{key}"]
        on_benign = f[f"phase2/benign data/benign kernel/{late}/{key}"]
        add(3, "", attack, f"{attack} accuracy of benign phase 2 on the adversarial kernel minus "
            f"on the benign kernel ({late})", on_adversarial - on_benign)  # fmt: skip
    for attack, key in attacks:
        best = max(f[f"phase2/adversarial data/benign kernel/{e}/{key}"] for e in fixed)
        add(4, "", attack, f"best {attack} accuracy of adversarial phase 2 on a fixed benign "
            "kernel minus the benign network's", best - f[f"phase1/benign/{key}"])  # fmt: skip
    fooled = f["phase1/benign/clean"] - f["ntk_attack/relu/benign_net"]
    add(5, "", "PGD", "benign network's clean accuracy minus its accuracy on the infinite-width "
        "NTK's PGD examples", fooled)  # fmt: skip
    for attack, key in eigen_attacks:
        for part, kind in (("a", "benign"), ("b", "adversarial")):
            top = eigen_ratio(f, kind, range(2, 6), key) - eigen_ratio(f, kind, range(6, 11), key)
            add(6, part, attack, f"{kind} kernel: mean {attack}/clean accuracy ratio of single "
                "eigen-components 2-5 minus 6-10", top)  # fmt: skip
    add(7, "a", None, "benign settling epoch minus adversarial (as 2b)", sooner)
    full = settings["kernel_size"]
    for attack, key in eigen_attacks:
        gain = f[f"eigen/adversarial/top_k/{full}/{key}"] - f[f"eigen/benign/top_k/{full}/{key}"]
        add(7, "b", attack, f"{attack} accuracy of the full adversarial-kernel predictor minus "
            "the benign one's", gain)  # fmt: skip
    return effects


LABELS = {  # the effects' short names, for the claims figure
    (1, "a"): "benign kernel velocity falls > 10x",
    (1, "b"): "adversarial kernel velocity falls > 10x",
    (2, "a"): "final kernels differ",
    (2, "b"): "adversarial kernel settles sooner",
    (3, ""): "benign phase 2 more robust on adversarial kernel",
    (4, ""): "adversarial phase 2 on fixed kernel beats benign net",
    (5, ""): "infinite-width NTK examples fool the benign net",
    (6, "a"): "benign kernel: top components more robust",
    (6, "b"): "adversarial kernel: top components more robust",
    (7, "a"): "adversarial kernel settles sooner",
    (7, "b"): "adversarial-kernel predictor more robust",
}


def unit_of(claim: int, part: str) -> str:
    """What an effect measures, for the claims figure's panels."""
    if claim == 1 or (claim, part) == (2, "a"):
        return "relative"
    if (claim, part) in ((2, "b"), (7, "a")):
        return "epochs"
    return "ratio" if claim == 6 else "accuracy"


def last_kernel_epoch(settings: dict) -> float:
    return kernel_epochs(settings)[-1]


def networks_test_images(settings: dict) -> str:
    """The networks' test images in the report's words (--n_test; absent before it existed)."""
    n = settings.get("n_test")
    return "the test set" if n is None else f"the first {n} test images"


def eigen_ratio(f: dict, kind: str, components, key: str) -> float:
    """Mean robust/clean accuracy ratio of the single eigen-components (those with a nonzero
    clean accuracy); NaN when there is none."""
    values = []
    for k in components:
        clean = f.get(f"eigen/{kind}/component/{k}/clean")
        if clean:
            values.append(f[f"eigen/{kind}/component/{k}/{key}"] / clean)
    return float(np.mean(values)) if values else math.nan


# ----------------------------------------------------------------------------- aggregation


def aggregate(records: list[dict], settings: dict) -> dict:
    """Every figure and every claim's effect over the seeds: per-seed values, mean, interval,
    method, and for effects the verdict."""
    names = list(records[0]["figures"])
    figures = {
        n: intervals.interval([r["figures"].get(n, math.nan) for r in records]) for n in names
    }
    per_seed = [claim_effects(r["figures"], settings) for r in records]
    claims = []
    for i, effect in enumerate(per_seed[0]):
        entry = {k: effect[k] for k in ("id", "claim", "attack", "label", "effect", "unit")}
        entry |= intervals.judge([effects[i]["value"] for effects in per_seed])
        claims.append(entry)
    return {"figures": figures, "claims": claims}


def write_figures_table(path: str, seeds: list[int], figures: dict) -> None:
    """figures.csv: one row per figure, its value on each seed, the mean and the interval."""
    with atomic_file(path, "w") as f:
        f.write(",".join(["figure", *(f"seed {s}" for s in seeds), "mean", "low", "high"]) + "\n")
        for name, s in figures.items():
            cells = [*s["per_seed"], s["mean"], *s["interval"]]
            f.write(",".join([f'"{name}"', *(f"{v:.6g}" for v in cells)]) + "\n")


# ----------------------------------------------------------------------------- report


CLAIMS = {
    1: "Loo et al.: feature learning happens early (kernel learning), then the kernel stays "
    "nearly fixed (lazy training).",
    2: "Loo et al.: under adversarial training the empirical NTK rapidly converges to a "
    "different kernel than under standard training.",
    3: "Loo et al.: this kernel provides robustness even when non-robust (benign) training is "
    "done on top of it.",
    4: "Loo et al.: adversarial training on a fixed kernel can yield a robust classifier (76.1% "
    "PGD accuracy at eps 4/255 on CIFAR-10).",
    5: "Tsilivis & Kempe: NTK adversarial examples, made without training, transfer to networks.",
    6: "Tsilivis & Kempe: robust features correspond to the largest eigenvalues (component 1, "
    "the near-constant mode, is left out).",
    7: "Tsilivis & Kempe: adversarial training's NTK falls into the lazy regime much earlier and "
    "relies more on its top eigenspaces.",
}
NETWORK_COLUMNS = (
    ("clean", "clean"),
    ("PGD-Linf", "pgd_linf"),
    ("PGD-L2", "pgd_l2"),
    ("PGD (AutoAttack's images)", "pgd_linf on the AutoAttack images"),
    ("AutoAttack", "autoattack"),
    ("before Square", "autoattack before square"),
)


def combine(verdicts: list[str]) -> str:
    """A claim resting on several effects holds when all hold, and is contradicted when one
    is."""
    if all(v == intervals.HOLDS for v in verdicts):
        return intervals.HOLDS
    if intervals.CONTRADICTED in verdicts:
        return intervals.CONTRADICTED
    return intervals.NOT_RESOLVED


def verdict_words(verdict: str, entry: dict | None = None) -> str:
    """The verdict in bold; for an unresolved effect, the seeds that would resolve it."""
    if verdict != intervals.NOT_RESOLVED:
        return f"**{verdict}**"
    if entry is None:
        return "**not resolved at this scale**"
    return f"**not resolved at this scale** ({to_resolve(entry)})"


def to_resolve(entry: dict) -> str:
    """How many seeds would resolve an unresolved effect at its observed mean and spread, and
    which way."""
    if entry["method"] is None:
        return "one seed: no interval"
    needed = entry["seeds_needed"]
    if needed is None:
        return "no number of seeds would, at its mean"
    return f"about {needed} seeds would, {'for' if entry['mean'] > 0 else 'against'} the claim"


def models_of(summary: dict) -> list[tuple[str, str]]:
    """(figure prefix, label) of every network and phase-2 model, in the report's order."""
    models = [(f"phase1/{kind}", f"phase 1\n{kind}") for kind, _ in KINDS]
    prefixes = sorted(
        {n.rsplit("/", 1)[0] for n in summary["figures"] if n.startswith("phase2/")},
        key=lambda p: (p.split("/")[1], p.split("/")[2], float(p.split("epoch ")[1])),
    )
    for prefix in prefixes:
        _, data, kernel, epoch = prefix.split("/")
        models.append((prefix, f"phase 2,\n{data},\n{kernel}\nof {epoch}"))
    return models


def draw(summary: dict, settings: dict, out: str) -> None:
    figures, n = summary["figures"], len(summary["seeds"])
    kinds = [kind for kind, _ in KINDS]
    plot_claims(summary["claims"], n, os.path.join(out, "claims.png"))
    epochs = kernel_epochs(settings)
    plot_evolution_over_seeds(figures, kinds, epochs, n, f"{out}/kernel_evolution.png")
    plot_robustness_over_seeds(
        figures, models_of(summary), list(NTK_ATTACK_LABELS.items()), settings["eps"], n,
        f"{out}/robustness.png",
    )  # fmt: skip
    ks = [int(k) for k in top_ks(settings).split(",")]
    plot_eigen_over_seeds(figures, kinds, 10, ks, n, f"{out}/eigen_features.png")


def write_report(summary: dict, settings: dict, out: str, wall: float) -> str:
    figures, claims, seeds = summary["figures"], summary["claims"], summary["seeds"]
    n = len(seeds)
    method = summary["interval"]["method"]

    def c(name: str) -> str:
        return intervals.format_interval(figures[name]) if name in figures else "-"

    warned = {}
    for per_model in summary["warnings"].values():
        for model, warnings in per_model.items():
            warned[model] = warned.get(model, 0) + bool(warnings)
    models = models_of(summary)
    epochs = kernel_epochs(settings)
    interval_text = {
        None: "one seed: no interval can be given, and no claim can be resolved",
        intervals.STUDENT_T: "Student's t interval of the mean over the seeds (mean +- "
        "t_{0.975, n-1} s / sqrt(n))",
        intervals.BOOTSTRAP: "percentile bootstrap of the mean over the seeds "
        f"({intervals.BOOTSTRAP_RESAMPLES} resamples)",
    }[method]
    lines = [
        "# Reproduction report",
        "",
        scale_line(settings) + f"; **{n} seed{'s' if n > 1 else ''}** "
        f"({', '.join(map(str, seeds))}), each a whole study in `seed_<s>/`. Every figure is "
        f"`mean [low, high]`, the 95% {interval_text}. Per-seed values: `figures.csv` and "
        "`summary.json`. Written by `scripts/reproduce.py` (this report in "
        f"{wall / 60:.1f} min; the seeds took "
        + ", ".join(f"{w / 60:.1f}" for w in summary["seed_wall_s"])
        + " min).",
        "",
        f"Accuracies are fractions of {networks_test_images(settings)}. PGD-Linf is 100 steps "
        "against the network "
        f"(and {settings['attack_steps']} steps against kernel predictors). AutoAttack: robust "
        "to all of APGD-CE, APGD-T, FAB-T and Square (5000 queries; in turn, each on the images "
        "still robust, as the reference runs them), L-inf at the same eps, on the first "
        f"{settings['aa_n_test']} test images (a subset, so that the 3-seed study fits its "
        "time on a CPU); 'PGD (AutoAttack's images)' is the 100-step PGD on those images, "
        "'before Square' the robust accuracy after APGD-CE, APGD-T and FAB-T.",
        "",
        "## Verdicts",
        "",
        "Each claim of the abstracts rests on one or more effects, each oriented so that a "
        "positive value is the claimed direction. An effect **holds** when its interval lies "
        "above zero, is **contradicted** when it lies at or below zero, and is otherwise **not "
        "resolved at this scale**; then the number of seeds that would resolve it at the "
        "observed mean and spread is given. Robustness effects are judged on PGD and on "
        "AutoAttack separately.",
        "",
        "![claims](claims.png)",
        "",
        table(
            ["id", "effect", "per seed", "mean [95% interval]", "verdict", "seeds to resolve"],
            [
                [
                    e["id"],
                    e["effect"],
                    ", ".join(f"{v:.4g}" for v in e["per_seed"]),
                    intervals.format_interval(e),
                    e["verdict"],
                    "-" if e["verdict"] != intervals.NOT_RESOLVED else to_resolve(e),
                ]
                for e in claims
            ],
        ),
        "",
        *claim_lines(claims, warned, n),
        "## Phase 1",
        "",
        table(
            ["run", *(h for h, _ in NETWORK_COLUMNS), "masking warned"],
            [
                [
                    label,
                    *(c(f"{prefix}/{key}") for _, key in NETWORK_COLUMNS),
                    f"{warned.get(prefix, 0)} of {n} seeds",
                ]
                for prefix, label in [(p, label.replace("\n", " ")) for p, label in models[:2]]
            ],
        ),  # fmt: skip
        "",
        "## Kernel evolution",
        "",
        "![kernel evolution](kernel_evolution.png)",
        "",
        table(
            ["run", "epoch", *EVOLUTION_KEYS],
            [
                [kind, f"{e:g}", *(c(f"kernel/{kind}/epoch {e:g}/{key}") for key in EVOLUTION_KEYS)]
                for kind, _ in KINDS
                for e in epochs
            ],
        ),
        "",
        table(
            ["run", "settling epoch", "velocity fall (first / last interval)"],
            [
                [kind, c(f"kernel/{kind}/settling epoch"), c(f"kernel/{kind}/velocity fall")]
                for kind, _ in KINDS
            ],
        ),
        "",
        "Distance between the benign and adversarial kernels: at the first kernel epoch "
        f"{c('kernel/initial benign vs adversarial distance')}, at the last "
        f"{c('kernel/final benign vs adversarial distance')}.",
        "",
        "## Phase 2 on frozen kernels (centered linearized dynamics)",
        "",
        table(
            ["model", *(h for h, _ in NETWORK_COLUMNS), "masking warned"],
            [
                [
                    label,
                    *(c(f"{prefix}/{key}") for _, key in NETWORK_COLUMNS),
                    f"{warned.get(prefix, 0)} of {n} seeds",
                ]
                for prefix, label in [(p, label.replace("\n", " ")) for p, label in models[2:]]
            ],
        ),  # fmt: skip
        "",
        "![robustness](robustness.png)",
        "",
        *masking_lines(summary["warnings"]),
        "## Training-free NTK adversarial examples and their transfer",
        "",
        table(
            [
                "kernel",
                "kernel regression clean",
                "kernel regression PGD",
                "kernel regression AutoAttack",
                "benign net on them",
                "adversarial net on them",
            ],
            [
                [
                    label,
                    *(
                        c(f"ntk_attack/{name}/{key}")
                        for key in ("clean", "pgd", "autoattack", "benign_net", "adversarial_net")
                    ),
                ]
                for name, label in NTK_ATTACK_LABELS.items()
            ],
        ),  # fmt: skip
        "",
        "## NTK eigen-features (final kernels)",
        "",
        "![eigen-features](eigen_features.png)",
        "",
        table(
            ["kernel", "predictor", "k", "eigenvalue", "clean", "PGD-Linf", "AutoAttack"],
            [
                [
                    kind,
                    part,
                    k,
                    *(
                        c(f"eigen/{kind}/{part}/{k}/{key}")
                        for key in ("eigenvalue", "clean", "pgd", "autoattack")
                    ),
                ]
                for kind, _ in KINDS
                for part, k in eigen_rows(figures, kind)
            ],
        ),  # fmt: skip
        "",
        "## CKA (linear, layer i against layer i)",
        "",
        table(
            ["pair", "layer", "CKA"],
            [[*name.split("/", 2)[1:], c(name)] for name in figures if name.startswith("cka/")],
        ),
        "",
        "Each seed's pictures (kernel heatmaps and evolution, eigen-features, CKA heatmaps) are in "
        "its folder: `seed_<s>/kernel_analysis/`, `seed_<s>/eigen_features/`, `seed_<s>/cka/`.",
        "",
        "## Wall time per seed (minutes)",
        "",
        table(
            ["seed", *summary["step_names"]],
            [[s, *(f"{t / 60:.1f}" for t in times)] for s, times in summary["step_minutes"]],
        ),
    ]
    text = "\n".join(lines) + "\n"
    with atomic_file(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(text)
    return text


def scale_line(settings: dict) -> str:
    """Dataset, model, eps, epochs and kernel size of the study, in words."""
    return (
        f"{settings['dataset']}, {settings['model']}, L-inf eps {settings['eps']:g}/255, phase 1 "
        f"{settings['epochs']} epochs, phase 2 {settings['phase2_epochs']} epochs, kernels on "
        f"{settings['kernel_size']} training images (averaged over logits)"
    )


def eigen_rows(figures: dict, kind: str) -> list[tuple[str, int]]:
    rows = {}
    for name in figures:
        parts = name.split("/")
        if parts[0] == "eigen" and parts[1] == kind:
            rows[(parts[2], int(parts[3]))] = None
    return sorted(rows, key=lambda r: (r[0] != "component", r[1]))


def claim_lines(claims: list[dict], warned: dict, n: int) -> list[str]:
    """One paragraph per claim: its statement, each effect with its interval and verdict, and
    the claim's verdict (on PGD and AutoAttack separately where it rests on an attack)."""
    lines = []
    for number, statement in CLAIMS.items():
        entries = [e for e in claims if e["claim"] == number]
        parts = [
            f"{e['id']} ({e['label']}): {intervals.format_interval(e)}, "
            + verdict_words(e["verdict"], e)
            + ";"
            for e in entries
        ]
        attacks = [a for a in ("PGD", "AutoAttack") if any(e["attack"] == a for e in entries)]
        if attacks:
            overall = "; ".join(
                f"on {a}: "
                + verdict_words(
                    combine([e["verdict"] for e in entries if e["attack"] in (None, a)])
                )
                for a in attacks
            )
            if "AutoAttack" not in attacks:
                overall += (
                    "; not judged on AutoAttack (the empirical-NTK predictors were attacked by PGD "
                    "only; rerun with --predictor_autoattack)"
                    if number in (6, 7)
                    else ""
                )
        else:
            overall = verdict_words(combine([e["verdict"] for e in entries]))
        note = ""
        if number in (3, 4):
            masked = {m: k for m, k in warned.items() if m.startswith("phase2/") and k}
            if masked:
                note = (
                    f" Gradient masking: the reference AutoAttack warned on {len(masked)} phase-2 "
                    "models on some seed (see below), so their PGD figures overstate robustness."
                )
        lines += [
            f"{number}. *{statement}* " + " ".join(parts) + f" **Verdict:** {overall}.{note}",
            "",
        ]
    return lines


def masking_lines(warnings: dict) -> list[str]:
    """The reference AutoAttack's gradient-masking warnings, by seed and model."""
    lines = [
        f"- seed {seed}, {model}: {w}"
        for seed, per_model in warnings.items()
        for model, ws in per_model.items()
        for w in ws
    ]
    if not lines:
        return [
            "No gradient masking detected: no check of the reference AutoAttack warned on a seed.",
            "",
        ]
    return ["Warnings of the reference AutoAttack's checks (gradient masking):", "", *lines, ""]
