"""NTK eigen-features in parameter space and images that excite them (Loo et al., Sec. 5).

For a class kernel K_c (N, N) on images x_1..x_N and a coefficient vector a (an eigenvector u
of K_c, or the kernel-regression weights K_c^-1 y_c), the parameter-space feature is

    v = sum_j a_j grad_theta f_c(x_j) = J_c^T a.

An image z, starting at 0.5 grey, is moved by signed-gradient steps (clipped to [0, 1]) to
maximise ("pos") or minimise ("neg") cos(grad_theta f_c(z), v).
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from ntk_evolution.kernels.ntk import kernel_features
from ntk_evolution.kernels.regression import regression_coefficients

FEATURE_STEPS = 600
FEATURE_STEP_SIZE = 0.001


def top_eigenvectors(kernel: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n largest eigenvalues of a symmetric kernel and their eigenvectors (N, n)."""
    eigenvalues, eigenvectors = np.linalg.eigh(kernel)
    order = np.argsort(eigenvalues)[::-1][:n]
    return eigenvalues[order], eigenvectors[:, order]


def regression_weights(kernel: np.ndarray, labels: np.ndarray, class_index: int) -> np.ndarray:
    """K^-1 y_c for the one-hot target of class c, with a ridge of 1e-6 * mean(diag K) so that a
    singular kernel still gives an answer."""
    target = (labels == class_index).astype(np.float64)[:, None]
    return regression_coefficients(kernel, target, 1e-6)[:, 0]


def parameter_features(
    model: hk.TransformedWithState,
    params: hk.Params,
    net_state: hk.State,
    images: np.ndarray,
    class_index: int,
    coefficients: np.ndarray,
) -> hk.Params:
    """v_k = J_c^T a_k for each column a_k of `coefficients` (N, K): a pytree whose leaves have a
    leading axis of K (ntk.kernel_features of the class-c kernel)."""
    features = kernel_features(model, params, net_state, images, coefficients, class_index)
    return jax.tree.map(lambda f: f[:, 0], features)


def feature_cosine(
    model: hk.TransformedWithState,
    params: hk.Params,
    net_state: hk.State,
    image: jax.Array,
    class_index: int,
    feature: hk.Params,
) -> jax.Array:
    """cos(grad_theta f_c(image), feature) for one image (H, W, C)."""

    def f_c(p):
        logits, _ = model.apply(p, net_state, image[None], False)
        return logits[0, class_index]

    grad = jax.grad(f_c)(params)
    dot = sum(
        jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(feature), strict=True)
    )
    norm_g = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grad)))
    norm_v = jnp.sqrt(sum(jnp.vdot(v, v) for v in jax.tree.leaves(feature)))
    return dot / (norm_g * norm_v + 1e-30)


def optimise_feature_images(
    model: hk.TransformedWithState,
    params: hk.Params,
    net_state: hk.State,
    image_shape: tuple[int, int, int],
    class_index: int,
    features: hk.Params,
    signs: np.ndarray,
    n_steps: int = FEATURE_STEPS,
    step_size: float = FEATURE_STEP_SIZE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each feature k (leading axis of `features`), an image that maximises (sign +1) or
    minimises (sign -1) the cosine, by `n_steps` signed-gradient steps from 0.5 grey; all
    images in one jitted loop. Returns the images (K, H, W, C) and their final cosines (K,)."""
    n = len(signs)

    def cosine(image, feature):
        return feature_cosine(model, params, net_state, image, class_index, feature)

    @jax.jit
    def run(features, signs):
        def step(_, images):
            grads = jax.vmap(jax.grad(cosine))(images, features)
            moved = images + step_size * signs[:, None, None, None] * jnp.sign(grads)
            return jnp.clip(moved, 0.0, 1.0)

        grey = jnp.full((n, *image_shape), 0.5, jnp.float32)
        images = jax.lax.fori_loop(0, n_steps, step, grey)
        return images, jax.vmap(cosine)(grey, features), jax.vmap(cosine)(images, features)

    images, start, end = run(features, jnp.asarray(signs, jnp.float32))
    return np.asarray(images), np.asarray(start), np.asarray(end)
