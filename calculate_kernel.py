"""Empirical NTK of one or more checkpoints on a class-balanced subset of the training set.

Writes dirname(model_path)/<bonus_dir>/<save_name>_<dataset_size>.pkl (averaged over logits,
--class_index -1) or <save_name>_class_<c>_<dataset_size>.pkl (logit c). Given several
checkpoints (several --model_path values or a quoted glob; one process, compiled once), each
name carries its checkpoint's epoch, <save_name>_epoch_<e>_..., or its file stem when the
epoch is unknown, so that none overwrites another. Each pickle holds
{'kernel': (N, N) float64, 'labels': (N,)} plus 'indices' (into the training set),
'class_index', 'dataset', 'model', 'model_path', 'epoch' (from the checkpoint's meta or
name, or None)
and 'use_linear_params', and a PNG of the kernel and its spectrum beside it.

With --full, <save_name>_<N>_full.pkl (outside the globs of the N x N kernels) holds the full
kernel, every pair of logits: 'kernel' (C N, C N), logit-major (row k N + i is logit k of image
i), 'full' True, 'n_logits' C and 'layout'. Its diagonal block (c, c) is the class-c kernel;
their mean is the averaged one.
"""

from __future__ import annotations

import argparse
import os
import time

from tqdm import tqdm

from ntk_evolution.cli import (
    Parser,
    add_kernel_subset_flags,
    add_model_flags,
    add_seed_flag,
    add_shared_flags,
    expand_paths,
    finite_float,
    initialize_from_args,
    load_model_from_args,
)
from ntk_evolution.data import class_balanced_subset, load_dataset
from ntk_evolution.io.checkpoints import (
    checkpoint_epoch,
    format_epoch,
    load_model,
    run_name,
)
from ntk_evolution.kernels.ntk import empirical_ntk
from ntk_evolution.kernels.plots import kernel_title, plot_kernel
from ntk_evolution.kernels.predictors import check_class_index, check_full_kernel
from ntk_evolution.utils import UserError, check_out_dir, run_main, save_pickle

FULL_LAYOUT = "logit-major: row k * N + i is logit k of image i (ntk.empirical_ntk)"


def build_parser() -> Parser:
    p = Parser(__doc__)
    p.add_argument(
        "--model_path",
        required=True,
        nargs="+",
        help="Checkpoint(s) of run_exp.py: paths or quoted globs, all of one model and dataset.",
    )
    add_kernel_subset_flags(p)
    p.add_argument(
        "--full",
        action="store_true",
        help="The full kernel: every pair of logits, (C N, C N), logit-major (row k N + i: "
        "logit k of image i), as neural-tangents' trace_axes=() reshaped by the adversarial-NTK "
        "code; written as <save_name>_<N>_full.pkl. Needs --class_index -1.",
    )
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


def kernel_file_name(
    save_name: str, class_index: int, dataset_size: int, full: bool = False
) -> str:
    if full:
        return f"{save_name}_{dataset_size}_full.pkl"
    if class_index >= 0:
        return f"{save_name}_class_{class_index}_{dataset_size}.pkl"
    return f"{save_name}_{dataset_size}.pkl"


def output_names(paths: list[str], epochs: list[float | None], save_name: str) -> list[str]:
    """--save_name for one checkpoint; with several, --save_name_epoch_<e> (or _<file stem>
    where the epoch is unknown or shared by two checkpoints of one folder)."""
    if len(paths) == 1:
        return [save_name]
    names = []
    for path, epoch in zip(paths, epochs, strict=True):
        same_folder = [e for p, e in zip(paths, epochs, strict=True) if same_dir(p, path)]
        if epoch is not None and same_folder.count(epoch) == 1:
            names.append(f"{save_name}_epoch_{format_epoch(epoch)}")
        else:
            names.append(f"{save_name}_{os.path.splitext(os.path.basename(path))[0]}")
    return names


def same_dir(a: str, b: str) -> bool:
    return os.path.dirname(os.path.abspath(a)) == os.path.dirname(os.path.abspath(b))


def main(argv=None) -> dict | list[dict]:
    """The kernel record of one checkpoint, or the list of records of several."""
    args = parse_args(argv)
    initialize_from_args(args)
    paths = expand_paths(args.model_path, "checkpoint")
    for path in paths:
        check_out_dir(
            os.path.join(os.path.dirname(os.path.abspath(path)), args.bonus_dir), "--bonus_dir"
        )
    args, first = load_model_from_args(args, paths[0])  # --model and --dataset filled in
    ds = load_dataset(args.dataset, args.data_root)
    check_full_kernel(args.full, args.class_index)
    check_class_index(args.class_index, args.dataset, ds.n_classes)
    indices = class_balanced_subset(ds.y_train, args.dataset_size, ds.n_classes, args.random_seed)
    images, labels = ds.x_train[indices], ds.y_train[indices]

    # every checkpoint is checked (and its epoch read) before the first kernel; one is held at
    # a time
    epochs = [checkpoint_epoch(first.meta, paths[0])]
    for path in paths[1:]:
        epochs.append(checkpoint_epoch(load_checked(args, path).meta, path))
    names = output_names(paths, epochs, args.save_name)
    records = []
    start_all = time.time()
    for i, (path, name) in enumerate(zip(paths, names, strict=True)):
        loaded = first if i == 0 else load_checked(args, path)
        first = None
        if len(paths) > 1:
            print(f"[{i + 1}/{len(paths)}] {path}", flush=True)
        records.append(kernel_of(args, path, name, loaded, images, labels, indices, epochs[i]))
    if len(paths) > 1:
        print(f"{len(paths)} kernels in {time.time() - start_all:.1f}s")
        return records
    return records[0]


def load_checked(args, path: str):
    return load_model(path, args.model, args.dataset, args.trust_pickle)


def kernel_of(args, path, name, loaded, images, labels, indices, epoch) -> dict:
    """Compute, save and draw the kernel of one checkpoint."""
    params = loaded.lin_params if args.use_linear_params else loaded.params
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
            full=args.full,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"kernel {kernel.shape} in {time.time() - start:.1f}s")

    out_dir = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), args.bonus_dir))
    out = os.path.join(
        out_dir, kernel_file_name(name, args.class_index, args.dataset_size, args.full)
    )
    record = {
        "kernel": kernel,
        "labels": labels,
        "indices": indices,
        "class_index": args.class_index,
        "dataset": args.dataset,
        "model": args.model,
        "model_path": os.path.abspath(path),
        "run": run_name(path, loaded.meta),
        "epoch": epoch,
        "use_linear_params": args.use_linear_params,
    }
    if args.full:
        record.update(full=True, n_logits=len(kernel) // len(labels), layout=FULL_LAYOUT)
    save_pickle(record, out)
    plot_kernel(kernel, labels, kernel_title(record), out[:-4] + ".png")
    print(f"wrote {out} and {out[:-4]}.png")
    return record


if __name__ == "__main__":
    run_main(main)
