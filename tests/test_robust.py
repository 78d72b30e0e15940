"""Robust datasets by kernel regression and the attacks that test them: the support-set gradient
against finite differences, the optimisation against its own objective, margin PGD with
restarts against a single restart, and the scripts end to end."""

from __future__ import annotations

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from helpers import small_model

import eval_and_make_adv
from ntk_evolution.attacks.pgd import margin, pgd_restarts
from ntk_evolution.data import load_dataset
from ntk_evolution.kernels.regression import (
    jacobian_kernel_fn,
    kernel_predictor,
    one_hot,
    regression_coefficients,
    relu_ntk,
)
from ntk_evolution.kernels.robust_data import (
    HISTORY_KEYS,
    adversarial_objective,
    inner_attack,
    robust_loss,
    robustify,
)
from ntk_evolution.utils import UserError, load_pickle

EPS = 32 / 255


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_kernel_predictor_is_the_regression_solution(digits):
    x, y, z = digits.x_train[:60], digits.y_train[:60], digits.x_test[:20]
    kernel_fn = functools.partial(relu_ntk, depth=2)
    outputs = kernel_predictor(kernel_fn, jnp.asarray(x), jnp.asarray(one_hot(y, 10)), 1e-3)(z)
    gram = np.asarray(kernel_fn(x, x), np.float64)
    expected = np.asarray(kernel_fn(z, x), np.float64) @ regression_coefficients(
        gram, one_hot(y, 10), 1e-3
    )
    np.testing.assert_allclose(np.asarray(outputs), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["relu_ntk", "empirical"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_support_gradient_matches_finite_differences(digits, kernel, loss):
    """d loss(F_X(z), t) / dX along random directions, against central differences in float64."""
    with jax.enable_x64(True):
        if kernel == "relu_ntk":
            kernel_fn = functools.partial(relu_ntk, depth=2)
        else:
            model, params, net_state = small_model("mlp_skinny")
            params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
            kernel_fn = jacobian_kernel_fn(model, params, net_state, class_index=-1)
        x = jnp.asarray(digits.x_train[:12], jnp.float64)
        targets = jnp.asarray(one_hot(digits.y_train[:12], 10), jnp.float64)
        z, t = jnp.asarray(digits.x_test[:16], jnp.float64), jnp.asarray(digits.y_test[:16])

        def value(support):
            return robust_loss(kernel_fn, support, targets, z, t, 1e-2, loss)[0]

        grad = jax.grad(value)(x)
        assert grad.dtype == jnp.float64 and float(jnp.abs(grad).max()) > 0
        rng = np.random.default_rng(0)
        for _ in range(3):
            direction = jnp.asarray(rng.normal(size=x.shape))
            h = 1e-5
            numeric = (value(x + h * direction) - value(x - h * direction)) / (2 * h)
            analytic = jnp.vdot(grad, direction)
            np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_robustify_lowers_its_objective_and_keeps_images_in_range(digits):
    kernel_fn = functools.partial(relu_ntk, depth=2)
    x, y = digits.x_train[:50], digits.y_train[:50]
    z, t = digits.x_train[50:250], digits.y_train[50:250]
    targets = jnp.asarray(one_hot(y, 10), jnp.float32)
    settings = {"eps": EPS, "n_steps": 5, "ridge": 1e-4, "loss": "mse"}

    def objective(support):
        key = jax.random.PRNGKey(7)
        return float(adversarial_objective(kernel_fn, support, targets, z, t, key, **settings)[0])

    optimised, history = robustify(
        kernel_fn, x, y, z, t, 0, n_classes=10, steps=40, lr=0.01, eps=EPS, n_steps=5,
        target_batch=100, ridge=1e-4, loss="mse", progress=False,
    )  # fmt: skip
    assert optimised.shape == x.shape and optimised.dtype == np.float32
    assert optimised.min() >= 0 and optimised.max() <= 1
    assert np.abs(optimised - x).max() > 0.05
    assert all(len(history[k]) == 40 for k in HISTORY_KEYS)
    clean, adversarial = (np.array(history[f"{k}_loss"]) for k in ("clean", "adversarial"))
    assert np.all(adversarial >= clean) and adversarial[-1] > clean[-1]
    before, after = objective(jnp.asarray(x)), objective(jnp.asarray(optimised))
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_margin_restarts_never_report_higher_accuracy_than_one_restart(digits):
    kernel_fn = functools.partial(relu_ntk, depth=2)
    predictor = kernel_predictor(
        kernel_fn,
        jnp.asarray(digits.x_train[:100]),
        jnp.asarray(one_hot(digits.y_train[:100], 10)),
        1e-4,
    )
    x, y = jnp.asarray(digits.x_test[:200]), jnp.asarray(digits.y_test[:200])
    settings = {"eps": EPS, "step_size": 2 * EPS / 10, "n_steps": 10, "loss": "margin"}
    key = jax.random.PRNGKey(3)
    fooled = {}
    for restarts in (1, 4):
        adv = pgd_restarts(predictor, x, y, key, restarts=restarts, **settings)
        assert float(jnp.abs(adv - x).max()) <= EPS + 1e-6
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1
        fooled[restarts] = np.asarray(jnp.argmax(predictor(adv), -1) != y)
    # every example a single restart fools stays fooled, and the restarts find more
    assert np.all(fooled[4][fooled[1]])
    assert fooled[4].sum() > fooled[1].sum()
    # the margin is positive exactly on the misclassified examples
    logits = predictor(x)
    np.testing.assert_array_equal(np.asarray(margin(logits, y) > 0), np.argmax(logits, -1) != y)


@pytest.mark.slow
def test_robust_data_study_writes_its_report(tmp_path):
    path = os.path.join(ROOT, "scripts", "robust_data_study.py")
    spec = importlib.util.spec_from_file_location("robust_data_study", path)
    robust_data_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(robust_data_study)

    # the paper's variety of models is the study's default; the run below trains two of them
    # (mlp_wide's AutoAttack alone took 38 of this test's 61 s: each of its 10^4 forward passes
    # reads 16 MB of weights), whose rows and report lines stand for every network's
    assert robust_data_study.parse_args([]).models == ["mlp_skinny", "mlp_wide", "cnn_small"]
    nets = ("mlp_skinny", "cnn_small")
    out = tmp_path / "study"
    rows = robust_data_study.main(
        ["--support_size", "50", "--steps", "3", "--epochs", "2", "--batch_size", "25",
         "--source_epochs", "1", "--models", *nets,
         "--restarts", "2", "--n_test", "8", "--out", str(out)]
    )  # fmt: skip
    assert len(rows) == 2 + len(nets) * 2 and all(len(v) == 7 for v in rows.values())
    for values in rows.values():  # the worst case is below every single attack and AutoAttack
        assert values[6] <= min(values[:6])
    assert "AutoAttack" in robust_data_study.COLUMNS
    report = (out / "REPORT.md").read_text()
    assert "| kernel regression, optimised set |" in report and "finding" in report
    for net in nets:
        assert f"| {net} trained on the optimised set |" in report and f"- {net}: PGD" in report
    record = load_pickle(str(out / "robust_optimised.pkl"))
    assert np.all(
        np.array(record["history"]["adversarial_loss"]) >= record["history"]["clean_loss"]
    )
    assert (out / "robust_data_study.png").exists() and (out / "robust_optimised.png").exists()

    # the optimised set in the adv_examples format, with where it came from
    record = load_pickle(str(out / "robust_optimised.pkl"))
    assert record["images"].shape == (50, 1, 8, 8) and len(record["indices"]) == 50
    assert set(record["test_accuracy"]) == {"original", "optimised"}
    summary = json.loads((out / "ntk_optimised" / "ntk_attack_strong.json").read_text())
    assert summary["support_size"] == 50 and summary["restarts"] == 2
    results = load_pickle(str(out / "mlp_skinny_optimised" / "test_results_strong.pkl"))
    assert results["restarts"] == 2 and results["acc_worst"] <= results["acc_margin"]

    # transfer examples must be of the very test images evaluated
    transfer = out / "source_cnn_small" / "adv_examples_source.pkl"
    with pytest.raises(UserError, match="--n_test 8"):
        eval_and_make_adv.main(
            ["--dataset", "digits", "--model", "mlp_skinny", "--n_test", "30",
             "--model_path", str(out / "mlp_skinny_optimised" / "parameters_final.pkl"),
             "--transfer_path", str(transfer)]
        )  # fmt: skip


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_the_inner_attack_raises_the_outer_loss_and_the_outer_gradient_is_danskins(digits, loss):
    """The attack ascends the loss the step descends: for each loss, the attacked targets have
    a higher loss of that kind than the clean ones, and higher than an attack on the other
    loss finds in it; at the attacked points the outer gradient is a finite difference of the
    objective (z_adv held fixed), in float64."""
    with jax.enable_x64(True):
        kernel_fn = functools.partial(relu_ntk, depth=2)
        x = jnp.asarray(digits.x_train[:30], jnp.float64)
        targets = jnp.asarray(one_hot(digits.y_train[:30], 10), jnp.float64)
        z, t = jnp.asarray(digits.x_test[:40], jnp.float64), jnp.asarray(digits.y_test[:40])
        key = jax.random.PRNGKey(2)
        attacked = {
            kind: inner_attack(kernel_fn, x, targets, z, t, key, eps=EPS, n_steps=10,
                               ridge=1e-4, loss=kind)
            for kind in ("mse", "ce")
        }  # fmt: skip
        other = "ce" if loss == "mse" else "mse"

        def value(support, points):
            return robust_loss(kernel_fn, support, targets, points, t, 1e-4, loss)[0]

        clean, mine, theirs = (value(x, p) for p in (z, attacked[loss], attacked[other]))
        assert mine > clean and mine > theirs, (clean, mine, theirs)
        assert float(jnp.abs(attacked[loss] - z).max()) <= EPS + 1e-9
        grad = jax.grad(value)(x, attacked[loss])
        rng = np.random.default_rng(1)
        for _ in range(3):
            direction = jnp.asarray(rng.normal(size=x.shape))
            h = 1e-5
            numeric = (
                value(x + h * direction, attacked[loss]) - value(x - h * direction, attacked[loss])
            ) / (2 * h)
            np.testing.assert_allclose(
                float(jnp.vdot(grad, direction)), float(numeric), rtol=1e-5, atol=1e-9
            )


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_the_logged_adversarial_loss_is_at_least_the_clean_loss(digits, loss):
    """On every step and the same targets, in the outer loss; with --max_change the support
    stays within that L-inf radius of the original images."""
    kernel_fn = functools.partial(relu_ntk, depth=2)
    x, y = digits.x_train[:30], digits.y_train[:30]
    optimised, history = robustify(
        kernel_fn, x, y, digits.x_train[30:130], digits.y_train[30:130], 0, n_classes=10,
        steps=6, lr=0.05, eps=EPS, n_steps=3, target_batch=50, loss=loss, max_change=0.1,
        progress=False,
    )  # fmt: skip
    clean, adversarial = (np.array(history[f"{k}_loss"]) for k in ("clean", "adversarial"))
    assert np.all(adversarial >= clean) and adversarial.mean() > 1.1 * clean.mean()
    assert np.abs(optimised - x).max() <= 0.1 + 1e-6 and np.abs(optimised - x).max() > 0.01
