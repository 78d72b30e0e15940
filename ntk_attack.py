"""Training-free adversarial examples (Tsilivis & Kempe 2022): L-inf PGD against the
kernel-regression predictor F(z) = K(z, X) (K(X, X) + r I)^-1 Y of an NTK, no network trained.

The kernel is the empirical NTK of a checkpoint (--model_path; at initialisation when empty) or
the infinite-width ReLU MLP NTK in closed form (--kernel relu_ntk); the support set X is a
class-balanced training subset (or the images of a calculate_kernel.py pickle, --kernel_path).
Writes into --save_dir:
  adv_examples_<save_name>.pkl   {images: (N, C, H, W) in [0, 1], labels: (N,)}; evaluate their
                                 transfer with eval_and_make_adv.py --test_path
  ntk_attack_<save_name>.json    the predictor's clean and PGD accuracy (and, with --margin,
                                 --restarts, --transfer_path, each attack's and the worst
                                 case), the settings
  ntk_attack_<save_name>.png     clean images, adversarial images, perturbations
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from ntk_evolution.attacks.evaluation import NAMES, print_warnings
from ntk_evolution.attacks.pgd import VARIANT_NAMES
from ntk_evolution.cli import (
    Parser,
    add_kernel_flags,
    add_out_dir_flag,
    add_robustness_flags,
    add_shared_flags,
    autoattack_threat,
    check_attack_variant,
    initialize_from_args,
    model_and_dataset,
    support_kernel_from_args,
)
from ntk_evolution.figures import plot_image_grid
from ntk_evolution.io.checkpoints import load_transfer
from ntk_evolution.kernels.predictors import (
    evaluate_predictor,
    predicted_labels,
)
from ntk_evolution.kernels.regression import one_hot, regression_coefficients
from ntk_evolution.utils import check_out_dir, check_output, run_main, save_pickle, write_json

N_SHOWN = 8


def build_parser() -> Parser:
    p = Parser(__doc__)
    add_kernel_flags(p)
    add_out_dir_flag(p, "./ntk_attack", alias="--save_dir")
    p.add_argument("--save_name", default="ntk", help="Outputs are ntk_attack_<save_name>.*.")
    add_robustness_flags(p)
    add_shared_flags(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_out_dir(args.out_dir, "--out_dir")
    initialize_from_args(args)
    args, loaded, ds = model_and_dataset(args)
    support = support_kernel_from_args(args, ds, loaded)
    x, y = ds.x_test[: args.n_test], ds.y_test[: args.n_test]
    check_attack_variant(args)
    transfer = None
    if args.transfer_path:
        transfer = load_transfer(
            args.transfer_path, x, y, ds.image_shape, ds.n_classes, args.trust_pickle
        )
    coefficients = regression_coefficients(
        support.kernel, one_hot(support.labels, ds.n_classes), args.ridge
    )
    accuracies, adversarial, warnings = evaluate_predictor(
        support,
        coefficients,
        np.eye(ds.n_classes),
        x,
        y,
        jax.random.PRNGKey(args.random_seed),
        eps_linf=args.eps_linf,
        n_steps=args.pgd_steps,
        attacks=("linf", "margin") if args.margin else ("linf",),
        restarts=args.restarts,
        variant=args.attack_variant,
        transfer=transfer,
        description="NTK attack",
        autoattack=autoattack_threat(args),
        autoattack_each=args.autoattack_each,
    )
    attack = f"{VARIANT_NAMES[args.attack_variant]}-Linf (eps {args.eps:g}/255)"
    names = {**NAMES, "linf": attack, "transfer": "transfer"}
    names.update(autoattack=f"AutoAttack ({args.autoattack_norm})", worst="worst case")
    print(
        f"{support.description}, {len(support.images)} support images: kernel regression "
        f"clean {accuracies['clean']:.4f}, "
        + ", ".join(f"{names[k]} {v:.4f}" for k, v in accuracies.items() if k != "clean")
        + f" on {len(x)} test images"
        + (f" ({args.restarts} restarts)" if args.restarts > 1 else "")
    )
    print_warnings(warnings)

    summary = {
        "kernel": support.description,
        "support_size": len(support.images),
        "n_test": len(x),
        "eps": args.eps,
        "pgd_steps": args.pgd_steps,
        "attack_variant": args.attack_variant,
        "ridge": args.ridge,
        "restarts": args.restarts,
        "transfer_path": args.transfer_path,
        "autoattack": autoattack_threat(args),
        "warnings": warnings,
        **{f"accuracy_{name}": value for name, value in accuracies.items()},
    }
    summary_path = os.path.join(args.out_dir, f"ntk_attack_{args.save_name}.json")
    check_output(summary, summary_path)  # both outputs checked before either is written
    examples_path = os.path.join(args.out_dir, f"adv_examples_{args.save_name}.pkl")
    save_pickle({"images": adversarial.transpose(0, 3, 1, 2), "labels": y}, examples_path)
    write_json(summary, summary_path)
    shown_clean, shown_adv = x[:N_SHOWN], adversarial[:N_SHOWN]
    projection = np.eye(ds.n_classes)
    before = predicted_labels(support, coefficients, projection, shown_clean)
    after = predicted_labels(support, coefficients, projection, shown_adv)
    perturbation = 0.5 + (shown_adv - shown_clean) * (0.5 * 255.0 / max(args.eps, 1e-9))

    def caption(label, predicted):
        return f"{'!' if predicted != label else ''}label {label}, pred {predicted}"

    plot_image_grid(
        {"clean": shown_clean, "adversarial": shown_adv, "perturbation": perturbation},
        f"NTK attack on kernel regression ({support.description}), eps {args.eps:g}/255: "
        f"accuracy clean {accuracies['clean']:.3f}, PGD-Linf {accuracies['linf']:.3f}\n"
        "red: predicted label wrong; perturbation: grey = 0, black/white = -/+ eps",
        summary_path[:-5] + ".png",
        captions={
            "clean": [caption(int(t), int(p)) for t, p in zip(y, before, strict=False)],
            "adversarial": [caption(int(t), int(p)) for t, p in zip(y, after, strict=False)],
        },
    )
    print(f"wrote {examples_path}, {summary_path} and the PNG")
    return summary


if __name__ == "__main__":
    run_main(main)
