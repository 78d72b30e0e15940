"""Shared helpers: the user-facing error, host copies of arrays, atomic file writes, pickles.

Nothing here imports the `ntk_evolution` package, so every module can import this one."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

LOG_INTERVAL_S = 10.0  # seconds between progress lines when stderr is not a terminal


def user_cache_dir() -> str:
    """This project's cache folder (compiled functions, the digits split): $NTK_CACHE_DIR, else
    $XDG_CACHE_HOME/ntk_evolution, else ~/.cache/ntk_evolution."""
    if os.environ.get("NTK_CACHE_DIR"):
        return os.environ["NTK_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ntk_evolution")


class UserError(Exception):
    """An error the user caused and can fix (bad path, bad flag, wrong checkpoint)."""


class _LogLines:
    """tqdm's output file when stderr is not a terminal (a log, a pipe): each refresh becomes a
    line of its own instead of a carriage-return overwrite."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def flush(self) -> None:
        sys.stderr.flush()


def progress_bar(iterable=None, *, desc: str, total: int | None = None, enabled: bool = True):
    """A progress bar on a terminal; elsewhere (stderr redirected to a log) a line
    `desc: n/total (p%) [elapsed<remaining, rate]` about every LOG_INTERVAL_S seconds (none for
    a loop that ends sooner), so that long loops are visible in logs too. Transient on a
    terminal (cleared when done)."""
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, leave=False)
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        file=_LogLines(),
        mininterval=LOG_INTERVAL_S,
        delay=LOG_INTERVAL_S,  # a loop shorter than that prints nothing
        leave=False,
        bar_format="{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) "
        "[{elapsed}<{remaining}, {rate_fmt}{postfix}]",
    )


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
        return to_host(tree)
    return tree


def _intern(key: Any) -> Any:
    return sys.intern(key) if isinstance(key, str) else key


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of a (possibly multi-host) array: gathered from every process when this
    one does not hold all of it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def is_writer() -> bool:
    """Whether this process writes outputs: process 0 (the only one on a single host)."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside `path` for writing; on success it is synced and renamed to
    `path`, so readers see the old file or the whole new one, never half of it. On failure the
    temporary file is removed and `path` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(
            dir=folder, prefix=".tmp_", suffix=os.path.splitext(path)[1]
        )
    except OSError as err:
        raise UserError(f"cannot write to folder {folder}: {err.strerror}") from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as err:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        if isinstance(err, OSError):
            raise UserError(f"could not save {path}: {err.strerror}") from None
        raise


def write_json(obj: Any, path: str) -> None:
    """`obj` as indented JSON, atomically (process 0 only)."""
    if is_writer():
        with atomic_file(path, "w") as f:
            json.dump(obj, f, indent=2)


def write_csv(rows: list[dict], path: str, fields: Sequence[str] | None = None) -> None:
    """Rows of dicts as CSV with a header (the first row's keys by default), atomically."""
    if is_writer():
        with atomic_file(path, "w") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields or rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def save_pickle(obj: Any, path: str) -> None:
    """Write `obj` to `path` atomically (arrays as NumPy). With several processes every one
    calls this (arrays are gathered) and process 0 writes."""
    obj = to_numpy(obj)
    if is_writer():
        with atomic_file(path) as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


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


def tree_size(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))
