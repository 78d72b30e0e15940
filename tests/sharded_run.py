"""Run by test_parallel.py in a subprocess, on as many (CPU) devices as XLA_FLAGS gives it: a
training epoch of clean steps and one of adversarial steps (cnn_small, BatchNorm in training
mode), a PGD attack, an evaluation whose batch does not divide over the devices, and a kernel.
Writes what they produced to the .npz named on the command line."""

from __future__ import annotations

import sys

import jax
import numpy as np

from ntk_evolution.attacks.autoattack import AUTOATTACK
from ntk_evolution.attacks.evaluation import (
    evaluate,
    make_attack_fn,
    make_autoattack_fns,
    make_logits_fn,
)
from ntk_evolution.attacks.pgd import attack_settings
from ntk_evolution.data import load_dataset
from ntk_evolution.dynamics import PHASE1
from ntk_evolution.kernels.ntk import empirical_ntk
from ntk_evolution.models import get_model, init_model
from ntk_evolution.parallel import default_compile_cache, initialize, replicate, shard_batch
from ntk_evolution.training import init_train_state, make_optimizer, make_train_step, run_epoch
from ntk_evolution.utils import UserError, is_writer, to_host

EPS = 32 / 255
AUTOATTACK_IMAGES = 48  # 12 per device on 4


def main(path: str, coordinator: str = "", processes: str = "1", process_id: str = "0") -> None:
    """With a coordinator address: one of `processes` processes (parallel.initialize)."""
    initialize(
        coordinator_address=coordinator,
        num_processes=int(processes),
        process_id=int(process_id),
        compile_cache=default_compile_cache(),  # the tests' (conftest.tests_cache_dir)
    )
    ds = load_dataset("digits")
    model = get_model("cnn_small", ds.n_classes)
    params, net_state = init_model(model, jax.random.PRNGKey(0), ds.image_shape)
    optimizer = make_optimizer(0.05)
    state = init_train_state(optimizer, params, None, net_state)
    x, y = ds.x_train[:512], ds.y_train[:512]
    for adversarial in (False, True):
        step = make_train_step(model, optimizer, PHASE1, adversarial=adversarial, eps=EPS)
        state, _ = run_epoch(
            step, state, x, y, batch_size=128, seed=0, key=jax.random.PRNGKey(1),
            description="epoch",
        )  # fmt: skip
    # evaluation on 150 images: test batches of 100 and 50, padded to the device count
    accuracy = evaluate(
        model, PHASE1, state.w, None, state.net_state, ds.x_test[:150], ds.y_test[:150],
        jax.random.PRNGKey(2), eps_linf=EPS, attacks=("linf",),
    )  # fmt: skip
    attack = make_attack_fn(model, PHASE1, **(attack_settings(EPS)["linf"] | {"n_steps": 10}))
    xb, yb = shard_batch(ds.x_test[:100], ds.y_test[:100])
    w, net = replicate((state.w, state.net_state))
    adversarial_images = to_host(attack(w, None, net, xb, yb, jax.random.PRNGKey(3)))
    # AutoAttack's four on the first 48 of them, sharded: each one's accuracy
    autoattack = make_autoattack_fns(model, PHASE1, eps=EPS, norm="linf", n_classes=10)
    logits = make_logits_fn(model, PHASE1)
    xa, ya = shard_batch(ds.x_test[:AUTOATTACK_IMAGES], ds.y_test[:AUTOATTACK_IMAGES])
    autoattack_accuracy = []
    for name in AUTOATTACK:  # not its zero-gradient check
        x_aa = autoattack[name](w, None, net, xa, ya, jax.random.PRNGKey(4))
        correct = jax.numpy.argmax(logits(w, None, net, x_aa), -1) == ya
        autoattack_accuracy.append(float(np.mean(to_host(correct))))
    kernel = empirical_ntk(model, state.w, state.net_state, ds.x_train[:30], chunk_size=10)
    flat = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(state.w)])
    bn = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(state.net_state)])
    try:  # last: on one device this epoch runs, and consumes (donates) the state
        run_epoch(step, state, x, y, batch_size=130, seed=0, key=jax.random.PRNGKey(1),
                  description="epoch")  # fmt: skip
        error = ""
    except UserError as err:
        error = str(err)

    if not is_writer():
        return
    np.savez(
        path,
        devices=jax.device_count(),
        shards=len(xb.sharding.device_set),
        params=flat,
        bn=bn,
        accuracy=np.array([accuracy["clean"], accuracy["linf"]]),
        adversarial=adversarial_images,
        autoattack=np.array(autoattack_accuracy),
        kernel=kernel,
        error=np.array(error),
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
