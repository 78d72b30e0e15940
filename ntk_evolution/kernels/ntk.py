"""Empirical neural tangent kernel of a Haiku model, computed in memory-bounded blocks.

For parameters theta and logit c, with J_c(x) = d f_c(x; theta) / d theta (a row vector over
all P parameters):

    K_c(x1, x2) = J_c(x1) J_c(x2)^T                      (class_index = c)
    K(x1, x2)   = (1 / C) sum_c J_c(x1) J_c(x2)^T         (class_index = -1)

the second being neural-tangents' `trace_axes=(-1,)` convention (trace over the logits divided
by their number C). The full kernel (neural-tangents' `trace_axes=()`) keeps every pair of
logits, in the logit-major layout of the adversarial-NTK code (Tsilivis & Kempe 2022, which
reshapes neural-tangents' (N, N, C, C) output so):

    K_full[k N1 + i, l N2 + j] = J_k(x1_i) J_l(x2_j)^T          ((C N1, C N2); full=True)

so its diagonal block (c, c) is K_c and the mean of its diagonal blocks is K. A convolution
whose output has few positions enters K through the factors of its weight Jacobian (input
patches and output gradients, see Factors) rather than the Jacobian itself, when that is
cheaper (factored_layers). BatchNorm runs in inference mode (running statistics), so each
example's output depends only on that example. Products accumulate in float32 at full matmul
precision; the result is returned as float64 like the original.
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from ntk_evolution.models import Conv, conv_patches, use_conv_impl
from ntk_evolution.parallel import AXIS, mesh, padded_size, replicate, shard_batch
from ntk_evolution.utils import progress_bar, to_host, tree_size


class ConvLayer(NamedTuple):
    """One models.Conv call: its parameter bundle, kernel size and stride, output positions
    S = H' W', patch length D = k * k * C_in and output channels C, and output shape."""

    name: str
    kernel: int
    stride: int
    positions: int
    patch: int
    channels: int
    out_shape: tuple[int, ...]


def conv_layers(
    model: hk.TransformedWithState, params: hk.Params, net_state: hk.State, image_shape
) -> list[ConvLayer]:
    """The models.Conv layers each called once in a forward pass of one image (traced only)."""
    calls: list[ConvLayer] = []

    def record(next_f, args, kwargs, context):
        out = next_f(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, Conv):
            calls.append(
                ConvLayer(
                    module.module_name, module.kernel, module.stride,
                    out.shape[1] * out.shape[2], module.kernel**2 * args[0].shape[-1],
                    out.shape[-1], tuple(out.shape),
                )
            )  # fmt: skip
        return out

    def forward(params, net_state, x):
        with hk.experimental.intercept_methods(record):
            return model.apply(params, net_state, x, False)[0]

    jax.eval_shape(forward, params, net_state, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    counts = collections.Counter(layer.name for layer in calls)
    return [layer for layer in calls if counts[layer.name] == 1]


FACTOR_MODES = ("auto", "all", "none")


def factored_layers(layers: list[ConvLayer], n_outputs: int, mode: str) -> tuple[ConvLayer, ...]:
    """The convolutions whose weight enters the kernel through its factors (see Factors).

    Per pair of images and traced logit, the explicit Jacobian of a weight costs D * C
    multiply-adds (and D * C floats per image); the factors cost S^2 (D + C) (and S (D + C)
    floats). "auto" factors a layer when that is cheaper: ResNet-18's 4x4 last stage (74% of
    its parameters) on 32x32 images, cnn_small's 2x2 last convolution on digits. "all" and
    "none" are for tests and comparisons."""
    if mode not in FACTOR_MODES:
        raise ValueError(f"factor_convs={mode!r}: use one of {FACTOR_MODES}")
    if mode == "none":
        return ()
    if mode == "all":
        return tuple(layers)
    k = n_outputs
    return tuple(
        layer
        for layer in layers
        if layer.positions**2 * (layer.patch + k * layer.channels)
        < k * layer.patch * layer.channels
    )


class Factors(NamedTuple):
    """The Jacobian of a chunk of n images, with factored convolutions kept as factors.

    `jac`: per-example Jacobians of every other parameter, leaves (n, K, *param_shape).
    For a factored convolution y[s] = P[s] W (P the (S, D) patches of its input, see
    models.conv_patches), d f_k / d W = sum_s P[s]^T g_k[s] with g_k = d f_k / d y, so

        J_k(x1)_W . J_k(x2)_W = sum_{s, t} (P1 P2^T)[s, t] (g1_k g2_k^T)[s, t]

    and `patches[name]` (n, S, D) and `grads[name]` (n, K, S, C) are all that is stored."""

    jac: hk.Params
    patches: dict[str, jax.Array]
    grads: dict[str, jax.Array]


# Convolutions inside Jacobians: "auto" is one matrix product on CPUs, where vmapped
# per-example weight gradients of XLA's convolution ran ~1.5x slower (benchmarks/RESULTS.md).
JACOBIAN_CONV_IMPL = "auto"


LogitSelection = int | tuple[int, int]


def _logit_range(class_index: LogitSelection, n_logits: int) -> tuple[int, int]:
    """The logits start..stop a Jacobian traces: class index c -> (c, c + 1), -1 -> all, and a
    (start, stop) pair (a group of logits, see plan_kernel) as it is."""
    if isinstance(class_index, tuple):
        return class_index
    return (class_index, class_index + 1) if class_index >= 0 else (0, n_logits)


@functools.lru_cache(maxsize=16)
def make_factor_fn(
    model: hk.TransformedWithState,
    class_index: LogitSelection,
    factored: tuple[ConvLayer, ...] = (),
) -> Callable[[hk.Params, hk.State, jax.Array], Factors]:
    """Jitted fn(params, net_state, x (n, H, W, C)) -> Factors of the n images: K = 1 for one
    logit, K = C for all logits (class_index -1), K = stop - start for a (start, stop) range.
    Cached, so that repeated kernels of one model compile once."""
    names = {layer.name for layer in factored}

    def outputs(explicit, deltas, fixed, net_state, x_single):
        patches = {}

        def tap(next_f, args, kwargs, context):
            out = next_f(*args, **kwargs)
            module = context.module
            if context.method_name != "__call__" or not isinstance(module, Conv):
                return out
            name = module.module_name
            if name not in deltas:
                return out
            patches[name] = conv_patches(args[0], module.kernel, module.stride, module.kernel // 2)
            return out + deltas[name]  # deltas are zeros: d f / d delta = d f / d y

        with hk.experimental.intercept_methods(tap), use_conv_impl(JACOBIAN_CONV_IMPL):
            params = hk.data_structures.merge(explicit, fixed)
            logits, _ = model.apply(params, net_state, x_single[None], False)
        start, stop = _logit_range(class_index, logits.shape[-1])
        return logits[0, start:stop], patches

    def one(params, net_state, x_single):
        fixed, explicit = hk.data_structures.partition(
            lambda module, name, _: module in names and name == "w", params
        )
        deltas = {layer.name: jnp.zeros(layer.out_shape, x_single.dtype) for layer in factored}
        (jac, grads), patches = jax.jacrev(outputs, argnums=(0, 1), has_aux=True)(
            explicit, deltas, fixed, net_state, x_single
        )
        return Factors(
            jac,
            {lay.name: patches[lay.name].reshape(lay.positions, lay.patch) for lay in factored},
            {
                lay.name: grads[lay.name].reshape(-1, lay.positions, lay.channels)
                for lay in factored
            },
        )

    return jax.jit(jax.vmap(one, in_axes=(None, None, 0)))


@functools.lru_cache(maxsize=16)
def make_jacobian_fn(
    model: hk.TransformedWithState, class_index: int
) -> Callable[[hk.Params, hk.State, jax.Array], hk.Params]:
    """Jitted fn(params, net_state, x (n, H, W, C)) -> per-example Jacobian pytree with leaves
    shaped (n, K, *param_shape): K = 1 for one logit, K = C for all logits."""
    factor_fn = make_factor_fn(model, class_index)
    return jax.jit(lambda params, net_state, x: factor_fn(params, net_state, x).jac)


@functools.lru_cache(maxsize=16)
def make_sharded_factor_fn(
    model: hk.TransformedWithState,
    class_index: LogitSelection,
    factored: tuple[ConvLayer, ...],
    mesh,
) -> Callable:
    """make_factor_fn with the images split over the devices of `mesh` (leading size a
    multiple of the device count): each device computes the Jacobians of its own rows
    (shard_map, without cross-device sums: each row's Jacobian is per-example). Left to jit's
    automatic partitioning instead, XLA (jax 0.10, CPU) returned wrong conv-weight Jacobians for
    the rows of every device but the first (tests/test_parallel.py caught it)."""
    local = jax.shard_map(
        make_factor_fn(model, class_index, factored),
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


@functools.partial(jax.jit, static_argnames="full")
def contract(jac1: hk.Params, jac2: hk.Params, full: bool = False) -> jax.Array:
    """sum_k sum_p jac1[i, k, p] jac2[j, k, p] / K: the kernel block between two Jacobian
    chunks (leaves (n, K, ...)), averaged over the K logits; with `full`, every pair of logits,
    sum_p jac1[i, k, p] jac2[j, l, p] as (n1, K, n2, K)."""
    leaves1, leaves2 = jax.tree.leaves(jac1), jax.tree.leaves(jac2)
    n1, k = leaves1[0].shape[:2]
    n2 = leaves2[0].shape[0]
    if full:  # (n K, p): each (example, logit) is a row
        block = sum(
            _gram(a.reshape(n1 * k, -1), b.reshape(n2 * k, -1))
            for a, b in zip(leaves1, leaves2, strict=True)
        )
        return block.reshape(n1, k, n2, k)
    block = jnp.zeros((n1, n2), jnp.float32)
    for a, b in zip(leaves1, leaves2, strict=True):
        # (n, K * p): the sum over logits and parameters is one product
        block = block + _gram(a.reshape(n1, -1), b.reshape(n2, -1))
    return block / k


FACTOR_BLOCK = 2**24  # entries of one (rows * S, cols * S) product of a factored layer


def _factored_block(p1, g1, p2, g2, matmul, concatenate, full=False):
    """sum_k sum_{s, t} (P1 P2^T)[s, t] (g1_k g2_k^T)[s, t] (n1, n2) for patches p (n, S, D) and
    output gradients g (n, K, S, C) (Factors), in row slices of at most FACTOR_BLOCK entries;
    with `full`, sum_{s, t} (P1 P2^T)[s, t] (g1_k g2_l^T)[s, t] for every pair of logits, as
    (n1, K, n2, K)."""
    n1, s, d = p1.shape
    n2, k = p2.shape[0], g1.shape[1]
    if full:  # (n K S, C): every (example, logit, position) is a row
        g1, g2 = g1.reshape(n1 * k * s, -1), g2.reshape(n2 * k * s, -1)
    else:  # (n S, K C): the sum over logits joins the sum over channels in one product
        g1 = g1.transpose(0, 2, 1, 3).reshape(n1 * s, -1)
        g2 = g2.transpose(0, 2, 1, 3).reshape(n2 * s, -1)
    p2 = p2.reshape(n2 * s, d)
    pairs = k * k if full else 1
    rows = max(1, FACTOR_BLOCK // (s * n2 * s * pairs))
    parts = []
    for start in range(0, n1, rows):
        stop = min(n1, start + rows)
        patch_gram = matmul(p1[start:stop].reshape(-1, d), p2.T)
        if full:
            grad_gram = matmul(g1[start * k * s : stop * k * s], g2.T)
            product = grad_gram.reshape(stop - start, k, s, n2, k, s) * patch_gram.reshape(
                stop - start, 1, s, n2, 1, s
            )
            parts.append(product.sum(axis=(2, 5)))
        else:
            grad_gram = matmul(g1[start * s : stop * s], g2.T)
            product = (patch_gram * grad_gram).reshape(stop - start, s, n2, s)
            parts.append(product.sum(axis=(1, 3)))
    return parts[0] if len(parts) == 1 else concatenate(parts)


def _n_traced(factors: Factors) -> int:
    return jax.tree.leaves(factors.jac)[0].shape[1]


@functools.partial(jax.jit, static_argnames="full")
def contract_factors(f1: Factors, f2: Factors, full: bool = False) -> jax.Array:
    """The kernel block between two chunks' Factors with XLA (off the CPU): contract() of the
    Jacobians plus each factored layer's term, averaged over the K logits (with `full`, every
    pair of logits, (n1, K, n2, K))."""
    matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    block = contract(f1.jac, f2.jac, full)
    for name in f1.patches:
        term = _factored_block(
            f1.patches[name], f1.grads[name], f2.patches[name], f2.grads[name], matmul,
            jnp.concatenate, full,
        )  # fmt: skip
        block = block + (term if full else term / _n_traced(f1))
    return block


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


MIN_CACHED_CHUNK = 32  # smaller chunks than this: recompute columns in bigger ones instead


def plan_chunks(
    n_rows: int,
    n_cols: int,
    bytes_per_image: int,
    max_memory_gb: float,
    working_bytes_per_image: int = 0,
) -> ChunkPlan:
    """Largest chunks that fit the budget. A chunk of c images takes c * b bytes (b per image)
    and, while it is computed, c * w of working memory (w = max(b, working_bytes_per_image)).
    When every column chunk plus one row chunk being computed fits with chunks of at least
    MIN_CACHED_CHUNK images, every chunk is computed once; otherwise a row chunk is held while
    column chunks are recomputed (c * (2 b + w))."""
    budget = max_memory_gb * 2**30
    b, w = bytes_per_image, max(bytes_per_image, working_bytes_per_image)
    chunk = int(budget // (2 * b + w))
    if chunk < 1:
        need = (2 * b + w) / 2**30
        raise ValueError(
            f"one image's Jacobian needs about {need:.3g} GB of a {max_memory_gb:g} "
            f"GB budget with working memory; raise --max_memory_gb above {need:.3g}"
        )
    cached_chunk = int((budget - n_cols * b) // (b + w))
    if cached_chunk >= min(MIN_CACHED_CHUNK, n_rows, n_cols):
        return ChunkPlan(min(cached_chunk, max(n_rows, n_cols)), True)
    return ChunkPlan(min(chunk, max(n_rows, n_cols)), False)


def _gram_host(jac1: hk.Params, jac2: hk.Params, full: bool = False) -> np.ndarray:
    """contract() with the host's BLAS (zero-copy views of CPU arrays): XLA's CPU dot is about
    3x slower than BLAS for these wide (n, P) x (P, n) products."""
    leaves1, leaves2 = jax.tree.leaves(jac1), jax.tree.leaves(jac2)
    n1, k = leaves1[0].shape[:2]
    n2 = leaves2[0].shape[0]
    rows1, rows2 = (n1 * k, n2 * k) if full else (n1, n2)  # full: each (example, logit) a row
    block = np.zeros((rows1, rows2), np.float32)
    for a, b in zip(leaves1, leaves2, strict=True):
        block += to_host(a).reshape(rows1, -1) @ to_host(b).reshape(rows2, -1).T
    return block.reshape(n1, k, n2, k) if full else block / k


def _factor_gram_host(f1: Factors, f2: Factors, full: bool = False) -> np.ndarray:
    """contract_factors() with the host's BLAS."""
    block = _gram_host(f1.jac, f2.jac, full)
    for name in f1.patches:
        term = _factored_block(
            *(to_host(a) for a in (f1.patches[name], f1.grads[name])),
            *(to_host(a) for a in (f2.patches[name], f2.grads[name])),
            np.matmul, np.concatenate, full,
        )  # fmt: skip
        block += term if full else term / _n_traced(f1)
    return block


class KernelPlan(NamedTuple):
    """How empirical_ntk computes a kernel: images per chunk, whether column chunks stay
    cached, the factored convolutions, the bytes one image's Factors take, and the logits
    traced per pass over the images (see plan_kernel)."""

    chunk_size: int
    cache_columns: bool
    factored: tuple[ConvLayer, ...]
    bytes_per_image: int
    logit_group: int = 1


def _plan_pass(layers, n_params, n_traced, n_rows, n_cols, budget, factor_convs):
    """(factored layers, bytes per image, ChunkPlan) of one pass tracing n_traced logits."""
    factored = factored_layers(layers, n_traced, factor_convs)
    floats = n_traced * n_params + sum(
        layer.positions * (layer.patch + n_traced * layer.channels)
        - n_traced * layer.patch * layer.channels
        for layer in factored
    )
    # working memory, roughly: each convolution's patches and output, and the other activations
    # as large as its output, per traced logit
    working = (
        4 * n_traced * sum(layer.positions * (layer.patch + 2 * layer.channels) for layer in layers)
    )
    return factored, 4 * floats, plan_chunks(n_rows, n_cols, 4 * floats, budget, working)


def plan_kernel(
    model: hk.TransformedWithState,
    params: hk.Params,
    net_state: hk.State,
    x1: np.ndarray,
    x2: np.ndarray,
    class_index: int = -1,
    chunk_size: int | None = None,
    max_memory_gb: float | None = None,
    factor_convs: str = "auto",
    full: bool = False,
) -> KernelPlan:
    """The KernelPlan of empirical_ntk(x1, x2) (pass x2 = x1 for the square kernel).

    The averaged kernel (class_index -1) traces all C logits in one pass when every image's
    Factors then fit the budget. Otherwise it sums passes over groups of G logits (G the largest
    divisor of C whose pass keeps every column chunk, else 1): each pass repeats the forward
    pass, but none recomputes column chunks, whose Jacobians would cost C backward passes each
    time. The full kernel (every pair of logits) always traces all C."""
    n_logits = _n_logits(model, params, net_state, x1[:1])
    layers = conv_layers(model, params, net_state, x1.shape[1:])
    budget = max_memory_gb or default_memory_gb()
    n_params = tree_size(params)
    groups = [1] if class_index >= 0 else [n_logits]
    if class_index < 0 and not full:
        groups += [g for g in range(n_logits - 1, 0, -1) if n_logits % g == 0]
    for group in groups:  # the first that keeps its column chunks, else one logit per pass
        try:
            factored, bytes_per_image, chunks = _plan_pass(
                layers, n_params, group, len(x1), len(x2), budget, factor_convs
            )
        except ValueError:  # not one image's Jacobians for `group` logits fit: fewer logits
            if group == groups[-1]:
                raise
            continue
        if chunks.cache_columns:
            break
    chunk = chunk_size or chunks.chunk_size
    longest = max(len(x1), len(x2))
    chunk = -(-longest // -(-longest // chunk))  # equal chunks: little padding in the last one
    chunk = padded_size(chunk)  # each chunk is split evenly over the devices
    return KernelPlan(chunk, chunks.cache_columns, factored, bytes_per_image, group)


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
    factor_convs: str = "auto",
    full: bool = False,
) -> np.ndarray:
    """K(x1, x2) (N1, N2) float64 as defined in the module docstring; K(x1, x1) when x2 is None.
    With `full` (class_index -1), the full kernel (C N1, C N2) of every pair of logits, in the
    logit-major layout of the module docstring.

    Each row chunk's Jacobian is computed once; column chunks are computed once and kept when
    they fit in `max_memory_gb` (default: default_memory_gb()), else recomputed per row chunk.
    The averaged kernel may sum passes over groups of logits instead (plan_kernel). The square
    kernel computes only blocks (i, j) with j >= i and mirrors them. Convolutions chosen by
    factored_layers(factor_convs) enter through their factors (Factors), not their Jacobians:
    the same kernel, with less memory and arithmetic."""
    square = x2 is None
    x2 = x1 if square else x2
    if full and class_index >= 0:
        raise ValueError("the full kernel takes every logit: use class index -1 with it")
    plan = plan_kernel(
        model, params, net_state, x1, x2, class_index, chunk_size, max_memory_gb, factor_convs,
        full,
    )  # fmt: skip
    n_logits = _n_logits(model, params, net_state, x1[:1])
    if class_index >= 0:
        selections = [class_index]
    else:
        step = plan.logit_group
        selections = [(start, start + step) for start in range(0, n_logits, step)]
    params, net_state = replicate((params, net_state))
    starts1, starts2 = range(0, len(x1), plan.chunk_size), range(0, len(x2), plan.chunk_size)
    n_blocks = sum(1 for i in starts1 for j in starts2 if not square or j >= i)
    bar = progress_bar(total=n_blocks * len(selections), desc="kernel blocks", enabled=progress)
    # each pass averages over its own group of logits; the groups are equal (divisors of C),
    # so the mean of the passes is the average over all C
    kernel = sum(
        _kernel_pass(
            model, params, net_state, x1, x2, square, plan, selection, full, bar, describe,
            f"logits {selection[0]}:{selection[1]} " if len(selections) > 1 else "",
        )
        for selection in selections
    ) / len(selections)  # fmt: skip
    bar.close()
    if square:  # the diagonal blocks are symmetric up to float32 rounding; make it exact
        kernel = 0.5 * (kernel + _swap(kernel))
    if full:  # (N1, C, N2, C) -> logit-major (C N1, C N2)
        kernel = kernel.transpose(1, 0, 3, 2).reshape(n_logits * len(x1), n_logits * len(x2))
    return kernel


def _kernel_pass(
    model, params, net_state, x1, x2, square, plan, selection, full, bar, describe, label
) -> np.ndarray:
    """The blocks of empirical_ntk for one selection of logits (a class index, or a (start,
    stop) range averaged over): (N1, N2), or (N1, C, N2, C) with `full`. `label` prefixes the
    blocks' descriptions."""
    chunk = plan.chunk_size
    jacobian_fn = make_sharded_factor_fn(model, selection, plan.factored, mesh())
    gram = _factor_gram_host if jax.default_backend() == "cpu" else contract_factors
    gram = functools.partial(gram, full=full)

    def jacobian(x: np.ndarray, start: int) -> Factors:
        """Factors of images start..start+chunk, split over the devices; a short last chunk is
        padded to the chunk size (one compiled shape) and the padding sliced off."""
        images = x[start : start + chunk]
        n_real = len(images)
        if n_real < chunk:
            images = np.concatenate([images, np.repeat(images[:1], chunk - n_real, axis=0)])
        jac = jacobian_fn(params, net_state, *shard_batch(images))
        return jac if n_real == chunk else jax.tree.map(lambda leaf: leaf[:n_real], jac)

    columns: dict[int, Factors] = {}
    n_traced = selection[1] - selection[0] if isinstance(selection, tuple) else 1
    shape = (len(x1), n_traced, len(x2), n_traced) if full else (len(x1), len(x2))
    kernel = np.zeros(shape, np.float64)
    for i in range(0, len(x1), chunk):
        row = columns[i] if square and i in columns else jacobian(x1, i)
        if square and plan.cache_columns:
            columns[i] = row
        for j in range(0, len(x2), chunk):
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
            rows, cols = slice(i, i + chunk), slice(j, j + chunk)
            # (n1, n2), or (n1, C, n2, C): the example axes are 0 and -2
            kernel[(rows, slice(None), cols) if full else (rows, cols)] = block
            if square and j != i:
                kernel[(cols, slice(None), rows) if full else (cols, rows)] = _swap(block)
            if describe is not None:
                describe(f"{label}block rows {i}:{i + len(block)} cols {j}:{j + block.shape[-2]}")
            bar.update()
    return kernel


def _swap(block: np.ndarray) -> np.ndarray:
    """K(x2, x1) from K(x1, x2): the transpose, or for a full block (n1, C, n2, C) the swap of
    (example, logit) pairs."""
    return block.transpose(2, 3, 0, 1) if block.ndim == 4 else block.T


TANGENT_BATCH = 10  # (m, k) pairs per vectorised JVP: bounds activation memory


def _selected_logits(class_index: int, n_logits: int) -> jax.Array:
    """The logits a kernel traces over: [c] for class_index c, all C for -1."""
    return jnp.arange(n_logits) if class_index < 0 else jnp.array([class_index])


KEPT_JACOBIAN_BYTES = 2**30  # kernel_features keeps a support set's Jacobians up to this size


def kernel_features(
    model: hk.TransformedWithState,
    params: hk.Params,
    net_state: hk.State,
    x: np.ndarray,
    coefficients: np.ndarray,
    class_index: int = -1,
    kept: list | None = None,
) -> hk.Params:
    """Parameter-space features of the kernel on images x (N, ...) with coefficients A (N, M):

        T[m, k] = J_k(x)^T A[:, m] = sum_j A[j, m] grad_theta f_k(x_j)

    for each traced logit k (K = 1 for class_index c, K = C for -1). Leaves are shaped
    (M, K, *param_shape). Computed from per-example Jacobians in memory-bounded chunks of
    images; K(z, x) A = kernel_times(T, z) then never needs the Jacobians of x again.

    `kept`: a list shared by the calls on the same x and parameters (a support set's predictors:
    eigen_features.py computes 16 and more). When all of x's Jacobians fit in one chunk and in
    KEPT_JACOBIAN_BYTES, the first call stores them there and later calls reuse them: the same
    numbers, without a Jacobian pass per predictor."""
    n_traced = 1 if class_index >= 0 else _n_logits(model, params, net_state, x[:1])
    bytes_per_image = 4 * tree_size(params) * n_traced
    chunk = plan_chunks(len(x), 0, bytes_per_image, default_memory_gb()).chunk_size
    keep = kept is not None and chunk >= len(x) and bytes_per_image * len(x) <= KEPT_JACOBIAN_BYTES
    jacobian_fn = make_jacobian_fn(model, class_index)
    if keep:  # one chunk: all of x's Jacobians, made by the first call, reused by the next
        if not kept:
            kept.append(jacobian_fn(params, net_state, jnp.asarray(x)))
        return _contract_coefficients(kept[0], jnp.asarray(coefficients))
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
    """The model's number of logits, from shapes only (no forward pass is run)."""
    logits, _ = jax.eval_shape(lambda x: model.apply(params, net_state, x, False), x)
    return int(logits.shape[-1])
