"""NTK eigen-features (Tsilivis & Kempe 2022): how accurate and how robust is kernel regression
restricted to each eigen-component of the kernel, and to the top-k components together?

With K(X, X) = sum_i lambda_i u_i u_i^T on the support set X (class-balanced training subset)
and one-hot targets Y, component i predicts F_i(z) = K(z, X) u_i u_i^T Y / (lambda_i + r); the
components sum to the kernel-regression predictor. For the --components components one by
one (the top N, or any range such as -10: for the bottom ten), and for the cumulative top-k
(--top_k), reports test accuracy and accuracy under L-inf PGD against that predictor itself.
Clean accuracy of the cumulative predictor is reported for every k. Writes into --save_dir:
eigen_features_<save_name>.json / .csv and a PNG, and the input gradient d F_i(z)_y / d z of
each chosen component on --gradient_images test images: eigen_features_<save_name>_gradients.pkl
({'components': 1-based ranks, 'eigenvalues', 'images', 'labels', 'gradients': (components,
images, H, W, C)}) and .png.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from ntk_evolution.attacks.pgd import VARIANT_NAMES
from ntk_evolution.cli import (
    Parser,
    add_kernel_flags,
    add_out_dir_flag,
    add_shared_flags,
    autoattack_threat,
    initialize_from_args,
    model_and_dataset,
    non_negative_int,
    support_kernel_from_args,
)
from ntk_evolution.kernels.plots import plot_component_gradients, plot_eigen_features
from ntk_evolution.kernels.predictors import evaluate_predictor
from ntk_evolution.kernels.regression import component_factors, eigen_decomposition, one_hot
from ntk_evolution.utils import (
    UserError,
    check_out_dir,
    check_output,
    progress_bar,
    run_main,
    save_pickle,
    write_csv,
    write_json,
)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def component_range(text: str) -> slice:
    """argparse type of --components: N (the top N), or a Python slice over the components in
    decreasing eigenvalue, 0-based: 0:10 (the top 10), -10: (the bottom 10), 20:30."""
    try:
        if ":" not in text:
            return slice(0, non_negative_int(text))
        start, stop = text.split(":")
        return slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected N or a range start:stop such as 0:10 or -10:, got {text!r}"
        ) from None


def build_parser() -> Parser:
    p = Parser(__doc__)
    add_kernel_flags(p)
    p.add_argument(
        "--classes", type=int, nargs="+", default=None, help="Restrict to these classes."
    )
    p.add_argument(
        "--components",
        type=component_range,
        default=slice(0, 10),
        help="Components one at a time: N (the top N) or a range over the components by "
        "decreasing eigenvalue, 0-based, e.g. 0:10 or --components=-10: (the bottom 10).",
    )
    p.add_argument(
        "--gradient_images",
        type=non_negative_int,
        default=4,
        help="Input gradient of each chosen component's predictor (its true-class output) on "
        "this many test images; 0: none.",
    )
    p.add_argument(
        "--top_k",
        type=int_list,
        default=[1, 2, 5, 10, 20, 50, 100, 200, 500],
        help="Sums of the top k components to evaluate (comma-separated).",
    )
    p.add_argument("--no_adv", action="store_true", help="Clean accuracy only.")
    add_out_dir_flag(p, "./eigen_features", alias="--save_dir")
    p.add_argument("--save_name", default="ntk", help="Outputs are eigen_features_<save_name>.*.")
    add_shared_flags(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_out_dir(args.out_dir, "--out_dir")
    initialize_from_args(args)
    args, loaded, ds = model_and_dataset(args)
    classes = sorted(set(args.classes)) if args.classes else list(range(ds.n_classes))
    if min(classes) < 0 or max(classes) >= ds.n_classes or len(classes) < 2:
        raise UserError(f"--classes needs at least two of 0..{ds.n_classes - 1}")
    support = support_kernel_from_args(args, ds, loaded)
    relabel = np.full(ds.n_classes, -1)
    relabel[classes] = np.arange(len(classes))
    test = np.flatnonzero(np.isin(ds.y_test, classes))[: args.n_test]
    x, y = ds.x_test[test], relabel[ds.y_test[test]].astype(np.int32)
    targets = one_hot(relabel[support.labels], len(classes))
    eigen = eigen_decomposition(support.kernel, targets, args.ridge)
    n_support = len(support.kernel)

    # clean accuracy of every component and every cumulative top-k, from the cross kernel
    cross = support.cross(x)  # (n, N)
    scores = cross @ eigen.vectors  # (n, N): K(z, X) u_i
    individual = (scores[:, :, None] * eigen.projections[None]).argmax(-1) == y[:, None]
    cumulative = np.cumsum(scores[:, :, None] * eigen.projections[None], axis=1)
    clean_individual = individual.mean(0)
    clean_cumulative = (cumulative.argmax(-1) == y[:, None]).mean(0)

    key = jax.random.PRNGKey(args.random_seed)
    evaluate = not args.no_adv and args.eps > 0
    rows = []
    components = list(range(n_support))[args.components]
    selections = [("component", i + 1, np.array([i])) for i in components]
    selections += [("top_k", k, np.arange(k)) for k in args.top_k if k <= n_support]
    for kind, k, chosen in progress_bar(selections, desc="eigen-features"):
        clean = clean_individual[k - 1] if kind == "component" else clean_cumulative[k - 1]
        row = {"kind": kind, "k": k, "eigenvalue": float(eigen.values[k - 1]), "clean": clean}
        if evaluate:
            coefficients, projection = component_factors(eigen, chosen)
            accuracies, _, warnings = evaluate_predictor(
                support,
                coefficients,
                projection,
                x,
                y,
                jax.random.fold_in(key, len(rows)),
                eps_linf=args.eps_linf,
                n_steps=args.pgd_steps,
                variant=args.attack_variant,
                description=f"{kind} {k}",
                autoattack=autoattack_threat(args),
                autoattack_each=args.autoattack_each,
            )
            row["linf"] = accuracies["linf"]
            if args.autoattack:
                row["autoattack"] = accuracies["autoattack"]
                for warning in warnings:
                    print(f"warning: {kind} {k}: {warning}")
        rows.append(row)

    result = {
        "kernel": support.description,
        "dataset": args.dataset,
        "classes": classes,
        "support_size": n_support,
        "n_test": len(x),
        "eps": args.eps,
        "pgd_steps": args.pgd_steps,
        "attack_variant": args.attack_variant,
        "eigenvalues": eigen.values.tolist(),
        "clean_cumulative": clean_cumulative.tolist(),
        "rows": rows,
    }
    gradients = None
    if args.gradient_images and components:
        shown = min(args.gradient_images, len(x))
        gradients = {
            "components": [i + 1 for i in components],
            "eigenvalues": eigen.values[components].tolist(),
            "images": x[:shown],
            "labels": y[:shown],
            "gradients": component_gradients(support, eigen, components, x[:shown], y[:shown]),
        }
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"eigen_features_{args.save_name}")
    if gradients is not None:
        check_output(gradients, path + "_gradients.pkl")
    write_json(result, path + ".json")
    fields = ["kind", "k", "eigenvalue", "clean", "linf"] + (["autoattack"] * args.autoattack)
    write_csv(rows, path + ".csv", fields)
    plot_eigen_features(result, path + ".png")
    if gradients is not None:
        save_pickle(gradients, path + "_gradients.pkl")
        plot_component_gradients(gradients, support.description, path + "_gradients.png")
    print(f"{support.description}: full kernel regression clean {clean_cumulative[-1]:.4f}")
    for row in rows:
        attack = VARIANT_NAMES[args.attack_variant]
        robust = f", {attack}-Linf {row['linf']:.4f}" if "linf" in row else ""
        robust += f", AutoAttack {row['autoattack']:.4f}" if "autoattack" in row else ""
        print(f"  {row['kind']:<9} {row['k']:>4}: clean {row['clean']:.4f}{robust}")
    also = f", {path}_gradients.pkl and .png" if gradients is not None else ""
    print(f"wrote {path}.json, .csv and .png{also}")
    return result


def component_gradients(support, eigen, components: list[int], x, y) -> np.ndarray:
    """d F_i(z)_y / d z for each component i and image z of x with label y, where
    F_i(z) = K(z, X) u_i u_i^T Y / (lambda_i + r): (len(components), *x.shape) float32."""
    # the operator's fn takes its coefficients as an argument: one compiled gradient serves
    # every component (same shapes)
    apply, _ = support.operator(component_factors(eigen, np.array(components[:1]))[0])

    def score(z, label, operand, projection):
        return (apply(z[None], operand) @ projection)[0, label]

    grad_fn = jax.jit(jax.vmap(jax.grad(score), in_axes=(0, 0, None, None)))
    out = []
    for i in progress_bar(components, desc="component gradients"):
        coefficients, projection = component_factors(eigen, np.array([i]))
        _, operand = support.operator(coefficients)
        out.append(np.asarray(grad_fn(x, y, operand, np.asarray(projection, np.float32))))
    return np.stack(out).astype(np.float32)


if __name__ == "__main__":
    run_main(main)
