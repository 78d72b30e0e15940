"""The files the pipeline passes along: checkpoints (run_exp.py -> every later script) and
kernel pickles (calculate_kernel.py -> analyze_kernels.py, visualize_ntk_features.py, ...).

A checkpoint is the original's pickle {'params': theta (theta_t in phase 2), 'lin_params': w,
'net_state'} plus a 'meta' entry describing it (model, dataset, n_classes, image_shape, phase,
epoch, step, the run's flags, the project version), so later scripts need not be told
--model and --dataset again. Checkpoints without 'meta' (earlier versions, the original code's
with --trust_pickle) still load; the flags, or their defaults, then say what they are.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, NamedTuple

import haiku as hk
import jax
import numpy as np

from ntk_evolution import __version__
from ntk_evolution.data import SHAPES
from ntk_evolution.io.schemas import check_checkpoint, check_examples, check_kernel
from ntk_evolution.models import get_model, init_model
from ntk_evolution.utils import UserError, load_pickle, save_pickle

# the original's defaults, for checkpoints that do not say what they are
DEFAULT_MODEL = "resnet18"
DEFAULT_DATASET = "cifar10"

# ----------------------------------------------------------------------------- names


def format_epoch(epoch: float) -> str:
    """Epoch as the original wrote it in file names: 20 -> '20', 0.125 -> '0.125'."""
    return str(int(epoch)) if float(epoch).is_integer() else str(epoch)


def checkpoint_name(epoch: float, linear: bool = False) -> str:
    """`parameters_checkpoint_{epoch}.pkl` or `parameters_checkpoint_linear_{epoch}.pkl`."""
    middle = "linear_" if linear else ""
    return f"parameters_checkpoint_{middle}{format_epoch(epoch)}.pkl"


def epoch_from_name(path: str) -> float | None:
    """The epoch in a checkpoint or kernel file name: parameters_checkpoint_0.125.pkl -> 0.125,
    kernel_epoch_5_500.pkl -> 5.0 (after 'checkpoint', 'epoch' or 'ep'); None when absent. Only
    for files without 'meta' (written before it existed, or by the original code)."""
    match = re.search(
        r"(?:checkpoint|epoch|ep)_?(?:linear_)?(\d+(?:\.\d+)?)", os.path.basename(path)
    )
    return float(match.group(1)) if match else None


# ----------------------------------------------------------------------------- checkpoints


# where a run writes and how it was launched, not what it is: left out of meta, so that the same
# run gives the same bytes wherever it is saved and whether or not it was resumed (eps_linf is
# --eps converted, recorded as --eps)
NOT_RECORDED = frozenset(
    {"save_path", "resume", "data_root", "trust_pickle", "coordinator_address",
     "num_processes", "process_id", "eps_linf"}
)  # fmt: skip


def _interned(value: Any) -> Any:
    """Strings interned (equal strings one object): pickle's memo, and so the bytes written,
    then depend on the values only."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, list):
        return [_interned(v) for v in value]
    return value


def recorded_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The run's settings a checkpoint records, by run_exp.py's flag names: every plain value
    (None, str, int, float, bool, list) but NOT_RECORDED, sorted by name."""
    return {
        name: _interned(value)
        for name, value in sorted(flags.items())
        if name not in NOT_RECORDED
        and (value is None or isinstance(value, str | int | float | bool | list))
    }


def checkpoint_meta(
    flags: dict[str, Any], run: str, phase: int, epoch: float, step: int | None = None
) -> dict:
    """What a checkpoint of the run named `run` (its folder's name) is: model, dataset,
    n_classes, image_shape (from `flags`, run_exp.py's flags by name), phase (1, or 2 for the
    linearized / --do_standard_second phase), epoch (fractional for the early saves), step
    (optimizer steps taken in this phase, when known), the run's flags (recorded_flags), the
    version."""
    image_shape, n_classes = SHAPES[flags["dataset"]]
    return {
        "run": _interned(run),
        "model": _interned(flags["model"]),
        "dataset": _interned(flags["dataset"]),
        "n_classes": n_classes,
        "image_shape": image_shape,
        "phase": phase,
        "epoch": epoch,
        "step": step,
        "flags": recorded_flags(flags),
        "version": __version__,
    }


def run_of_folder(folder: str) -> str:
    """A run's name: its folder's name."""
    return os.path.basename(os.path.normpath(os.path.abspath(folder)))


def run_name(path: str, meta: dict | None = None) -> str:
    """The run a checkpoint belongs to: meta's run, or (older checkpoints) its folder's name."""
    if meta and isinstance(meta.get("run"), str):
        return meta["run"]
    return run_of_folder(os.path.dirname(os.path.abspath(path)))


def save_checkpoint(
    path: str, params: Any, lin_params: Any, net_state: Any, meta: dict | None = None
) -> None:
    """Checkpoint pickle: {'params': theta (theta_t in phase 2), 'lin_params': w, 'net_state',
    'meta'}."""
    record = {"params": params, "lin_params": lin_params, "net_state": net_state}
    save_pickle(record if meta is None else {**record, "meta": meta}, path)


def load_checkpoint(path: str, trust: bool = False) -> dict:
    """The checkpoint dict at `path`, lin_params defaulting to params and meta to None. Its
    shapes are checked against a network by load_model."""
    return check_checkpoint(load_pickle(path, "checkpoint", trust=trust), path)


FIT_TODO = "pass the --model and --dataset it was trained with"


def check_tree_matches(tree: Any, reference: Any, where: str, todo: str = FIT_TODO) -> None:
    """Raise a UserError naming the first leaf whose path or shape differs from `reference`
    (`todo`: what the user can do about it)."""
    got = {
        jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }
    want = {
        jax.tree_util.keystr(k): np.shape(v)
        for k, v in jax.tree_util.tree_leaves_with_path(reference)
    }
    if got.keys() != want.keys():
        missing = sorted(want.keys() - got.keys())
        extra = sorted(got.keys() - want.keys())
        detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise UserError(f"{where} does not fit the chosen --model/--dataset ({detail}); {todo}")
    for name, shape in want.items():
        if got[name] != shape:
            raise UserError(
                f"{where} does not fit the chosen --model/--dataset: {name} has shape "
                f"{got[name]}, expected {shape}; {todo}"
            )


def resolve_model_flags(
    model: str | None, dataset: str | None, meta: dict | None, path: str
) -> tuple[str, str]:
    """(model, dataset): the given flag, else the checkpoint's meta, else the default. A flag
    that contradicts the meta is an error naming both."""
    resolved = []
    for flag, given, default in (
        ("model", model, DEFAULT_MODEL),
        ("dataset", dataset, DEFAULT_DATASET),
    ):
        recorded = (meta or {}).get(flag)
        if given is not None and recorded is not None and given != recorded:
            raise UserError(
                f"{path} is a checkpoint of --{flag} {recorded} (its meta says so), but "
                f"--{flag} {given} was given; drop --{flag} or pass --{flag} {recorded}"
            )
        resolved.append(given or recorded or default)
    return resolved[0], resolved[1]


class Checkpoint(NamedTuple):
    """A checkpoint and the network it fits: `model` the Haiku network, `model_name` and
    `dataset` what it is, `params` theta (theta_t in phase 2), `lin_params` w, `net_state`
    (BatchNorm), `meta` (None for older files) and `path`, the file it was read from or is saved
    as (None for one kept in memory only)."""

    model: hk.TransformedWithState
    model_name: str
    dataset: str
    params: hk.Params
    lin_params: hk.Params
    net_state: hk.State
    meta: dict | None
    path: str | None = None


def load_model(
    path: str, model: str | None = None, dataset: str | None = None, trust: bool = False
) -> Checkpoint:
    """The checkpoint at `path` with its network: --model/--dataset from the flags given
    (`model`, `dataset`; None when not given), else from the checkpoint's meta, else the
    defaults. Its shapes are checked before any dataset is loaded, so a checkpoint of another
    model or dataset is reported as such."""
    ckpt = load_checkpoint(path, trust=trust)
    model_name, dataset = resolve_model_flags(model, dataset, ckpt["meta"], path)
    image_shape, n_classes = SHAPES[dataset]
    network = get_model(model_name, n_classes)
    params, net_state = jax.eval_shape(
        lambda: init_model(network, jax.random.PRNGKey(0), image_shape)
    )
    for key, reference in (("params", params), ("lin_params", params), ("net_state", net_state)):
        check_tree_matches(ckpt[key], reference, f"{path} [{key}]")
    return Checkpoint(
        network,
        model_name,
        dataset,
        ckpt["params"],
        ckpt["lin_params"],
        ckpt["net_state"],
        ckpt["meta"],
        path,
    )


def checkpoint_epoch(meta: dict | None, path: str) -> float | None:
    """The epoch a checkpoint was saved at: its meta's, else the one in its file name."""
    if meta is not None and meta.get("epoch") is not None:
        return float(meta["epoch"])
    return epoch_from_name(path)


# ----------------------------------------------------------------------------- kernel pickles


def load_kernel(
    path: str, trust: bool = False, expect: dict | None = None, allow_full: bool = False
) -> dict:
    """A kernel pickle of calculate_kernel.py: {'kernel': (N, N), 'labels', 'indices',
    'class_index', 'dataset', 'model', 'model_path', 'epoch', ...} (schemas.check_kernel), with
    the kernel as float64. A full kernel ('full': (C N, C N)) only with `allow_full`.
    `expect` = {key: value} (e.g. dataset, model, class_index): a recorded value that differs
    is an error naming the flag to pass."""
    record = check_kernel(load_pickle(path, "kernel pickle", trust), path)
    if record.get("full") and not allow_full:
        raise UserError(
            f"{path}: a full kernel (every pair of logits, {record['kernel'].shape[0]} rows); "
            "this takes the averaged or a class kernel (run calculate_kernel.py without --full)"
        )
    check_kernel_record(record, path, expect or {})
    return record


def check_kernel_record(record: dict, path: str, expect: dict) -> None:
    """A value recorded in the kernel pickle at `path` that differs from `expect` = {key:
    value} is an error naming the flag to pass."""
    for key, value in expect.items():
        if record.get(key) is not None and record[key] != value:
            raise UserError(
                f"{path} was computed with --{key} {record[key]}, not {value}; "
                f"pass --{key} {record[key]}"
            )


# ----------------------------------------------------------------------------- example pickles


def load_examples(
    path: str, image_shape: tuple[int, ...], n_classes: int, trust: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Images (NHWC float32) and labels of an adv_examples pickle or robust set ({images: (N, C,
    H, W) in [0, 1], labels: (N,)}, as eval_and_make_adv.py, ntk_attack.py and
    robustify_dataset.py write it), checked against the dataset (schemas.check_examples)."""
    return check_examples(load_pickle(path, "examples file", trust), path, image_shape, n_classes)


def load_transfer(
    path: str, x: np.ndarray, y: np.ndarray, image_shape, n_classes: int, trust: bool
) -> np.ndarray:
    """Another model's adversarial examples of the test images x (same order and labels)."""
    images, labels = load_examples(path, image_shape, n_classes, trust)
    if len(images) != len(x):
        raise UserError(
            f"--transfer_path {path} has {len(images)} examples for {len(x)} test images; "
            f"pass --n_test {len(images)}"
        )
    if not np.array_equal(labels, y):
        raise UserError(f"--transfer_path {path} was not made from these test images (labels)")
    distance = float(np.max(np.abs(images - x))) * 255
    print(f"transfer examples: largest L-inf distance to the test images {distance:.2f}/255")
    return images
