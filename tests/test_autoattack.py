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

from ntk_evolution.attacks import pgd
from ntk_evolution.autoattack import (
    ATTACK_FNS,
    apgd,
    apgd_checkpoints,
    dlr_targeted,
    fab,
    min_norm_to_hyperplane,
    square,
)
from ntk_evolution.evaluation import Tally, masking_warnings, sweep_warnings

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


@pytest.mark.slow
def test_square_breaks_gradient_masking_and_the_warning_names_it(linear_classifier):
    """Rounding the input to 16 grey levels zeroes every input gradient: PGD and APGD cannot
    move, the gradient-free Square still finds the vulnerable examples, and the tally's
    accuracies make masking_warnings name gradient masking."""
    logits_fn, weights, bias, x, y = linear_classifier

    def masked(z):
        return logits_fn(jnp.round(z * 16) / 16)

    x, y = jnp.asarray(np.round(x * 16) / 16), jnp.asarray(y)
    y = jnp.argmax(masked(x), -1)
    key, eps = jax.random.PRNGKey(0), 0.1
    inputs = {
        "clean": x,
        "linf": pgd(masked, x, y, key, eps=eps, step_size=2 * eps / 100, n_steps=100),
        "apgd_ce": ATTACK_FNS["apgd_ce"](masked, x, y, key, eps=eps),
        "square": square(masked, x, y, key, eps=eps, n_queries=1000),
    }
    tally = Tally()
    tally.add({k: np.asarray(jnp.argmax(masked(v), -1) == y) for k, v in inputs.items()})
    accuracies = tally.accuracies()
    # the gradient attacks only have their random starts
    assert accuracies["square"] < min(accuracies["linf"], accuracies["apgd_ce"]) - 0.3
    (warning,) = masking_warnings(accuracies)
    assert "gradient masking" in warning and "Square" in warning
    assert masking_warnings({"clean": 1.0, "linf": 0.3, "square": 0.4}) == []


def test_tally_counts_autoattack_as_robust_to_all_four():
    hits = {
        "clean": np.array([1, 1, 1, 0], bool),
        "apgd_ce": np.array([1, 1, 0, 1], bool),
        "apgd_t": np.array([1, 1, 1, 1], bool),
        "fab_t": np.array([1, 0, 1, 1], bool),
        "square": np.array([1, 1, 1, 1], bool),
        "dirty": np.array([0, 1, 1, 1], bool),
    }
    tally = Tally()
    tally.add(hits)
    accuracies = tally.accuracies()
    assert accuracies["autoattack"] == 0.25  # example 0 only (example 3 is wrong when clean)
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
    """eval_and_make_adv.py --autoattack --eps_sweep: each attack's accuracy, AutoAttack no
    higher than any of its four attacks, the worst case no higher than anything, the sweep's
    radii, everything stored in test_results_autoattack.pkl."""
    import pickle

    import eval_and_make_adv

    result = eval_and_make_adv.main(
        f"--dataset digits --model cnn_small --model_path {digits_checkpoint} --n_test 30 "
        "--eps 32 --autoattack --eps_sweep 16,128 --save_name autoattack".split()
    )
    four = [result[f"acc_{name}"] for name in ATTACK_FNS]
    assert result["acc_autoattack"] <= min(four + [result["acc_clean"]])
    assert result["acc_worst"] <= min(result["acc_autoattack"], result["acc_dirty"])
    assert sorted(result["eps_sweep"]) == [16.0, 128.0]
    assert result["eps_sweep"][128.0] <= result["eps_sweep"][16.0]
    assert result["autoattack"] == ("linf", 32 / 255)
    with open(digits_checkpoint.parent / "test_results_autoattack.pkl", "rb") as f:
        stored = pickle.load(f)
    assert stored["acc_autoattack"] == result["acc_autoattack"]
    assert isinstance(stored["warnings"], list)


@pytest.mark.slow
def test_kernel_predictor_scripts_take_autoattack(tmp_path):
    import ntk_attack

    summary = ntk_attack.main(
        "--dataset digits --kernel relu_ntk --dataset_size 50 --n_test 20 --eps 32 --pgd_steps 10 "
        f"--autoattack --autoattack_norm l2 --eps_l2 1.0 --save_dir {tmp_path}".split()
    )
    four = [summary[f"accuracy_{name}"] for name in ATTACK_FNS]
    assert summary["accuracy_autoattack"] <= min(four + [summary["accuracy_clean"]])
    assert tuple(summary["autoattack"]) == ("l2", 1.0)
