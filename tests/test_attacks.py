"""PGD: outputs stay in the eps-ball and [0, 1], the attack really hurts, and it is seeded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_model

from ntk_evolution.attacks.evaluation import evaluate, make_attack_fn
from ntk_evolution.attacks.pgd import attack_settings, pgd
from ntk_evolution.data import load_dataset
from ntk_evolution.dynamics import PHASE1, Dynamics
from ntk_evolution.training import init_train_state, make_optimizer, make_train_step, run_epoch

EPS = 32 / 255


@pytest.fixture(scope="module")
def trained():
    """cnn_small trained benignly on digits for 8 epochs."""
    ds = load_dataset("digits")
    model, params, net_state = small_model("cnn_small")
    optimizer = make_optimizer(0.1)
    state = init_train_state(optimizer, params, None, net_state)
    step = make_train_step(model, optimizer, PHASE1, adversarial=False, eps=EPS)
    for epoch in range(8):
        state, _ = run_epoch(
            step, state, ds.x_train, ds.y_train, batch_size=128, seed=epoch,
            key=jax.random.PRNGKey(epoch), description="train",
        )  # fmt: skip
    return ds, model, state.w, state.net_state


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_output_lies_in_eps_ball_and_image_range(trained, norm):
    ds, model, params, net_state = trained
    settings = attack_settings(EPS)[norm]
    attack = make_attack_fn(model, Dynamics(), **settings)
    x, y = ds.x_test[:100], ds.y_test[:100]
    x_adv = np.asarray(attack(params, None, net_state, x, y, jax.random.PRNGKey(0)))
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).reshape(len(x), -1)
    if norm == "linf":
        assert np.abs(delta).max() <= settings["eps"] + 1e-6
    else:
        assert np.linalg.norm(delta, axis=1).max() <= settings["eps"] + 1e-5
    assert np.abs(delta).max() > 0.5 * settings["step_size"]  # it moved


def test_pgd_lowers_accuracy_far_below_clean(trained):
    ds, model, params, net_state = trained
    acc = evaluate(
        model, Dynamics(), params, None, net_state, ds.x_test, ds.y_test, jax.random.PRNGKey(0),
        eps_linf=EPS, attacks=("linf",),
    )  # fmt: skip
    assert acc["clean"] > 0.9
    assert acc["linf"] < acc["clean"] - 0.4, acc


def test_pgd_is_reproducible_for_a_seed(trained):
    ds, model, params, net_state = trained
    attack = make_attack_fn(model, Dynamics(), **attack_settings(EPS)["linf"])
    x, y = ds.x_test[:50], ds.y_test[:50]
    first = np.asarray(attack(params, None, net_state, x, y, jax.random.PRNGKey(3)))
    again = np.asarray(attack(params, None, net_state, x, y, jax.random.PRNGKey(3)))
    other = np.asarray(attack(params, None, net_state, x, y, jax.random.PRNGKey(4)))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_pgd_increases_the_loss_of_a_linear_classifier():
    """On logits = x W the L-inf PGD optimum is known in closed form for small eps."""
    rng = np.random.default_rng(0)
    weights = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
    x = jnp.asarray(rng.uniform(0.3, 0.7, (5, 2, 2, 3)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 0, 1])

    def logits_fn(images):
        return images.reshape(len(images), -1) @ weights

    eps = 0.05
    x_adv = pgd(logits_fn, x, y, jax.random.PRNGKey(0), eps=eps, step_size=0.01, n_steps=50)
    ce = jax.vmap(lambda lg, t: -jax.nn.log_softmax(lg)[t])
    assert np.all(np.asarray(ce(logits_fn(x_adv), y)) > np.asarray(ce(logits_fn(x), y)))
    assert np.abs(np.asarray(x_adv - x)).max() <= eps + 1e-6


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_and_pgd_without_random_start_follow_their_definitions(norm):
    """variant_schedule: FGSM is x + eps sign(grad) (L2: x + eps grad / |grad|_2), clipped to
    [0, 1]; PGD without a random start does not depend on the key; PGD with one does."""
    from ntk_evolution.attacks.pgd import variant_schedule

    rng = np.random.default_rng(1)
    weights = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
    x = jnp.asarray(rng.uniform(0.2, 0.8, (5, 2, 2, 3)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 0, 1])

    def logits_fn(images):
        return images.reshape(len(images), -1) @ weights

    eps = 0.05 if norm == "linf" else 0.3
    keys = jax.random.PRNGKey(0), jax.random.PRNGKey(1)

    def run(variant, key, **override):
        schedule = {**variant_schedule(variant, eps, 10), **override}
        return np.asarray(pgd(logits_fn, x, y, key, eps=eps, norm=norm, **schedule))

    grad = np.asarray(
        jax.grad(lambda z: jnp.sum(-jax.nn.log_softmax(logits_fn(z))[jnp.arange(5), y]))(x)
    )
    if norm == "linf":
        expected = np.clip(np.asarray(x) + eps * np.sign(grad), 0, 1)
    else:
        size = np.sqrt((grad**2).sum(axis=(1, 2, 3), keepdims=True))
        expected = np.clip(np.asarray(x) + eps * grad / size, 0, 1)
    np.testing.assert_allclose(run("fgsm", keys[0]), expected, atol=1e-6)
    np.testing.assert_array_equal(run("pgd_no_start", keys[0]), run("pgd_no_start", keys[1]))
    # the starts themselves (no steps): the image, or a point of the ball drawn from the key
    np.testing.assert_array_equal(run("pgd_no_start", keys[0], n_steps=0), np.asarray(x))
    assert np.abs(run("pgd", keys[0], n_steps=0) - run("pgd", keys[1], n_steps=0)).max() > 1e-4
    for variant in ("fgsm", "pgd_no_start"):
        delta = (run(variant, keys[0]) - np.asarray(x)).reshape(5, -1)
        size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta**2).sum(1))
        assert size.max() <= eps + 1e-6
    with pytest.raises(ValueError, match="unknown attack variant"):
        variant_schedule("bim", eps, 10)
