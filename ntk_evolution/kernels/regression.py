"""Kernel regression with neural tangent kernels (Tsilivis & Kempe 2022): the predictor, its
eigen-components, and the two kernels it is built on.

For a support set X (N images) with one-hot targets Y (N, C) and a kernel k:

    F(z)   = K(z, X) (K(X, X) + r I)^-1 Y                       the kernel-regression predictor
    F_i(z) = K(z, X) u_i u_i^T Y / (lambda_i + r)                its i-th eigen-component

where K(X, X) = sum_i lambda_i u_i u_i^T (eigenvalues in decreasing order) and the ridge r is
`ridge` times the mean of diag K(X, X). The components sum to F. Kernels:

- `empirical`: the empirical NTK of a network (ntk.py), at a checkpoint or at initialisation;
  K(z, X) A is a Jacobian-vector product with the features J(X)^T A (ntk.kernel_features).
- `relu_ntk`: the infinite-width NTK of a fully connected ReLU network in the NTK
  parameterisation, in closed form (arc-cosine recursion, `relu_ntk`).
- `cntk`: the infinite-width NTK of a convolutional ReLU network (3x3 convolutions, global
  average pooling), in closed form over pairs of pixel positions (`cntk`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from ntk_evolution.kernels.ntk import empirical_ntk, kernel_features, kernel_times, make_jacobian_fn

RELU_W_STD = math.sqrt(2.0)
RELU_B_STD = 0.1


def relu_ntk(
    x1: jax.Array,
    x2: jax.Array,
    depth: int = 2,
    w_std: float = RELU_W_STD,
    b_std: float = RELU_B_STD,
) -> jax.Array:
    """Infinite-width NTK Theta(x1, x2) (n1, n2) of a ReLU MLP with `depth` hidden layers, every
    dense layer z = (w_std / sqrt(fan_in)) W h + b_std b with W, b ~ N(0, 1) (NTK
    parameterisation), one output. With Sigma_0 = w_std^2 x.x' / d + b_std^2 and Theta_0 =
    Sigma_0, each hidden layer maps, for rho = Sigma(x, x') / sqrt(Sigma(x, x) Sigma(x', x'))
    and t = arccos(rho):

        Sigma'   = w_std^2 sqrt(Sigma(x, x) Sigma(x', x')) (sin t + (pi - t) cos t) / (2 pi)
                   + b_std^2
        Sigma'_d = w_std^2 (pi - t) / (2 pi)                    (derivative of the ReLU)
        Theta'   = Sigma' + Sigma'_d Theta

    Inputs are flattened per example; float32, or float64 for float64 inputs with x64 enabled.
    Differentiable in both arguments."""
    dtype = jnp.promote_types(jnp.result_type(x1, x2), jnp.float32)
    a = jnp.reshape(x1, (x1.shape[0], -1)).astype(dtype)
    b = jnp.reshape(x2, (x2.shape[0], -1)).astype(dtype)
    dim = a.shape[1]
    cross = w_std**2 * (a @ b.T) / dim + b_std**2
    diag1 = w_std**2 * jnp.sum(a * a, axis=1) / dim + b_std**2
    diag2 = w_std**2 * jnp.sum(b * b, axis=1) / dim + b_std**2
    theta = cross
    for _ in range(depth):
        value, derivative = _relu_expectations(cross, diag1[:, None], diag2[None, :])
        cross = w_std**2 * value + b_std**2
        theta = cross + w_std**2 * derivative * theta
        # E[relu(u)^2] = Sigma(x, x) / 2
        diag1 = w_std**2 * diag1 / 2 + b_std**2
        diag2 = w_std**2 * diag2 / 2 + b_std**2
    return theta


def _relu_expectations(cross, var1, var2):
    """For a centred Gaussian pair (u, u') with covariance cross and variances var1, var2:
    E[relu(u) relu(u')] and E[relu'(u) relu'(u')] (the arc-cosine kernels of degree 1, 0)."""
    norms = jnp.sqrt(var1 * var2)
    rho = jnp.clip(cross / norms, -1.0 + 1e-7, 1.0 - 1e-7)
    angle = jnp.arccos(rho)
    value = norms * (jnp.sin(angle) + (jnp.pi - angle) * rho) / (2 * jnp.pi)
    return value, (jnp.pi - angle) / (2 * jnp.pi)


OFFSETS = [(i, j) for i in range(3) for j in range(3)]  # a 3x3 patch, on the padded image


def _patch_mean(m: jax.Array) -> jax.Array:
    """A(M)[p, p'] = (1/9) sum_a M[p + a, p' + a] over the 3x3 offsets a, with zeros outside
    the image (SAME padding), for M (..., H, W, H, W) indexed by two positions."""
    h, w = m.shape[-4], m.shape[-3]
    pad = [(0, 0)] * (m.ndim - 4) + [(1, 1)] * 4
    m = jnp.pad(m, pad)
    return sum(m[..., i : i + h, j : j + w, i : i + h, j : j + w] for i, j in OFFSETS) / 9.0


def _patch_mean_diag(v: jax.Array) -> jax.Array:
    """_patch_mean on the diagonal: (1/9) sum_a v[p + a] for per-position variances (..., H, W)."""
    h, w = v.shape[-2], v.shape[-1]
    v = jnp.pad(v, [(0, 0)] * (v.ndim - 2) + [(1, 1)] * 2)
    return sum(v[..., i : i + h, j : j + w] for i, j in OFFSETS) / 9.0


def cntk(
    x1: jax.Array,
    x2: jax.Array,
    depth: int = 2,
    w_std: float = RELU_W_STD,
    b_std: float = RELU_B_STD,
) -> jax.Array:
    """Infinite-width NTK Theta(x1, x2) (n1, n2) of a convolutional ReLU network: `depth`
    layers of 3x3 convolution (stride 1, SAME zero padding) and ReLU, global average pooling,
    one dense output; every layer z = (w_std / sqrt(fan_in)) W * h + b_std b with W, b ~ N(0, 1)
    (NTK parameterisation, as relu_ntk). Images (n, H, W, C). Over pairs of positions p, p'
    (Arora et al. 2019), with A the 3x3 patch mean of _patch_mean and (E, E') the ReLU
    expectations of _relu_expectations of the layer's Sigma:

        S         = x[p] . x'[p'] / C
        Sigma_1   = w_std^2 A(S) + b_std^2,               Theta_1 = Sigma_1
        Sigma_l+1 = w_std^2 A(E_l) + b_std^2,             Theta_l+1 = w_std^2 A(E'_l Theta_l)
                                                                      + Sigma_l+1
        output:     Theta = w_std^2 mean_pp' (E'_d Theta_d) + w_std^2 mean_pp' E_d + b_std^2

    Memory: n1 n2 (H W)^2 numbers per array (digits: 4096 per pair; 32x32 images: 10^6), so
    callers go through cntk_blocked. Differentiable in both arguments."""
    dtype = jnp.promote_types(jnp.result_type(x1, x2), jnp.float32)
    a, b = x1.astype(dtype), x2.astype(dtype)
    channels = a.shape[-1]
    s = jnp.einsum("ihwc,jxyc->ijhwxy", a, b) / channels
    var1 = w_std**2 * _patch_mean_diag(jnp.sum(a * a, -1) / channels) + b_std**2
    var2 = w_std**2 * _patch_mean_diag(jnp.sum(b * b, -1) / channels) + b_std**2
    sigma = w_std**2 * _patch_mean(s) + b_std**2
    theta = sigma
    for layer in range(depth):
        v1 = var1[:, None, :, :, None, None]
        v2 = var2[None, :, None, None, :, :]
        value, derivative = _relu_expectations(sigma, v1, v2)
        if layer == depth - 1:
            pooled = jnp.mean(derivative * theta + value, axis=(2, 3, 4, 5))
            return w_std**2 * pooled + b_std**2
        sigma = w_std**2 * _patch_mean(value) + b_std**2
        theta = w_std**2 * _patch_mean(derivative * theta) + sigma
        # E[relu(u)^2] = var / 2 at every position
        var1 = w_std**2 * _patch_mean_diag(var1 / 2) + b_std**2
        var2 = w_std**2 * _patch_mean_diag(var2 / 2) + b_std**2
    raise ValueError("depth must be at least 1")


def cntk_network(width: int, depth: int = 2) -> hk.TransformedWithState:
    """The finite network whose NTK tends to cntk as `width` grows: `depth` 3x3 SAME
    convolutions of `width` channels with ReLU, global average pooling, one dense output; NTK
    parameterisation (weights and biases N(0, 1), scaled by w_std / sqrt(fan_in) and b_std).
    apply(params, state, x, is_training) like this project's models."""

    def forward(x, is_training):
        del is_training
        h, channels = x, x.shape[-1]
        normal = hk.initializers.RandomNormal(1.0)
        for layer in range(depth):
            w = hk.get_parameter(f"w{layer}", (3, 3, channels, width), init=normal)
            b = hk.get_parameter(f"b{layer}", (width,), init=normal)
            h = jax.lax.conv_general_dilated(
                h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            h = jax.nn.relu(h * RELU_W_STD / math.sqrt(9 * channels) + RELU_B_STD * b)
            channels = width
        v = hk.get_parameter("v", (width, 1), init=normal)
        bias = hk.get_parameter("bias", (1,), init=normal)
        return h.mean(axis=(1, 2)) @ v * RELU_W_STD / math.sqrt(width) + RELU_B_STD * bias

    return hk.without_apply_rng(hk.transform_with_state(forward))


CNTK_BLOCK = 16  # images per side of one cntk() call: 16^2 pairs of (H W)^2 numbers


def cntk_blocked(x1: jax.Array, x2: jax.Array, depth: int = 2) -> jax.Array:
    """cntk(x1, x2) (n1, n2), one block of CNTK_BLOCK x CNTK_BLOCK images at a time (nested
    scans with rematerialisation: memory for one block pair, under autodiff too).
    Differentiable in both arguments."""

    def blocks(x):
        n = x.shape[0]
        count = -(-n // CNTK_BLOCK)
        padded = jnp.pad(x, [(0, count * CNTK_BLOCK - n)] + [(0, 0)] * (x.ndim - 1))
        return padded.reshape(count, CNTK_BLOCK, *x.shape[1:])

    @jax.checkpoint
    def pair(a, b):
        return cntk(a, b, depth)

    rows = jax.lax.map(lambda a: jax.lax.map(lambda b: pair(a, b), blocks(x2)), blocks(x1))
    # (row blocks, column blocks, CNTK_BLOCK, CNTK_BLOCK) -> (n1, n2)
    full = rows.transpose(0, 2, 1, 3).reshape(rows.shape[0] * CNTK_BLOCK, -1)
    return full[: x1.shape[0], : x2.shape[0]]


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[labels]


def ridge_value(kernel: np.ndarray, ridge: float) -> float:
    """The ridge r added to the diagonal: `ridge` times the mean of diag K."""
    return ridge * float(np.mean(np.diag(kernel)))


def regression_coefficients(kernel: np.ndarray, targets: np.ndarray, ridge: float) -> np.ndarray:
    """A = (K + r I)^-1 Y (N, C), so that F(z) = K(z, X) A."""
    r = ridge_value(kernel, ridge)
    return np.linalg.solve(kernel + r * np.eye(len(kernel)), targets)


def kernel_predictor(
    kernel_fn: Callable, support: jax.Array, targets: jax.Array, ridge: float
) -> Callable[[jax.Array], jax.Array]:
    """z -> F(z) = k(z, X) (k(X, X) + r I)^-1 Y in JAX (r as in ridge_value), differentiable in
    the support images X as well as in z: robustify_dataset.py optimises X through it. The
    solve happens once, here."""
    gram = kernel_fn(support, support)
    r = ridge * jnp.mean(jnp.diag(gram))
    coefficients = jnp.linalg.solve(gram + r * jnp.eye(len(gram), dtype=gram.dtype), targets)
    return lambda z: kernel_fn(z, support) @ coefficients


def jacobian_kernel_fn(model, params, net_state, class_index: int) -> Callable:
    """k(x1, x2), the empirical NTK of ntk.py from explicit per-example Jacobians (n, K, P):
    differentiable in the images (second order), memory O((n1 + n2) K P); for small networks
    and support sets, where the kernel itself has to be differentiated."""
    jacobian_fn = make_jacobian_fn(model, class_index)

    def flat(x):
        leaves = jax.tree.leaves(jacobian_fn(params, net_state, x))
        return jnp.concatenate([leaf.reshape(*leaf.shape[:2], -1) for leaf in leaves], axis=2)

    def kernel_fn(x1, x2):
        j1, j2 = flat(x1), flat(x2)
        return jnp.einsum("ikp,jkp->ij", j1, j2) / j1.shape[1]

    return kernel_fn


class Eigen(NamedTuple):
    """K(X, X) = U diag(values) U^T, values in decreasing order; `projections` = U^T Y / (values +
    r) (N, C): component i has coefficients u_i projections[i]."""

    values: np.ndarray
    vectors: np.ndarray
    projections: np.ndarray


def eigen_decomposition(kernel: np.ndarray, targets: np.ndarray, ridge: float) -> Eigen:
    values, vectors = np.linalg.eigh(kernel)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    projections = (vectors.T @ targets) / (values + ridge_value(kernel, ridge))[:, None]
    return Eigen(values, vectors, projections)


def component_factors(eigen: Eigen, components: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The predictor sum_{i in components} F_i as K(z, X) B P, with B = U[:, components] (N, m)
    and P = projections[components] (m, C); or, when m > C, B = U_S P_S (N, C) and P = I:
    fewer columns for K(z, X) B."""
    vectors, projections = eigen.vectors[:, components], eigen.projections[components]
    if len(components) > projections.shape[1]:
        return vectors @ projections, np.eye(projections.shape[1])
    return vectors, projections


class SupportKernel(NamedTuple):
    """A kernel on a support set: the images X (N, H, W, C), labels (N,), K(X, X) (N, N) float64,
    and `operator(B)` -> (fn, operand) with fn(z, operand) = K(z, X) B (n, m) for B (N, m),
    jax-traceable (the arrays travel as an argument, not as constants of a compiled function);
    `cross(z)` -> K(z, X) (n, N) float64 for NumPy images z."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    kernel: np.ndarray
    operator: Callable[[np.ndarray], tuple[Callable, Any]]
    cross: Callable[[np.ndarray], np.ndarray]
    description: str


def closed_form_support_kernel(
    images, labels, indices, kernel_fn: Callable, description: str
) -> SupportKernel:
    """The support set under a closed-form kernel kernel_fn(x1, x2) (n1, n2), a differentiable
    JAX function (relu_ntk, cntk_blocked with their depth bound)."""
    x = jnp.asarray(images)
    compiled = jax.jit(kernel_fn)
    kernel = np.asarray(compiled(x, x), np.float64)
    kernel = 0.5 * (kernel + kernel.T)  # exactly symmetric (blocks can round apart)

    def apply(z, operand):
        support, b = operand
        return kernel_fn(z, support) @ b

    def operator(coefficients):
        return apply, (x, jnp.asarray(coefficients, jnp.float32))

    def cross(z):
        return np.asarray(compiled(jnp.asarray(z), x), np.float64)

    return SupportKernel(images, labels, indices, kernel, operator, cross, description)


def relu_support_kernel(images, labels, indices, depth: int) -> SupportKernel:
    """The support set under the ReLU MLP's NTK (relu_ntk)."""
    description = f"infinite-width ReLU MLP NTK, depth {depth}"
    kernel_fn = functools.partial(relu_ntk, depth=depth)
    return closed_form_support_kernel(images, labels, indices, kernel_fn, description)


def cntk_support_kernel(images, labels, indices, depth: int) -> SupportKernel:
    """The support set under the convolutional NTK (cntk, computed by cntk_blocked)."""
    description = f"infinite-width convolutional NTK (CNTK), depth {depth}"
    kernel_fn = functools.partial(cntk_blocked, depth=depth)
    return closed_form_support_kernel(images, labels, indices, kernel_fn, description)


def empirical_support_kernel(
    model, params, net_state, images, labels, indices, class_index, kernel=None, description=""
) -> SupportKernel:
    if kernel is None:
        kernel = empirical_ntk(model, params, net_state, images, class_index=class_index)

    def apply(z, operand):
        return kernel_times(model, *operand, z, class_index=class_index)

    jacobians = []  # the support set's, kept between predictors when they fit (kernel_features)

    def operator(coefficients):
        features = kernel_features(
            model, params, net_state, images, coefficients, class_index, jacobians
        )
        return apply, (params, net_state, features)

    def cross(z):
        return empirical_ntk(
            model, params, net_state, z, images, class_index=class_index, progress=False
        )

    return SupportKernel(images, labels, indices, kernel, operator, cross, description)
