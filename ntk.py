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

from collections.abc import Callable

import haiku as hk
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from utils import tree_size

DEFAULT_MAX_MEMORY_GB = 4.0


def make_jacobian_fn(
    model: hk.TransformedWithState, class_index: int
) -> Callable[[hk.Params, hk.State, jax.Array], hk.Params]:
    """Jitted fn(params, net_state, x (n, H, W, C)) -> per-example Jacobian pytree with leaves
    shaped (n, K, *param_shape): K = 1 for one logit, K = C for all logits."""

    def logits_one(params, net_state, x_single):
        logits, _ = model.apply(params, net_state, x_single[None], False)
        logits = logits[0]
        return logits[class_index : class_index + 1] if class_index >= 0 else logits

    jac = jax.vmap(jax.jacrev(logits_one), in_axes=(None, None, 0))
    return jax.jit(jac)


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


def chunk_size_for(
    n_params: int, n_outputs: int, max_memory_gb: float, n_images: int, resident_chunks: int = 3
) -> int:
    """Images per Jacobian chunk so that `resident_chunks` chunks (float32, plus the backward
    pass's working memory, counted as one more) fit in `max_memory_gb`."""
    bytes_per_image = 4 * n_params * n_outputs
    budget = max_memory_gb * 2**30
    size = int(budget // (bytes_per_image * (resident_chunks + 1)))
    if size < 1:
        need = bytes_per_image * (resident_chunks + 1) / 2**30
        raise ValueError(
            f"one image's Jacobian needs about {need:.2f} GB; raise --max_memory_gb above that"
        )
    return min(size, n_images)


def empirical_ntk(
    model: hk.TransformedWithState,
    params: hk.Params,
    net_state: hk.State,
    x1: np.ndarray,
    x2: np.ndarray | None = None,
    *,
    class_index: int = -1,
    chunk_size: int | None = None,
    max_memory_gb: float = DEFAULT_MAX_MEMORY_GB,
    progress: bool = True,
    describe: Callable[[str], None] | None = None,
) -> np.ndarray:
    """K(x1, x2) (N1, N2) float64 as defined in the module docstring; K(x1, x1) when x2 is None.

    The square kernel fills only block (i, j) with j >= i and mirrors it. When all Jacobian
    chunks fit in the memory budget, each is computed exactly once; otherwise row chunk i is
    computed once and column chunks are recomputed per row."""
    square = x2 is None
    x2 = x1 if square else x2
    n_outputs = 1 if class_index >= 0 else _n_logits(model, params, net_state, x1[:1])
    n_params = tree_size(params)
    if chunk_size is None:
        chunk_size = chunk_size_for(n_params, n_outputs, max_memory_gb, max(len(x1), len(x2)))
    jacobian_fn = make_jacobian_fn(model, class_index)
    starts1 = list(range(0, len(x1), chunk_size))
    starts2 = list(range(0, len(x2), chunk_size))
    budget_chunks = max_memory_gb * 2**30 // (4 * n_params * n_outputs * chunk_size) - 2
    cache_all = len(starts1) + (0 if square else len(starts2)) <= budget_chunks
    cache: dict[tuple[int, int], hk.Params] = {}

    def jacobian(which: int, start: int) -> hk.Params:
        if (which, start) in cache:
            return cache[(which, start)]
        x = x1 if which == 1 or square else x2
        jac = jacobian_fn(params, net_state, jnp.asarray(x[start : start + chunk_size]))
        if cache_all:
            cache[(which, start)] = jac
        return jac

    pairs = [(i, j) for i in starts1 for j in starts2 if not square or j >= i]
    kernel = np.zeros((len(x1), len(x2)), np.float64)
    bar = tqdm(pairs, desc="kernel blocks", disable=None if progress else True, leave=False)
    for i, j in bar:
        row = jacobian(1, i)
        block = np.asarray(contract(row, jacobian(2, j)), np.float64)
        kernel[i : i + chunk_size, j : j + chunk_size] = block
        if square and j != i:
            kernel[j : j + chunk_size, i : i + chunk_size] = block.T
        if describe is not None:
            describe(f"block rows {i}:{i + len(block)} cols {j}:{j + block.shape[1]}")
        if not cache_all and j == starts2[-1]:
            cache.clear()
    bar.close()
    if square:  # the diagonal blocks are symmetric up to float32 rounding; make it exact
        kernel = 0.5 * (kernel + kernel.T)
    return kernel


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


def cache_stats(n_params: int, n_outputs: int, chunk_size: int) -> str:
    """Human-readable size of one Jacobian chunk."""
    gb = 4 * n_params * n_outputs * chunk_size / 2**30
    return f"{chunk_size} images x {n_outputs} logits x {n_params:,} params = {gb:.2f} GB/chunk"
