"""Evaluation: clean accuracy and accuracy under the evaluation attacks (SPEC):
L-inf PGD, 100 steps of 2*eps/100, random start; L2 PGD, eps 0.25, 100 steps of 0.01.
BatchNorm runs in inference mode. Test batches of 100.
"""

from __future__ import annotations

from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from attacks import EVAL_PGD_STEPS, L2_EPS, L2_STEP, pgd
from data import padded_batches
from dynamics import Dynamics, components, forward

TEST_BATCH = 100


def attack_settings(eps_linf: float) -> dict[str, dict]:
    """PGD settings of the evaluation attacks, by name."""
    return {
        "linf": {
            "norm": "linf",
            "eps": eps_linf,
            "step_size": 2 * eps_linf / EVAL_PGD_STEPS,
            "n_steps": EVAL_PGD_STEPS,
        },
        "l2": {"norm": "l2", "eps": L2_EPS, "step_size": L2_STEP, "n_steps": EVAL_PGD_STEPS},
    }


def make_attack_fn(model: hk.TransformedWithState, dynamics: Dynamics, **pgd_kwargs) -> Callable:
    """Jitted attack(w, theta_t, net_state, x, y, key) -> adversarial x."""
    dynamics = dynamics._replace(bn_train=False)

    def attack(w, theta_t, net_state, x, y, key):
        def logits_fn(x_in):
            return forward(model, dynamics, w, theta_t, net_state, x_in)[0]

        return pgd(logits_fn, x, y, key, **pgd_kwargs)

    return jax.jit(attack)


def make_components_fn(model: hk.TransformedWithState, dynamics: Dynamics) -> Callable:
    """Jitted fn(w, theta_t, net_state, x) -> (f, df); see dynamics.components."""
    dynamics = dynamics._replace(bn_train=False)
    return jax.jit(
        lambda w, theta_t, net_state, x: components(model, dynamics, w, theta_t, net_state, x)
    )


def make_logits_fn(model: hk.TransformedWithState, dynamics: Dynamics) -> Callable:
    """Jitted fn(w, theta_t, net_state, x) -> logits, BatchNorm in inference mode."""
    dynamics = dynamics._replace(bn_train=False)
    return jax.jit(
        lambda w, theta_t, net_state, x: forward(model, dynamics, w, theta_t, net_state, x)[0]
    )


def evaluate(
    model: hk.TransformedWithState,
    dynamics: Dynamics,
    w: hk.Params,
    theta_t: hk.Params | None,
    net_state: hk.State,
    x: np.ndarray,
    y: np.ndarray,
    key: jax.Array,
    *,
    eps_linf: float,
    attacks: tuple[str, ...] = ("linf", "l2"),
    description: str = "evaluate",
) -> dict[str, float]:
    """Accuracy (fraction) on clean images and under each attack in `attacks`."""
    logits_fn = make_logits_fn(model, dynamics)
    settings = attack_settings(eps_linf)
    attack_fns = {name: make_attack_fn(model, dynamics, **settings[name]) for name in attacks}
    correct = {name: 0 for name in ("clean", *attacks)}
    n_batches = -(-len(x) // TEST_BATCH)
    bar = tqdm(
        padded_batches(x, y, TEST_BATCH),
        total=n_batches,
        desc=description,
        leave=False,
        disable=None,
    )
    for i, (xb, yb, n_real) in enumerate(bar):
        batch_key = jax.random.fold_in(key, i)
        inputs = {"clean": xb}
        for j, (name, attack_fn) in enumerate(attack_fns.items()):
            inputs[name] = attack_fn(
                w, theta_t, net_state, xb, yb, jax.random.fold_in(batch_key, j)
            )
        for name, x_in in inputs.items():
            hits = jnp.argmax(logits_fn(w, theta_t, net_state, x_in), -1) == yb
            correct[name] += int(np.sum(np.asarray(hits)[:n_real]))
    bar.close()
    return {name: count / len(x) for name, count in correct.items()}
