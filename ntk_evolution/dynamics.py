"""The three training dynamics of the paper as one function.

With theta_t the phase-1 parameters and w the parameters being trained:

- standard:            f(x; w)
- linearized:          f_lin(x; w) = f(x; theta_t) + J(x; theta_t) (w - theta_t)
- centered linearized: J(x; theta_t) (w - theta_t)
- standard, centered:  f(x; w) - f(x; theta_t)   (`--do_standard_second --centering`)

where J(x; theta_t) = d f(x; theta) / d theta at theta_t, applied as a Jacobian-vector product.
BatchNorm uses running statistics (frozen, `bn_train=False`) or batch statistics with updates
of the running averages (`bn_train=True`, phase 1 and `--loose_bn_second`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax


class Dynamics(NamedTuple):
    """How the model is evaluated: linearized around theta_t or not, centered or not, and
    whether BatchNorm uses batch statistics (and updates its running averages)."""

    linear: bool = False
    centering: bool = False
    bn_train: bool = False


PHASE1 = Dynamics(linear=False, centering=False, bn_train=True)


def forward(
    model: hk.TransformedWithState,
    dynamics: Dynamics,
    w: hk.Params,
    theta_t: hk.Params | None,
    net_state: hk.State,
    x: jax.Array,
) -> tuple[jax.Array, hk.State]:
    """Logits (N, n_classes) of the model under `dynamics`, and the new net_state (unchanged
    unless dynamics.bn_train). theta_t may be None for uncentered standard dynamics."""
    if dynamics.linear:
        f_theta_t, jvp, new_state = _linearize(model, dynamics, w, theta_t, net_state, x)
        logits = jvp if dynamics.centering else f_theta_t + jvp
    else:
        logits, new_state = model.apply(w, net_state, x, dynamics.bn_train)
        if dynamics.centering:
            f_theta_t, _ = model.apply(theta_t, net_state, x, dynamics.bn_train)
            logits = logits - f_theta_t
    return logits, (new_state if dynamics.bn_train else net_state)


def components(
    model: hk.TransformedWithState,
    dynamics: Dynamics,
    w: hk.Params,
    theta_t: hk.Params,
    net_state: hk.State,
    x: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(f, df), the logits being f + df, or df when centered: linearized, f = f(x; theta_t) and
    df = J(x; theta_t) (w - theta_t); standard dynamics, as the original, f = f(x; w) and df = 0,
    or when centered f = f(x; theta_t) and df = f(x; w) - f(x; theta_t) (the original stores 0
    there, which loses the logits)."""
    if dynamics.linear:
        f_theta_t, df, _ = _linearize(model, dynamics, w, theta_t, net_state, x)
        return f_theta_t, df
    if not dynamics.centering:
        logits, _ = model.apply(w, net_state, x, dynamics.bn_train)
        return logits, jnp.zeros_like(logits)
    f_theta_t, _ = model.apply(theta_t, net_state, x, dynamics.bn_train)
    f_w, _ = model.apply(w, net_state, x, dynamics.bn_train)
    return f_theta_t, f_w - f_theta_t


def _linearize(model, dynamics, w, theta_t, net_state, x):
    """(f(x; theta_t), J(x; theta_t) (w - theta_t), new_state) from one jax.jvp."""

    def f(params):
        return model.apply(params, net_state, x, dynamics.bn_train)

    delta = jax.tree.map(jnp.subtract, w, theta_t)
    return jax.jvp(f, (theta_t,), (delta,), has_aux=True)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def loss_fn(
    w: hk.Params,
    model: hk.TransformedWithState,
    dynamics: Dynamics,
    theta_t: Any,
    net_state: hk.State,
    x: jax.Array,
    y: jax.Array,
) -> tuple[jax.Array, tuple[hk.State, jax.Array]]:
    """Cross-entropy of the model under `dynamics`; aux = (new net_state, logits)."""
    logits, new_state = forward(model, dynamics, w, theta_t, net_state, x)
    return cross_entropy(logits, y), (new_state, logits)
