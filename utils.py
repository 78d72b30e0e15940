"""Shared helpers: user-facing errors, pickle I/O, checkpoints, flag types."""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


class UserError(Exception):
    """An error the user caused and can fix (bad path, bad flag, wrong checkpoint)."""


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None):
    """Run an entry script's main(); a UserError ends in one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------- pickles


def to_numpy(tree: Any) -> Any:
    """Every JAX array in `tree` as a NumPy array (pickles must not need JAX to load), keeping
    dict order (jax.tree.map would sort the keys)."""
    if isinstance(tree, dict):  # interned keys: the same content pickles to the same bytes
        return {_intern(key): to_numpy(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        items = [to_numpy(value) for value in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    if isinstance(tree, jax.Array):
        from parallel import to_host  # gathers arrays spread over several hosts

        return to_host(tree)
    return tree


def _intern(key: Any) -> Any:
    return sys.intern(key) if isinstance(key, str) else key


def save_pickle(obj: Any, path: str) -> None:
    """Write `obj` to `path` atomically: a temporary file in the same folder, synced, renamed.
    With several processes every one calls this (arrays are gathered) and process 0 writes."""
    from parallel import is_writer

    obj = to_numpy(obj)
    if not is_writer():
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".pkl")
    except OSError as err:
        raise UserError(f"cannot write to folder {folder}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as err:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        if isinstance(err, OSError):
            raise UserError(f"could not save {path}: {err.strerror}") from None
        raise


# What a pickle of NumPy arrays, dtypes, scalars and plain containers refers to (NumPy 1 and 2).
SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
    *(
        (f"numpy.{core}.multiarray", name)
        for core in ("core", "_core")
        for name in ("_reconstruct", "scalar")
    ),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    *(
        ("builtins", name)
        for name in ("dict", "list", "tuple", "set", "frozenset", "complex", "bytearray")
    ),
}


class _SafeUnpickler(pickle.Unpickler):
    """Admits only SAFE_GLOBALS: loading can build arrays and containers, never call code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        return super().find_class(module, name)


def load_pickle(path: str, what: str = "file", trust: bool = False) -> Any:
    """Load a pickle of NumPy arrays and plain containers (what this project writes). Anything
    else is refused, because unpickling can run arbitrary code; `trust=True` (--trust_pickle)
    allows a full unpickle of a file the user trusts, e.g. one written by the original code."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f) if trust else _SafeUnpickler(f).load()
    except PermissionError:
        raise UserError(f"{what} is not readable: {path}") from None
    except pickle.UnpicklingError as err:
        if not trust and str(err).startswith("it refers to"):
            raise UserError(
                f"{what} {path} holds more than arrays and plain containers ({err}); refusing to "
                "load it, since unpickling can run code; pass --trust_pickle if you trust it"
            ) from None
        raise UserError(f"{what} {path} is not a valid pickle ({err})") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as err:
        raise UserError(f"{what} {path} is not a valid or complete pickle ({err})") from None


# ----------------------------------------------------------------------------- checkpoints


def format_epoch(epoch: float) -> str:
    """Epoch as the original wrote it in file names: 20 -> '20', 0.125 -> '0.125'."""
    return str(int(epoch)) if float(epoch).is_integer() else str(epoch)


def checkpoint_name(epoch: float, linear: bool = False) -> str:
    """`parameters_checkpoint_{epoch}.pkl` or `parameters_checkpoint_linear_{epoch}.pkl`."""
    middle = "linear_" if linear else ""
    return f"parameters_checkpoint_{middle}{format_epoch(epoch)}.pkl"


def epoch_from_name(path: str) -> float | None:
    """The epoch in a checkpoint or kernel file name: parameters_checkpoint_0.125.pkl -> 0.125,
    kernel_epoch_5_500.pkl -> 5.0 (after 'checkpoint', 'epoch' or 'ep'); None when absent."""
    match = re.search(
        r"(?:checkpoint|epoch|ep)_?(?:linear_)?(\d+(?:\.\d+)?)", os.path.basename(path)
    )
    return float(match.group(1)) if match else None


def save_checkpoint(path: str, params: Any, lin_params: Any, net_state: Any) -> None:
    """Checkpoint pickle: {'params': theta (theta_t in phase 2), 'lin_params': w, 'net_state'}."""
    save_pickle({"params": params, "lin_params": lin_params, "net_state": net_state}, path)


def load_checkpoint(path: str, like: tuple | None = None, trust: bool = False) -> dict:
    """Load a checkpoint dict; with `like` = (params, net_state) of the model the user asked
    for, check that params, lin_params and net_state have the expected names and shapes."""
    ckpt = load_pickle(path, "checkpoint", trust=trust)
    if not isinstance(ckpt, dict) or not {"params", "net_state"} <= set(ckpt):
        raise UserError(f"{path} is not a checkpoint (expected a dict with params, net_state)")
    ckpt.setdefault("lin_params", ckpt["params"])
    if like is not None:
        params, net_state = like
        for key, reference in (
            ("params", params),
            ("lin_params", params),
            ("net_state", net_state),
        ):
            check_tree_matches(ckpt[key], reference, f"{path} [{key}]")
    return ckpt


def check_tree_matches(tree: Any, reference: Any, where: str) -> None:
    """Raise a UserError naming the first leaf whose path or shape differs from `reference`."""
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
        raise UserError(
            f"{where} does not fit the chosen --model/--dataset ({detail}); "
            "pass the --model and --dataset it was trained with"
        )
    for name, shape in want.items():
        if got[name] != shape:
            raise UserError(
                f"{where} does not fit the chosen --model/--dataset: {name} has shape "
                f"{got[name]}, expected {shape}; pass the --model and --dataset it was trained with"
            )


# ----------------------------------------------------------------------------- flags


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr (exit code 2), without the usage."""

    def __init__(self, description: str | None = None):
        super().__init__(description=description, formatter_class=argparse.RawTextHelpFormatter)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args=None, namespace=None):
        """Parse, then join the other hosts when --coordinator_address says so."""
        parsed = super().parse_args(args, namespace)
        from parallel import initialize

        initialize(parsed)
        return parsed


def add_shared_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every entry script adds to the original's: --data_root, --trust_pickle and the
    several-host flags (parallel.py)."""
    from parallel import add_distributed_flags

    add_distributed_flags(parser)
    parser.add_argument("--data_root", default="./data", help="where CIFAR lives or is downloaded")
    parser.add_argument(
        "--trust_pickle",
        action="store_true",
        help="fully unpickle input files you trust (e.g. written by the original code)",
    )


def finite_float(min_value: float = -math.inf, inclusive: bool = True) -> Callable[[str], float]:
    """argparse type: a finite float >= min_value (or > when not inclusive)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = value >= min_value if inclusive else value > min_value
        if not math.isfinite(value) or not ok:
            sign = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {sign} {min_value}")
        return value

    return parse


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def tree_size(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))
