"""AutoAttack's attacks against their definitions: outputs inside the eps-ball and [0, 1], the
exact robust accuracy of a linear classifier reached, the boundary projection against a linear
program, gradient masking caught by Square and named by the warning."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_images
from scipy.optimize import linprog

from ntk_evolution.attacks.autoattack import (
    ATTACK_FNS,
    AUTOATTACK,
    AUTOATTACK_FNS,
    _l2_candidate,
    _l2_init,
    _pseudo_gaussian,
    _pseudo_gaussians,
    apgd,
    apgd_checkpoints,
    dlr_targeted,
    fab,
    min_norm_to_hyperplane,
    square_sides,
)
from ntk_evolution.attacks.evaluation import (
    Tally,
    _output_checks,
    masking_warnings,
    run_autoattack,
    sweep_warnings,
)

N_CLASSES = 10


@pytest.fixture(scope="module")
def linear_classifier():
    """logits = (flatten(x) - 1/2) W + b on 60 random 8x8 images labelled by their own argmax
    (every class present); L-inf eps 0.02 leaves 40% of them robust."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(64, N_CLASSES)).astype(np.float32)
    bias = 0.1 * rng.normal(size=N_CLASSES).astype(np.float32)
    x = random_images(60)

    def logits_fn(z):
        return (z.reshape(z.shape[0], -1) - 0.5) @ weights + bias

    y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
    # the same map as flatten(x) W + (b - W^T 1 / 2)
    return logits_fn, weights, bias - 0.5 * weights.sum(0), x, y


def exact_linear_robustness(weights, bias, x, y, eps: float) -> np.ndarray:
    """Whether each example keeps its label for every z in the L-inf eps-ball around x within
    [0, 1]: for each other class t, the smallest z_y - z_t over the box is
    (z_y - z_t)(x) + sum_i min(v_i lo_i, v_i hi_i), v = W_y - W_t, lo/hi the box's offsets."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    lo, hi = np.maximum(-eps, -flat), np.minimum(eps, 1 - flat)
    logits = flat @ weights + bias
    robust = np.ones(len(x), bool)
    for t in range(weights.shape[1]):
        v = weights[:, y].T - weights[:, t][None]  # (N, D)
        worst = logits[np.arange(len(x)), y] - logits[:, t] + np.minimum(v * lo, v * hi).sum(1)
        robust &= (t == y) | (worst > 0)
    return robust


def _in_ball(x_adv, x, eps, norm):
    x_adv, x = np.asarray(x_adv), np.asarray(x)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.6)])
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "square" else n for n in ATTACK_FNS]
)
def test_every_attack_stays_in_the_eps_ball_and_image_range(linear_classifier, name, norm, eps):
    logits_fn, _, _, x, y = linear_classifier
    attack = jax.jit(functools.partial(ATTACK_FNS[name], logits_fn, eps=eps, norm=norm))
    x_adv = attack(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))
    _in_ball(x_adv, x, eps, norm)
    accuracy = float(np.mean(np.argmax(logits_fn(x_adv), -1) == y))
    assert accuracy < 0.9  # it attacked


@pytest.fixture(scope="module")
def colour_classifier():
    """The same kind of linear classifier on 30 colour images of CIFAR's shape (32 x 32 x 3),
    with a weight per channel: the per-channel code paths (Square's windows) run."""
    rng = np.random.default_rng(1)
    weights = (rng.normal(size=(32 * 32 * 3, N_CLASSES)) / np.sqrt(48)).astype(np.float32)
    x = random_images(30, (32, 32, 3), seed=2)

    def logits_fn(z):
        return (z.reshape(z.shape[0], -1) - 0.5) @ weights

    return logits_fn, x, np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 4 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("name", list(ATTACK_FNS))
def test_every_attack_stays_in_the_eps_ball_on_colour_images(colour_classifier, name, norm, eps):
    logits_fn, x, y = colour_classifier
    attack = jax.jit(functools.partial(ATTACK_FNS[name], logits_fn, eps=eps, norm=norm))
    x_adv = attack(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))
    assert x_adv.shape == x.shape
    _in_ball(x_adv, x, eps, norm)
    accuracy = float(np.mean(np.argmax(logits_fn(x_adv), -1) == y))
    assert accuracy < 0.9  # it attacked


def minimal_linf_distance(weights, bias, x, y) -> np.ndarray:
    """The exact smallest L-inf perturbation (within [0, 1]) that changes a linear classifier's
    label: over the other classes t, the box-constrained step onto z_t = z_y (inf where the box
    cannot reach it)."""
    flat = x.reshape(len(x), -1)
    logits = flat @ weights + bias
    best = np.full(len(x), np.inf)
    for t in range(weights.shape[1]):
        v = (weights[:, t][None] - weights[:, y].T).astype(np.float32)
        need = (logits[np.arange(len(x)), y] - logits[:, t]).astype(np.float32)
        d = np.asarray(min_norm_to_hyperplane(jnp.asarray(flat), jnp.asarray(v), need, "linf"))
        reached = np.abs((v * d).sum(1) - need) < 1e-4
        best = np.where((t != y) & reached, np.minimum(best, np.abs(d).max(1)), best)
    return best


@pytest.mark.parametrize("name", list(ATTACK_FNS))
def test_attacks_reach_the_exact_robust_accuracy_of_a_linear_classifier(linear_classifier, name):
    """For a linear classifier the worst case over the L-inf ball (and the box) is known in
    closed form. No attack may fool a robust example; the targeted attacks (and so AutoAttack)
    must fool every other one, APGD-CE and Square at least 90% of them. Examples whose exact
    minimal perturbation lies within 2% of eps are borderline and not counted (FAB approaches
    the boundary from its 5% overshoot)."""
    logits_fn, weights, bias, x, y = linear_classifier
    eps = 0.02
    robust = exact_linear_robustness(weights, bias, x, y, eps)
    assert 0.2 < robust.mean() < 0.8  # a test with something to find
    clear = np.abs(minimal_linf_distance(weights, bias, x, y) / eps - 1) > 0.02
    attack = jax.jit(functools.partial(ATTACK_FNS[name], logits_fn, eps=eps, norm="linf"))
    x_adv = attack(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(1))
    still_correct = np.asarray(jnp.argmax(logits_fn(x_adv), -1)) == y
    assert np.all(still_correct[robust])  # sound: the exact check agrees with the attack
    foolable = clear & ~robust
    found = np.mean(~still_correct[foolable])
    assert found == 1.0 if name in ("apgd_t", "fab_t") else found >= 0.9, found


@pytest.fixture(scope="module")
def colour_linear_classifier():
    """logits = flatten(x - 1/2) W on 60 colour images (8x8x3) inside [0.25, 0.75]; each
    channel has its own weights, scaled by channel (1, 0.3, 2)."""
    rng = np.random.default_rng(4)
    scale = np.tile(np.array([1.0, 0.3, 2.0]), 64)[:, None]
    weights = (rng.normal(size=(192, N_CLASSES)) * scale).astype(np.float32)
    x = (0.25 + 0.5 * random_images(60, (8, 8, 3), seed=6)).astype(np.float32)

    def logits_fn(z):
        return (z.reshape(z.shape[0], -1) - 0.5) @ weights

    y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
    return logits_fn, weights, x, y


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "square" else n for n in ATTACK_FNS]
)
def test_attacks_reach_the_exact_l2_robust_accuracy_on_colour_images(
    colour_linear_classifier, name
):
    """L2 on 3-channel images. A linear classifier's smallest L2 step to class t is
    (z_y - z_t) / |W_y - W_t| along W_t - W_y; with the images inside [0.25, 0.75] and eps 0.04
    that step never leaves [0, 1], so an example is robust exactly when every such distance
    exceeds eps. No attack may fool a robust example; the targeted ones (and so AutoAttack)
    must fool every other, APGD-CE 90% of them, Square half (it searches squares of smooth
    noise, which a linear model's pixel-wise weights do not favour: here it fooled 64%, the
    reference's Square fewer); within 2% of eps is borderline."""
    logits_fn, weights, x, y = colour_linear_classifier
    eps = 0.04
    logits = np.asarray(logits_fn(jnp.asarray(x)), np.float64)
    distance = np.full(len(x), np.inf)
    for t in range(N_CLASSES):
        gap = logits[np.arange(len(x)), y] - logits[:, t]
        size = np.linalg.norm(weights[:, y].T - weights[:, t][None], axis=1)
        distance = np.where(t != y, np.minimum(distance, gap / np.maximum(size, 1e-12)), distance)
    robust, clear = distance > eps, np.abs(distance / eps - 1) > 0.02
    assert 0.2 < robust.mean() < 0.8  # a test with something to find
    attack = jax.jit(functools.partial(ATTACK_FNS[name], logits_fn, eps=eps, norm="l2"))
    x_adv = attack(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(1))
    _in_ball(x_adv, x, eps, "l2")
    still_correct = np.asarray(jnp.argmax(logits_fn(x_adv), -1)) == y
    assert np.all(still_correct[robust])
    found = np.mean(~still_correct[clear & ~robust])
    least = {"apgd_t": 1.0, "fab_t": 1.0, "apgd_ce": 0.9, "square": 0.5}[name]
    assert found >= least, found


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_boundary_step_is_the_smallest_inside_the_box(norm):
    """min_norm_to_hyperplane against its definition: w . d = c, z + d in [0, 1], and no
    smaller step (a linear program for L-inf; for L2 the KKT form d = clip(l w, lo, hi))."""
    rng = np.random.default_rng(3)
    z = rng.uniform(0, 1, (6, 12)).astype(np.float32)
    w = rng.normal(size=(6, 12)).astype(np.float32)
    c = rng.normal(size=6).astype(np.float32)
    d = np.asarray(min_norm_to_hyperplane(jnp.asarray(z), jnp.asarray(w), jnp.asarray(c), norm))
    np.testing.assert_allclose((w * d).sum(1), c, atol=1e-5)
    assert (z + d).min() >= -1e-6 and (z + d).max() <= 1 + 1e-6
    for i in range(len(z)):
        lo, hi = -z[i].astype(np.float64), 1 - z[i].astype(np.float64)
        if norm == "linf":  # variables (d, t): minimise t, -t <= d <= t, w . d = c, box
            n = len(lo)
            a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
            res = linprog(
                np.r_[np.zeros(n), 1.0],
                A_ub=a_ub,
                b_ub=np.zeros(2 * n),
                A_eq=np.r_[w[i], 0.0][None],
                b_eq=[c[i]],
                bounds=[*zip(lo, hi, strict=True), (0, None)],
            )
            assert np.abs(d[i]).max() == pytest.approx(res.fun, rel=1e-4, abs=1e-6)
        else:  # the L2-smallest step is clip(l w, lo, hi) with the l that meets the plane
            lam_lo, lam_hi = -1e6, 1e6
            for _ in range(200):
                lam = 0.5 * (lam_lo + lam_hi)
                if (w[i] * np.clip(lam * w[i], lo, hi)).sum() < c[i]:
                    lam_lo = lam
                else:
                    lam_hi = lam
            reference = np.clip(lam * w[i], lo, hi)
            np.testing.assert_allclose(d[i], reference, atol=1e-4)


@pytest.mark.slow
def test_fab_finds_a_smaller_perturbation_than_eps_needs_on_a_linear_model(linear_classifier):
    """Targeted FAB on the runner-up class: where it succeeds, its perturbation is at most the
    exact minimal L-inf distance to that class (plus the 5% overshoot it takes)."""
    logits_fn, weights, bias, x, y = linear_classifier
    logits = np.asarray(logits_fn(jnp.asarray(x)))
    target = np.argsort(logits, 1)[:, -2]
    x_adv, fooled = fab(logits_fn, jnp.asarray(x), jnp.asarray(y), jnp.asarray(target), eps=1.0)
    flat = x.reshape(len(x), -1).astype(np.float64)
    for i in np.flatnonzero(np.asarray(fooled))[:10]:
        v = weights[:, target[i]] - weights[:, y[i]]
        need = logits[i, y[i]] - logits[i, target[i]]
        d = min_norm_to_hyperplane(jnp.asarray(flat[i : i + 1], jnp.float32),
                                   jnp.asarray(v[None]), jnp.asarray([need]), "linf")  # fmt: skip
        exact = float(np.abs(np.asarray(d)).max())
        found = float(np.abs(np.asarray(x_adv[i]).reshape(-1) - flat[i]).max())
        assert found <= exact * 1.06 + 1e-5


def test_apgd_checkpoints_are_the_papers_for_100_iterations():
    """Periods of 22, 19, 16, 13, 10, 7, then 6 (0.22 n, shrinking by 0.03 n to 0.06 n)."""
    is_check, lengths = apgd_checkpoints(100)
    np.testing.assert_array_equal(np.flatnonzero(is_check), [21, 40, 56, 69, 79, 86, 92, 98])
    np.testing.assert_array_equal(lengths[is_check], [22, 19, 16, 13, 10, 7, 6, 6])


def test_targeted_dlr_matches_its_formula():
    logits = jnp.asarray([[4.0, 1.0, 3.0, 0.0, -2.0], [0.5, 2.0, 1.5, 1.0, 0.0]])
    y, t = jnp.asarray([2, 1]), jnp.asarray([0, 4])
    # sorted: [4, 3, 1, 0, -2] -> 4 - (1 + 0)/2 = 3.5;  [2, 1.5, 1, 0.5, 0] -> 2 - 0.75 = 1.25
    expected = [-(3.0 - 4.0) / 3.5, -(2.0 - 0.0) / 1.25]
    np.testing.assert_allclose(dlr_targeted(logits, y, t), expected, rtol=1e-6)


@pytest.mark.slow
def test_apgd_raises_its_loss_above_pgd_start(linear_classifier):
    logits_fn, _, _, x, y = linear_classifier
    x_adv, fooled = apgd(logits_fn, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0), eps=0.1)
    assert np.asarray(fooled).mean() > 0.2
    np.testing.assert_array_equal(
        np.asarray(fooled), np.asarray(jnp.argmax(logits_fn(x_adv), -1)) != y
    )


def test_square_windows_follow_the_papers_schedule():
    """Query i's window side is sqrt(p_i H W) rounded, p_i = 0.8 halved after queries 10, 50,
    200, 500, 1000, 2000, 4000, 6000 and 8000 (the paper's schedule for 10k queries, as
    AutoAttack runs it); L2 windows odd and at least 3, none wider than the image."""
    linf = square_sides(5000, 32, 32, "linf")
    assert linf.dtype == np.int32 and len(linf) == 5000
    # sqrt(0.8 * 1024) = 28.6; then 20.2, 14.3, 10.1, 7.2, 5.1, 3.6 (p halved at each bound)
    segments = [(0, 10, 29), (11, 50, 20), (51, 200, 14), (201, 500, 10), (501, 1000, 7),
                (1001, 2000, 5), (2001, 4000, 4), (4001, 4999, 3)]  # fmt: skip
    for first, last, side in segments:
        assert set(linf[first : last + 1]) == {side}, (first, last)
    l2 = square_sides(5000, 32, 32, "l2")
    assert set(l2[:11]) == {29} and set(l2[11:51]) == {21} and set(l2[2001:]) == {5, 3}
    assert np.all(l2 % 2 == 1) and l2.min() == 3
    assert square_sides(20, 6, 6, "linf").max() == 5 and square_sides(20, 4, 4, "l2").max() == 4
    assert square_sides(20, 2, 2, "l2").max() == 2  # an image narrower than 3: its own side


def test_l2_square_starts_from_a_grid_of_pseudo_gaussian_blocks():
    """The L2 Square start on 32x32x3 (the reference's grid): a 5 x 5 grid of blocks of
    side H // 5 = 6 from row and column (32 - 30) // 2 = 1, each block of each example and
    channel +-the pseudo-Gaussian pattern or its transpose (the transpose per example and
    block, the sign per channel too), zeros outside the grid, unit L2 norm per example."""
    n, h, c, s = 4, 32, 3, 6
    delta = np.asarray(_l2_init(jax.random.PRNGKey(2), (n, h, h, c)))
    np.testing.assert_allclose(np.linalg.norm(delta.reshape(n, -1), axis=1), 1.0, rtol=1e-5)
    grid = np.zeros((h, h), bool)
    grid[1:31, 1:31] = True
    assert not np.any(delta[:, ~grid])
    pattern = _pseudo_gaussian(s)
    scale = 1 / np.sqrt(25 * c)  # 25 blocks x C channels of unit norm each
    transposed, signs = set(), set()
    for i in range(n):
        for a in range(5):
            for b in range(5):
                rows, cols = slice(1 + a * s, 1 + (a + 1) * s), slice(1 + b * s, 1 + (b + 1) * s)
                block = delta[i, rows, cols] / scale
                per_channel = [
                    {
                        (sign, flip)
                        for sign in (1, -1)
                        for flip, p in ((0, pattern), (1, pattern.T))
                        if np.allclose(block[..., k], sign * p, atol=1e-5)
                    }
                    for k in range(c)
                ]
                assert all(len(f) == 1 for f in per_channel), (i, a, b)
                found = set().union(*per_channel)
                assert len({flip for _, flip in found}) == 1, (i, a, b)  # one per block
                transposed |= {flip for _, flip in found}
                signs |= {sign for sign, _ in found}
    assert transposed == {0, 1} and signs == {-1, 1}


def test_l2_square_candidate_takes_window_norms_per_channel():
    """One L2 Square proposal against the reference's rule on 3-channel images whose channels
    carry very different perturbation mass: window 2 emptied, the rest of the perturbation
    only rescaled, and channel k's new square in window 1 of norm sqrt(W_k^2 + (eps^2 -
    |delta|^2) / C) before the common rescaling to norm eps (W_k: channel k's norm over both
    windows). A norm over all channels at once gives every channel the same square norm. The
    side s is traced, as in the attack's loop, and the pattern table is wider than s (5)."""
    rng = np.random.default_rng(5)
    n, side, c, s, eps = 3, 8, 3, 3, 0.5
    table = _pseudo_gaussians(np.array([5, s, 5]))
    assert table.shape == (6, 5, 5)
    np.testing.assert_allclose(table[s, :s, :s], _pseudo_gaussian(s), rtol=1e-6)
    assert not np.any(table[s, s:]) and not np.any(table[s, :, s:])
    x = np.full((n, side, side, c), 0.5, np.float32)
    delta = rng.normal(size=x.shape).astype(np.float32) * np.array([1.0, 0.1, 0.4], np.float32)
    delta *= 0.6 * eps / np.linalg.norm(delta.reshape(n, -1), axis=1)[:, None, None, None]
    corners1 = (jnp.asarray([0, 1, 2]), jnp.asarray([0, 4, 2]))
    corners2 = (jnp.asarray([5, 4, 3]), jnp.asarray([5, 0, 4]))  # the last overlaps window 1
    propose = jax.jit(functools.partial(_l2_candidate, eps=eps))
    candidate = propose(
        jnp.asarray(x), jnp.asarray(x + delta), jax.random.PRNGKey(0), corners1, corners2,
        jnp.int32(s), table[s],
    )  # fmt: skip
    new = np.asarray(candidate) - x
    assert 0 < np.asarray(candidate).min() and np.asarray(candidate).max() < 1  # no clipping
    np.testing.assert_allclose(np.linalg.norm(new.reshape(n, -1), axis=1), eps, rtol=1e-5)
    for i in range(n):
        in1, in2 = np.zeros((side, side), bool), np.zeros((side, side), bool)
        in1[corners1[0][i] : corners1[0][i] + s, corners1[1][i] : corners1[1][i] + s] = True
        in2[corners2[0][i] : corners2[0][i] + s, corners2[1][i] : corners2[1][i] + s] = True
        rest = ~(in1 | in2)
        scale = np.linalg.norm(new[i][rest]) / np.linalg.norm(delta[i][rest])
        np.testing.assert_allclose(new[i][rest], scale * delta[i][rest], atol=1e-6)
        np.testing.assert_array_equal(new[i][in2 & ~in1], 0.0)
        slack = eps**2 - np.sum(delta[i] ** 2)
        for k in range(c):
            windows_k = np.linalg.norm(delta[i][in1 | in2][:, k])
            expected = np.sqrt(windows_k**2 + slack / c)
            got = np.linalg.norm(new[i][in1][:, k]) / scale
            np.testing.assert_allclose(got, expected, rtol=1e-4)


def cascade_fns(logits_fn, eps, norm="linf", n_queries=5000, seen=None):
    """run_autoattack's attack functions on a plain logits function (one device, no sharding),
    each recording the real images it was given in `seen` when that is a dict."""
    fns = {}
    for name, fn in AUTOATTACK_FNS.items():
        extra = {"n_queries": n_queries} if name == "square" else {}
        jitted = jax.jit(functools.partial(fn, logits_fn, eps=eps, norm=norm, **extra))

        def recorded(x, y, key, name=name, jitted=jitted):
            if seen is not None:
                seen.setdefault(name, []).append(np.asarray(x))
            return jitted(x, y, key)

        fns[name] = recorded
    return fns


def test_cascade_attacks_only_the_images_still_robust(linear_classifier):
    """The standard version's order: APGD-CE on the images correct when clean, each next attack
    only on those still robust after the ones before (as the reference runs it); robust after
    each attack never rises; on a linear classifier the result is the exact robust set; with
    `each` every attack sees every image and the cascade's figures are the running AND of the
    per-attack ones."""
    logits_fn, weights, bias, x, y = linear_classifier
    eps = 0.02
    correct = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1)) == y
    correct[:5] = False  # as if misclassified: no attack may look at them
    seen = {}
    flags, checks = run_autoattack(
        cascade_fns(logits_fn, eps, seen=seen), logits_fn, x, y, correct, jax.random.PRNGKey(0)
    )
    assert list(flags) == [f"after_{name}" for name in AUTOATTACK]
    before = correct
    for name in AUTOATTACK:
        robust = flags[f"after_{name}"]
        assert not np.any(robust & ~before)  # nothing becomes robust again
        attacked = {row.tobytes() for batch in seen[name] for row in batch}
        assert attacked == {row.tobytes() for row in x[before]}  # exactly the robust ones
        before = robust
    exact = exact_linear_robustness(weights, bias, x, y, eps) & correct
    clear = np.abs(minimal_linf_distance(weights, bias, x, y) / eps - 1) > 0.02
    np.testing.assert_array_equal(flags["after_square"][clear], exact[clear])
    assert checks["zero_gradients"] == 0 and checks["zero_gradient_of"] == correct.sum()
    assert checks["randomness"] < 1e-6 and not checks["probabilities"]

    seen = {}
    each, _ = run_autoattack(
        cascade_fns(logits_fn, eps, n_queries=300, seen=seen), logits_fn, x, y, correct,
        jax.random.PRNGKey(0), each=True,
    )  # fmt: skip
    running = correct
    for name in AUTOATTACK:
        attacked = {row.tobytes() for batch in seen[name] for row in batch}
        assert attacked == {row.tobytes() for row in x}  # every image
        running = running & each[name]
        np.testing.assert_array_equal(each[f"after_{name}"], running)
    tally = Tally()
    tally.add({"clean": correct})
    tally.add(each)
    accuracies = tally.accuracies()
    assert accuracies["autoattack"] == accuracies["after_square"] == running.mean()


@pytest.mark.slow
def test_square_breaks_gradient_masking_and_the_checks_name_it(linear_classifier):
    """Rounding the input to 16 grey levels zeroes every input gradient: APGD-CE, APGD-T and
    FAB-T cannot move, the gradient-free Square still finds the vulnerable examples, and the
    reference's checks name both signs: Square beyond the gradient attacks together, and
    zero gradients where APGD-CE starts."""
    logits_fn, weights, bias, x, y = linear_classifier

    def masked(z):
        return logits_fn(jnp.round(z * 16) / 16)

    x = np.round(x * 16).astype(np.float32) / 16
    y = np.asarray(jnp.argmax(masked(jnp.asarray(x)), -1))
    eps = 0.1
    correct = np.ones(len(x), bool)
    flags, checks = run_autoattack(
        cascade_fns(masked, eps, n_queries=1000), masked, x, y, correct, jax.random.PRNGKey(0)
    )
    tally = Tally()
    tally.add({"clean": correct})
    tally.add(flags)
    accuracies = tally.accuracies()
    # the gradient attacks only have their random starts
    assert accuracies["after_square"] < accuracies["after_fab_t"] - 0.3
    assert checks["zero_gradients"] == checks["zero_gradient_of"] == len(x)
    square_warning, zero_warning = masking_warnings(accuracies, checks)
    assert "gradient masking" in square_warning and "Square" in square_warning
    assert f"{len(x)} of the {len(x)} images" in zero_warning and "zero" in zero_warning
    # the reference's threshold: 0.2% of the images beyond the gradient attacks together
    assert masking_warnings({"after_fab_t": 0.5, "after_square": 0.499}) == []
    assert len(masking_warnings({"after_fab_t": 0.5, "after_square": 0.497})) == 1


def test_checks_name_a_randomised_model_and_probability_outputs(linear_classifier):
    """The reference's check_randomized (clean passes that differ) and check_range_output
    (outputs in [0, 1] summing to 1) on one batch, as warnings."""
    logits_fn, _, _, x, y = linear_classifier
    calls = iter(range(100))

    def noisy(z):  # a different output on every pass, as a randomised defence gives
        return logits_fn(z) + jnp.arange(N_CLASSES) * 0.1 * next(calls)

    checks = _output_checks(noisy, x[:20], y[:20])
    (warning,) = masking_warnings({}, checks)
    assert "randomised" in warning and checks["randomness"] > 1e-4

    def softmaxed(z):
        return jax.nn.softmax(logits_fn(z))

    checks = _output_checks(softmaxed, x[:20], y[:20])
    (warning,) = masking_warnings({}, checks)
    assert "probabilities" in warning
    assert masking_warnings({}, _output_checks(logits_fn, x[:20], y[:20])) == []


def test_tally_gives_autoattack_as_the_cascade_after_square():
    tally = Tally()
    tally.add({"clean": np.array([1, 1, 1, 0], bool), "dirty": np.array([0, 1, 1, 1], bool)})
    tally.add(
        {
            "after_apgd_ce": np.array([1, 1, 0, 0], bool),
            "after_apgd_t": np.array([1, 1, 0, 0], bool),
            "after_fab_t": np.array([1, 0, 0, 0], bool),
            "after_square": np.array([1, 0, 0, 0], bool),
        }
    )
    accuracies = tally.accuracies()
    assert accuracies["autoattack"] == 0.25  # example 0 only
    assert accuracies["worst"] == 0.0  # example 0 falls to PGD


def test_sweep_warning_when_accuracy_rises_or_exceeds_the_grey_bound():
    assert sweep_warnings({8: 0.6, 16: 0.3, 32: 0.1, 128: 0.1}, grey_bound=0.1) == []
    (rising,) = sweep_warnings({8: 0.5, 16: 0.6}, grey_bound=None)
    assert "rises" in rising
    (grey,) = sweep_warnings({8: 0.6, 128: 0.5}, grey_bound=0.1)
    assert "all-grey image" in grey


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    import run_exp

    folder = tmp_path_factory.mktemp("aa_run")
    run_exp.main(
        f"--dataset digits --model cnn_small --standard_epochs 2 --linear_epochs 0 --save_models "
        f"--skip_first_test --skip_second_test --save_path {folder}".split()
    )
    return folder / "parameters_final.pkl"


@pytest.mark.slow
def test_eval_script_reports_autoattack_beside_pgd_and_sweeps_eps(digits_checkpoint):
    """eval_and_make_adv.py --autoattack --eps_sweep: the robust accuracy after each attack of
    the cascade (never rising, AutoAttack's the last), the worst case no higher than anything,
    the sweep's radii, the checks with their figures, everything stored in
    test_results_autoattack.pkl; the per-attack figures only with --autoattack_each."""
    import pickle

    import eval_and_make_adv

    result = eval_and_make_adv.main(
        f"--dataset digits --model cnn_small --model_path {digits_checkpoint} --n_test 30 "
        "--eps 32 --autoattack --eps_sweep 16,128 --save_name autoattack".split()
    )
    cascade = [result["acc_clean"]] + [result[f"acc_after_{name}"] for name in AUTOATTACK]
    assert cascade == sorted(cascade, reverse=True)
    assert result["acc_autoattack"] == result["acc_after_square"]
    assert all(result[f"acc_{name}"] is None for name in AUTOATTACK)  # not run alone
    assert result["acc_worst"] <= min(result["acc_autoattack"], result["acc_dirty"])
    assert sorted(result["eps_sweep"]) == [16.0, 128.0]
    assert result["eps_sweep"][128.0] <= result["eps_sweep"][16.0]
    assert result["autoattack"] == ("linf", 32 / 255)
    checks = result["autoattack_checks"]
    assert checks["zero_gradient_of"] == round(30 * result["acc_clean"])
    assert checks["zero_gradients"] == 0 and not checks["probabilities"]
    with open(digits_checkpoint.parent / "test_results_autoattack.pkl", "rb") as f:
        stored = pickle.load(f)
    assert stored["acc_autoattack"] == result["acc_autoattack"]
    assert stored["autoattack_checks"] == checks
    assert isinstance(stored["warnings"], list)


@pytest.mark.slow
def test_kernel_predictor_scripts_take_autoattack(tmp_path):
    """ntk_attack.py --autoattack_each on the L2 threat model: each attack's own figure, the
    cascade's figures as their running AND, AutoAttack no higher than any of them."""
    import ntk_attack

    summary = ntk_attack.main(
        "--dataset digits --kernel relu_ntk --dataset_size 50 --n_test 20 --eps 32 --pgd_steps 10 "
        "--autoattack --autoattack_each --autoattack_norm l2 --eps_l2 1.0 "
        f"--save_dir {tmp_path}".split()
    )
    four = [summary[f"accuracy_{name}"] for name in AUTOATTACK]
    assert summary["accuracy_autoattack"] <= min(four + [summary["accuracy_clean"]])
    assert summary["accuracy_autoattack"] == summary["accuracy_after_square"]
    assert tuple(summary["autoattack"]) == ("l2", 1.0)
