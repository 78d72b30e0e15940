"""The three dynamics against their definitions (SPEC: f_lin = f(theta_t) + J (w - theta_t))."""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_delta, random_images, small_model, warm_bn_state

from ntk_evolution.dynamics import Dynamics, components, forward, loss_fn
from ntk_evolution.training import init_train_state, make_optimizer, make_train_step

LINEAR = Dynamics(linear=True)
CENTERED = Dynamics(linear=True, centering=True)


@pytest.fixture(scope="module", params=["cnn_small", "mlp_skinny"])
def setup(request):
    model, theta_t, net_state = small_model(request.param)
    x = jnp.asarray(random_images(6))
    net_state = warm_bn_state(model, theta_t, net_state, x)
    w = jax.tree.map(jnp.add, theta_t, random_delta(theta_t))
    return model, theta_t, w, net_state, x


def test_linearized_equals_standard_at_theta_t(setup):
    model, theta_t, _, net_state, x = setup
    standard, _ = forward(model, Dynamics(), theta_t, None, net_state, x)
    linear, _ = forward(model, LINEAR, theta_t, theta_t, net_state, x)
    np.testing.assert_array_equal(np.asarray(linear), np.asarray(standard))


def test_centered_is_zero_at_theta_t(setup):
    model, theta_t, _, net_state, x = setup
    centered, _ = forward(model, CENTERED, theta_t, theta_t, net_state, x)
    np.testing.assert_array_equal(np.asarray(centered), 0.0)


def test_linearized_is_f_plus_explicit_jacobian_times_delta(setup):
    model, theta_t, w, net_state, x = setup
    flat_theta, unravel = jax.flatten_util.ravel_pytree(theta_t)
    flat_delta = jax.flatten_util.ravel_pytree(w)[0] - flat_theta

    def f_flat(flat):
        return model.apply(unravel(flat), net_state, x, False)[0].reshape(-1)

    jacobian = np.asarray(jax.jacrev(f_flat)(flat_theta), np.float64)  # (N * C, P)
    expected_df = (jacobian @ np.asarray(flat_delta, np.float64)).reshape(len(x), -1)
    f0 = np.asarray(f_flat(flat_theta)).reshape(len(x), -1)

    linear, _ = forward(model, LINEAR, w, theta_t, net_state, x)
    centered, _ = forward(model, CENTERED, w, theta_t, net_state, x)
    scale = np.abs(expected_df).max()
    np.testing.assert_allclose(np.asarray(linear), f0 + expected_df, atol=1e-4 * scale + 1e-5)
    np.testing.assert_allclose(np.asarray(centered), expected_df, atol=1e-4 * scale + 1e-5)
    f, df = components(model, LINEAR, w, theta_t, net_state, x)
    np.testing.assert_allclose(np.asarray(f) + np.asarray(df), np.asarray(linear), atol=1e-5)


def test_centered_standard_dynamics_subtracts_output_at_theta_t(setup):
    model, theta_t, w, net_state, x = setup
    dynamics = Dynamics(centering=True)
    got, _ = forward(model, dynamics, w, theta_t, net_state, x)
    expected = model.apply(w, net_state, x, False)[0] - model.apply(theta_t, net_state, x, False)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)


@pytest.mark.slow
def test_linearized_loss_gradient_matches_finite_differences(setup):
    model, theta_t, w, net_state, x = setup
    y = jnp.arange(len(x)) % 10

    def loss(params):
        return loss_fn(params, model, LINEAR, theta_t, net_state, x, y)[0]

    grad = jax.grad(loss)(w)
    direction = random_delta(w, scale=1.0, seed=7)
    norm = jnp.sqrt(sum(jnp.vdot(d, d) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: d / norm, direction)
    analytic = float(
        sum(jnp.vdot(g, d) for g, d in zip(*map(jax.tree.leaves, (grad, direction)), strict=True))
    )
    h = 1e-2
    plus = loss(jax.tree.map(lambda a, d: a + h * d, w, direction))
    minus = loss(jax.tree.map(lambda a, d: a - h * d, w, direction))
    numeric = float(plus - minus) / (2 * h)
    assert abs(numeric - analytic) <= 2e-3 * max(abs(analytic), 1e-2), (numeric, analytic)


@pytest.mark.parametrize("loose_bn", [False, True])
def test_bn_state_is_frozen_in_phase2_unless_loose(loose_bn):
    model, theta_t, net_state = small_model("cnn_small")
    x = jnp.asarray(random_images(16))
    y = jnp.arange(16) % 10
    net_state = warm_bn_state(model, theta_t, net_state, x)
    before = jax.tree.map(np.asarray, net_state)
    theta_before = np.asarray(jax.tree.leaves(theta_t)[0])
    optimizer = make_optimizer(0.01)
    dynamics = Dynamics(linear=True, centering=True, bn_train=loose_bn)
    w = jax.tree.map(jnp.copy, theta_t)
    state = init_train_state(optimizer, w, theta_t, net_state)
    step = make_train_step(model, optimizer, dynamics, adversarial=False, eps=0.1)
    state, _ = step(state, x, y, jax.random.PRNGKey(0))
    changed = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.net_state), strict=True)
    ]
    assert any(changed) == loose_bn
    # w moved, theta_t did not
    assert not np.array_equal(np.asarray(jax.tree.leaves(state.w)[0]), theta_before)
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(state.theta_t)[0]), theta_before)
