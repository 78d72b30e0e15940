"""The four attacks of AutoAttack's "standard" version (Croce & Hein, ICML 2020), in JAX.

Each attack takes `logits_fn` (images (N, H, W, C) in [0, 1] -> logits (N, K), jittable),
images x, labels y and a PRNG key, and returns adversarial images inside the `norm` eps-ball
around x and inside [0, 1]: per example, a misclassified point when the attack found one, else
its last or best try. Each runs inside one jitted function (lax loops), batched, so it shards
over devices like attacks.pgd.

- apgd_ce: APGD on the cross-entropy, 100 iterations, one run. Step size starts at 2 eps and
  is halved at the checkpoints w_j (w_0 = 0.22 n, periods shrinking by 0.03 n down to 0.06 n)
  where fewer than 75% of the period's steps raised the loss, or where the step was not halved
  last time and the best loss did not rise; then the iterate restarts from the best point.
  Update: z = P(x_k + eta s(grad)), x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1})),
  with s = sign (L-inf) or grad / |grad|_2 (L2).
- apgd_t: APGD on the targeted DLR loss -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), for the
  9 (at most K - 1) classes t ranked 2nd, 3rd, ... by the clean logits, 100 iterations each.
- fab_t: FAB, targeted, for the same 9 classes, 100 iterations each, started at x: project the
  iterate and x onto the linearised boundary {z : (z_t - z_y)(x1) + grad . (z - x1) = 0} within
  the box [0, 1] (minimal L-inf or L2 step), move to the convex combination (weight alpha <= 0.1
  on the projection of x, eta = 1.05 overshoot), and on success keep the smallest perturbation
  and pull back towards x by beta = 0.9. An example is fooled if the smallest perturbation found
  is within eps.
- square: Square Attack on the margin z_y - max_{j != y} z_j, 5000 queries, p_init 0.8:
  random square windows (side sqrt(p H W), p shrinking on the schedule of the paper) set to
  the vertices of the L-inf ball, or (L2) moving perturbation mass between two windows, with
  the windows' norms taken per channel as in the reference (`_l2_candidate`); a candidate is
  kept if it lowers the margin. Gradient-free: it cannot be fooled by masked gradients.
  Windows are drawn per example and may sit anywhere, the last row and column included (the
  reference draws one corner per query for the whole batch, in 0 .. H - s - 1).

start_gradient_vanishes is the reference's zero-gradient check (CHECK_FNS). The standard
version's order, each attack on the examples still robust after the ones before, and the
reference's other checks are evaluation.run_autoattack's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_evolution.attacks.pgd import _per_example_norm, margin, project
from ntk_evolution.models import use_conv_impl

AUTOATTACK = ("apgd_ce", "apgd_t", "fab_t", "square")
GRADIENT_FREE = ("square",)
APGD_ITERATIONS = 100
FAB_ITERATIONS = 100
SQUARE_QUERIES = 5000
N_TARGET_CLASSES = 9
APGD_RHO = 0.75  # a period passes if more than this share of its steps raised the loss
APGD_MOMENTUM = 0.75
FAB_ALPHA_MAX, FAB_ETA, FAB_BETA = 0.1, 1.05, 0.9
SQUARE_P_INIT = 0.8


def _convs_as_matmul_on_cpu(attack: Callable) -> Callable:
    """Trace `attack` with convolutions as one matrix product on CPUs (models.use_conv_impl
    "auto"; the same function): 1.6-2x faster attack iterations on cnn_small on this project's
    CPU; XLA's convolution on accelerators."""

    @functools.wraps(attack)
    def traced(*args, **kwargs):
        with use_conv_impl("auto"):
            return attack(*args, **kwargs)

    return traced


_norm = _per_example_norm  # (N, 1, 1, 1)


def _project(x: jax.Array, x_adv: jax.Array, eps: float, norm: str) -> jax.Array:
    """x_adv moved into the eps-ball around x (attacks.project), then into [0, 1]."""
    return jnp.clip(x + project(x_adv - x, eps, norm), 0.0, 1.0)


def _expand(mask: jax.Array) -> jax.Array:
    return mask[:, None, None, None]


def dlr_targeted(logits: jax.Array, y: jax.Array, target: jax.Array) -> jax.Array:
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), pi sorting the logits downwards:
    larger when the target class gains on the true one, invariant to shifting and scaling
    (with fewer than 4 classes, z_t - z_y)."""
    z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    z_t = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
    if logits.shape[1] < 4:  # no 4th logit to scale by: the plain logit difference
        return z_t - z_y
    top = jnp.sort(logits, axis=1)[:, ::-1]
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def apgd_checkpoints(n_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """(is_check (n_iter,) bool, period (n_iter,) int): whether iteration i (from 0) ends a
    period, and that period's length. The first period has max(0.22 n, 1) iterations, each next
    one 0.03 n fewer, down to 0.06 n."""
    period = max(int(0.22 * n_iter), 1)
    decrease, minimum = max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    is_check, lengths = np.zeros(n_iter, bool), np.zeros(n_iter, np.int32)
    i = period - 1
    while i < n_iter:
        is_check[i], lengths[i] = True, period
        period = max(period - decrease, minimum)
        i += period
    return is_check, lengths


def _apgd_start(x: jax.Array, key: jax.Array, eps: float, norm: str) -> jax.Array:
    """APGD's random start: a uniform (L-inf) or Gaussian (L2) draw scaled onto the eps-sphere,
    clipped to [0, 1]."""
    if norm == "linf":
        t = jax.random.uniform(key, x.shape, minval=-1.0, maxval=1.0)
        t = t / jnp.max(jnp.abs(t), axis=(1, 2, 3), keepdims=True)
    else:
        t = jax.random.normal(key, x.shape)
        t = t / (_norm(t) + 1e-12)
    return jnp.clip(x + eps * t, 0.0, 1.0)


def start_gradient_vanishes(
    logits_fn, x, y, key, *, eps: float, norm: str = "linf", n_classes: int = 10
) -> jax.Array:
    """(N,) bool: the cross-entropy's input gradient is exactly zero at APGD-CE's start (the same
    key draws the same start). The reference's check_zero_gradients: there a gradient attack
    has nothing to follow, and only Square can find what such an example hides."""

    def loss(z):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_fn(z), y))

    grad = jax.grad(loss)(_apgd_start(x, key, eps, norm))
    return jnp.all(grad == 0, axis=tuple(range(1, x.ndim)))


def apgd(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    loss: str = "ce",
    target: jax.Array | None = None,
    n_iter: int = APGD_ITERATIONS,
) -> tuple[jax.Array, jax.Array]:
    """APGD (one run) maximising `loss` ("ce", or "dlr_t" towards `target`). Returns
    (x_adv, fooled): the last misclassified iterate where there was one, else the iterate of
    highest loss; fooled (N,) bool."""

    def loss_fn(z):
        logits = logits_fn(z)
        if loss == "ce":
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        else:
            per_example = dlr_targeted(logits, y, target)
        return jnp.sum(per_example), (per_example, logits)

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    x_adv = _apgd_start(x, key, eps, norm)
    (_, (loss0, logits)), grad = value_and_grad(x_adv)
    fooled = jnp.argmax(logits, -1) != y
    step = jnp.full((x.shape[0], 1, 1, 1), 2.0 * eps)
    is_check, lengths = (jnp.asarray(a) for a in apgd_checkpoints(n_iter))

    def move(x_adv, x_old, grad, step, momentum):
        if norm == "linf":
            z = _project(x, x_adv + step * jnp.sign(grad), eps, norm)
        else:
            z = _project(x, x_adv + step * grad / (_norm(grad) + 1e-12), eps, norm)
        return _project(
            x, x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_old), eps, norm
        )

    def body(i, carry):
        (x_adv, x_old, grad, step, best_adv, fooled, x_best, grad_best, loss_best, loss_prev,
         increases, best_at_check, halved_at_check) = carry  # fmt: skip
        momentum = jnp.where(i > 0, APGD_MOMENTUM, 1.0)
        x_new = move(x_adv, x_old, grad, step, momentum)
        (_, (loss_new, logits)), grad_new = value_and_grad(x_new)
        now_fooled = jnp.argmax(logits, -1) != y
        best_adv = jnp.where(_expand(now_fooled), x_new, best_adv)
        fooled = fooled | now_fooled
        increases = increases + (loss_new > loss_prev)
        improved = loss_new > loss_best
        x_best = jnp.where(_expand(improved), x_new, x_best)
        grad_best = jnp.where(_expand(improved), grad_new, grad_best)
        loss_best = jnp.maximum(loss_new, loss_best)
        # checkpoint: halve the step and restart from the best point where progress stalled
        oscillating = increases <= APGD_RHO * lengths[i]
        no_improvement = ~halved_at_check & (best_at_check >= loss_best)
        halve = is_check[i] & (oscillating | no_improvement)
        step = jnp.where(_expand(halve), step / 2, step)
        x_next = jnp.where(_expand(halve), x_best, x_new)
        grad_next = jnp.where(_expand(halve), grad_best, grad_new)
        best_at_check = jnp.where(is_check[i], loss_best, best_at_check)
        halved_at_check = jnp.where(is_check[i], halve, halved_at_check)
        increases = jnp.where(is_check[i], 0, increases)
        return (x_next, x_adv, grad_next, step, best_adv, fooled, x_best, grad_best, loss_best,
                loss_new, increases, best_at_check, halved_at_check)  # fmt: skip

    n = x.shape[0]
    carry = (x_adv, x_adv, grad, step, x_adv, fooled, x_adv, grad, loss0, loss0,
             jnp.zeros(n, jnp.int32), loss0, jnp.ones(n, bool))  # fmt: skip
    carry = jax.lax.fori_loop(0, n_iter, body, carry)
    best_adv, fooled, x_best = carry[4], carry[5], carry[6]
    return jnp.where(_expand(fooled), best_adv, x_best), fooled


def _over_targets(run: Callable, logits_fn: Callable, x: jax.Array, y: jax.Array, n_classes: int):
    """Run `run(target, r) -> (x_adv, fooled)` for the classes ranked r + 2 = 2 .. n_targets + 1
    by the clean logits; per example, the first success, else the last try. Stops early once
    every example of the batch is fooled or misclassified on its clean image."""
    n_targets = min(N_TARGET_CLASSES, n_classes - 1)
    clean_logits = logits_fn(x)
    order = jnp.argsort(clean_logits, axis=1)
    settled = jnp.argmax(clean_logits, -1) != y  # not robust whatever the attack does

    def cond(carry):
        r, _, fooled = carry
        return (r < n_targets) & ~jnp.all(fooled | settled)

    def body(carry):
        r, best, fooled = carry
        target = jnp.take(order, order.shape[1] - 2 - r, axis=1)
        x_adv, now = run(target, r)
        best = jnp.where(_expand(fooled), best, x_adv)
        return r + 1, best, fooled | now

    carry = (jnp.int32(0), x, jnp.zeros(x.shape[0], bool))
    return jax.lax.while_loop(cond, body, carry)[1:]


def apgd_ce(logits_fn, x, y, key, *, eps: float, norm: str = "linf", n_classes: int = 10):
    """APGD on the cross-entropy (one run, 100 iterations)."""
    return apgd(logits_fn, x, y, key, eps=eps, norm=norm, loss="ce")[0]


def apgd_t(logits_fn, x, y, key, *, eps: float, norm: str = "linf", n_classes: int = 10):
    """APGD on the targeted DLR loss, for each of the 9 runner-up classes (100 iterations)."""

    def run(target, r):
        return apgd(
            logits_fn, x, y, jax.random.fold_in(key, r), eps=eps, norm=norm, loss="dlr_t",
            target=target,
        )  # fmt: skip

    return _over_targets(run, logits_fn, x, y, n_classes)[0]


def min_norm_to_hyperplane(z: jax.Array, w: jax.Array, c: jax.Array, norm: str) -> jax.Array:
    """The smallest step d (L-inf or L2) with w . d = c and z + d in [0, 1], per example (z, w:
    (N, D), c: (N,)); where the box cannot reach the hyperplane, the step that gets closest.

    With s = sign(c), coordinate i moves by s sign(w_i) min(a_i t, r_i), r_i its room in that
    direction, a_i = 1 (L-inf) or |w_i| (L2): the gain g(t) = sum |w_i| min(a_i t, r_i) is
    piecewise linear and increasing, with kinks at t_i = r_i / a_i; t solves g(t) = |c|."""
    s = jnp.sign(c)[:, None]
    direction = s * jnp.sign(w)
    room = jnp.where(direction > 0, 1.0 - z, z)
    abs_w = jnp.abs(w)
    rate = jnp.ones_like(w) if norm == "linf" else abs_w
    kinks = jnp.where(rate > 0, room / jnp.maximum(rate, 1e-30), jnp.inf)
    order = jnp.argsort(kinks, axis=1)
    kinks_sorted = jnp.take_along_axis(kinks, order, axis=1)
    gain_full = jnp.take_along_axis(abs_w * room, order, axis=1)  # once saturated
    slope = jnp.take_along_axis(abs_w * rate, order, axis=1)  # while unsaturated
    saturated_before = jnp.cumsum(gain_full, axis=1) - gain_full  # kinks < k saturated
    slope_after = jnp.cumsum(slope[:, ::-1], axis=1)[:, ::-1]  # kinks >= k unsaturated
    finite_kinks = jnp.where(jnp.isfinite(kinks_sorted), kinks_sorted, 0.0)
    gain_at_kink = saturated_before + finite_kinks * slope_after
    target = jnp.abs(c)[:, None]
    # the last kink whose gain is still below the target: t lies between it and the next
    below = (gain_at_kink < target) & jnp.isfinite(kinks_sorted)
    n_below = jnp.sum(below, axis=1, keepdims=True)
    k = jnp.maximum(n_below - 1, 0)
    t_k = jnp.take_along_axis(finite_kinks, k, axis=1)
    g_k = jnp.take_along_axis(gain_at_kink, k, axis=1)
    # between kink k and the next, only the coordinates after k are still unsaturated
    slope_between = jnp.take_along_axis(slope_after - slope, k, axis=1)
    t = jnp.where(
        n_below == 0,
        target / jnp.maximum(slope_after[:, :1], 1e-30),  # reached before the first kink
        t_k + (target - g_k) / jnp.maximum(slope_between, 1e-30),
    )
    t = jnp.where(target == 0, 0.0, t)
    return direction * jnp.minimum(rate * t, room)


def fab(
    logits_fn: Callable,
    x: jax.Array,
    y: jax.Array,
    target: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    n_iter: int = FAB_ITERATIONS,
) -> tuple[jax.Array, jax.Array]:
    """Targeted FAB from x (one run). Returns (x_adv, fooled): the misclassified point of
    smallest perturbation found, fooled where that perturbation is within eps."""
    n = x.shape[0]
    x0 = x.reshape(n, -1)

    def diff(z):  # z_t - z_y summed: its gradient is each example's boundary normal
        logits = logits_fn(z)
        pick = jnp.take_along_axis
        d = pick(logits, target[:, None], axis=1)[:, 0] - pick(logits, y[:, None], axis=1)[:, 0]
        return jnp.sum(d), d

    grad_diff = jax.grad(diff, has_aux=True)

    def size(d):
        if norm == "linf":
            return jnp.max(jnp.abs(d), axis=1, keepdims=True)
        return jnp.sqrt(jnp.sum(d * d, axis=1, keepdims=True))

    def body(_, carry):
        x1, best, best_size = carry
        w, f = grad_diff(x1.reshape(x.shape))
        w = w.reshape(n, -1)
        # boundary: f + w . (z - x1) = 0; steps onto it from x1 and from x0
        d1 = min_norm_to_hyperplane(x1, w, -f, norm)
        d0 = min_norm_to_hyperplane(x0, w, -f + jnp.sum(w * (x1 - x0), axis=1), norm)
        a1, a0 = jnp.maximum(size(d1), 1e-8), jnp.maximum(size(d0), 1e-8)
        alpha = jnp.clip(a1 / (a1 + a0), 0.0, FAB_ALPHA_MAX)
        x1 = jnp.clip((x1 + FAB_ETA * d1) * (1 - alpha) + (x0 + FAB_ETA * d0) * alpha, 0.0, 1.0)
        adversarial = jnp.argmax(logits_fn(x1.reshape(x.shape)), -1) != y
        distance = size(x1 - x0)[:, 0]
        smaller = adversarial & (distance < best_size)
        best = jnp.where(smaller[:, None], x1, best)
        best_size = jnp.where(smaller, distance, best_size)
        x1 = jnp.where(adversarial[:, None], x0 + (x1 - x0) * FAB_BETA, x1)
        return x1, best, best_size

    carry = (x0, x0, jnp.full(n, jnp.inf))
    _, best, best_size = jax.lax.fori_loop(0, n_iter, body, carry)
    fooled = best_size <= eps * (1 + 1e-5)
    x_adv = jnp.where(fooled[:, None], best, x0).reshape(x.shape)
    # the found point may exceed eps by rounding only: project to be exactly inside
    return _project(x, x_adv, eps, norm), fooled


def fab_t(logits_fn, x, y, key, *, eps: float, norm: str = "linf", n_classes: int = 10):
    """Targeted FAB for each of the 9 runner-up classes (100 iterations, deterministic)."""
    del key  # the first (only) run of FAB starts at x
    return _over_targets(
        lambda target, r: fab(logits_fn, x, y, target, eps=eps, norm=norm),
        logits_fn,
        x,
        y,
        n_classes,
    )[0]


# ----------------------------------------------------------------------------- Square


def square_p_schedule(i: int, p_init: float = SQUARE_P_INIT) -> float:
    """Share of the image a window covers at query i (the paper's schedule for 10k queries,
    unrescaled, as AutoAttack's standard version runs it)."""
    for bound, divisor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                           (4000, 64), (6000, 128), (8000, 256)):  # fmt: skip
        if i <= bound:
            return p_init / divisor
    return p_init / 512


def _pseudo_gaussian(s: int) -> np.ndarray:
    """The L2 Square attack's s x s perturbation: two stacked rectangles of nested squares with
    weights 1/(k+1)^2, opposite signs, unit L2 norm."""

    def rectangles(a: int, b: int) -> np.ndarray:
        delta = np.zeros((a, b))
        ca, cb = a // 2, b // 2
        for k in range(max(ca + 1, cb + 1)):
            delta[max(ca - k, 0) : min(ca - k + 2 * k + 1, a),
                  max(cb - k, 0) : min(cb - k + 2 * k + 1, b)] += 1.0 / (k + 1) ** 2  # fmt: skip
        return delta / max(np.sqrt(np.sum(delta**2)), 1e-12)

    delta = np.zeros((s, s))
    delta[: s // 2] = rectangles(s // 2, s)
    delta[s // 2 :] = -rectangles(s - s // 2, s)
    return delta / max(np.sqrt(np.sum(delta**2)), 1e-12)


def _window(shape, corner_h, corner_w, s):
    """Boolean (N, H, W, 1): the s x s window at per-example corners."""
    _, h, w, _ = shape
    rows = jnp.arange(h)[None, :, None, None]
    cols = jnp.arange(w)[None, None, :, None]
    ch, cw = corner_h[:, None, None, None], corner_w[:, None, None, None]
    return (rows >= ch) & (rows < ch + s) & (cols >= cw) & (cols < cw + s)


def _square_at(v: jax.Array, corner_h, corner_w, size: int) -> jax.Array:
    """(N, size, size, C): the size x size block of v (N, H, W, C) at per-example corners, v
    padded with zeros below and to the right so that no corner is moved to fit."""
    padded = jnp.pad(v, ((0, 0), (0, size), (0, size), (0, 0)))
    return jax.vmap(lambda d, a, b: jax.lax.dynamic_slice(d, (a, b, 0), (size, size, v.shape[3])))(
        padded, corner_h, corner_w
    )


def _place(patch: jax.Array, shape, corner_h, corner_w) -> jax.Array:
    """(N, H, W, C) zeros with patch (N, size, size, C) at per-example corners; what of the
    patch falls outside the image is dropped (zeros here: the windows lie inside)."""
    size = patch.shape[1]
    zeros = jnp.zeros((shape[1] + size, shape[2] + size, shape[3]), patch.dtype)
    placed = jax.vmap(lambda p, a, b: jax.lax.dynamic_update_slice(zeros, p, (a, b, 0)))(
        patch, corner_h, corner_w
    )
    return placed[:, : shape[1], : shape[2]]


def square(
    logits_fn: Callable,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    n_classes: int = 10,
    n_queries: int = SQUARE_QUERIES,
) -> jax.Array:
    """Square Attack (one run of n_queries): random search on the margin loss. One loop over
    the queries, the window side of query i read from a table: the model is compiled into the
    loop once, not once per window side (AutoAttack compiles a quarter faster so:
    benchmarks/RESULTS.md)."""
    n, h, w, c = x.shape

    def margin_of(z):  # z_y - max_{j != y} z_j: positive while correctly classified
        return -margin(logits_fn(z), y)

    init_key, key = jax.random.split(key)
    if norm == "linf":
        stripes = jax.random.rademacher(init_key, (n, 1, w, c), dtype=x.dtype)
        x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
    else:
        x_best = jnp.clip(x + eps * _l2_init(init_key, x.shape), 0.0, 1.0)
    sides = square_sides(n_queries, h, w, norm)
    patterns = _pseudo_gaussians(sides) if norm == "l2" else None
    sides = jnp.asarray(sides)

    def body(i, x_best, best_margin):
        s = sides[i]
        k = jax.random.split(jax.random.fold_in(key, i), 5)
        corner_h = jax.random.randint(k[0], (n,), 0, h - s + 1)
        corner_w = jax.random.randint(k[1], (n,), 0, w - s + 1)
        if norm == "linf":
            signs = jax.random.rademacher(k[2], (n, 1, 1, c), dtype=x.dtype)
            inside = _window(x.shape, corner_h, corner_w, s)
            x_new = _project(x, x_best + jnp.where(inside, 2 * eps * signs, 0.0), eps, norm)
        else:
            corners2 = (jax.random.randint(k[3], (n,), 0, h - s + 1),
                        jax.random.randint(k[4], (n,), 0, w - s + 1))  # fmt: skip
            x_new = _l2_candidate(
                x, x_best, k[2], (corner_h, corner_w), corners2, s, patterns[s], eps
            )
        new_margin = margin_of(x_new)
        better = (new_margin < best_margin) & (best_margin > 0)
        x_best = jnp.where(_expand(better), x_new, x_best)
        return x_best, jnp.where(better, new_margin, best_margin)

    def cond(carry):
        return (carry[0] < n_queries) & jnp.any(carry[2] > 0)

    def step(carry):
        i, x_best, best_margin = carry
        return (i + 1, *body(i, x_best, best_margin))

    carry = (jnp.int32(0), x_best, margin_of(x_best))
    return jax.lax.while_loop(cond, step, carry)[1]


def square_sides(n_queries: int, h: int, w: int, norm: str) -> np.ndarray:
    """The window side of each candidate query 0 .. n_queries - 1 (int32): sqrt(p_i H W)
    rounded, p_i the schedule's share; at least 1 (L-inf), or odd and at least 3 (L2), as in
    the reference; at most the image's side."""
    sides = []
    for i in range(n_queries):
        s = int(round(math.sqrt(square_p_schedule(i) * h * w)))
        if norm == "linf":
            s = max(s, 1)
        else:
            s = max(s, 3)
            s = s + 1 if s % 2 == 0 else s
        sides.append(min(s, h, w))
    return np.asarray(sides, np.int32)


def _pseudo_gaussians(sides: np.ndarray) -> jax.Array:
    """(max side + 1, S, S), S the largest side: entry s holds _pseudo_gaussian(s) in its top
    left corner, zeros elsewhere (entries of sides not used: zeros)."""
    size = int(sides.max())
    table = np.zeros((size + 1, size, size), np.float32)
    for s in np.unique(sides):
        table[s, :s, :s] = _pseudo_gaussian(int(s))
    return jnp.asarray(table)


def _l2_init(key: jax.Array, shape) -> jax.Array:
    """Unit-L2 start of the L2 Square attack: a grid of pseudo-Gaussian blocks of side H // 5,
    each transposed or not at random (per example), with random signs per example and channel,
    normalised."""
    n, h, w, c = shape
    s = max(h // 5, 1)
    start = (h - s * 5) // 2
    rows, cols = h // s, w // s
    pattern = jnp.asarray(_pseudo_gaussian(s), jnp.float32)[None, :, :, None]

    def block(block_key):  # (N, s, s, C): one block of the grid, for every example
        sign_key, flip_key = jax.random.split(block_key)
        sign = jax.random.rademacher(sign_key, (n, 1, 1, c), dtype=jnp.float32)
        flip = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
        return jnp.where(flip, jnp.swapaxes(pattern, 1, 2), pattern) * sign

    blocks = jax.vmap(block)(jax.random.split(key, rows * cols))  # (rows * cols, N, s, s, C)
    grid = blocks.reshape(rows, cols, n, s, s, c).transpose(2, 0, 3, 1, 4, 5)
    grid = grid.reshape(n, rows * s, cols * s, c)
    # the grid's top left corner at (start, start) (negative on images under 5 pixels): the
    # grid's first -start rows and columns fall before the image, and what passes its end is cut
    skip, top = max(-start, 0), max(start, 0)
    keep_h, keep_w = min(h - top, rows * s - skip), min(w - top, cols * s - skip)
    grid = grid[:, skip : skip + keep_h, skip : skip + keep_w]
    delta = jnp.pad(grid, ((0, 0), (top, h - top - keep_h), (top, w - top - keep_w), (0, 0)))
    return delta / (_norm(delta) + 1e-12)


def _channel_norm(v: jax.Array) -> jax.Array:
    """L2 norm over rows and columns, per example and channel: (N, H, W, C) -> (N, 1, 1, C)."""
    return jnp.sqrt(jnp.sum(v * v, axis=(1, 2), keepdims=True))


def _l2_candidate(x, x_best, key, corners1, corners2, s, pattern, eps):
    """One L2 Square proposal: the perturbation's mass in the second s x s window (corners2:
    (rows, columns) per example) moves into the first (corners1), redrawn there as a
    pseudo-Gaussian square with random signs per channel on top of what the first held; then
    the whole perturbation is rescaled to norm eps. As in the reference, the window norms are
    per channel: channel k's new square gets the norm sqrt(W_k^2 + (eps^2 - |delta|^2) / C),
    W_k the norm of channel k of the perturbation in both windows, |delta| the whole one's.
    s may be traced: the squares are handled in blocks of pattern's side (S x S, the s x s
    pattern in its top left corner, zeros elsewhere)."""
    n, h, w, c = x.shape
    size = pattern.shape[0]
    delta = x_best - x
    (corner_h, corner_w), (corner_h2, corner_w2) = corners1, corners2
    window1 = _window(x.shape, corner_h, corner_w, s)
    window2 = _window(x.shape, corner_h2, corner_w2, s)
    in_square = (jnp.arange(size)[:, None] < s) & (jnp.arange(size)[None, :] < s)
    old = jnp.where(in_square[None, :, :, None], _square_at(delta, corner_h, corner_w, size), 0.0)
    old_norm = _channel_norm(old)  # (N, 1, 1, C), as every window norm here
    image_norm = _norm(delta)  # (N, 1, 1, 1): the whole image's, all channels
    windows_norm = _channel_norm(jnp.where(window1 | window2, delta, 0.0))
    flip = jax.random.bernoulli(key, 0.5, (n,))[:, None, None, None]
    pattern = jnp.where(flip, pattern.T[None, :, :, None], pattern[None, :, :, None])
    signs = jax.random.rademacher(jax.random.fold_in(key, 1), (n, 1, 1, c), dtype=x.dtype)
    new = pattern * signs + old / (1e-12 + old_norm)  # zeros outside the s x s square
    new_norm = _channel_norm(new)
    # each channel's window gets that channel's mass of both windows plus an equal share of
    # what the image lacks to reach eps (the reference's rule; the final rescaling to norm eps
    # settles the rest)
    budget = jnp.sqrt(jnp.maximum(eps**2 - image_norm**2, 0.0) / c + windows_norm**2)
    new = new / (1e-12 + new_norm) * budget
    delta = jnp.where(window2 | window1, 0.0, delta) + _place(new, x.shape, corner_h, corner_w)
    return jnp.clip(x + delta / (_norm(delta) + 1e-12) * eps, 0.0, 1.0)


ATTACK_FNS = {
    name: _convs_as_matmul_on_cpu(attack)
    for name, attack in {
        "apgd_ce": apgd_ce,
        "apgd_t": apgd_t,
        "fab_t": fab_t,
        "square": square,
    }.items()
}
# not attacks: the reference's zero-gradient check, run where APGD-CE starts (same signature)
CHECK_FNS = {"zero_gradient": _convs_as_matmul_on_cpu(start_gradient_vanishes)}
AUTOATTACK_FNS = {**ATTACK_FNS, **CHECK_FNS}  # what evaluation.run_autoattack runs
