"""Robust datasets by kernel regression (Tsilivis, Su & Kempe, "Can we achieve robustness from
data alone?", arXiv 2207.11727): the support set X of the kernel-regression predictor
F_X(z) = k(z, X) (k(X, X) + r I)^-1 onehot(Y) is optimised by Adam so that
inf_X E sup_{|delta| <= eps} L(F_X(z + delta), t) decreases, the inner sup by L-inf PGD on L
itself (Danskin's theorem). robustify_dataset.py is its command line."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_evolution.attacks.pgd import PER_EXAMPLE_LOSSES, pgd, pgd_step_size
from ntk_evolution.kernels.regression import kernel_predictor, one_hot
from ntk_evolution.utils import progress_bar

INNER_PGD_STEPS = 10
LOSSES = ("mse", "ce")
HISTORY_KEYS = ("clean_loss", "adversarial_loss", "clean_accuracy", "adversarial_accuracy")


def robust_loss(
    kernel_fn: Callable,
    support: jax.Array,
    targets: jax.Array,
    z: jax.Array,
    t: jax.Array,
    ridge: float,
    loss: str = "mse",
) -> tuple[jax.Array, jax.Array]:
    """Mean loss of F_X(z) against labels t (mse: squared error to one-hot, summed over the
    classes; ce: cross-entropy), and the accuracy."""
    outputs = kernel_predictor(kernel_fn, support, targets, ridge)(z)
    return jnp.mean(PER_EXAMPLE_LOSSES[loss](outputs, t)), jnp.mean(jnp.argmax(outputs, -1) == t)


def inner_attack(
    kernel_fn: Callable,
    support: jax.Array,
    targets: jax.Array,
    z: jax.Array,
    t: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    n_steps: int,
    ridge: float,
    loss: str = "mse",
) -> jax.Array:
    """L-inf PGD on the targets against the predictor of the (fixed) support set, ascending
    the outer loss (attacks.pgd with loss = mse or ce)."""
    predictor = kernel_predictor(kernel_fn, jax.lax.stop_gradient(support), targets, ridge)
    return pgd(
        predictor, z, t, key, eps=eps, step_size=pgd_step_size(eps, n_steps), n_steps=n_steps,
        loss=loss,
    )  # fmt: skip


def worst_case_loss(
    kernel_fn: Callable, support, targets, z, z_adv, t, ridge: float, loss: str
) -> tuple[jax.Array, dict]:
    """The mean over targets of the larger of L at z and at z_adv (the sup over the ball
    includes delta = 0, so an attack that ends below the clean loss falls back to z), and the
    facts logged (clean and adversarial loss and accuracy); one predictor call, so the two
    losses are comparable exactly."""
    outputs = kernel_predictor(kernel_fn, support, targets, ridge)(jnp.concatenate([z, z_adv]))
    clean_out, adv_out = jnp.split(outputs, 2)
    clean, adv = PER_EXAMPLE_LOSSES[loss](clean_out, t), PER_EXAMPLE_LOSSES[loss](adv_out, t)
    worse = adv >= clean
    worst_out = jnp.where(worse[:, None], adv_out, clean_out)
    facts = {
        "clean_loss": jnp.mean(clean),
        "adversarial_loss": jnp.mean(jnp.where(worse, adv, clean)),
        "clean_accuracy": jnp.mean(jnp.argmax(clean_out, -1) == t),
        "adversarial_accuracy": jnp.mean(jnp.argmax(worst_out, -1) == t),
    }
    return facts["adversarial_loss"], facts


def adversarial_objective(kernel_fn, support, targets, z, t, key, *, eps, n_steps, ridge, loss):
    """The quantity minimised (worst_case_loss at the inner attack's images), and the
    adversarial accuracy."""
    z_adv = inner_attack(
        kernel_fn, support, targets, z, t, key, eps=eps, n_steps=n_steps, ridge=ridge, loss=loss
    )
    value, facts = worst_case_loss(kernel_fn, support, targets, z, z_adv, t, ridge, loss)
    return value, facts["adversarial_accuracy"]


def make_step(
    kernel_fn: Callable, optimizer, *, eps: float, n_steps: int, ridge: float, loss: str
) -> Callable:
    """Jitted step(support, opt_state, targets, z, t, key, low, high) -> (support, opt_state,
    facts): worst_case_loss's facts on the targets before the update; the support is
    projected into [low, high] after it."""

    def step(support, opt_state, targets, z, t, key, low, high):
        z_adv = inner_attack(
            kernel_fn, support, targets, z, t, key, eps=eps, n_steps=n_steps, ridge=ridge,
            loss=loss,
        )  # fmt: skip
        (_, facts), grad = jax.value_and_grad(worst_case_loss, argnums=1, has_aux=True)(
            kernel_fn, support, targets, z, z_adv, t, ridge, loss
        )
        updates, opt_state = optimizer.update(grad, opt_state, support)
        support = jnp.clip(optax.apply_updates(support, updates), low, high)
        return support, opt_state, facts

    return jax.jit(step)


def robustify(
    kernel_fn: Callable,
    support: np.ndarray,
    support_labels: np.ndarray,
    x_target: np.ndarray,
    y_target: np.ndarray,
    seed: int,
    *,
    n_classes: int,
    steps: int,
    lr: float,
    eps: float,
    n_steps: int = INNER_PGD_STEPS,
    target_batch: int = 256,
    ridge: float = 1e-4,
    loss: str = "mse",
    max_change: float | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, dict[str, list[float]]]:
    """The optimised support images (same shape, in [0, 1], and within max_change of the
    originals in L-inf when given) and the history: on each step's target batch, before its
    update, the clean and adversarial loss (both in `loss`) and accuracy."""
    optimizer = optax.adam(lr)
    step = make_step(kernel_fn, optimizer, eps=eps, n_steps=n_steps, ridge=ridge, loss=loss)
    x = jnp.asarray(support, jnp.float32)
    low, high = jnp.zeros_like(x), jnp.ones_like(x)
    if max_change is not None:
        low, high = jnp.clip(x - max_change, 0.0, 1.0), jnp.clip(x + max_change, 0.0, 1.0)
    opt_state = optimizer.init(x)
    targets = jnp.asarray(one_hot(support_labels, n_classes), jnp.float32)
    key, rng = jax.random.PRNGKey(seed), np.random.default_rng(seed)
    batch = min(target_batch, len(x_target))
    history = {k: [] for k in HISTORY_KEYS}
    bar = progress_bar(range(steps), desc="robustify", enabled=progress)
    for i in bar:
        chosen = rng.choice(len(x_target), batch, replace=False)
        x, opt_state, facts = step(
            x, opt_state, targets, x_target[chosen], y_target[chosen], jax.random.fold_in(key, i),
            low, high,
        )  # fmt: skip
        for k in HISTORY_KEYS:
            history[k].append(float(facts[k]))
        bar.set_postfix(clean=f"{history['clean_loss'][-1]:.4f}",
                        adversarial=f"{history['adversarial_loss'][-1]:.4f}")  # fmt: skip
    return np.asarray(x), history
