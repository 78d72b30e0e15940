"""Behaviours matched to the original code (yolky/adversarial_ntk_evolution), one test each:
see docs/differences.md for what is kept different and why."""

from __future__ import annotations

import os
import pickle
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_images, small_model

import calculate_kernel
import eval_and_make_adv
import run_exp
from ntk_evolution import training
from ntk_evolution.attacks.pgd import _random_start, pgd
from ntk_evolution.data import class_balanced_subset, load_dataset, to_8_bits
from ntk_evolution.dynamics import PHASE1, Dynamics
from ntk_evolution.models import get_model, init_model
from ntk_evolution.training import init_train_state, make_optimizer, make_train_step

DIGITS = "--dataset digits --model cnn_small --eps 32 --n_test 50"


def load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def leaves(tree):
    return [np.asarray(v) for v in jax.tree.leaves(tree)]


def same(a, b) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(leaves(a), leaves(b), strict=True))


def test_resnet18_output_layer_starts_at_zero():
    """The original's ResNet sets the logits layer's w_init to zeros: logits are 0 at init."""
    model = get_model("resnet18", 10)
    params, net_state = init_model(model, jax.random.PRNGKey(0), (32, 32, 3))
    assert np.all(np.asarray(params["classifier"]["w"]) == 0)
    logits, _ = model.apply(params, net_state, jnp.asarray(random_images(2, (32, 32, 3))), False)
    np.testing.assert_array_equal(np.asarray(logits), 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("dynamics", [PHASE1, Dynamics(linear=True, bn_train=True)])
def test_training_pgd_sees_batchnorm_in_inference_mode(monkeypatch, dynamics):
    """The original makes the training-time PGD examples with is_training=False: each example's
    logits then do not depend on the rest of the batch (batch statistics would)."""
    model, params, net_state = small_model("cnn_small")
    x, y = jnp.asarray(random_images(8)), jnp.arange(8) % 10
    seen = []

    def recording_pgd(logits_fn, x, y, key, eps, step_size=None):
        seen.append((np.asarray(logits_fn(x))[:1], np.asarray(logits_fn(x[:1]))))
        return x

    monkeypatch.setattr(training, "pgd_linf_train", recording_pgd)
    optimizer = make_optimizer(0.1)
    theta_t = params if dynamics.linear else None
    state = init_train_state(optimizer, params, theta_t, net_state)
    step = make_train_step(model, optimizer, dynamics, adversarial=True, eps=0.1)
    with jax.disable_jit():
        step(state, x, y, jax.random.PRNGKey(0))
    ((in_batch, alone),) = seen
    np.testing.assert_allclose(in_batch, alone, rtol=1e-5, atol=1e-6)


def test_l2_pgd_clips_to_the_image_then_projects():
    """One L2 step, as the original's do_perturbation_step_l_2: clip to [0, 1], then project the
    difference onto the eps-ball."""
    weights = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)

    def logits_fn(z):
        return z.reshape(len(z), -1) @ weights

    x = jnp.asarray(random_images(4) * 0.2 + 0.8)  # near 1: the clip matters
    y, key, eps, step = jnp.zeros(4, jnp.int32), jax.random.PRNGKey(0), 0.5, 0.4
    out = pgd(logits_fn, x, y, key, eps=eps, step_size=step, n_steps=1, norm="l2")
    start = jnp.clip(x + _random_start(key, x.shape, eps, "l2"), 0, 1)
    grad = jax.grad(lambda z: jnp.sum(-jax.nn.log_softmax(logits_fn(z))[:, 0]))(start)
    moved = jnp.clip(
        start + step * grad / jnp.linalg.norm(grad.reshape(4, -1), axis=1)[:, None, None, None],
        0,
        1,
    )  # noqa: E501
    delta = moved - x
    size = jnp.linalg.norm(delta.reshape(4, -1), axis=1)[:, None, None, None]
    expected = x + delta * jnp.minimum(1.0, eps / size)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)


def test_kernel_subset_is_the_originals_draw():
    """np.random.seed(seed), then np.random.choice(len(members), n, replace=False) per class."""
    labels = np.random.default_rng(1).integers(0, 10, 400)
    np.random.seed(7)  # noqa: NPY002 (the original's legacy global draw, on purpose)
    expected = []
    for c in range(10):
        members = np.where(labels == c)[0]
        expected.extend(members[np.random.choice(len(members), 5, replace=False)])  # noqa: NPY002
    np.testing.assert_array_equal(class_balanced_subset(labels, 50, 10, 7), expected)


def test_test_path_images_are_truncated_to_8_bits():
    """The original passes --test_path images through ToPILImage (floor of 255 x) and back."""
    x = np.array([0.0, 1.0, 3.7 / 255, 254.99 / 255, 0.5], np.float32)
    np.testing.assert_array_equal(to_8_bits(x) * 255, np.float32([0, 255, 3, 254, 127]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Phase 1 (2 epochs, checkpoints), then phase 2 three ways from its epoch-1 checkpoint."""
    root = tmp_path_factory.mktemp("fidelity")
    phase1 = root / "phase1"
    run_exp.main(shlex.split(
        f"{DIGITS} --standard_epochs 2 --linear_epochs 0 --save_models --constant_save "
        f"--skip_first_test --skip_second_test --save_path {phase1}"
    ))  # fmt: skip
    base = phase1 / "parameters_checkpoint_1.pkl"
    for name, flags in {
        "linear": "--loaders CC --centering --constant_save_linear",
        "standard": "--loaders CC --do_standard_second --centering",
        "loose_adv": "--loaders CA --loose_bn_second --pure_pgd",
    }.items():
        run_exp.main(shlex.split(
            f"{DIGITS} --base_model_path {base} --linear_epochs 1 {flags} --save_models "
            f"--skip_first_test --skip_second_test --save_path {root / name}"
        ))  # fmt: skip
    return root


@pytest.mark.slow
def test_phase1_checkpoints_keep_lin_params_at_initialisation(runs):
    init = load(runs / "phase1" / "parameters_checkpoint_0.pkl")
    later = load(runs / "phase1" / "parameters_checkpoint_1.pkl")
    assert same(later["lin_params"], init["params"]) and not same(later["params"], init["params"])
    final = load(runs / "phase1" / "parameters_final.pkl")  # phase 2 of 0 epochs: w = theta_t
    assert same(final["lin_params"], final["params"])


@pytest.mark.slow
def test_phase2_checkpoints_name_theta_t_and_w_as_the_original(runs):
    theta_t = load(runs / "phase1" / "parameters_checkpoint_1.pkl")["params"]
    linear = load(runs / "linear" / "parameters_final.pkl")
    assert same(linear["params"], theta_t) and not same(linear["lin_params"], theta_t)
    standard = load(runs / "standard" / "parameters_final.pkl")  # trains params, centers on lin
    assert same(standard["lin_params"], theta_t) and not same(standard["params"], theta_t)


def test_linear_checkpoint_is_the_state_before_the_epochs_last_step(runs):
    """The original rewrites parameters_checkpoint_linear_{e} before every step of epoch e:
    the file holds the state after all but the last step (11 steps per digits epoch)."""
    theta_t = load(runs / "phase1" / "parameters_checkpoint_1.pkl")["params"]
    checkpoint = load(runs / "linear" / "parameters_checkpoint_linear_0.pkl")
    final = load(runs / "linear" / "parameters_final.pkl")
    assert not same(checkpoint["lin_params"], theta_t)  # trained 10 steps
    assert not same(checkpoint["lin_params"], final["lin_params"])  # not the 11th


def test_loose_bn_second_adversarial_update_keeps_batchnorm_frozen(runs):
    """With --loose_bn_second the original's phase-2 update on PGD examples still runs in
    inference mode: with --pure_pgd (no clean update) BatchNorm never changes in phase 2."""
    base = load(runs / "phase1" / "parameters_checkpoint_1.pkl")
    final = load(runs / "loose_adv" / "parameters_final.pkl")
    assert same(final["net_state"], base["net_state"])


@pytest.mark.slow
def test_standard_second_continues_phase1_optimizer(tmp_path):
    """After phase 1 in the same run, --do_standard_second keeps phase 1's SGD (its learning
    rate, momentum and step count), not a fresh one at --second_lr."""
    run_exp.main(shlex.split(
        f"{DIGITS} --standard_epochs 1 --linear_epochs 1 --do_standard_second --second_lr 0.003 "
        f"--skip_first_test --skip_second_test --save_path {tmp_path}"
    ))  # fmt: skip
    state = load(tmp_path / "resume_state.pkl")
    count, learning_rate = (np.asarray(v) for v in state["opt_state_leaves"][:2])
    assert int(count) == 2 * 11 and float(learning_rate) == pytest.approx(0.1)


def test_eval_uses_params_without_linear_and_stores_predicted_labels(runs):
    """Without --linear the original evaluates `params` (centered on lin_params with
    --centering); predictions_* are argmax labels; components of the plain network are
    (logits, 0)."""
    path = runs / "phase1" / "parameters_checkpoint_1.pkl"  # params trained, lin_params at init
    result = eval_and_make_adv.main(shlex.split(f"{DIGITS} --model_path {path} --no_adv"))
    ckpt = load(path)
    model = get_model("cnn_small", 10)
    ds = load_dataset("digits")
    logits, _ = model.apply(ckpt["params"], ckpt["net_state"], ds.x_test[:50], False)
    np.testing.assert_array_equal(result["predictions_clean"], np.argmax(logits, 1))
    np.testing.assert_allclose(result["components_clean"]["f"], logits, rtol=1e-5, atol=1e-5)
    assert np.all(result["components_clean"]["df"] == 0)
    assert os.path.isfile(runs / "phase1" / "test_results_test_results.pkl")  # original's name


def test_kernel_default_name_is_the_originals(runs):
    path = runs / "phase1" / "parameters_checkpoint_1.pkl"
    calculate_kernel.main(
        shlex.split(f"--dataset digits --model cnn_small --model_path {path} --dataset_size 20 "
                    "--class_index 0")
    )  # fmt: skip
    assert os.path.isfile(runs / "phase1" / "saved_kernel_class_0_20.pkl")
