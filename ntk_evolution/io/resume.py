"""Resuming run_exp.py: the resume state saved after each epoch (resume_state.pkl), checked
against the run that continues it; where training is, for the line Ctrl-C prints; and the
original's fractional-epoch checkpoints."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

from ntk_evolution.io.schemas import check_resume_state
from ntk_evolution.utils import UserError, load_pickle, save_pickle

FRACTIONAL_EPOCHS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5)


def fractional_saves(n_steps: int) -> dict[tuple[int, int], list[float]]:
    """{(epoch counted from 1, step index): [fractional epoch to save before that step]}, by the
    original's rule: before step i of epoch e (from 0), save the next pending fraction f once
    e + i / n_steps > f, at most one per step (so with very few steps per epoch a save can
    move into a later epoch)."""
    pending = list(FRACTIONAL_EPOCHS)
    saves: dict[tuple[int, int], list[float]] = {}
    epoch = 0
    while pending:
        for i in range(n_steps):
            if pending and epoch + i / n_steps > pending[0]:
                saves[(epoch + 1, i)] = [pending.pop(0)]
        epoch += 1
    return saves


RESUME_FILE = "resume_state.pkl"
METRICS_FILE = "metrics.csv"
# flags that must agree between an interrupted run and its --resume
RESUME_CONFIG = (
    "centering", "loose_bn_second", "do_standard_second",
    "random_seed", "base_model_path", "model", "loaders", "dataset", "second_lr", "eps",
    "batch_size", "pure_pgd", "train_path", "n_train",
)  # fmt: skip


class Position:
    """Where one run's training is (phase, epoch being run, step within it) and the last epoch
    whose resume state is saved: what Ctrl-C reports (interrupt_message). An interrupted run
    attaches its Position to the KeyboardInterrupt it lets through (`err.position`)."""

    def __init__(self) -> None:
        self.at: tuple[int, int, int] | None = None
        self.saved: tuple[int, int] | None = None


def interrupt_message(cause: str = "interrupted", err: BaseException | None = None) -> str:
    """The one line Ctrl-C or SIGTERM prints (run_main's on_interrupt; `cause` says which, and
    `err`'s position, when it has one, where training was)."""
    position = getattr(err, "position", None) or Position()
    if position.at is None:
        where = f"{cause} before training started"
    else:
        where = f"{cause} at phase {{}} epoch {{}} step {{}}".format(*position.at)
    if position.saved is None:
        return f"{where}; no epoch is complete yet; run the same command to start again"
    return (
        f"{where}; the last complete epoch is saved; run the same command with --resume to continue"
    )


def save_resume_state(
    save_path: str, config: dict, phase: int, epoch: int, state: Any, results: dict
) -> None:
    """Everything needed to continue after `epoch` epochs of `phase`: the run's `config` (the
    RESUME_CONFIG flags), parameters, BatchNorm and optimizer state, results so far. Data order
    and PRNG keys derive from (seed, phase, epoch)."""
    record = {
        "config": config,
        "phase": phase,
        "epoch": epoch,
        "w": state.w,
        "theta_t": state.theta_t,
        "net_state": state.net_state,
        "opt_state_leaves": jax.tree.leaves(state.opt_state),
        "results": results,
    }
    save_pickle(record, os.path.join(save_path, RESUME_FILE))


def load_resume_state(
    save_path: str,
    config: dict,
    defaults: dict,
    epochs: dict[int, int],
    check_shapes: Callable[[dict, str], None],
) -> dict | None:
    """The checked resume state in save_path (None, said, when there is none), refused when
    it was written with another `config` (a flag missing from the file: its value in
    `defaults`), is past the `epochs` of its phase ({phase: epochs}), or does not fit the
    network (`check_shapes(record, path)` raises a UserError)."""
    path = os.path.join(save_path, RESUME_FILE)
    if not os.path.exists(path):
        print(f"--resume: no {RESUME_FILE} in {save_path}; starting from the beginning")
        return None
    record = check_resume_state(load_pickle(path, "resume state"), path)
    for name, wanted in config.items():  # a flag added since the file was written: its default
        value = record["config"].get(name, defaults.get(name))
        if wanted != value:
            raise UserError(
                f"--resume: {path} was written with --{name} {value!r}, not "
                f"{wanted!r}; use the interrupted run's flags"
            )
    epochs = epochs[record["phase"]]
    if record["epoch"] > epochs:
        raise UserError(
            f"--resume: {path} is past phase {record['phase']} epoch {record['epoch']}, more "
            f"than the {epochs} epochs asked for"
        )
    check_shapes(record, path)
    print(f"--resume: continuing after phase {record['phase']} epoch {record['epoch']}")
    return record
