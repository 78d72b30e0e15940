"""Optimise a training subset so that kernel regression on it is robust (Tsilivis, Su & Kempe,
"Can we achieve robustness from data alone?", arXiv 2207.11727).

The support set X (a class-balanced training subset, labels Y kept) is the variable. With the
kernel-regression predictor F_X(z) = k(z, X) (k(X, X) + r I)^-1 onehot(Y), the paper's
objective is inf_X E sup_{|delta| <= eps} L(F_X(z + delta), t), one loss L inside and outside.
Each step

  1. draws a batch of target images (z, t) from the training split,
  2. perturbs them by L-inf PGD against the current predictor, ascending L itself (--pgd_steps
     steps of 2 eps / steps, random start; the inner maximisation),
  3. takes an Adam step (--lr) on X down the gradient of L(F_X(z_adv), t) (--loss mse: the
     squared error to onehot(t), the loss kernel regression itself fits, as in kernel
     inducing points; or ce: the cross-entropy), through the kernel-regression solution
     (z_adv held fixed: Danskin's theorem, which needs the inner attack to maximise this L),
     and projects X into [0, 1] (and, with --max_change, into the L-inf ball of that radius
     around the original images; the paper leaves the images otherwise unconstrained and
     keeps the labels).

The history records, on each step's target batch and before its update, the clean and the
adversarial loss (both in L) and accuracy.

Kernel: the closed-form infinite-width ReLU MLP NTK (default), or the empirical NTK of
--model at --model_path (at initialisation when empty), differentiated through explicit
per-example Jacobians (small networks). Writes into --save_dir:
  robust_<save_name>.pkl   {images: (N, C, H, W) in [0, 1], labels: (N,)}, the adv_examples
                           format (run_exp.py --train_path trains on it; ntk_attack.py
                           --support_path uses it as a support set), plus indices, original,
                           dataset, kernel, eps, loss, max_change, change (per-image L-inf
                           change), history {clean_loss, adversarial_loss, clean_accuracy,
                           adversarial_accuracy: per step}
  robust_<save_name>.png   original vs optimised images, their difference, the objective
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from ntk_evolution.attacks.evaluation import print_warnings
from ntk_evolution.attacks.pgd import (
    VARIANT_NAMES,
)
from ntk_evolution.cli import (
    Parser,
    add_kernel_flags,
    add_out_dir_flag,
    add_shared_flags,
    autoattack_threat,
    finite_float,
    initialize_from_args,
    kernel_from_args,
    model_and_dataset,
    positive_int,
)
from ntk_evolution.data import class_balanced_subset
from ntk_evolution.kernels.plots import plot_robustified
from ntk_evolution.kernels.predictors import evaluate_predictor
from ntk_evolution.kernels.regression import one_hot, regression_coefficients
from ntk_evolution.kernels.robust_data import INNER_PGD_STEPS, LOSSES, robustify
from ntk_evolution.utils import check_out_dir, run_main, save_pickle

N_SHOWN = 10


def build_parser() -> Parser:
    p = Parser(__doc__)
    add_kernel_flags(p)
    p.set_defaults(kernel="relu_ntk", pgd_steps=INNER_PGD_STEPS, n_test=1000)
    p.add_argument("--steps", type=positive_int, default=300, help="Outer (Adam) steps.")
    p.add_argument(
        "--lr", type=finite_float(0.0, inclusive=False), default=0.01, help="Outer Adam step."
    )
    p.add_argument("--target_batch", type=positive_int, default=256, help="Targets per step.")
    p.add_argument("--loss", default="mse", choices=LOSSES,
                   help="The min-max's loss L, in the inner attack and outer step.")  # fmt: skip
    p.add_argument("--max_change", type=finite_float(0.0, inclusive=False), default=None,
                   help="Bound each support pixel's change to this L-inf radius (in 1/255); "
                   "default: unbounded within [0, 1], as the paper.")  # fmt: skip
    add_out_dir_flag(p, "./robust_data", alias="--save_dir")
    p.add_argument("--save_name", default="default", help="Outputs are robust_<save_name>.*.")
    add_shared_flags(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.kernel_path or args.support_path:
        p.error("robustify_dataset.py draws its own support set: drop --kernel_path/--support_path")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_out_dir(args.out_dir, "--out_dir")
    initialize_from_args(args)
    args, loaded, ds = model_and_dataset(args)
    choice = kernel_from_args(args, ds, loaded)
    indices = class_balanced_subset(ds.y_train, args.dataset_size, ds.n_classes, args.random_seed)
    original, labels = ds.x_train[indices], ds.y_train[indices]
    eps = args.eps_linf
    start = time.time()
    images, history = robustify(
        choice.kernel_fn, original, labels, ds.x_train, ds.y_train, args.random_seed,
        n_classes=ds.n_classes, steps=args.steps, lr=args.lr, eps=eps, n_steps=args.pgd_steps,
        target_batch=args.target_batch, ridge=args.ridge, loss=args.loss,
        max_change=None if args.max_change is None else args.max_change / 255,
    )  # fmt: skip
    change = np.abs(images - original).reshape(len(images), -1).max(axis=1)

    def at(key, where):  # the first step, or the mean of the last 10
        values = history[key]
        return values[0] if where == "start" else float(np.mean(values[-10:]))

    print(
        f"{choice.description}: {args.steps} steps on {len(images)} support images in "
        f"{time.time() - start:.1f}s; {args.loss} loss on the targets, clean / adversarial: "
        f"{at('clean_loss', 'start'):.4f} / {at('adversarial_loss', 'start'):.4f} at the start, "
        f"{at('clean_loss', 'end'):.4f} / {at('adversarial_loss', 'end'):.4f} at the end (mean "
        f"of the last 10 steps); median per-image L-inf change {np.median(change) * 255:.1f}/255"
    )

    # kernel regression on the test images, before and after (clean, PGD-Linf on itself)
    x_test, y_test = ds.x_test[: args.n_test], ds.y_test[: args.n_test]
    summary = {}
    for name, support_images in (("original", original), ("optimised", images)):
        support = choice.support(support_images, labels, indices)
        coefficients = regression_coefficients(
            support.kernel, one_hot(labels, ds.n_classes), args.ridge
        )
        summary[name], _, warnings = evaluate_predictor(
            support, coefficients, np.eye(ds.n_classes), x_test, y_test,
            jax.random.PRNGKey(args.random_seed), eps_linf=eps, n_steps=20,
            variant=args.attack_variant, description=f"evaluate {name}",
            autoattack=autoattack_threat(args), autoattack_each=args.autoattack_each,
        )  # fmt: skip
        autoattack = summary[name].get("autoattack")
        print(
            f"kernel regression on the {name} set: clean {summary[name]['clean']:.4f}, "
            f"{VARIANT_NAMES[args.attack_variant]}-Linf (20 steps) {summary[name]['linf']:.4f}"
            + (f", AutoAttack {autoattack:.4f}" if autoattack is not None else "")
            + f" on {len(x_test)} test images"
        )
        print_warnings(warnings)

    path = os.path.join(args.out_dir, f"robust_{args.save_name}.pkl")
    record = {
        "images": images.transpose(0, 3, 1, 2),
        "labels": labels,
        "indices": indices,
        "original": original.transpose(0, 3, 1, 2),
        "dataset": args.dataset,
        "kernel": choice.description,
        "eps": args.eps,
        "loss": args.loss,
        "max_change": args.max_change,
        "change": change,
        "history": history,
        "test_accuracy": summary,
    }
    save_pickle(record, path)
    shown = np.concatenate([np.flatnonzero(labels == c)[:1] for c in range(ds.n_classes)])
    shown = shown[:N_SHOWN]
    plot_robustified(
        original[shown], images[shown], history,
        f"{choice.description}, eps {args.eps:g}/255: original vs optimised support images",
        path[:-4] + ".png", labels[shown],
    )  # fmt: skip
    print(f"wrote {path} and the PNG")
    return record


if __name__ == "__main__":
    run_main(main)
