"""Kernel evolution over checkpoints, for one or more runs side by side.

Takes kernel pickles of calculate_kernel.py (paths or quoted globs). Kernels are grouped into
runs by the run folder (the folder holding the checkpoint), the class index and the subset size;
each kernel's epoch is read from the pickle ('epoch'), else from its checkpoint's or its own
file name (e.g. --save_name kernel_epoch_5). For each run, ordered by epoch: the distance to the
first and to the last kernel, the velocity between consecutive checkpoints, the centered
kernel-target alignment, the share of spectral energy in the top 10 and top 20 eigenvalues, and
the polar view; beside them the same run measured as the adversarial-NTK code measures it
(Tsilivis & Kempe 2022): Frobenius radius and angle to the initial kernel, also within each
kernel's top --top_space and bottom --bottom_space eigenspaces, the squared-eigenvalue mass of
the top 10 and 20, and the distance between every pair of epochs (formulas in
kernel_analysis.py). Full kernels (calculate_kernel.py --full) are analysed as they are,
(C N, C N). Writes into --out_dir:
  kernel_evolution.csv / .json   one row per (run, epoch)
  kernel_evolution.png           the quantities against epoch, runs side by side
  kernel_polar.png               the adversarial-NTK code's polar dynamics: whole, top, bottom
  kernel_distances.png / .json   the epoch-by-epoch distance matrix of each run
  kernel_spectra.png             eigen-spectra of each run, coloured by epoch
  kernel_grid.png                the kernels themselves, one row per run on one colour scale
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from ntk_evolution.cli import (
    Parser,
    add_out_dir_flag,
    add_shared_flags,
    expand_paths,
    initialize_from_args,
    positive_int,
)
from ntk_evolution.io.checkpoints import epoch_from_name, load_kernel
from ntk_evolution.kernels.analysis import distance_matrix, evolution, spectrum, target_matrix
from ntk_evolution.kernels.plots import (
    plot_distance_matrices,
    plot_kernel_evolution,
    plot_kernel_grid,
    plot_kernel_spectra,
    plot_polar_dynamics,
)
from ntk_evolution.utils import (
    UserError,
    check_out_dir,
    check_output,
    run_main,
    write_csv,
    write_json,
)


def build_parser() -> Parser:
    p = Parser(__doc__)
    p.add_argument("kernels", nargs="+", help="Kernel pickles: paths or quoted globs.")
    p.add_argument("--names", nargs="+", default=None, help="A label per run, in order.")
    p.add_argument(
        "--top_space",
        type=positive_int,
        default=20,
        help="Radius and angle also within each kernel's top this many eigenvalues (theirs: 20).",
    )
    p.add_argument(
        "--bottom_space",
        type=positive_int,
        default=None,
        help="... and within its bottom this many; default all but --top_space (theirs: 2480 "
        "of 2500).",
    )
    add_out_dir_flag(p, "./kernel_analysis")
    add_shared_flags(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def read_kernel(path: str, trust: bool) -> dict:
    """A kernel pickle with its epoch and the run it belongs to (the checkpoint's folder,
    class, size)."""
    record = load_kernel(path, trust, allow_full=True)
    epoch = record.get("epoch")
    if epoch is None:
        epoch = epoch_from_name(record.get("model_path", "")) or epoch_from_name(path)
    if epoch is None:
        raise UserError(
            f"cannot tell the epoch of {path}: compute it from a parameters_checkpoint_<epoch>.pkl "
            "or name it with --save_name kernel_epoch_<epoch>"
        )
    model_path = record.get("model_path")
    run_dir = os.path.dirname(model_path) if model_path else os.path.dirname(os.path.dirname(path))
    kernel = record["kernel"]
    return {
        "path": path,
        "epoch": float(epoch),
        "kernel": kernel,
        "labels": np.asarray(record["labels"]),
        "indices": record.get("indices"),
        "class_index": int(record.get("class_index", -1)),
        "full": bool(record.get("full")),
        "model": record.get("model"),
        "dataset": record.get("dataset"),
        "run": (os.path.abspath(run_dir), int(record.get("class_index", -1)), len(kernel)),
    }


def group_runs(records: list[dict]) -> dict[tuple, list[dict]]:
    runs: dict[tuple, list[dict]] = {}
    for record in records:
        runs.setdefault(record["run"], []).append(record)
    for members in runs.values():
        members.sort(key=lambda r: r["epoch"])
        first = members[0]
        for other in members[1:]:
            same_images = (
                first["indices"] is None
                or other["indices"] is None
                or np.array_equal(first["indices"], other["indices"])
            )
            if not same_images or not np.array_equal(first["labels"], other["labels"]):
                raise UserError(
                    f"{other['path']} and {first['path']} are kernels on different images; "
                    "compute them with the same --dataset_size and --random_seed"
                )
            if other["epoch"] == first["epoch"]:
                raise UserError(
                    f"{other['path']} and {first['path']} are both epoch {first['epoch']:g}"
                )
    return runs


def run_label(key: tuple, keys: list[tuple]) -> str:
    run_dir, class_index, size = key
    label = os.path.basename(run_dir)
    if sum(1 for k in keys if k[0] == run_dir) > 1:
        which = f"class {class_index}" if class_index >= 0 else "all logits"
        label += f" ({which}, {size} rows)"
    return label


def grid_title(record: dict) -> str:
    """What the kernels are: model, dataset, N, logit (the first kernel's; the runs share N)."""
    which = (
        f"logit {record['class_index']}" if record["class_index"] >= 0 else "averaged over logits"
    )
    if record["full"]:
        which = "full (every pair of logits)"
    model = record.get("model") or "?"
    dataset = record.get("dataset") or "?"
    return (
        f"empirical NTKs over training: {model} on {dataset}, N = {len(record['labels'])}, "
        f"{which}; images ordered by class, one colour scale per run"
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_out_dir(args.out_dir, "--out_dir")
    initialize_from_args(args)
    paths = expand_paths(args.kernels, "kernel pickle")
    records = [read_kernel(path, args.trust_pickle) for path in paths]
    runs = group_runs(records)
    keys = list(runs)
    if args.names and len(args.names) != len(keys):
        raise UserError(f"--names gives {len(args.names)} labels for {len(keys)} runs")
    labels = args.names or [run_label(key, keys) for key in keys]

    # classes: the labels seen, or a full kernel's logits
    n_classes = max(
        max(int(r["labels"].max()) + 1, len(r["kernel"]) // len(r["labels"])) for r in records
    )
    table, spectra, grid, distances = {}, {}, {}, {}
    for label, key in zip(labels, keys, strict=True):
        members = runs[key]
        first = members[0]
        target = target_matrix(first["labels"], n_classes, first["class_index"], first["full"])
        kernels = [r["kernel"] for r in members]
        epochs = [r["epoch"] for r in members]
        table[label] = evolution(kernels, epochs, target, args.top_space, args.bottom_space)
        spectra[label] = (epochs, [spectrum(k) for k in kernels])
        grid[label] = [(r["epoch"], r["kernel"], r["labels"]) for r in members]
        distances[label] = {"epochs": epochs, "distance": distance_matrix(kernels).tolist()}

    os.makedirs(args.out_dir, exist_ok=True)
    rows = [{"run": label, **row} for label, run_rows in table.items() for row in run_rows]
    csv_path = os.path.join(args.out_dir, "kernel_evolution.csv")
    check_output([table, distances], csv_path)  # before the first of the outputs is written
    write_csv(rows, csv_path)
    write_json(table, os.path.join(args.out_dir, "kernel_evolution.json"))
    write_json(distances, os.path.join(args.out_dir, "kernel_distances.json"))
    plot_kernel_evolution(table, os.path.join(args.out_dir, "kernel_evolution.png"))
    plot_polar_dynamics(table, os.path.join(args.out_dir, "kernel_polar.png"))
    plot_distance_matrices(distances, os.path.join(args.out_dir, "kernel_distances.png"))
    plot_kernel_spectra(spectra, os.path.join(args.out_dir, "kernel_spectra.png"))
    plot_kernel_grid(grid, grid_title(records[0]), os.path.join(args.out_dir, "kernel_grid.png"))
    for label, run_rows in table.items():
        print(
            f"{label}: {len(run_rows)} kernels, "
            f"epochs {run_rows[0]['epoch']:g}..{run_rows[-1]['epoch']:g}"
        )
        print("  epoch  dist_first  dist_last  velocity   alignment  top10")
        for row in run_rows:
            velocity = "-" if row["velocity"] is None else f"{row['velocity']:.4f}"
            print(
                f"  {row['epoch']:>5g}  {row['distance_to_first']:10.4f}  "
                f"{row['distance_to_last']:9.4f}  {velocity:>9}  {row['alignment']:9.4f}  "
                f"{row['energy_top10']:.4f}"
            )
        print("  as the adversarial-NTK code measures it (radius normalised to 1 at the end):")
        print("  epoch  tk_radius  tk_angle  mass_top20")
        for row in run_rows:
            radius = "-" if row["tk_radius"] is None else f"{row['tk_radius']:.4f}"
            print(
                f"  {row['epoch']:>5g}  {radius:>9}  {row['tk_angle']:8.4f}  "
                f"{row['mass_top20']:10.4f}"
            )
    print(
        f"wrote {csv_path}, kernel_evolution.json, kernel_distances.json and five PNGs into "
        f"{args.out_dir}"
    )
    return table


if __name__ == "__main__":
    run_main(main)
