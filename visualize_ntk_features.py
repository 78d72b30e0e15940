"""Visualise NTK eigen-features of a class kernel as images.

For the top --n_images eigenvectors u of the class-c kernel, and for the kernel-regression
weights K^-1 y_c, form v = sum_j a_j grad_theta f_c(x_j) over the kernel's own images and
optimise a grey image towards (pos) and away from (neg) v by cosine; see ntk_features.py.

The kernel comes from --kernel_path (a calculate_kernel.py pickle: its stored training-set
indices give the very images it was computed on) or, without it, is computed here on the
class-balanced subset of --dataset_size images. Writes beside the model:
<save_name>_class_<c>_<dataset_size>.pkl {'pos_images', 'neg_images' (n, H, W, C),
'w_image' (H, W, C), plus 'eigenvalues', 'cosines' and 'cosines_start'
(pos..., neg..., w)} and a PNG grid of the images.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from ntk_evolution.cli import (
    Parser,
    add_kernel_subset_flags,
    add_model_flags,
    add_seed_flag,
    add_shared_flags,
    initialize_from_args,
    model_and_dataset,
    positive_int,
    with_values,
)
from ntk_evolution.data import class_balanced_subset
from ntk_evolution.io.checkpoints import (
    check_kernel_record,
    checkpoint_epoch,
    load_kernel,
)
from ntk_evolution.kernels.features import (
    FEATURE_STEP_SIZE,
    FEATURE_STEPS,
    optimise_feature_images,
    parameter_features,
    regression_weights,
    top_eigenvectors,
)
from ntk_evolution.kernels.ntk import empirical_ntk
from ntk_evolution.kernels.plots import plot_eigen_feature_images
from ntk_evolution.utils import UserError, check_out_dir, run_main, save_pickle


def build_parser() -> Parser:
    p = Parser(__doc__)
    p.add_argument("--model_path", required=True, help="Checkpoint of run_exp.py.")
    add_kernel_subset_flags(p, class_help="Class c, or -1: the kernel pickle's class.")
    p.add_argument("--save_name", default="ntk_eig_images", help="Prefix of the output files.")
    p.add_argument("--kernel_path", default="", help="Class kernel from calculate_kernel.py.")
    p.add_argument("--n_images", type=positive_int, default=3, help="Eigen-feature images to draw.")
    # added
    p.add_argument(
        "--steps",
        type=positive_int,
        default=FEATURE_STEPS,
        help=f"Signed-gradient steps of {FEATURE_STEP_SIZE} from grey for each image (the "
        f"original's {FEATURE_STEPS}; fewer for a quick look).",
    )
    add_model_flags(p)
    add_shared_flags(p)
    add_seed_flag(p, "class-balanced subset (without --kernel_path)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def read_class_kernel(args) -> dict:
    """The --kernel_path pickle, checked to be a class kernel before anything slow is done."""
    record = load_kernel(args.kernel_path, args.trust_pickle)
    kernel_class = int(record.get("class_index", -1))
    if kernel_class < 0:
        raise UserError(
            f"{args.kernel_path} is averaged over logits; eigen-features need a class kernel "
            "(of one logit): calculate_kernel.py --model_path <checkpoint> --class_index 0 "
            f"--dataset_size {len(record['kernel'])}"
        )
    return record


def load_class_kernel(args, ds, record: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """(kernel, training-set indices, class) from the --kernel_path record, checked against the
    flags."""
    check_kernel_record(record, args.kernel_path, {"dataset": args.dataset, "model": args.model})
    if "indices" not in record:
        raise UserError(
            f"{args.kernel_path} does not record which images it was computed on (no "
            "'indices'); recompute it with this project's calculate_kernel.py"
        )
    kernel, indices = record["kernel"], np.asarray(record["indices"])
    kernel_class = int(record.get("class_index", -1))
    class_index = kernel_class if args.class_index == -1 else args.class_index
    if kernel_class != class_index or class_index < 0:
        raise UserError(
            f"{args.kernel_path} is the kernel of class {kernel_class}; a class kernel is needed "
            f"(calculate_kernel.py --class_index c) and --class_index must be -1 or match it"
        )
    if kernel.shape != (len(indices), len(indices)) or indices.max() >= len(ds.x_train):
        raise UserError(f"{args.kernel_path} does not match the {args.dataset} training set")
    if len(indices) != args.dataset_size:
        print(f"note: the kernel has {len(indices)} images; using that as --dataset_size")
    return kernel, indices, class_index


def main(argv=None) -> dict:
    args = parse_args(argv)
    initialize_from_args(args)
    check_out_dir(os.path.dirname(os.path.abspath(args.model_path)), "--model_path's folder")
    record = read_class_kernel(args) if args.kernel_path else None
    args, loaded, ds = model_and_dataset(args)
    model = loaded.model
    params = loaded.lin_params if args.use_linear_params else loaded.params
    net_state = loaded.net_state

    if record is not None:
        kernel, indices, class_index = load_class_kernel(args, ds, record)
        args = with_values(args, dataset_size=len(indices))  # the kernel's, when it differs
    else:
        class_index = args.class_index
        if not 0 <= class_index < ds.n_classes:
            raise UserError(f"without --kernel_path, --class_index must be 0..{ds.n_classes - 1}")
        indices = class_balanced_subset(
            ds.y_train, args.dataset_size, ds.n_classes, args.random_seed
        )
        kernel = empirical_ntk(
            model, params, net_state, ds.x_train[indices], class_index=class_index
        )
    if args.n_images > len(kernel):
        raise UserError(f"--n_images {args.n_images} exceeds the kernel's {len(kernel)} images")
    images, labels = ds.x_train[indices], ds.y_train[indices]

    eigenvalues, eigenvectors = top_eigenvectors(kernel, args.n_images)
    weights = regression_weights(kernel, labels, class_index)
    coefficients = np.concatenate([eigenvectors, eigenvectors, weights[:, None]], axis=1)
    signs = np.array([1.0] * args.n_images + [-1.0] * args.n_images + [1.0])
    features = parameter_features(model, params, net_state, images, class_index, coefficients)
    optimised, cosines_start, cosines = optimise_feature_images(
        model, params, net_state, ds.image_shape, class_index, features, signs, args.steps
    )
    n = args.n_images
    result = {
        "pos_images": optimised[:n],
        "neg_images": optimised[n : 2 * n],
        "w_image": optimised[2 * n],
        "eigenvalues": eigenvalues,
        "cosines": cosines,
        "cosines_start": cosines_start,
    }
    out_dir = os.path.dirname(os.path.abspath(args.model_path))
    path = os.path.join(out_dir, f"{args.save_name}_class_{class_index}_{args.dataset_size}.pkl")
    save_pickle(result, path)
    captions = {
        "pos": [f"u{i + 1}, eig {eigenvalues[i]:.3g}\ncos {cosines[i]:.2f}" for i in range(n)],
        "neg": [f"-u{i + 1}\ncos {cosines[n + i]:.2f}" for i in range(n)],
        "w": [f"regression weights w\ncos {cosines[-1]:.2f}"],
    }
    run = os.path.basename(out_dir)
    epoch = checkpoint_epoch(loaded.meta, args.model_path)
    at = f"epoch {epoch:g}" if epoch is not None else os.path.basename(args.model_path)
    plot_eigen_feature_images(
        result["pos_images"], result["neg_images"], result["w_image"], captions,
        f"NTK eigen-features of {run}, {at}\n{args.model} on {args.dataset}, logit "
        f"{class_index}, N = {len(kernel)}: images whose NTK feature is closest (cosine)\n"
        "to each top eigenvector's feature (u_i and -u_i) and to the regression weights'",
        path[:-4] + ".png",
    )  # fmt: skip
    print(f"wrote {path} and {path[:-4]}.png")
    return result


if __name__ == "__main__":
    run_main(main)
