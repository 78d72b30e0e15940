"""Empirical neural tangent kernel of a Haiku model, computed in memory-bounded blocks.

For parameters theta and logit c, with J_c(x) = d f_c(x; theta) / d theta (a row vector over
all P parameters):

    K_c(x1, x2) = J_c(x1) J_c(x2)^T                      (class_index = c)
    K(x1, x2)   = (1 / C) sum_c J_c(x1) J_c(x2)^T         (class_index = -1)

the second being neural-tangents' `trace_axes=(-1,)` convention (trace over the logits divided
by their number C). BatchNorm runs in inference mode (running statistics), so each example's
output depends only on that example. Products accumulate in float32 at full matmul precision;
the result is returned as float64 like the original.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import haiku as hk
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from tqdm import tqdm

from parallel import AXIS, mesh, padded_size, replicate, shard_batch, to_host
from utils import tree_size


@functools.lru_cache(maxsize=16)
def make_jacobian_fn(
    model: hk.TransformedWithState, class_index: int
) -> Callable[[hk.Params, hk.State, jax.Array], hk.Params]:
    """Jitted fn(params, net_state, x (n, H, W, C)) -> per-example Jacobian pytree with leaves
    shaped (n, K, *param_shape): K = 1 for one logit, K = C for all logits. Cached, so that
    repeated kernels of one model compile once."""

    def logits_one(params, net_state, x_single):
        logits, _ = model.apply(params, net_state, x_single[None], False)
        logits = logits[0]
        return logits[class_index : class_index + 1] if class_index >= 0 else logits

    jac = jax.vmap(jax.jacrev(logits_one), in_axes=(None, None, 0))
    return jax.jit(jac)


@functools.lru_cache(maxsize=16)
def make_sharded_jacobian_fn(model: hk.TransformedWithState, class_index: int, mesh) -> Callable:
    """make_jacobian_fn with the images split over the devices of `mesh` (leading size a
    multiple of the device count): each device computes the Jacobians of its own rows
    (shard_map, without cross-device sums: each row's Jacobian is per-example). Left to jit's
    automatic partitioning instead, XLA (jax 0.10, CPU) returned wrong conv-weight Jacobians for
    the rows of every device but the first (tests/test_parallel.py caught it)."""
    jacobian_fn = make_jacobian_fn(model, class_index)
    local = jax.shard_map(
        jacobian_fn,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(AXIS)),
        out_specs=PartitionSpec(AXIS),
        check_vma=False,
    )
    return jax.jit(local)


REDUCTION_BLOCK = 4096


def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (n1, p) @ b (n2, p)^T in float32, summed in two levels (blocks of REDUCTION_BLOCK, then
    over blocks): XLA's CPU dot accumulates some small shapes (e.g. one row) in one long
    sequential sum, which loses ~1e-5 relative accuracy over 10^4+ parameters."""
    p = a.shape[1]
    if p <= REDUCTION_BLOCK:
        return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    n_blocks = -(-p // REDUCTION_BLOCK)
    pad = n_blocks * REDUCTION_BLOCK - p
    a = jnp.pad(a, ((0, 0), (0, pad))).reshape(a.shape[0], n_blocks, REDUCTION_BLOCK)
    b = jnp.pad(b, ((0, 0), (0, pad))).reshape(b.shape[0], n_blocks, REDUCTION_BLOCK)
    partial = jnp.einsum("ikp,jkp->kij", a, b, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(partial, axis=0)


@jax.jit
def contract(jac1: hk.Params, jac2: hk.Params) -> jax.Array:
    """sum_k sum_p jac1[i, k, p] jac2[j, k, p] / K: the kernel block between two Jacobian
    chunks (leaves (n, K, ...)), averaged over the K logits."""
    leaves1, leaves2 = jax.tree.leaves(jac1), jax.tree.leaves(jac2)
    n1, k = leaves1[0].shape[:2]
    n2 = leaves2[0].shape[0]
    block = jnp.zeros((n1, n2), jnp.float32)
    for a, b in zip(leaves1, leaves2, strict=True):
        # (n, K * p): the sum over logits and parameters is one product
        block = block + _gram(a.reshape(n1, -1), b.reshape(n2, -1))
    return block / k


def default_memory_gb() -> float:
    """40% of the default device's memory (of the machine's RAM on a CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return 0.4 * stats["bytes_limit"] / 2**30
    return 0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


class ChunkPlan(NamedTuple):
    """Images per Jacobian chunk, and whether every column chunk stays cached."""

    chunk_size: int
    cache_columns: bool


def plan_chunks(n_rows: int, n_cols: int, bytes_per_image: int, max_memory_gb: float) -> ChunkPlan:
    """Largest chunks that fit the budget. When all column Jacobians plus one row chunk and its
    working memory fit, every chunk is computed once; otherwise a row chunk is held while column
    chunks are recomputed (row, column and working memory: three chunks)."""
    budget = max_memory_gb * 2**30
    chunk = int(budget // (3 * bytes_per_image))
    if chunk < 1:
        need = 3 * bytes_per_image / 2**30
        raise ValueError(
            f"one image's Jacobian needs about {need:.2f} GB of a {max_memory_gb:g} "
            f"GB budget with working memory; raise --max_memory_gb above {need:.2f}"
        )
    all_columns = n_cols * bytes_per_image
    if all_columns <= 0.5 * budget:  # the rest: one row chunk and the working memory
        chunk = max(1, int((budget - all_columns) // (2 * bytes_per_image)))
        return ChunkPlan(min(chunk, max(n_rows, n_cols)), True)
    return ChunkPlan(min(chunk, max(n_rows, n_cols)), False)


def _gram_host(jac1: hk.Params, jac2: hk.Params) -> np.ndarray:
    """contract() with the host's BLAS (zero-copy views of CPU arrays): XLA's CPU dot is about
    3x slower than BLAS for these wide (n, P) x (P, n) products."""
    leaves1, leaves2 = jax.tree.leaves(jac1), jax.tree.leaves(jac2)
    n1, k = leaves1[0].shape[:2]
    n2 = leaves2[0].shape[0]
    block = np.zeros((n1, n2), np.float32)
    for a, b in zip(leaves1, leaves2, strict=True):
        block += to_host(a).reshape(n1, -1) @ to_host(b).reshape(n2, -1).T
    return block / k


def empirical_ntk(
    model: hk.TransformedWithState,
    params: hk.Params,
    net_state: hk.State,
    x1: np.ndarray,
    x2: np.ndarray | None = None,
    *,
    class_index: int = -1,
    chunk_size: int | None = None,
    max_memory_gb: float | None = None,
    progress: bool = True,
    describe: Callable[[str], None] | None = None,
) -> np.ndarray:
    """K(x1, x2) (N1, N2) float64 as defined in the module docstring; K(x1, x1) when x2 is None.

    Each row chunk's Jacobian is computed once; column chunks are computed once and kept when
    they fit in `max_memory_gb` (default: default_memory_gb()), else recomputed per row chunk.
    The square kernel computes only blocks (i, j) with j >= i and mirrors them."""
    square = x2 is None
    x2 = x1 if square else x2
    n_outputs = 1 if class_index >= 0 else _n_logits(model, params, net_state, x1[:1])
    bytes_per_image = 4 * tree_size(params) * n_outputs
    plan = plan_chunks(len(x1), len(x2), bytes_per_image, max_memory_gb or default_memory_gb())
    chunk = chunk_size or plan.chunk_size
    longest = max(len(x1), len(x2))
    chunk = -(-longest // -(-longest // chunk))  # equal chunks: little padding in the last one
    chunk = padded_size(chunk)  # each chunk is split evenly over the devices
    jacobian_fn = make_sharded_jacobian_fn(model, class_index, mesh())
    params, net_state = replicate((params, net_state))
    gram = _gram_host if jax.default_backend() == "cpu" else contract

    def jacobian(x: np.ndarray, start: int) -> hk.Params:
        """Jacobian of images start..start+chunk, split over the devices; a short last chunk is
        padded to the chunk size (one compiled shape) and the padding sliced off."""
        images = x[start : start + chunk]
        n_real = len(images)
        if n_real < chunk:
            images = np.concatenate([images, np.repeat(images[:1], chunk - n_real, axis=0)])
        jac = jacobian_fn(params, net_state, *shard_batch(images))
        return jac if n_real == chunk else jax.tree.map(lambda leaf: leaf[:n_real], jac)

    columns: dict[int, hk.Params] = {}
    starts1, starts2 = range(0, len(x1), chunk), range(0, len(x2), chunk)
    n_blocks = sum(1 for i in starts1 for j in starts2 if not square or j >= i)
    kernel = np.zeros((len(x1), len(x2)), np.float64)
    bar = tqdm(
        total=n_blocks, desc="kernel blocks", disable=None if progress else True, leave=False
    )
    for i in starts1:
        row = columns[i] if square and i in columns else jacobian(x1, i)
        if square and plan.cache_columns:
            columns[i] = row
        for j in starts2:
            if square and j < i:
                continue
            if square and j == i:
                col = row
            elif j in columns:
                col = columns[j]
            else:
                col = jacobian(x2, j)
                if plan.cache_columns:
                    columns[j] = col
            block = to_host(gram(row, col)).astype(np.float64)
            kernel[i : i + chunk, j : j + chunk] = block
            if square and j != i:
                kernel[j : j + chunk, i : i + chunk] = block.T
            if describe is not None:
                describe(f"block rows {i}:{i + len(block)} cols {j}:{j + block.shape[1]}")
            bar.update()
    bar.close()
    if square:  # the diagonal blocks are symmetric up to float32 rounding; make it exact
        kernel = 0.5 * (kernel + kernel.T)
    return kernel


TANGENT_BATCH = 10  # (m, k) pairs per vectorised JVP: bounds activation memory


def _selected_logits(class_index: int, n_logits: int) -> jax.Array:
    """The logits a kernel traces over: [c] for class_index c, all C for -1."""
    return jnp.arange(n_logits) if class_index < 0 else jnp.array([class_index])


def kernel_features(
    model: hk.TransformedWithState,
    params: hk.Params,
    net_state: hk.State,
    x: np.ndarray,
    coefficients: np.ndarray,
    class_index: int = -1,
) -> hk.Params:
    """Parameter-space features of the kernel on images x (N, ...) with coefficients A (N, M):

        T[m, k] = J_k(x)^T A[:, m] = sum_j A[j, m] grad_theta f_k(x_j)

    for each traced logit k (K = 1 for class_index c, K = C for -1). Leaves are shaped
    (M, K, *param_shape). Computed from per-example Jacobians in memory-bounded chunks of
    images; K(z, x) A = kernel_times(T, z) then never needs the Jacobians of x again."""
    n_traced = 1 if class_index >= 0 else _n_logits(model, params, net_state, x[:1])
    bytes_per_image = 4 * tree_size(params) * n_traced
    chunk = plan_chunks(len(x), 0, bytes_per_image, default_memory_gb()).chunk_size
    jacobian_fn = make_jacobian_fn(model, class_index)
    total = None
    for start in range(0, len(x), chunk):
        jac = jacobian_fn(params, net_state, jnp.asarray(x[start : start + chunk]))
        part = _contract_coefficients(jac, jnp.asarray(coefficients[start : start + chunk]))
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return total


@jax.jit
def _contract_coefficients(jac: hk.Params, a: jax.Array) -> hk.Params:
    """sum_j a[j, m] jac[j, k, ...] for each leaf: (M, K, ...)."""
    a = a.astype(jnp.float32)
    return jax.tree.map(
        lambda leaf: jnp.tensordot(a.T, leaf, axes=1, precision=jax.lax.Precision.HIGHEST), jac
    )


def kernel_times(
    model: hk.TransformedWithState,
    params: hk.Params,
    net_state: hk.State,
    features: hk.Params,
    z: jax.Array,
    class_index: int = -1,
) -> jax.Array:
    """K(z, x) A (n, M) from the features T of kernel_features(x, A): for each m,

        (1/K) sum_k J_k(z) T[m, k]

    i.e. one Jacobian-vector product per (m, k). Differentiable in z (for attacks on kernel
    predictors); traceable inside jit."""
    leaves = jax.tree.leaves(features)
    n_columns, n_traced = leaves[0].shape[:2]
    flat = jax.tree.map(lambda f: f.reshape(-1, *f.shape[2:]), features)

    def logits(p):
        return model.apply(p, net_state, z, False)[0]

    def jvp(tangent):
        return jax.jvp(logits, (params,), (tangent,))[1]  # (n, C)

    outputs = jax.lax.map(jvp, flat, batch_size=TANGENT_BATCH)  # (M * K, n, C)
    outputs = outputs.reshape(n_columns, n_traced, *outputs.shape[1:])
    logits_used = _selected_logits(class_index, outputs.shape[-1])
    traced = jnp.take(outputs, logits_used, axis=-1)  # (M, K, n, K)
    diagonal = jnp.einsum("mknk->mn", traced)
    return diagonal.T / n_traced


def _n_logits(model, params, net_state, x) -> int:
    logits, _ = model.apply(params, net_state, jnp.asarray(x), False)
    return int(logits.shape[-1])


def explicit_ntk(model, params, net_state, x1, x2, class_index: int = -1) -> np.ndarray:
    """Reference K(x1, x2) from the definition: flatten jax.jacrev per example and multiply.
    Slow; for tests."""

    def logits_flat(flat, x_single, unravel):
        logits, _ = model.apply(unravel(flat), net_state, x_single[None], False)
        return logits[0]

    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def jac_matrix(x):
        rows = [jax.jacrev(logits_flat)(flat, xi, unravel) for xi in jnp.asarray(x)]
        return np.stack([np.asarray(r, np.float64) for r in rows])  # (n, C, P)

    j1, j2 = jac_matrix(x1), jac_matrix(x2)
    if class_index >= 0:
        return j1[:, class_index] @ j2[:, class_index].T
    return np.einsum("icp,jcp->ij", j1, j2) / j1.shape[1]
