"""Training: one jitted step per step kind, and the epoch loop shared by both phases.

An adversarial step is, by default, the original's two updates per batch: an SGD step on the
clean batch, then an SGD step on L-inf PGD examples made against the updated model. With
`pure_pgd` it is a single update on PGD examples (Madry et al.). As in the original, the PGD
examples are made with BatchNorm in inference mode (running statistics), whatever the phase.
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from ntk_evolution.attacks.pgd import TRAIN_PGD_STEPS, pgd_linf_train, pgd_step_size
from ntk_evolution.data import iterate_batches, num_batches
from ntk_evolution.dynamics import Dynamics, forward, loss_fn
from ntk_evolution.parallel import replicate, shard_batch
from ntk_evolution.utils import UserError, progress_bar, write_csv

MOMENTUM = 0.9


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


F_LOADER_CLEAN_EPOCHS = 50  # loader 'F': clean for the first 50 epochs of its phase


class TrainState(NamedTuple):
    """What a step updates: trained params w, the fixed theta_t (None in phase 1), BatchNorm
    state and the SGD-momentum state."""

    w: hk.Params
    theta_t: hk.Params | None
    net_state: hk.State
    opt_state: Any


@functools.cache  # one optimizer per rate, so that its compiled steps are reused
def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """SGD with momentum 0.9, no weight decay; the rate can be changed between epochs."""
    return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=MOMENTUM)


def set_learning_rate(state: TrainState, learning_rate: float) -> None:
    state.opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)


def phase1_learning_rate(epoch: int, base: float = 0.1) -> float:
    """0.1 for epochs 1..100, 0.01 for 101..150, 0.001 after (epochs counted from 1)."""
    if epoch <= 100:
        return base
    return base * (0.1 if epoch <= 150 else 0.01)


def init_train_state(
    optimizer: optax.GradientTransformation, w: hk.Params, theta_t: Any, net_state: hk.State
) -> TrainState:
    return TrainState(w, theta_t, net_state, optimizer.init(w))


def make_train_step(
    model: hk.TransformedWithState,
    optimizer: optax.GradientTransformation,
    dynamics: Dynamics,
    *,
    adversarial: bool,
    eps: float,
    pure_pgd: bool = False,
    adversarial_dynamics: Dynamics | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """Jitted step(state, x, y, key) -> (state, {'loss', 'accuracy'}) of the last update.
    The update on PGD examples uses `adversarial_dynamics` (default: `dynamics`); the original
    makes it with BatchNorm in inference mode in phase 2, even with --loose_bn_second. The
    PGD examples themselves always see BatchNorm in inference mode.
    The step is compiled once per model, optimizer, dynamics and flags (compiled_train_step),
    eps and the PGD step size being arguments of it.
    The input state's buffers are donated: use only the returned state afterwards."""
    compiled = compiled_train_step(
        model, optimizer, dynamics, adversarial, pure_pgd, adversarial_dynamics or dynamics
    )
    eps32 = np.float32(eps)
    step_size = np.float32(pgd_step_size(eps, TRAIN_PGD_STEPS))
    return functools.partial(compiled, eps=eps32, step_size=step_size)


@functools.lru_cache(maxsize=32)
def compiled_train_step(
    model: hk.TransformedWithState,
    optimizer: optax.GradientTransformation,
    dynamics: Dynamics,
    adversarial: bool,
    pure_pgd: bool,
    adversarial_dynamics: Dynamics,
) -> Callable:
    """Jitted step(state, x, y, key, eps, step_size): see make_train_step."""
    attack_dynamics = dynamics._replace(bn_train=False)

    def update(state: TrainState, x, y, dynamics=dynamics):
        (loss, (net_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.w, model, dynamics, state.theta_t, state.net_state, x, y
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.w)
        w = optax.apply_updates(state.w, updates)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
        return TrainState(w, state.theta_t, net_state, opt_state), metrics

    def step(state: TrainState, x, y, key, eps, step_size):
        if not adversarial:
            return update(state, x, y)
        if not pure_pgd:
            state, _ = update(state, x, y)

        def logits_fn(x_in):
            return forward(model, attack_dynamics, state.w, state.theta_t, state.net_state, x_in)[0]

        x_adv = pgd_linf_train(logits_fn, x, y, key, eps, step_size)
        return update(state, x_adv, y, adversarial_dynamics)

    return jax.jit(step, donate_argnums=0)


def is_adversarial_epoch(loader: str, epoch: int) -> bool:
    """Loader letter C (clean), A (adversarial) or F (clean for 50 epochs, then adversarial);
    epochs counted from 1 within the phase."""
    return loader == "A" or (loader == "F" and epoch > F_LOADER_CLEAN_EPOCHS)


def _record(totals: dict, bar: tqdm, description: str, i: int, metrics: dict) -> None:
    """Add step i's metrics to the running totals; stop on a non-finite loss. Called once step
    i + 1 is dispatched, so that the host waits for a step while the next one is queued."""
    metrics = jax.device_get(metrics)
    if not np.isfinite(metrics["loss"]):
        bar.close()
        raise TrainingDiverged(
            f"{description}: the training loss became {metrics['loss']} at step {i + 1}; "
            "stopped, keeping the last good checkpoint and resume state (try a smaller "
            "learning rate)"
        )
    for name in totals:
        totals[name] += float(metrics[name])
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}", refresh=False)


def run_epoch(
    step_fn: Callable,
    state: TrainState,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    seed: Any,
    key: jax.Array,
    description: str,
    on_step: Callable[[int, Callable[[], TrainState]], None] | None = None,
) -> tuple[TrainState, dict]:
    """One pass over (x, y) in an order drawn from `seed`; `on_step(i, get_state)` is called
    before step i (for fractional-epoch checkpoints): get_state() returns the state once the
    previous step's loss has been checked, so a hook that saves never saves a diverged state,
    and a hook that does not call it lets the host queue steps ahead. Each batch is split over
    the devices and the state replicated (parallel.py). Returns the state and mean
    loss/accuracy."""
    rng = np.random.default_rng(seed)
    state = replicate(state)
    totals = {"loss": 0.0, "accuracy": 0.0}
    n_steps = num_batches(len(x), batch_size)
    bar = progress_bar(iterate_batches(x, y, batch_size, rng), total=n_steps, desc=description)
    # one call for every step's key (the same keys as fold_in(key, i) step by step), on the host
    keys = np.asarray(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, np.arange(n_steps)))
    pending = []  # the previous step's (index, metrics), read after the next step is dispatched

    def flush() -> None:
        while pending:
            _record(totals, bar, description, *pending.pop())

    def checked_state() -> TrainState:
        flush()
        return state

    for i, (xb, yb) in enumerate(bar):
        if on_step is not None:
            on_step(i, checked_state)
        xb, yb = shard_batch(xb, yb)
        state, metrics = step_fn(state, xb, yb, keys[i])
        flush()
        pending.append((i, metrics))
    flush()
    bar.close()
    return state, {name: total / max(n_steps, 1) for name, total in totals.items()}


METRICS_FIELDS = (
    "phase", "epoch", "adversarial", "lr", "loss", "train_accuracy", "epoch_time_s",
    "wall_time_s", "test_clean", "test_linf", "test_l2",
)  # fmt: skip


class TrainingLog:
    """metrics.csv of a run_exp.py run: one row per trained epoch (phase, epoch, whether it was
    adversarial, learning rate, mean training loss and accuracy, the epoch's time and the
    run's cumulative training time) and one row per test (the test figures in test_clean,
    test_linf, test_l2). Rewritten whole and atomically after each row (kept in memory only
    when `path` is None). A resumed run keeps the rows up to its resume point and appends after
    them."""

    def __init__(self, path: str | None, resume_at: tuple[int, int] | None = None):
        self.path = path
        self.rows: list[dict] = []
        if resume_at is not None and path is not None and os.path.isfile(path):
            with open(path, newline="") as f:
                self.rows = [
                    row
                    for row in csv.DictReader(f)
                    if (int(row["phase"]), float(row["epoch"] or 0)) <= resume_at
                ]
        times = [float(r["wall_time_s"]) for r in self.rows if r.get("wall_time_s")]
        self.wall_time = times[-1] if times else 0.0

    def epoch(self, phase: int, epoch: int, adversarial: bool, lr: float, metrics: dict,
              seconds: float) -> None:  # fmt: skip
        self.wall_time += seconds
        self._add(
            phase=phase, epoch=epoch, adversarial=int(adversarial), lr=lr, loss=metrics["loss"],
            train_accuracy=metrics["accuracy"], epoch_time_s=round(seconds, 3),
            wall_time_s=round(self.wall_time, 3),
        )  # fmt: skip

    def test(self, phase: int, epoch: float | None, results: dict) -> None:
        self._add(phase=phase, epoch="" if epoch is None else epoch,
                  **{f"test_{k}": v for k, v in results.items()})  # fmt: skip

    def _add(self, **row) -> None:
        self.rows.append({name: row.get(name, "") for name in METRICS_FIELDS})
        if self.path is not None:
            write_csv(self.rows, self.path, METRICS_FIELDS)

    def numeric(self) -> list[dict]:
        """The rows with numbers as floats and blanks as None (for plotting)."""
        return [
            {k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in self.rows
        ]
