"""Small models and inputs shared by the numerical tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models import get_model, init_model


def small_model(name: str = "cnn_small", n_classes: int = 10, image_shape=(8, 8, 1), seed=0):
    model = get_model(name, n_classes)
    params, net_state = init_model(model, jax.random.PRNGKey(seed), image_shape)
    return model, params, net_state


def random_images(n: int, image_shape=(8, 8, 1), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *image_shape)).astype(np.float32)


def warm_bn_state(model, params, net_state, x):
    """Run a few training-mode passes so BatchNorm running statistics are not trivial."""
    for _ in range(3):
        _, net_state = model.apply(params, net_state, jnp.asarray(x), True)
    return net_state


def random_delta(params, scale: float = 0.05, seed: int = 1):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noise = [scale * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, noise)
