"""What each file the pipeline passes along must hold, checked after the safe unpickle
(utils.load_pickle) and before anything is written.

One check per file kind: checkpoint, resume state, kernel, adv_examples / robust set, results.
Each field is checked for type, dtype (real floating point or integer, as fits), shape (against
the other fields; against the network in checkpoints.load_model), finiteness and range; the
nesting depth is bounded by load_pickle. A failure is a UserError

    <file>: <what is wrong> (<what to do>)

which run_main prints as one line with exit code 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ntk_evolution.data import SHAPES
from ntk_evolution.models import MODELS
from ntk_evolution.utils import UserError, leaves


def invalid(path: str, what: str, todo: str) -> UserError:
    """The error of a file that fails its schema."""
    return UserError(f"{path}: {what} ({todo})")


# ----------------------------------------------------------------------------- fields


def as_array(value: Any, path: str, field: str, kinds: str, todo: str) -> np.ndarray:
    """`value` as a NumPy array whose dtype kind is one of `kinds` ('f' float, 'i'/'u'
    integer); objects, strings, booleans, complex numbers and containers are refused."""
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
    elif hasattr(value, "__array__") and not isinstance(value, str | bytes):  # --trust_pickle
        array = np.asarray(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        array = np.asarray(value)
    else:
        raise invalid(path, f"{field} is a {type(value).__name__}, not an array", todo)
    if array.dtype.kind not in kinds:
        wanted = {"f": "real floating point", "i": "integer", "u": "integer"}
        names = " or ".join(dict.fromkeys(wanted[k] for k in kinds))
        raise invalid(path, f"{field} has dtype {array.dtype}, not {names}", todo)
    return array


def check_finite(array: np.ndarray, path: str, field: str, todo: str) -> None:
    if array.dtype.kind == "f":
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise invalid(path, f"{field} has {bad} NaN or infinite values", todo)


def real_array(
    value: Any,
    path: str,
    field: str,
    todo: str,
    *,
    ndim: int | None = None,
    low: float | None = None,
    high: float | None = None,
    integral: bool = False,
) -> np.ndarray:
    """A finite real array with `ndim` dimensions and values in [low, high]; `integral`: whole
    numbers only (integer dtype, or floats without a fractional part)."""
    array = as_array(value, path, field, "fiu", todo)
    if ndim is not None and array.ndim != ndim:
        raise invalid(path, f"{field} has shape {array.shape}, expected {ndim} dimensions", todo)
    check_finite(array, path, field, todo)
    if integral and array.dtype.kind == "f" and np.any(array != np.round(array)):
        raise invalid(path, f"{field} has fractional values; they must be whole numbers", todo)
    if array.size and low is not None and array.min() < low:
        raise invalid(path, f"{field} has values below {low:g} (min {array.min():g})", todo)
    if array.size and high is not None and array.max() > high:
        raise invalid(path, f"{field} has values above {high:g} (max {array.max():g})", todo)
    return array


def number(
    value: Any,
    path: str,
    field: str,
    todo: str,
    *,
    integral: bool = False,
    low: float | None = None,
    high: float | None = None,
    optional: bool = False,
) -> float | int | None:
    """A finite real scalar (a whole number when `integral`) in [low, high], as a Python
    number; None when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        kind = "whole number" if integral else "number"
        raise invalid(path, f"{field} is {type(value).__name__} {value!r:.40}, not a {kind}", todo)
    if not math.isfinite(float(value)):
        raise invalid(path, f"{field} is {value}, not a finite number", todo)
    if integral and float(value) != int(value):
        raise invalid(path, f"{field} is {value}, not a whole number", todo)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else high}]"
        raise invalid(path, f"{field} is {value}, outside {bounds}", todo)
    return int(value) if integral else float(value)


def choice(value: Any, path: str, field: str, options, todo: str, optional: bool = True):
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in options:
        raise invalid(path, f"{field} is {value!r:.40}, not one of {', '.join(options)}", todo)
    return value


def require_dict(record: Any, path: str, keys: set[str], what: str, todo: str) -> dict:
    if not isinstance(record, dict):
        raise invalid(path, f"not {what} (a {type(record).__name__}, not a dict)", todo)
    missing = sorted(keys - set(record))
    if missing:
        raise invalid(path, f"not {what} (no {', '.join(missing)})", todo)
    return record


def parameter_tree(tree: Any, path: str, field: str, kinds: str, todo: str) -> dict:
    """A Haiku tree {module: {name: array}} (nested dicts with string keys, any depth that
    load_pickle admitted) whose arrays have dtype kind in `kinds` and are finite; returned with
    plain dicts and NumPy arrays."""
    if not isinstance(tree, Mapping):
        raise invalid(path, f"{field} is a {type(tree).__name__}, not a dict of arrays", todo)
    out = {}
    for key, value in tree.items():
        name = f"{field}[{key!r}]"
        if not isinstance(key, str):
            raise invalid(path, f"{field} has a key {key!r:.40} that is not a name", todo)
        if isinstance(value, Mapping):
            out[key] = parameter_tree(value, path, name, kinds, todo)
        else:
            array = as_array(value, path, name, kinds, todo)
            check_finite(array, path, name, todo)
            out[key] = array
    return out


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_TODO = "use another checkpoint of run_exp.py, e.g. an earlier epoch's"


def check_checkpoint(record: Any, path: str) -> dict:
    """{'params', 'net_state'[, 'lin_params' (default params), 'meta' (default None)]}: float
    parameter trees, a float or integer state tree (BatchNorm statistics and counters), all
    finite; meta's model, dataset, phase, epoch and step of the right types."""
    record = require_dict(
        record, path, {"params", "net_state"}, "a checkpoint of run_exp.py", CHECKPOINT_TODO
    )
    out = {
        "params": parameter_tree(record["params"], path, "params", "f", CHECKPOINT_TODO),
        "net_state": parameter_tree(record["net_state"], path, "net_state", "fiu", CHECKPOINT_TODO),
        "meta": check_meta(record.get("meta"), path),
    }
    lin = record.get("lin_params")
    out["lin_params"] = (
        out["params"]
        if lin is None
        else parameter_tree(lin, path, "lin_params", "f", CHECKPOINT_TODO)
    )
    return out


def check_meta(meta: Any, path: str) -> dict | None:
    """A checkpoint's meta: None (older checkpoints) or a dict whose model, dataset, phase,
    epoch, step and flags have the types checkpoints.checkpoint_meta writes."""
    if meta is None:
        return None
    todo = "drop its 'meta' entry to pass --model and --dataset yourself, or use another file"
    if not isinstance(meta, dict):
        raise invalid(path, f"its meta is a {type(meta).__name__}, not a dict", todo)
    choice(meta.get("model"), path, "meta['model']", MODELS, todo)
    choice(meta.get("dataset"), path, "meta['dataset']", tuple(SHAPES), todo)
    number(
        meta.get("phase"), path, "meta['phase']", todo, integral=True, low=1, high=2, optional=True
    )
    number(meta.get("epoch"), path, "meta['epoch']", todo, low=0, optional=True)
    number(meta.get("step"), path, "meta['step']", todo, integral=True, low=0, optional=True)
    if not isinstance(meta.get("run", ""), str):
        raise invalid(path, "meta['run'] is not a string", todo)
    if not isinstance(meta.get("flags", {}), dict):
        raise invalid(path, "meta['flags'] is not a dict", todo)
    return meta


# ----------------------------------------------------------------------------- resume state

RESUME_TODO = "delete it, or use a new --save_path, to start the run from the beginning"
RESUME_KEYS = {
    "config",
    "phase",
    "epoch",
    "w",
    "theta_t",
    "net_state",
    "opt_state_leaves",
    "results",
}


def check_resume_state(record: Any, path: str) -> dict:
    """run_exp.py's resume_state.pkl: config (dict), phase (1 or 2), epoch (>= 0), w and
    theta_t (None in phase 1) finite float trees, net_state, opt_state_leaves (a list of finite
    arrays, or None), results. Shapes are checked against the network by run_exp.py."""
    record = require_dict(record, path, RESUME_KEYS, "a resume state of run_exp.py", RESUME_TODO)
    if not isinstance(record["config"], dict):
        raise invalid(path, "config is not a dict", RESUME_TODO)
    leaves = record["opt_state_leaves"]
    if leaves is not None and not isinstance(leaves, list | tuple):
        raise invalid(path, "opt_state_leaves is not a list", RESUME_TODO)
    return {
        **record,
        "phase": number(record["phase"], path, "phase", RESUME_TODO, integral=True, low=1, high=2),
        "epoch": number(record["epoch"], path, "epoch", RESUME_TODO, integral=True, low=0),
        "w": parameter_tree(record["w"], path, "w", "f", RESUME_TODO),
        "theta_t": None
        if record["theta_t"] is None
        else parameter_tree(record["theta_t"], path, "theta_t", "f", RESUME_TODO),
        "net_state": parameter_tree(record["net_state"], path, "net_state", "fiu", RESUME_TODO),
        "opt_state_leaves": None
        if leaves is None
        else [
            real_array(leaf, path, f"opt_state_leaves[{i}]", RESUME_TODO)
            for i, leaf in enumerate(leaves)
        ],
        "results": check_results(record["results"], path, RESUME_TODO),
    }


# ----------------------------------------------------------------------------- results


def check_results(results: Any, path: str, todo: str = "") -> dict:
    """A results dict (run_exp.py's results.pkl, eval_and_make_adv.py's test_results): keys
    names or finite numbers; values None, booleans, strings, finite numbers, or such dicts and
    lists."""
    todo = todo or "rerun the script that wrote it"
    if not isinstance(results, dict):
        raise invalid(path, f"the results are a {type(results).__name__}, not a dict", todo)
    for field, value in leaves(results, "results"):  # keys: names, or numbers (eps_sweep's)
        if isinstance(value, np.ndarray):
            real_array(value, path, field, todo)
        elif value is not None and not isinstance(value, bool | np.bool_ | str):
            number(value, path, field, todo)
    return results


# ----------------------------------------------------------------------------- kernels

KERNEL_TODO = "recompute it with calculate_kernel.py"
SYMMETRY_RTOL = 1e-3  # of max |K|: float32 blocks computed apart differ by ~1e-6


def check_kernel(record: Any, path: str) -> dict:
    """calculate_kernel.py's pickle: kernel (N, N) finite, real and symmetric (with 'full' True,
    (C N, C N) for 'n_logits' C); labels (N,) whole numbers in [0, classes); indices (N,) whole
    numbers >= 0 (optional); class_index -1 or a class; dataset and model known names
    (optional); epoch a finite number >= 0 (optional)."""
    record = require_dict(
        record, path, {"kernel", "labels"}, "a kernel pickle of calculate_kernel.py", KERNEL_TODO
    )
    kernel = real_array(record["kernel"], path, "kernel", KERNEL_TODO, ndim=2)
    n = kernel.shape[0]
    if kernel.shape != (n, n) or n == 0:
        raise invalid(
            path, f"the kernel has shape {kernel.shape}, not (N, N) with N >= 1", KERNEL_TODO
        )
    asymmetry = max(  # by row blocks: no N x N temporaries
        float(np.max(np.abs(kernel[i : i + 256] - kernel[:, i : i + 256].T)))
        for i in range(0, n, 256)
    )
    if asymmetry > SYMMETRY_RTOL * max(float(np.max(kernel)), -float(np.min(kernel))):
        raise invalid(
            path, f"the kernel is not symmetric (max |K - K^T| = {asymmetry:.3g})", KERNEL_TODO
        )
    dataset = choice(record.get("dataset"), path, "dataset", tuple(SHAPES), KERNEL_TODO)
    choice(record.get("model"), path, "model", MODELS, KERNEL_TODO)
    n_classes = SHAPES[dataset][1] if dataset else None
    labels = real_array(
        record["labels"],
        path,
        "labels",
        KERNEL_TODO,
        ndim=1,
        low=0,
        high=None if n_classes is None else n_classes - 1,
        integral=True,
    )
    full = record.get("full", False)
    if full not in (True, False):
        raise invalid(path, "'full' is not True or False", KERNEL_TODO)
    n_classes = n_classes or int(labels.max()) + 1
    if full:  # every pair of logits: (C N, C N), logit-major (ntk.empirical_ntk)
        logits = number(record.get("n_logits"), path, "n_logits", KERNEL_TODO, integral=True, low=1)
        if logits * len(labels) != n:
            raise invalid(
                path, f"a full kernel of {n} rows for {logits} logits x {len(labels)} labels",
                KERNEL_TODO,
            )  # fmt: skip
        n = len(labels)
    elif labels.shape != (n,):
        raise invalid(path, f"{len(labels)} labels for a {n} x {n} kernel", KERNEL_TODO)
    out = {
        **record,
        "kernel": kernel.astype(np.float64, copy=False),
        "labels": labels.astype(np.int64),
    }
    if record.get("indices") is not None:
        indices = real_array(
            record["indices"], path, "indices", KERNEL_TODO, ndim=1, low=0, integral=True
        )
        if indices.shape != (n,):
            raise invalid(path, f"{len(indices)} indices for a {n} x {n} kernel", KERNEL_TODO)
        out["indices"] = indices.astype(np.int64)
    out["class_index"] = number(
        record.get("class_index", -1),
        path,
        "class_index",
        KERNEL_TODO,
        integral=True,
        low=-1,
        high=n_classes - 1,
    )
    out["epoch"] = number(record.get("epoch"), path, "epoch", KERNEL_TODO, low=0, optional=True)
    if record.get("model_path") is not None and not isinstance(record["model_path"], str):
        raise invalid(path, "model_path is not a path", KERNEL_TODO)
    return out


# ----------------------------------------------------------------------------- examples

EXAMPLES_TODO = "write it as {'images': (N, C, H, W) floats in [0, 1], 'labels': (N,) classes}"


def check_examples(
    record: Any, path: str, image_shape: tuple[int, ...], n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """An adv_examples pickle or robust set ({images: (N, C, H, W) in [0, 1], labels: (N,)}, as
    eval_and_make_adv.py, ntk_attack.py and robustify_dataset.py write it) against the
    dataset's image shape and classes: images NHWC float32, labels int32."""
    if not isinstance(record, dict) or not {"images", "labels"} <= set(record):
        raise invalid(
            path, "not an adv_examples pickle (expected keys images, labels)", EXAMPLES_TODO
        )
    images = as_array(record["images"], path, "images", "fiu", EXAMPLES_TODO)
    h, w, c = image_shape
    if images.ndim != 4 or images.shape[1:] != (c, h, w):
        raise invalid(
            path,
            f"images have shape {images.shape}, expected (N, {c}, {h}, {w}) for the dataset",
            EXAMPLES_TODO,
        )
    if len(images) == 0:
        raise invalid(path, "it holds no images", EXAMPLES_TODO)
    images = real_array(images, path, "images", EXAMPLES_TODO, low=0, high=1)
    labels = real_array(
        record["labels"], path, "labels", EXAMPLES_TODO, low=0, high=n_classes - 1, integral=True
    )
    if labels.shape != (len(images),):
        raise invalid(path, f"{labels.shape} labels for {len(images)} images", EXAMPLES_TODO)
    if record.get("indices") is not None:
        indices = real_array(
            record["indices"], path, "indices", EXAMPLES_TODO, low=0, integral=True
        )
        if indices.shape != labels.shape:
            raise invalid(path, f"{indices.shape} indices for {len(images)} images", EXAMPLES_TODO)
    return images.astype(np.float32).transpose(0, 2, 3, 1), labels.astype(np.int32)
