"""Empirical NTK of a checkpoint on a class-balanced subset of the training set.

Writes dirname(model_path)/<bonus_dir>/<save_name>_<dataset_size>.pkl (averaged over logits,
--class_index -1) or <save_name>_class_<c>_<dataset_size>.pkl (logit c), holding
{'kernel': (N, N) float64, 'labels': (N,)} plus 'indices' (into the training set),
'class_index', 'dataset', 'model', 'model_path', 'epoch' (from the checkpoint's meta or
name, or None)
and 'use_linear_params', and a PNG of the kernel and its spectrum beside it.
"""

from __future__ import annotations

import argparse
import os
import time

from tqdm import tqdm

from data import class_balanced_subset
from ntk_evolution.checkpoints import checkpoint_epoch, model_and_dataset
from ntk_evolution.cli import (
    Parser,
    add_kernel_subset_flags,
    add_model_flags,
    add_seed_flag,
    add_shared_flags,
    finite_float,
)
from ntk_evolution.ntk import empirical_ntk
from ntk_evolution.parallel import initialize
from ntk_evolution.plots import plot_kernel
from utils import UserError, run_main, save_pickle


def build_parser() -> Parser:
    p = Parser(__doc__)
    p.add_argument("--model_path", required=True, help="Checkpoint of run_exp.py.")
    add_kernel_subset_flags(p)
    p.add_argument("--save_name", default="saved_kernel", help="Prefix of the output file.")
    p.add_argument("--show_progress", action="store_true", help="Print every kernel block.")
    add_model_flags(p)
    p.add_argument("--bonus_dir", default=".", help="Output folder, under the model's folder.")
    add_seed_flag(p, "class-balanced subset")
    # added
    add_shared_flags(p)
    p.add_argument(
        "--max_memory_gb",
        type=finite_float(0.0, inclusive=False),
        default=None,
        help="Memory budget for Jacobian chunks (None: 40%% of the device's memory).",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def kernel_file_name(save_name: str, class_index: int, dataset_size: int) -> str:
    if class_index >= 0:
        return f"{save_name}_class_{class_index}_{dataset_size}.pkl"
    return f"{save_name}_{dataset_size}.pkl"


def main(argv=None) -> dict:
    args = parse_args(argv)
    initialize(args)
    loaded, ds = model_and_dataset(args)
    if not -1 <= args.class_index < ds.n_classes:
        raise UserError(
            f"--class_index {args.class_index} is out of range for {args.dataset}: use -1 or "
            f"0..{ds.n_classes - 1}"
        )
    params = loaded.lin_params if args.use_linear_params else loaded.params
    indices = class_balanced_subset(ds.y_train, args.dataset_size, ds.n_classes, args.random_seed)
    images, labels = ds.x_train[indices], ds.y_train[indices]

    start = time.time()
    try:
        kernel = empirical_ntk(
            loaded.model,
            params,
            loaded.net_state,
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
        "epoch": checkpoint_epoch(loaded.meta, args.model_path),
        "use_linear_params": args.use_linear_params,
    }
    save_pickle(record, path)
    which = f"logit {args.class_index}" if args.class_index >= 0 else "averaged over logits"
    plot_kernel(kernel, labels, f"empirical NTK, {which}, {args.dataset}", path[:-4] + ".png")
    print(f"wrote {path} and {path[:-4]}.png")
    return record


if __name__ == "__main__":
    run_main(main)
