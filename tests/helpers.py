"""Small models and inputs shared by the numerical tests, and the entry scripts by name."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import analyze_kernels
import calculate_kernel
import cka
import eigen_features
import eval_and_make_adv
import ntk_attack
import robustify_dataset
import run_exp
import visualize_ntk_features
from ntk_evolution.models import get_model, init_model
from ntk_evolution.utils import run_main

# the nine NTK/CKA entry scripts' main(argv), by module name
SCRIPTS = {
    "run_exp": run_exp.main,
    "eval_and_make_adv": eval_and_make_adv.main,
    "calculate_kernel": calculate_kernel.main,
    "visualize_ntk_features": visualize_ntk_features.main,
    "analyze_kernels": analyze_kernels.main,
    "ntk_attack": ntk_attack.main,
    "eigen_features": eigen_features.main,
    "cka": cka.main,
    "robustify_dataset": robustify_dataset.main,
}


def one_line_error(main: Callable, argv: str | Sequence[str], capsys) -> str:
    """Run an entry script's main(argv) through run_main (what its __main__ does) on bad input:
    it must end with exit code 2 and one line on stderr, `error: ...`, with no traceback.
    Returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, shlex.split(argv) if isinstance(argv, str) else list(argv))
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in captured.out + captured.err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


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


def explicit_ntk(
    model, params, net_state, x1, x2, class_index: int = -1, full: bool = False
) -> np.ndarray:
    """Reference K(x1, x2) from the definition: flatten jax.jacrev per example and multiply.
    With `full`, every pair of logits, K[k N1 + i, l N2 + j] = J_k(x1_i) . J_l(x2_j). Slow: the
    test reference for ntk.py."""

    def logits_flat(flat, x_single, unravel):
        logits, _ = model.apply(unravel(flat), net_state, x_single[None], False)
        return logits[0]

    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def jac_matrix(x):
        rows = [jax.jacrev(logits_flat)(flat, xi, unravel) for xi in jnp.asarray(x)]
        return np.stack([np.asarray(r, np.float64) for r in rows])  # (n, C, P)

    j1, j2 = jac_matrix(x1), jac_matrix(x2)
    if full:
        c = j1.shape[1]
        return np.einsum("ikp,jlp->kilj", j1, j2).reshape(c * len(x1), c * len(x2))
    if class_index >= 0:
        return j1[:, class_index] @ j2[:, class_index].T
    return np.einsum("icp,jcp->ij", j1, j2) / j1.shape[1]
