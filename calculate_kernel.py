"""Empirical NTK of a checkpoint on a class-balanced subset of the training set.

Writes dirname(model_path)/<bonus_dir>/<save_name>_<dataset_size>.pkl (averaged over logits,
--class_index -1) or <save_name>_class_<c>_<dataset_size>.pkl (logit c), holding
{'kernel': (N, N) float64, 'labels': (N,)} plus 'indices' (into the training set),
'class_index', 'dataset', 'model', 'model_path', 'epoch' (from the checkpoint's name, or None)
and 'use_linear_params', and a PNG of the kernel and its spectrum beside it.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
from tqdm import tqdm

from data import DATASETS, class_balanced_subset, load_dataset
from models import MODELS, get_model, init_model
from ntk import empirical_ntk
from plots import plot_kernel
from utils import (
    Parser,
    UserError,
    add_shared_flags,
    epoch_from_name,
    finite_float,
    load_checkpoint,
    run_main,
    save_pickle,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument("--model_path", required=True)
    p.add_argument("--dataset_size", type=int, default=500)
    p.add_argument("--save_name", default="saved_kernel")
    p.add_argument("--class_index", type=int, default=-1, help="logit c, or -1: average")
    p.add_argument("--show_progress", action="store_true", help="print every kernel block")
    p.add_argument("--model", default="resnet18", choices=MODELS)
    p.add_argument("--bonus_dir", default=".", help="folder under the model's folder")
    p.add_argument("--random_seed", type=int, default=0)
    p.add_argument("--use_linear_params", action="store_true", help="kernel at lin_params (w)")
    p.add_argument("--dataset", default="cifar10", choices=DATASETS)
    # added
    add_shared_flags(p)
    p.add_argument(
        "--max_memory_gb",
        type=finite_float(0.0, inclusive=False),
        default=None,
        help="memory budget for Jacobian chunks (default: 40%% of the device's memory)",
    )
    return p.parse_args(argv)


def kernel_file_name(save_name: str, class_index: int, dataset_size: int) -> str:
    if class_index >= 0:
        return f"{save_name}_class_{class_index}_{dataset_size}.pkl"
    return f"{save_name}_{dataset_size}.pkl"


def main(argv=None) -> dict:
    args = parse_args(argv)
    ds = load_dataset(args.dataset, args.data_root)
    if not -1 <= args.class_index < ds.n_classes:
        raise UserError(
            f"--class_index {args.class_index} is out of range for {args.dataset}: use -1 or "
            f"0..{ds.n_classes - 1}"
        )
    model = get_model(args.model, ds.n_classes)
    like = init_model(model, jax.random.PRNGKey(0), ds.image_shape)
    ckpt = load_checkpoint(args.model_path, like=like, trust=args.trust_pickle)
    params = ckpt["lin_params"] if args.use_linear_params else ckpt["params"]
    indices = class_balanced_subset(ds.y_train, args.dataset_size, ds.n_classes, args.random_seed)
    images, labels = ds.x_train[indices], ds.y_train[indices]

    start = time.time()
    try:
        kernel = empirical_ntk(
            model,
            params,
            ckpt["net_state"],
            images,
            class_index=args.class_index,
            max_memory_gb=args.max_memory_gb,
            describe=tqdm.write if args.show_progress else None,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"kernel {kernel.shape} in {time.time() - start:.1f}s")

    out_dir = os.path.normpath(
        os.path.join(os.path.dirname(os.path.abspath(args.model_path)), args.bonus_dir)
    )
    path = os.path.join(
        out_dir, kernel_file_name(args.save_name, args.class_index, args.dataset_size)
    )
    record = {
        "kernel": kernel,
        "labels": labels,
        "indices": indices,
        "class_index": args.class_index,
        "dataset": args.dataset,
        "model": args.model,
        "model_path": os.path.abspath(args.model_path),
        "epoch": epoch_from_name(args.model_path),
        "use_linear_params": args.use_linear_params,
    }
    save_pickle(record, path)
    which = f"logit {args.class_index}" if args.class_index >= 0 else "averaged over logits"
    plot_kernel(kernel, labels, f"empirical NTK, {which}, {args.dataset}", path[:-4] + ".png")
    print(f"wrote {path} and {path[:-4]}.png")
    return record


if __name__ == "__main__":
    run_main(main)
