"""`make reproduce`: the NTK-evolution study and its companion analyses in one command, then
REPORT.md with the tables, the pictures and each claim of the paper's abstract beside the number
that supports or contradicts it at this scale.

Default: digits (8x8) and cnn_small on a CPU: 15-25 minutes on 2 cores before AutoAttack, which
adds an estimated 20-30 (12 models on 360 images; not timed in full). The paper's scale
on a GPU: --dataset cifar10 --model resnet18 --eps 4 --epochs 100 --phase2_epochs 100
--kernel_size 500 --kernel_epochs 0,0.125,0.5,1,2,5,10,20,50,100 --phase2_from 0,1,5,20,100.

Steps (every output under --out):
  1. phase 1, benign (CC) and adversarial (AC), a checkpoint every epoch and at fractions;
  2. the empirical NTK (averaged over logits) at --kernel_epochs of both runs;
  3. kernel evolution (analyze_kernels.py);
  4. phase 2, benign centered linearized dynamics, from the kernels at --phase2_from of both
     runs; adversarial training on the fixed kernel (phase 2 on A) from the benign run's
     kernels at init and at the end;
  5. training-free NTK adversarial examples (ntk_attack.py) and their transfer to the phase-1
     networks (eval_and_make_adv.py --test_path);
  6. NTK eigen-features of the final benign and adversarial kernels (eigen_features.py);
  7. CKA between the final benign and adversarial networks (cka.py).
Every network, phase-2 model and the infinite-width NTK predictor is attacked by PGD (the
original's figure) and by AutoAttack (eval_and_make_adv.py / ntk_attack.py --autoattack; the
empirical-NTK predictors of the NTK attacks and eigen-features too with --predictor_autoattack,
which takes hours on a CPU); the claims are judged on both, and a gradient-masking warning is
reported where the gradient-free Square attack beats the gradient attacks together.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import analyze_kernels
import calculate_kernel
import cka
import eigen_features
import eval_and_make_adv
import ntk_attack
import run_exp
from ntk_evolution.checkpoints import format_epoch, load_kernel
from ntk_evolution.cli import Parser
from ntk_evolution.kernel_analysis import kernel_distance
from ntk_evolution.reports import call, open_log, table

KINDS = (("benign", "C"), ("adversarial", "A"))


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="cnn_small")
    p.add_argument("--eps", type=float, default=32.0, help="L-inf radius in 1/255")
    p.add_argument("--epochs", type=int, default=20, help="phase 1")
    p.add_argument("--phase2_epochs", type=int, default=20)
    p.add_argument("--kernel_size", type=int, default=300)
    p.add_argument("--kernel_epochs", default="0,0.125,0.5,1,2,5,10,20")
    p.add_argument("--phase2_from", default="0,1,5,20")
    p.add_argument("--attack_steps", type=int, default=20, help="PGD steps on kernel predictors")
    p.add_argument("--eigen_n_test", type=int, default=100)
    p.add_argument(
        "--aa_n_test", type=int, default=None, help="AutoAttack on the first N test images (all)"
    )
    p.add_argument(
        "--predictor_n_test",
        type=int,
        default=100,
        help="test images of the NTK attacks (PGD and AutoAttack on kernel predictors)",
    )
    p.add_argument(
        "--predictor_autoattack",
        action="store_true",
        help="AutoAttack on the empirical-NTK predictors too: the NTK attacks' and every "
        "eigen-feature's (hours on a CPU)",
    )
    p.add_argument("--out", default="reproduce_runs")
    return p.parse_args(argv)


def epochs_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def checkpoint(run_dir: str, epoch: float, final_epoch: int) -> str:
    if epoch == final_epoch:
        return f"{run_dir}/parameters_final.pkl"
    return f"{run_dir}/parameters_checkpoint_{format_epoch(epoch)}.pkl"


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.time()
    out = args.out
    log = open_log(out)
    common = f"--dataset {args.dataset} --model {args.model} --random_seed 0"
    kernel_epochs = [e for e in epochs_list(args.kernel_epochs) if e <= args.epochs]
    phase2_from = [e for e in epochs_list(args.phase2_from) if e <= args.epochs]
    timings = {}

    # 1. phase 1
    t = time.time()
    phase1 = {}
    for kind, letter in KINDS:
        phase1[kind] = call(
            run_exp,
            f"{common} --eps {args.eps} --loaders {letter}C --standard_epochs {args.epochs} "
            f"--linear_epochs 0 --save_models --constant_save --skip_second_test "
            f"--save_path {out}/phase1_{kind}",
            log,
        )["standard"]
    timings["phase 1 (2 runs)"] = time.time() - t
    aa_flags = f"--eps {args.eps} --autoattack --save_name autoattack" + (
        f" --n_test {args.aa_n_test}" if args.aa_n_test else ""
    )

    # 2-3. kernels and their evolution
    t = time.time()
    kernel_paths = {kind: {} for kind, _ in KINDS}
    for kind, _ in KINDS:
        for epoch in kernel_epochs:
            name = f"kernel_epoch_{format_epoch(epoch)}"
            call(
                calculate_kernel,
                f"{common} --model_path {checkpoint(f'{out}/phase1_{kind}', epoch, args.epochs)} "
                f"--dataset_size {args.kernel_size} --save_name {name}",
                log,
            )
            kernel_paths[kind][epoch] = f"{out}/phase1_{kind}/{name}_{args.kernel_size}.pkl"
    evolution = call(
        analyze_kernels,
        " ".join(p for kind, _ in KINDS for p in kernel_paths[kind].values())
        + f" --names benign adversarial --out_dir {out}/kernel_analysis",
        log,
    )
    timings["kernels and evolution"] = time.time() - t
    final_kernels = {
        kind: load_kernel(kernel_paths[kind][kernel_epochs[-1]])["kernel"] for kind, _ in KINDS
    }
    initial_kernels = {
        kind: load_kernel(kernel_paths[kind][kernel_epochs[0]])["kernel"] for kind, _ in KINDS
    }
    between_finals = kernel_distance(final_kernels["benign"], final_kernels["adversarial"])

    # 4. phase 2 on frozen kernels
    t = time.time()
    phase2 = []
    for kind, _ in KINDS:
        for epoch in phase2_from:
            path = checkpoint(f"{out}/phase1_{kind}", epoch, args.epochs)
            result = call(
                run_exp,
                f"{common} --eps {args.eps} --loaders CC --linear_epochs {args.phase2_epochs} "
                f"--base_model_path {path} --centering --second_lr 0.01 --skip_first_test "
                f"--save_models --save_path {out}/phase2_benign_from_{kind}_{format_epoch(epoch)}",
                log,
            )["linear"]
            phase2.append((kind, epoch, "benign", result))
    for epoch in (phase2_from[0], phase2_from[-1]):
        path = checkpoint(f"{out}/phase1_benign", epoch, args.epochs)
        result = call(
            run_exp,
            f"{common} --eps {args.eps} --loaders CA --linear_epochs {args.phase2_epochs} "
            f"--base_model_path {path} --centering --second_lr 0.01 --skip_first_test "
            f"--save_models --save_path {out}/phase2_adversarial_from_benign_{format_epoch(epoch)}",
            log,
        )["linear"]
        phase2.append(("benign", epoch, "adversarial", result))
    timings["phase 2 runs"] = time.time() - t

    # AutoAttack on every network and phase-2 model (the same test images for PGD and AA)
    t = time.time()
    for kind, _ in KINDS:
        phase1[kind]["aa"] = call(
            eval_and_make_adv,
            f"{common} --model_path {out}/phase1_{kind}/parameters_final.pkl {aa_flags}",
            log,
        )
    for kind, epoch, data, result in phase2:
        folder = f"phase2_{data}_from_{kind}_{format_epoch(epoch)}"
        result["aa"] = call(
            eval_and_make_adv,
            f"{common} --model_path {out}/{folder}/parameters_final.pkl --linear --centering "
            f"{aa_flags}",
            log,
        )
    timings["AutoAttack on the networks"] = time.time() - t

    # 5. NTK attack and transfer
    t = time.time()
    attacks = {
        "infinite-width ReLU NTK": "--kernel relu_ntk --save_name relu",
        "empirical NTK at init": f"--model {args.model} --save_name init",
        f"empirical NTK, benign epoch {args.epochs}": (
            f"--model {args.model} --model_path {out}/phase1_benign/parameters_final.pkl "
            "--save_name benign_final"
        ),
    }
    transfer = []
    for label, flags in attacks.items():
        summary = call(
            ntk_attack,
            f"--dataset {args.dataset} --dataset_size {args.kernel_size} --eps {args.eps} "
            f"--pgd_steps {args.attack_steps} --n_test {args.predictor_n_test} "
            f"--save_dir {out}/ntk_attack {flags}"
            + (" --autoattack" if "relu_ntk" in flags or args.predictor_autoattack else ""),
            log,
        )
        name = flags.split("--save_name ")[1]
        row = [
            label,
            summary["accuracy_clean"],
            summary["accuracy_linf"],
            summary.get("accuracy_autoattack", "not run"),
        ]
        for kind, _ in KINDS:
            evaluated = call(
                eval_and_make_adv,
                f"{common} --model_path {out}/phase1_{kind}/parameters_final.pkl --no_adv "
                f"--test_path {out}/ntk_attack/adv_examples_{name}.pkl --save_name ntk_{name}",
                log,
            )
            row.append(evaluated["acc_transfer"])
        transfer.append(row)
    timings["NTK attacks and transfer"] = time.time() - t

    # 6. eigen-features
    t = time.time()
    eigen = {}
    for kind, _ in KINDS:
        eigen[kind] = call(
            eigen_features,
            f"{common} --model_path {out}/phase1_{kind}/parameters_final.pkl "
            f"--kernel_path {kernel_paths[kind][kernel_epochs[-1]]} --eps {args.eps} "
            f"--pgd_steps {args.attack_steps} --n_test {args.eigen_n_test} --components 10 "
            f"--top_k 1,2,5,10,20,50,100,{args.kernel_size} --save_dir {out}/eigen_features "
            + ("--autoattack " if args.predictor_autoattack else "")
            + f"--save_name {kind}",
            log,
        )
    timings["eigen-features"] = time.time() - t

    # 7. CKA
    t = time.time()
    pair = f"{out}/phase1_benign/parameters_final.pkl {out}/phase1_adversarial/parameters_final.pkl"
    cka_results = {}
    for suffix, paths, adv in (
        ("benign_self", f"{out}/phase1_benign/parameters_final.pkl", "0"),
        ("adversarial_self", f"{out}/phase1_adversarial/parameters_final.pkl", "0"),
        ("benign_vs_adversarial", pair, "0 0"),
        ("benign_vs_adversarial_pgd_inputs", pair, "1 1"),
    ):
        cka_results[suffix] = call(
            cka,
            f"--dataset {args.dataset} --model {args.model} --model_path {paths} --adv {adv} "
            f"--eps {args.eps} --savedir {out}/cka --suffix {suffix}",
            log,
        )
    timings["CKA"] = time.time() - t
    log.close()

    report = write_report(
        args, phase1, evolution, between_finals, initial_kernels, phase2, transfer, eigen,
        cka_results, timings, time.time() - start,
    )  # fmt: skip
    print(report)
    print(f"\nwrote {out}/REPORT.md; wall time {time.time() - start:.0f}s")


AA_COLUMNS = ["PGD (same images)", "AutoAttack", "before Square", "masking"]


def aa_cells(aa: dict) -> list:
    """The AutoAttack columns of a row, from eval_and_make_adv.py --autoattack's results."""
    masked = "**yes**" if aa["warnings"] else "no"
    return [aa["acc_dirty"], aa["acc_autoattack"], aa["acc_after_fab_t"], masked]


def write_report(
    args, phase1, evolution, between_finals, initial_kernels, phase2, transfer, eigen, cka_results,
    timings, wall,
) -> str:  # fmt: skip
    out, eps = args.out, args.eps
    benign_rows, adversarial_rows = evolution["benign"], evolution["adversarial"]
    lines = [
        "# Reproduction report",
        "",
        f"{args.dataset}, {args.model}, L-inf eps {eps:g}/255, phase 1 {args.epochs} epochs, "
        f"phase 2 {args.phase2_epochs} epochs, kernels on {args.kernel_size} training images "
        f"(averaged over logits). Written by `scripts/reproduce.py` in {wall / 60:.1f} min; "
        "accuracies are fractions of the test set, PGD-Linf is 100 steps against the network "
        f"(and {args.attack_steps} steps against kernel predictors). AutoAttack: robust to all "
        "of APGD-CE, APGD-T, FAB-T and Square (5000 queries; in turn, each on the images still "
        "robust, as the reference runs them), L-inf at the same eps, on "
        + (f"the first {args.aa_n_test}" if args.aa_n_test else "all")
        + " test images; 'PGD (same images)' is the 100-step PGD on those images, 'before "
        "Square' the robust accuracy after APGD-CE, APGD-T and FAB-T, 'masking' whether a "
        "check of the reference's AutoAttack warned, such as Square lowering the robust "
        "accuracy by more than 0.2% below that (gradient masking).",
        "",
        "## Phase 1",
        "",
        table(
            ["run", "clean", "PGD-Linf", "PGD-L2", *AA_COLUMNS],
            [
                [kind, r["clean"], r["linf"], r["l2"], *aa_cells(r["aa"])]
                for kind, r in phase1.items()
            ],
        ),
        "",
        "## Kernel evolution",
        "",
        "![kernel evolution](kernel_analysis/kernel_evolution.png)",
        "![spectra](kernel_analysis/kernel_spectra.png)",
        "",
        table(
            [
                "run",
                "epoch",
                "distance to first",
                "distance to last",
                "velocity",
                "alignment",
                "top-10 energy",
            ],
            [
                [
                    label,
                    f"{r['epoch']:g}",
                    r["distance_to_first"],
                    r["distance_to_last"],
                    "-" if r["velocity"] is None else r["velocity"],
                    r["alignment"],
                    r["energy_top10"],
                ]
                for label, rows in evolution.items()
                for r in rows
            ],
        ),  # fmt: skip
        "",
        f"Distance between the final benign and final adversarial kernels: {between_finals:.4f} "
        f"(each run's distance from its first kernel at the end: benign "
        f"{benign_rows[-1]['distance_to_first']:.4f}, adversarial "
        f"{adversarial_rows[-1]['distance_to_first']:.4f}; the two initial kernels differ by "
        f"{kernel_distance(initial_kernels['benign'], initial_kernels['adversarial']):.4f}).",
        "",
        "## Phase 2 on frozen kernels (centered linearized dynamics)",
        "",
        table(
            ["kernel from", "at epoch", "phase-2 data", "clean", "PGD-Linf", "PGD-L2", *AA_COLUMNS],
            [
                [kind, f"{e:g}", data, r["clean"], r["linf"], r["l2"], *aa_cells(r["aa"])]
                for kind, e, data, r in phase2
            ],
        ),
        "",
        *masking_section(phase1, phase2),
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
            transfer,
        ),  # fmt: skip
        "",
        f"For reference, the networks' clean accuracy: benign {phase1['benign']['clean']:.4f}, "
        f"adversarial {phase1['adversarial']['clean']:.4f}.",
        "",
        "## NTK eigen-features (final kernels)",
        "",
    ]
    for kind, result in eigen.items():
        lines += [
            f"![eigen-features {kind}](eigen_features/eigen_features_{kind}.png)",
            "",
            f"{kind}: {result['kernel']} ({result['n_test']} test images)",
            "",
            table(
                ["kind", "k", "eigenvalue", "clean", "PGD-Linf", "AutoAttack"],
                [
                    [
                        r["kind"],
                        r["k"],
                        r["eigenvalue"],
                        r["clean"],
                        r["linf"],
                        r.get("autoattack", "not run"),
                    ]
                    for r in result["rows"]
                ],
            ),
            "",
        ]
    lines += ["## CKA", ""]
    for suffix, result in cka_results.items():
        diagonal = np.diag(result["linear"])
        lines += [
            f"![CKA {suffix}](cka/cka_{suffix}.png)",
            "",
            f"{suffix}: linear CKA layer i vs layer i: "
            + ", ".join(f"{n} {v:.3f}" for n, v in zip(result["layers0"], diagonal, strict=True)),
            "",
        ]
    lines += claims(args, phase1, evolution, between_finals, phase2, transfer, eigen)
    lines += [
        "",
        "## Wall time",
        "",
        table(["step", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()]),
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(text)
    return text


def claims(args, phase1, evolution, between_finals, phase2, transfer, eigen) -> list[str]:
    """The abstract's claims (Loo et al. 2022, and Tsilivis & Kempe 2022), each with the number
    from this run and whether it holds here."""
    benign, adversarial = evolution["benign"], evolution["adversarial"]

    def settle_epoch(rows, share=0.1):
        """First epoch after which the distance to the final kernel stays below `share` of its
        initial value."""
        start = rows[0]["distance_to_last"]
        for i, r in enumerate(rows):
            if all(q["distance_to_last"] <= share * start for q in rows[i:]):
                return r["epoch"]
        return rows[-1]["epoch"]

    def velocity_drop(rows):
        velocities = [r["velocity"] for r in rows if r["velocity"]]
        return velocities[0] / velocities[-1] if len(velocities) > 1 else float("nan")

    p2 = {(kind, e, data): r for kind, e, data, r in phase2}
    late = max(e for _, e, _, _ in phase2)
    from_adv = p2[("adversarial", late, "benign")]
    from_benign = p2[("benign", late, "benign")]
    fixed = {e: r for (kind, e, data), r in p2.items() if data == "adversarial"}
    lazy = velocity_drop(benign) > 10 and velocity_drop(adversarial) > 10
    settle_b, settle_a = settle_epoch(benign), settle_epoch(adversarial)
    robust_kernel = from_adv["linf"] > from_benign["linf"] + 0.05
    robust_kernel_aa = aa(from_adv) > aa(from_benign) + 0.05
    different = between_finals > 0.5 * min(
        r[-1]["distance_to_first"] for r in (benign, adversarial)
    )
    best_fixed_at = max(r["linf"] for r in fixed.values())
    best_fixed_aa = max(aa(r) for r in fixed.values())
    benign_aa = phase1["benign"]["aa"]["acc_autoattack"]
    lines = [
        "## The abstract's claims at this scale",
        "",
        "Loo et al. (NeurIPS 2022):",
        "",
        "1. *Feature learning happens early (kernel learning), then the kernel stays nearly fixed "
        f"(lazy training).* Kernel velocity falls by a factor {velocity_drop(benign):.0f} (benign) "
        f"and {velocity_drop(adversarial):.0f} (adversarial) from the first to the last interval. "
        + ("**Holds.**" if lazy else "**Does not hold here.**"),
        "2. *Under adversarial training the empirical NTK rapidly converges to a different kernel "
        "than under standard training.* The final kernels differ by "
        f"{between_finals:.4f} (distance), against a total movement of "
        f"{benign[-1]['distance_to_first']:.4f} (benign) and "
        f"{adversarial[-1]['distance_to_first']:.4f} (adversarial) from the common initial "
        "kernel; each run's kernel stays within 10% of its initial distance to its final kernel "
        f"from epoch {settle_a:g} (adversarial) and {settle_b:g} (benign). "
        + (
            "**Holds** (a different kernel, reached sooner)."
            if different and settle_a < settle_b
            else "**Partly**: a different kernel, but not reached sooner at these checkpoints."
            if different
            else "**Does not hold here.**"
        ),
        "3. *This kernel provides robustness even when non-robust (benign) training is done on "
        f"top of it.* Benign phase 2 on the adversarial kernel of epoch {late:g}: PGD-Linf "
        f"{from_adv['linf']:.4f}, AutoAttack {aa(from_adv):.4f} (clean {from_adv['clean']:.4f}); "
        f"on the benign kernel: PGD-Linf {from_benign['linf']:.4f}, AutoAttack "
        f"{aa(from_benign):.4f} (clean {from_benign['clean']:.4f}). "
        + verdict(robust_kernel, robust_kernel_aa)
        + masking_note([from_adv, from_benign]),
        "4. *Adversarial training on a fixed kernel can yield a robust classifier (76.1% PGD "
        "accuracy at eps 4/255 on CIFAR-10).* Adversarial phase 2 on the frozen benign kernel of "
        + ", ".join(
            f"epoch {e:g}: PGD-Linf {r['linf']:.4f}, AutoAttack {aa(r):.4f}"
            for e, r in fixed.items()
        )
        + f"; vs {phase1['adversarial']['linf']:.4f} (AutoAttack "
        f"{phase1['adversarial']['aa']['acc_autoattack']:.4f}) for full adversarial training and "
        f"{phase1['benign']['linf']:.4f} (AutoAttack {benign_aa:.4f}) for benign training. "
        + verdict(best_fixed_at > phase1["benign"]["linf"] + 0.1, best_fixed_aa > benign_aa + 0.1)
        + masking_note(list(fixed.values())),
        "",
        "Tsilivis & Kempe (NeurIPS 2022):",
        "",
    ]
    relu_row = transfer[0]
    fooled = relu_row[4] < phase1["benign"]["clean"] - 0.05
    lines.append(
        "5. *NTK adversarial examples, made without training, transfer to networks.* The "
        f"infinite-width kernel's examples take the benign network from "
        f"{phase1['benign']['clean']:.4f} to {relu_row[4]:.4f} and the adversarial one to "
        f"{relu_row[5]:.4f}. " + ("**Holds.**" if fooled else "**Does not hold here.**")
    )
    # component 1 is the near-constant mode (one class for almost every input, so PGD cannot
    # move it): compare components 2-5 with 6-10
    ratios = {}
    for kind, result in eigen.items():
        single = {r["k"]: r for r in result["rows"] if r["kind"] == "component"}

        def ratio(ks, attack, single=single):
            values = [
                single[k][attack] / single[k]["clean"] for k in ks if single.get(k, {}).get("clean")
            ]
            return float(np.mean(values)) if values else float("nan")

        ratios[kind] = {
            attack: (ratio(range(2, 6), attack), ratio(range(6, 11), attack))
            for attack in ("linf", "autoattack")
            if attack == "linf" or args.predictor_autoattack
        }
    lines.append(
        "6. *Robust features correspond to the largest eigenvalues.* Robust/clean accuracy "
        "ratio of single eigen-components 2-5 vs 6-10 (component 1 is the near-constant mode), "
        "PGD and AutoAttack: "
        + "; ".join(
            f"{k} kernel {r['linf'][0]:.2f} vs {r['linf'][1]:.2f}"
            + (
                f" (AutoAttack {r['autoattack'][0]:.2f} vs {r['autoattack'][1]:.2f})"
                if "autoattack" in r
                else ""
            )
            for k, r in ratios.items()
        )
        + ". "
        + verdict(
            all(a > b for a, b in (r["linf"] for r in ratios.values())),
            all(a > b for a, b in (r["autoattack"] for r in ratios.values()))
            if args.predictor_autoattack
            else None,
        )
    )
    top = {
        kind: max((r for r in result["rows"] if r["kind"] == "top_k"), key=lambda r: r["k"])
        for kind, result in eigen.items()
    }
    sooner = settle_a < settle_b
    more_robust = "adversarial" in top and top["adversarial"]["linf"] > top["benign"]["linf"]
    more_robust_aa = (
        top["adversarial"]["autoattack"] > top["benign"]["autoattack"]
        if args.predictor_autoattack
        else None
    )
    lines.append(
        "7. *Adversarial training's NTK falls into the lazy regime much earlier and relies more "
        "on its top eigenspaces.* Settling epoch (claim 2): adversarial "
        f"{settle_a:g} vs benign {settle_b:g}; PGD (AutoAttack) accuracy of the full kernel "
        "predictor: "
        + "; ".join(
            f"{k} kernel {r['linf']:.2f} ("
            + (f"{r['autoattack']:.2f}, " if "autoattack" in r else "")
            + f"clean {r['clean']:.2f})"
            for k, r in top.items()
        )
        + (
            ". **Holds.**"
            if sooner and more_robust
            else ". **Partly**: "
            + ("it settles sooner" if sooner else "it does not settle sooner at these checkpoints")
            + (
                ", but its predictor is more robust."
                if more_robust
                else ", but is not more robust."
            )
            if sooner or more_robust
            else ". **Does not hold here.**"
        )
        + (
            " On AutoAttack the predictor of the adversarial kernel is "
            + ("more" if more_robust_aa else "not more")
            + " robust."
            if more_robust_aa is not None
            else f" {NO_EIGEN_AA}"
        )
    )
    return lines


def masking_section(phase1, phase2) -> list[str]:
    """The gradient-masking warnings of the networks and phase-2 models, one line each."""
    named = [(f"phase 1 {kind}", r["aa"]) for kind, r in phase1.items()]
    named += [
        (f"phase 2 ({data} data) on the {kind} kernel of epoch {e:g}", r["aa"])
        for kind, e, data, r in phase2
    ]
    lines = [f"- {name}: {w}" for name, result in named for w in result["warnings"]]
    if not lines:
        return ["No gradient masking detected: no check of the reference AutoAttack warned.", ""]
    return ["Warnings of the reference AutoAttack's checks (gradient masking):", "", *lines, ""]


def aa(result: dict) -> float:
    """The AutoAttack accuracy of a phase-1 or phase-2 row."""
    return result["aa"]["acc_autoattack"]


NO_EIGEN_AA = (
    "Not judged on AutoAttack: the empirical-NTK predictors were attacked by PGD only (AutoAttack "
    "on them takes hours on a CPU; rerun with --predictor_autoattack)."
)


def verdict(on_pgd: bool, on_autoattack: bool | None) -> str:
    def word(holds):
        return "**holds**" if holds else "**does not hold**"

    if on_autoattack is None:
        return f"On PGD: {word(on_pgd)}. {NO_EIGEN_AA}"
    return f"On PGD: {word(on_pgd)}; on AutoAttack: {word(on_autoattack)}."


def masking_note(rows: list[dict]) -> str:
    """Names gradient masking where Square beat the gradient attacks on one of these models."""
    masked = [r for r in rows if r["aa"]["warnings"]]
    if not masked:
        return ""
    return (
        f" Gradient masking: on {len(masked)} of these {len(rows)} models the gradient-free "
        "Square attack found what the gradient attacks together missed (or gradients vanished), "
        "so their PGD figures overstate robustness."
    )


if __name__ == "__main__":
    main()
