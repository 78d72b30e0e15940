"""Shared helpers: the user-facing error, host copies of arrays, atomic file writes, pickles.

Nothing here imports the `ntk_evolution` package, so every module can import this one."""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import csv
import io
import json
import os
import pickle
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    return os.path.join(cache_home(), "ntk_evolution")


def cache_home() -> str:
    """The user's cache folders' parent: $XDG_CACHE_HOME, else ~/.cache."""
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


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


INTERRUPTED = (
    "{cause}; nothing half-written was left (every output is written whole or not at all); "
    "run the same command again for the outputs not yet written"
)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `kill`), raised in the main thread like Ctrl-C's
    KeyboardInterrupt, so that it unwinds the same way: no half-written file is left."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def run_main(
    main: Callable[[Sequence[str] | None], Any],
    argv: Sequence[str] | None = None,
    on_interrupt: Callable[[str, BaseException], str] | None = None,
):
    """Run an entry script's main(); a UserError ends in one line on stderr and exit code 2,
    Ctrl-C in one line (`on_interrupt(cause, the KeyboardInterrupt)`, else INTERRUPTED, with
    cause "interrupted") and
    exit code 130, SIGTERM likewise with cause "terminated (SIGTERM)" and exit code 143
    (128 + 15, as a shell reports a process that SIGTERM ended)."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals go there
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        cause = "terminated (SIGTERM)" if terminated else "interrupted"
        message = on_interrupt(cause, err) if on_interrupt else INTERRUPTED.format(cause=cause)
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(143 if terminated else 130) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- output folders


def check_out_dir(path: str, flag: str) -> str:
    """Refuse, before any work, an output folder that cannot be one: an existing file, a path
    under a file, or a folder (or the nearest existing parent) that is not writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder (pass a folder)")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder (pass a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable (pass a folder you can write)")
    return path


# ----------------------------------------------------------------------------- pickles


def to_numpy(tree: Any) -> Any:
    """Every JAX array in `tree` as a NumPy array (pickles must not need JAX to load), and every
    array neither C- nor Fortran-ordered as a C-ordered copy, keeping dict order (jax.tree.map
    would sort the keys)."""
    if isinstance(tree, dict):  # interned keys: the same content pickles to the same bytes
        return {_intern(key): to_numpy(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        items = [to_numpy(value) for value in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    if isinstance(tree, jax.Array):
        return to_host(tree)
    if isinstance(tree, np.ndarray) and not (tree.flags.c_contiguous or tree.flags.f_contiguous):
        # a transposed or sliced array is written C-ordered: NumPy before 2.3 cannot read
        # protocol 5's form of it
        return np.ascontiguousarray(tree)
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
    """`obj` as indented JSON, atomically (process 0 only), after check_output."""
    check_output(obj, path)
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


def leaves(obj: Any, root: str = "") -> Iterator[tuple[str, Any]]:
    """(where, value) for every value in nested dicts, lists and tuples that is not one of
    them, e.g. ("['standard']['clean']", 0.98); dict keys that are not strings too, as ("a key
    of <where>", key). Without recursion."""
    stack = [(root, obj)]
    while stack:
        field, value = stack.pop()
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    yield f"a key of {field or 'the value'}", key
                stack.append((f"{field}[{key!r}]", item))
        elif isinstance(value, list | tuple):
            stack.extend((f"{field}[{i}]", item) for i, item in enumerate(value))
        else:
            yield field, value


def check_output(obj: Any, path: str) -> None:
    """Before writing `path`: every floating-point number and array in `obj` is finite (a NaN
    is never saved)."""
    for field, value in leaves(obj):
        if isinstance(value, float | np.floating | np.ndarray | jax.Array):
            array = np.asarray(value)
            if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
                bad = int(array.size - np.count_nonzero(np.isfinite(array)))
                raise UserError(
                    f"not writing {path}: {field.lstrip() or 'the value'} has {bad} NaN or "
                    "infinite values (the computation overflowed: check the inputs it came from)"
                )


def save_pickle(obj: Any, path: str, allow_nan: bool = False) -> None:
    """Write `obj` to `path` atomically (arrays as NumPy), after check_output (no NaN is saved
    unless `allow_nan`: a value that is undefined, said so by the caller). With several
    processes every one calls this (arrays are gathered) and process 0 writes."""
    obj = to_numpy(obj)
    if not allow_nan:
        check_output(obj, path)
    if is_writer():
        with atomic_file(path) as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


MAX_DEPTH = 16  # nesting of containers in any file this project reads (a checkpoint: 4)


class _Refused:
    """What find_class returns for numpy.ndarray: a token _reconstruct accepts, which cannot be
    called or instantiated (NEWOBJ ndarray(shape) would allocate a size read from the file)."""


_NDARRAY = _Refused()


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"it asks to allocate {what}")


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """numpy's _reconstruct(ndarray, (0,), b'b'), the empty array numpy's pickles then fill
    with BUILD (whose data must match the shape): any other size is refused."""
    if subtype is not _NDARRAY or tuple(shape) != (0,):
        raise _refuse(f"an array of shape {shape!r} before its data")
    return _multiarray._reconstruct(np.ndarray, (0,), typecode)


def _scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's scalar(dtype, bytes): only from exactly itemsize bytes of a plain dtype."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _refuse(f"a scalar of dtype {dtype!r}")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _refuse(f"a scalar of {dtype.itemsize} bytes from {type(data).__name__}")
    return _NUMPY_SCALAR(dtype, data)


def _frombuffer(
    buffer: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None
) -> np.ndarray:
    """numpy's _frombuffer: reshapes the bytes the file carries, allocates nothing more. NumPy
    2.3 and later pickle an array that is neither C- nor Fortran-ordered (a transposed one, as
    NHWC images become NCHW) under protocol 5 as its bytes in memory order with order 'K' and
    the permutation `axis_order` that restores its axes; earlier NumPy passes four arguments."""
    if axis_order is None or order != "K":
        return _NUMPY_FROMBUFFER(buffer, dtype, shape, order)
    rank = len(shape) if isinstance(shape, tuple | list) else -1
    if not isinstance(axis_order, tuple | list) or sorted(axis_order) != list(range(rank)):
        raise _refuse(f"an array of shape {shape!r} by the axis order {axis_order!r}")
    return _NUMPY_FROMBUFFER(buffer, dtype, shape, "C").transpose(axis_order)


def _from_containers(kind: type) -> Callable[..., Any]:
    """kind() or kind(a list, tuple, dict or set the pickle built): never kind(n) or kind of
    an iterator, which could allocate more than the file holds."""

    def make(*args: Any) -> Any:
        if len(args) > 1 or (args and not isinstance(args[0], list | tuple | dict | set)):
            raise _refuse(f"a {kind.__name__} from {type(args[0]).__name__}")
        return kind(*args)

    return make


def _bytearray(*args: Any) -> bytearray:
    """bytearray(bytes) or bytearray(str, 'latin-1'), as pickle writes it; never bytearray(n)."""
    if not args or not isinstance(args[0], bytes | str) or len(args) > 2:
        raise _refuse("a bytearray of a size given in the file")
    return bytearray(*args)


def _bytes(*args: Any) -> bytes:
    """bytes(), how protocol 2 carries empty bytes (a zero-size array's data); never bytes(n)."""
    if args:
        raise _refuse("bytes of a size given in the file")
    return b""


def _encode(text: Any, encoding: str = "latin1") -> bytes:
    """_codecs.encode(str, 'latin1'), how protocol-2 pickles carry bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _refuse(f"bytes by the codec {encoding!r}")
    return text.encode("latin1")


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(isinstance(v, int | float) for v in (real, imag)):
        raise _refuse("a complex number from non-numbers")
    return complex(real, imag)


try:  # NumPy 2, else 1
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric
_NUMPY_SCALAR, _NUMPY_FROMBUFFER = _multiarray.scalar, _numeric._frombuffer

# What a pickle of NumPy arrays, dtypes, scalars and plain containers refers to (NumPy 1 and 2),
# each mapped to a version that allocates no more than the bytes the file carries.
SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _encode,
    ("collections", "OrderedDict"): _from_containers(collections.OrderedDict),
    ("builtins", "complex"): _complex,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "bytes"): _bytes,
    **{
        ("builtins", kind.__name__): _from_containers(kind)
        for kind in (dict, list, tuple, set, frozenset)
    },
    **{
        (f"numpy.{core}.{module}", name): function
        for core in ("core", "_core")
        for module, name, function in (
            ("multiarray", "_reconstruct", _reconstruct),
            ("multiarray", "scalar", _scalar),
            ("numeric", "_frombuffer", _frombuffer),
        )
    },
}


class _BoundedReader:
    """The file as the unpickler reads it, refusing a read of more bytes than the file has left
    (a length named in the file must not make the read allocate it)."""

    def __init__(self, f: io.BufferedReader):
        self.f = f
        self.size = os.fstat(f.fileno()).st_size

    def _check(self, n: int) -> None:
        left = self.size - self.f.tell()
        if n > left:
            raise pickle.UnpicklingError(f"it names {n} bytes where the file has {left} left")

    def read(self, n: int = -1) -> bytes:
        if n >= 0:
            self._check(n)
        return self.f.read(n)

    def readinto(self, buffer) -> int:
        self._check(len(memoryview(buffer).cast("B")))
        return self.f.readinto(buffer)

    def readline(self) -> bytes:
        return self.f.readline()


class _SafeUnpickler(pickle._Unpickler):  # the Python one: its memo is a dict, not an array
    """Admits only SAFE_GLOBALS: loading can build arrays and containers from the file's own
    bytes, never call code or allocate a size the file merely names."""

    def find_class(self, module: str, name: str):
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle.Unpickler maps them
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        return SAFE_GLOBALS[module, name]


def nesting_depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Depth of nested dicts, lists, tuples and sets in `obj` (0 for a leaf), without recursion;
    stops counting past `limit`."""
    deepest, stack = 0, [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.keys()) + list(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            children = list(item)
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def load_pickle(path: str, what: str = "file", trust: bool = False) -> Any:
    """Load a pickle of NumPy arrays and plain containers (what this project writes). Anything
    else is refused, because unpickling can run arbitrary code, and so is a constructor call
    that would allocate more than the file's own bytes, or nesting deeper than MAX_DEPTH;
    `trust=True` (--trust_pickle) allows a full unpickle of a file the user trusts, e.g. one
    written by the original code. What the loaded object holds is checked by the file kind's
    schema (ntk_evolution.schemas)."""
    if not os.path.isfile(path):
        kind = "not found: it is a folder" if os.path.isdir(path) else "not found"
        raise UserError(f"{path}: {what} {kind} (check the path)")
    try:
        f = open(path, "rb")
    except OSError as err:
        raise UserError(
            f"{path}: {what} cannot be read, {err.strerror} (check the path and its permissions)"
        ) from None
    redo = "pass one this project wrote, or recreate it"
    try:
        with f:
            obj = pickle.load(f) if trust else _SafeUnpickler(_BoundedReader(f)).load()
    except pickle.UnpicklingError as err:
        if not trust and str(err).startswith("it refers to"):
            raise UserError(
                f"{path}: {what} holds more than arrays and plain containers ({err}); refusing to "
                "load it, since unpickling can run code (pass --trust_pickle if you trust it)"
            ) from None
        raise UserError(f"{path}: not a valid {what}, {err} ({redo})") from None  # e.g. allocation
    except (MemoryError, RecursionError, OverflowError) as err:
        raise UserError(
            f"{path}: not a valid {what}, {type(err).__name__} while unpickling ({redo})"
        ) from None
    except Exception as err:  # noqa: BLE001 - arbitrary bytes can raise anything while parsed
        detail = str(err) or type(err).__name__
        raise UserError(f"{path}: not a valid or complete {what}, {detail} ({redo})") from None
    if nesting_depth(obj) > MAX_DEPTH:
        raise UserError(
            f"{path}: not a valid {what}, containers nested more than {MAX_DEPTH} deep (a "
            f"{what} of this project nests 4 deep; recreate it)"
        )
    return obj


def tree_size(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))
