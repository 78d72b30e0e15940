"""Projected gradient descent (PGD) attacks, L-inf and L2, sharing one loop.

Each step ascends a loss of `logits_fn` summed over the batch, the cross-entropy (`loss="ce"`)
or the Carlini-Wagner margin max_{j != y} z_j - z_y (`loss="margin"`, which does not saturate
when the softmax does):
    L-inf: x <- Proj(clip(x + step * sign(grad))),   ball {|x - x0|_inf <= eps}
    L2:    x <- Proj(clip(x + step * grad / |grad|_2)), ball {|x - x0|_2 <= eps} (per example)
where clip is to the image range [0, 1], applied before the projection as in the original
(the result stays in [0, 1]: the ball's centre x0 is in it). The start is random in the ball,
or x0 itself (variant_schedule: PGD without a random start, and FGSM, one step of eps).
The whole loop runs inside one `lax.fori_loop`, so it compiles into the caller's jitted
function. With random restarts (`pgd_restarts`) an example counts as robust only if every
restart fails.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

NORMS = ("linf", "l2")
LOSSES = ("ce", "margin", "mse")

# SPEC: training uses 20-step L-inf PGD with step 2*eps/20; evaluation 100 steps, 2*eps/100;
# L2 evaluation eps 0.25, step 0.01, 100 steps.
TRAIN_PGD_STEPS = 20
EVAL_PGD_STEPS = 100
L2_EPS = 0.25
L2_STEP = 0.01


# how the PGD loop is run (variant_schedule); the adversarial-NTK code uses all three
ATTACK_VARIANTS = ("pgd", "pgd_no_start", "fgsm")
VARIANT_NAMES = {"pgd": "PGD", "pgd_no_start": "PGD (no random start)", "fgsm": "FGSM"}


def apply_variant(settings: dict, variant: str) -> dict:
    """pgd's keyword settings ({'eps', 'step_size', 'n_steps', ...}) run as an attack variant:
    'pgd' as they are, from a random start in the ball; 'pgd_no_start', the same from x itself;
    'fgsm', one step of eps from x (x + eps sign(grad) for L-inf, the fast gradient method
    x + eps grad / |grad|_2 for L2)."""
    if variant not in ATTACK_VARIANTS:
        raise ValueError(f"unknown attack variant {variant!r}: use one of {ATTACK_VARIANTS}")
    if variant == "fgsm":
        return {**settings, "step_size": settings["eps"], "n_steps": 1, "random_start": False}
    return {**settings, "random_start": variant == "pgd"}


def variant_schedule(variant: str, eps, n_steps: int) -> dict:
    """pgd's step_size, n_steps and random_start for `variant` (apply_variant) of the PGD of
    n_steps steps of 2 eps / n_steps."""
    base = {"eps": eps, "step_size": pgd_step_size(eps, n_steps), "n_steps": n_steps}
    schedule = apply_variant(base, variant)
    del schedule["eps"]
    return schedule


DEFAULT_EPS_255 = 4.0  # the original's --eps: 4/255


def eps_from_255(eps: float) -> float:
    """An L-inf radius given in 1/255 (the --eps flags) in image units, [0, 1] pixels."""
    return eps / 255.0


def pgd_step_size(eps: float, n_steps: int) -> float:
    """The original's PGD step rule: 2 eps / n_steps, so n_steps steps can cross the ball."""
    return 2 * eps / n_steps


def attack_settings(eps_linf: float) -> dict[str, dict]:
    """PGD settings of the evaluation attacks, by name."""
    return {
        "linf": {
            "norm": "linf",
            "eps": eps_linf,
            "step_size": pgd_step_size(eps_linf, EVAL_PGD_STEPS),
            "n_steps": EVAL_PGD_STEPS,
        },
        "l2": {"norm": "l2", "eps": L2_EPS, "step_size": L2_STEP, "n_steps": EVAL_PGD_STEPS},
        "margin": {
            "norm": "linf",
            "eps": eps_linf,
            "step_size": pgd_step_size(eps_linf, EVAL_PGD_STEPS),
            "n_steps": EVAL_PGD_STEPS,
            "loss": "margin",
        },
    }


def attack_key(key: jax.Array, batch: int, attack: int) -> jax.Array:
    """The key of attack number `attack` on test batch `batch`: the first attack keeps the
    original's fold_in(key, batch), so adding attacks leaves its figure unchanged."""
    batch_key = jax.random.fold_in(key, batch)
    return jax.random.fold_in(batch_key, attack) if attack else batch_key


def nested_attack_key(key: jax.Array, batch: int, attack: int) -> jax.Array:
    """evaluate()'s keys (run_exp.py's end-of-phase tests): fold_in(fold_in(key, batch), attack)
    for every attack, as recorded figures were made with."""
    return jax.random.fold_in(jax.random.fold_in(key, batch), attack)


def _per_example_norm(v: jax.Array) -> jax.Array:
    """L2 norm of each example, shaped (N, 1, 1, 1) for broadcasting."""
    return jnp.sqrt(jnp.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))


def project(delta: jax.Array, eps: float, norm: str) -> jax.Array:
    """Project each perturbation onto the eps-ball of `norm`."""
    if norm == "linf":
        return jnp.clip(delta, -eps, eps)
    scale = jnp.minimum(1.0, eps / jnp.maximum(_per_example_norm(delta), 1e-12))
    return delta * scale


def _ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
    if norm == "linf":
        return jnp.sign(grad)
    return grad / jnp.maximum(_per_example_norm(grad), 1e-12)


def _random_start(key: jax.Array, shape: tuple[int, ...], eps: float, norm: str) -> jax.Array:
    if norm == "linf":
        return jax.random.uniform(key, shape, minval=-eps, maxval=eps)
    dir_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(dir_key, shape)
    direction = direction / jnp.maximum(_per_example_norm(direction), 1e-12)
    radius = jax.random.uniform(radius_key, (shape[0],) + (1,) * (len(shape) - 1))
    return direction * radius * eps


def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
    """max_{j != y} z_j - z_y per example: positive exactly when the example is misclassified
    (ties aside)."""
    true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
    return jnp.max(others, axis=1) - true


def squared_error(outputs: jax.Array, y: jax.Array) -> jax.Array:
    """sum_j (outputs_j - onehot(y)_j)^2 per example: the loss kernel regression fits."""
    return jnp.sum((outputs - jax.nn.one_hot(y, outputs.shape[1])) ** 2, axis=1)


# loss(outputs (N, K), labels (N,)) -> (N,): what pgd ascends, by the name in LOSSES
PER_EXAMPLE_LOSSES = {
    "ce": optax.softmax_cross_entropy_with_integer_labels,
    "margin": margin,
    "mse": squared_error,
}


def pgd(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    step_size: float,
    n_steps: int,
    norm: str = "linf",
    loss: str = "ce",
    random_start: bool = True,
) -> jax.Array:
    """Adversarial examples for images x (N, H, W, C) in [0, 1] with labels y (N,), within the
    `norm` eps-ball around x and within [0, 1], by ascent on the summed `loss` (ce:
    cross-entropy; margin; mse: squared error to the one-hot label); from a random start in
    the ball, or with `random_start` False from x itself (key unused)."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}")
    per_example = PER_EXAMPLE_LOSSES[loss]

    def objective(x_adv):
        return jnp.sum(per_example(logits_fn(x_adv), y))

    def step(_, x_adv):
        grad = jax.grad(objective)(x_adv)
        x_adv = jnp.clip(x_adv + step_size * _ascent_direction(grad, norm), 0.0, 1.0)
        # the outer clip only removes rounding error: x + project(...) is in [0, 1] already
        return jnp.clip(x + project(x_adv - x, eps, norm), 0.0, 1.0)

    x_start = x
    if random_start:
        x_start = jnp.clip(x + _random_start(key, x.shape, eps, norm), 0.0, 1.0)
    return jax.lax.fori_loop(0, n_steps, step, x_start)


def pgd_restarts(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    restarts: int = 1,
    **pgd_kwargs,
) -> jax.Array:
    """`pgd` from `restarts` random starts (restart 0 uses `key`, restart r > 0 uses
    fold_in(key, r)); per example, the first restart's output that `logits_fn` misclassifies,
    else the last restart's. So an example stays correct only if every restart fails, and
    restarts=1 is `pgd` itself."""
    if restarts < 1:
        raise ValueError(f"restarts must be at least 1, got {restarts}")
    x_adv = pgd(logits_fn, x, y, key, **pgd_kwargs)
    if restarts == 1:
        return x_adv
    expand = (-1,) + (1,) * (x.ndim - 1)

    def restart(r, carry):
        best, fooled = carry
        candidate = pgd(logits_fn, x, y, jax.random.fold_in(key, r), **pgd_kwargs)
        best = jnp.where(fooled.reshape(expand), best, candidate)
        return best, fooled | (jnp.argmax(logits_fn(best), -1) != y)

    fooled = jnp.argmax(logits_fn(x_adv), -1) != y
    return jax.lax.fori_loop(1, restarts, restart, (x_adv, fooled))[0]


def pgd_linf_train(
    logits_fn: Callable,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    eps: float,
    step_size: float | None = None,
):
    """The adversarial-training attack: L-inf PGD, 20 steps of 2*eps/20 (or `step_size`, that
    step computed on the host when eps is a traced argument), random start."""
    return pgd(
        logits_fn,
        x,
        y,
        key,
        eps=eps,
        step_size=pgd_step_size(eps, TRAIN_PGD_STEPS) if step_size is None else step_size,
        n_steps=TRAIN_PGD_STEPS,
    )
