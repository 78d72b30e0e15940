"""Data parallelism on JAX's own sharding: a 1-D mesh over every visible device (axis "batch"),
batches split along it, parameters and optimizer state replicated. jax.jit partitions the
computation from the arrays' shardings (GSPMD), so the step functions are the same code on one
device (a mesh of one) and on many; reductions over the batch (the loss, BatchNorm statistics)
run over the global batch, so results do not depend on the device count beyond float32
rounding.

Several hosts: `initialize` calls jax.distributed.initialize (the --coordinator_address,
--num_processes and --process_id flags of every script); every host then runs the same
command, draws the same global batch order, and feeds only its own rows of each batch
(`shard_batch`). Only process 0 writes files (`is_writer`).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ntk_evolution.utils import UserError, to_host, user_cache_dir

AXIS = "batch"


@functools.cache
def mesh() -> Mesh:
    """The 1-D mesh over all devices of all processes, in jax.devices() order (each process's
    devices contiguous, so each process holds a contiguous block of rows of a batch)."""
    return Mesh(np.array(jax.devices()), (AXIS,))


def n_devices() -> int:
    return mesh().size


def batch_sharding() -> NamedSharding:
    """Leading axis split over the mesh, the rest whole."""
    return _sharding(mesh(), PartitionSpec(AXIS))


def replicated() -> NamedSharding:
    return _sharding(mesh(), PartitionSpec())


@functools.lru_cache(maxsize=8)
def _sharding(on: Mesh, spec: PartitionSpec) -> NamedSharding:
    return NamedSharding(on, spec)


def replicate(tree: Any) -> Any:
    """Every leaf on every device (a no-op for leaves already so)."""

    def put(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding == replicated():
            return leaf
        value = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
        if jax.process_count() == 1:
            return jax.device_put(value, replicated())
        host = np.asarray(to_host(value))
        return jax.make_array_from_callback(host.shape, replicated(), lambda index: host[index])

    return jax.tree.map(put, tree)


def padded_size(n: int) -> int:
    """n rounded up to a multiple of the device count."""
    return -(-n // n_devices()) * n_devices()


def shard_batch(*arrays: np.ndarray, pad: bool = False) -> tuple[jax.Array, ...]:
    """The global batch arrays (same leading size on every process) split over the mesh; this
    process supplies only its rows. A size not divisible by the device count is an error, or
    with `pad` is padded by repeating the first row (for evaluation, where padding rows are
    dropped from the results)."""
    n = len(arrays[0])
    if n % n_devices():
        if not pad:
            raise UserError(
                f"a batch of {n} cannot be split over {n_devices()} devices: use a batch size "
                f"that is a multiple of {n_devices()}"
            )
        extra = padded_size(n) - n
        arrays = tuple(np.concatenate([a, np.repeat(a[:1], extra, axis=0)]) for a in arrays)
        n += extra
    if jax.process_count() == 1:  # one call for all arrays: cheaper per training step
        return tuple(jax.device_put(tuple(np.asarray(a) for a in arrays), batch_sharding()))
    per_process = n // jax.process_count()
    start = jax.process_index() * per_process
    return tuple(
        jax.make_array_from_process_local_data(
            batch_sharding(), np.asarray(a[start : start + per_process]), a.shape
        )
        for a in arrays
    )


def initialize(
    *,
    compile_cache: str | None = None,
    coordinator_address: str = "",
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Set JAX up for a script's run: the persistent compilation cache in `compile_cache`
    (enable_compile_cache; None: off), then jax.distributed.initialize when
    `coordinator_address` is given (and on a cluster JAX detects, such as SLURM, when the other
    two are left out)."""
    if compile_cache is not None:
        enable_compile_cache(compile_cache)
    if not coordinator_address:
        return
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    except (RuntimeError, ValueError) as err:
        raise UserError(f"jax.distributed.initialize failed: {err}") from None
    mesh.cache_clear()


def default_compile_cache() -> str:
    """The folder jax/ in the user cache folder (utils.user_cache_dir: $NTK_CACHE_DIR moves it)."""
    return os.path.join(user_cache_dir(), "jax")


def use_default_compile_cache() -> None:
    """For library calls (a notebook): the scripts' persistent compilation cache
    (default_compile_cache), unless JAX already has a cache folder (set by the user or a
    script's --compile_cache) or $NTK_NO_COMPILE_CACHE is set."""
    if jax.config.jax_compilation_cache_dir or os.environ.get("NTK_NO_COMPILE_CACHE"):
        return
    enable_compile_cache(default_compile_cache())


def enable_compile_cache(folder: str) -> None:
    """JAX's persistent compilation cache in `folder` (created when missing): every compiled
    function is stored there, keyed by its program, shapes, devices and JAX version, so the next
    process that compiles the same function loads it instead (compilation is most of a short
    script's start-up). An unusable folder only costs the speed-up: a warning, not an error."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".probe_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        print(f"warning: compilation cache off ({folder}: {err.strerror})", file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
