"""Schedules, loaders, fractional checkpoints and the adversarial step (SPEC conventions)."""

from __future__ import annotations

import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from helpers import random_images, small_model

from ntk_evolution.dynamics import PHASE1
from ntk_evolution.io.resume import FRACTIONAL_EPOCHS, fractional_saves
from ntk_evolution.training import (
    init_train_state,
    is_adversarial_epoch,
    make_optimizer,
    make_train_step,
    phase1_learning_rate,
)


def test_phase1_learning_rate_schedule_counts_epochs_from_one():
    assert phase1_learning_rate(1) == 0.1 and phase1_learning_rate(100) == 0.1
    assert phase1_learning_rate(101) == pytest.approx(0.01)
    assert phase1_learning_rate(150) == pytest.approx(0.01)
    assert phase1_learning_rate(151) == pytest.approx(0.001)


def test_loader_letters():
    assert not any(is_adversarial_epoch("C", e) for e in range(1, 200))
    assert all(is_adversarial_epoch("A", e) for e in range(1, 200))
    assert [is_adversarial_epoch("F", e) for e in (1, 50, 51, 100)] == [False, False, True, True]


@pytest.mark.parametrize("n_steps", [1, 4, 11, 390, 391])
def test_fractional_checkpoints_follow_the_original_rule(n_steps):
    """The original saves the next pending fraction f before the first step i of epoch e (from
    0) with e + i / n_steps > f, one per step."""
    saves = fractional_saves(n_steps)
    names = [f for fractions in saves.values() for f in fractions]
    assert sorted(names) == sorted(FRACTIONAL_EPOCHS) and len(saves) == len(names)
    positions = sorted(saves)
    for (epoch, step), f in zip(positions, names, strict=True):
        assert 0 <= step < n_steps
        assert epoch - 1 + step / n_steps > f
    if n_steps == 391:  # CIFAR-10 at batch 128 with the last partial batch, as the original
        assert saves[(1, 49)] == [0.125] and saves[(1, 196)] == [0.5] and saves[(2, 196)] == [1.5]
    if n_steps == 1:  # one step per epoch: the saves move into later epochs, one per step
        assert saves == {(e + 2, 0): [f] for e, f in enumerate(FRACTIONAL_EPOCHS)}


@pytest.mark.parametrize("pure_pgd,updates", [(False, 2), (True, 1)])
def test_adversarial_step_makes_the_original_two_updates_or_one(pure_pgd, updates):
    model, params, net_state = small_model("mlp_skinny")
    x = jnp.asarray(random_images(8))
    y = jnp.arange(8) % 10
    optimizer = make_optimizer(0.1)
    state = init_train_state(optimizer, params, None, net_state)
    step = make_train_step(model, optimizer, PHASE1, adversarial=True, eps=0.1, pure_pgd=pure_pgd)
    state, metrics = step(state, x, y, jax.random.PRNGKey(0))
    # optax's sgd-with-momentum state counts nothing; the injected-hyperparams wrapper does
    assert int(state.opt_state.count) == updates
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
def test_chain_script_runs_phase1_phase2_eval_and_kernel(tmp_path):
    env = dict(
        os.environ,
        DATASET="digits",
        MODEL="cnn_small",
        STANDARD_EPOCHS="3",
        FROM_EPOCH="2",
        LINEAR_EPOCHS="1",
        EPS="32",
        OUT=str(tmp_path / "run"),
        EXTRA="--n_test 100",
        PYTHON=os.path.join(ROOT, ".venv", "bin", "python")
        if os.path.exists(os.path.join(ROOT, ".venv", "bin", "python"))
        else "python",
    )
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "chain.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "run"
    assert (out / "phase_1" / "parameters_checkpoint_2.pkl").is_file()
    assert (out / "phase_2_centered" / "parameters_final.pkl").is_file()
    assert (out / "phase_2_centered" / "test_results" / "adv_examples_test_results.pkl").is_file()
    assert (out / "phase_1" / "saved_kernel_class_0_500.pkl").is_file()


def test_a_hook_reading_the_state_never_sees_an_unchecked_diverged_step():
    """run_epoch reads each step's loss one step late, but on_step's get_state() checks the
    previous step first: a checkpoint hook raises TrainingDiverged instead of saving the
    state after a non-finite loss. A hook that does not read the state does not stop it."""
    from ntk_evolution.training import TrainingDiverged, run_epoch

    def step_fn(state, x, y, key):
        loss = jnp.where(state["n"] >= 1, jnp.nan, 1.0)  # step 1 diverges
        return {"n": state["n"] + 1}, {"loss": loss, "accuracy": jnp.float32(0)}

    x, y = random_images(8), np.zeros(8, np.int32)
    seen = []

    def saving_hook(i, get_state):
        seen.append((i, int(get_state()["n"])))

    def epoch(hook):
        kwargs = {"batch_size": 2, "seed": 0, "key": jax.random.PRNGKey(0), "description": "t"}
        run_epoch(step_fn, {"n": jnp.int32(0)}, x, y, on_step=hook, **kwargs)

    with pytest.raises(TrainingDiverged, match="at step 2"):
        epoch(saving_hook)
    assert seen == [(0, 0), (1, 1)]  # step 2's hook never got the diverged state
    with pytest.raises(TrainingDiverged, match="at step 2"):
        epoch(lambda i, get_state: None)
