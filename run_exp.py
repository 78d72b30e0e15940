"""Train a network in two phases and evaluate it after each (Loo et al., NeurIPS 2022).

Phase 1: standard dynamics, SGD (lr 0.1 -> 0.01 after epoch 100 -> 0.001 after epoch 150).
Phase 2: from theta_t (end of phase 1, or --base_model_path), train w under linearized
dynamics (--centering: centered) or standard dynamics (--do_standard_second), lr --second_lr,
BatchNorm frozen unless --loose_bn_second. --loaders XY picks clean (C), adversarial (A) or
clean-then-adversarial (F) data for phase 1 (X) and phase 2 (Y).

Writes into --save_path: checkpoints, results.pkl, resume_state.pkl, metrics.csv (a row per
epoch and per test) and training_curves.png (drawn from it). While it runs it holds a lock on
--save_path (.run_exp.lock): a second run into the same folder is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import time
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ntk_evolution.attacks.evaluation import evaluate
from ntk_evolution.cli import (
    Parser,
    add_eps_flag,
    add_model_flags,
    add_seed_flag,
    add_shared_flags,
    finite_float,
    non_negative_int,
    positive_int,
)
from ntk_evolution.data import Dataset, load_dataset, num_batches
from ntk_evolution.dynamics import PHASE1, Dynamics
from ntk_evolution.figures import plot_training_curves
from ntk_evolution.io.checkpoints import (
    LoadedModel,
    checkpoint_epoch,
    checkpoint_meta,
    checkpoint_name,
    load_examples,
    load_model_from_args,
    save_checkpoint,
)
from ntk_evolution.io.resume import (
    METRICS_FILE,
    RESUME_CONFIG,
    Position,
    fractional_saves,
    interrupt_message,
    load_resume_state,
    restore_train_state,
    save_resume_state,
)
from ntk_evolution.io.schemas import check_results
from ntk_evolution.models import get_model, init_model
from ntk_evolution.parallel import initialize
from ntk_evolution.run_lock import folder_lock
from ntk_evolution.training import (
    TrainingLog,
    TrainState,
    init_train_state,
    is_adversarial_epoch,
    make_optimizer,
    make_train_step,
    phase1_learning_rate,
    run_epoch,
    set_learning_rate,
)
from ntk_evolution.utils import UserError, is_writer, run_main, save_pickle, to_numpy

PHASE1_LR = 0.1


def build_parser() -> Parser:
    p = Parser(__doc__)
    p.add_argument("--data_path", default="./X_nothing", help="Accepted for compatibility; unused.")
    p.add_argument("--standard_epochs", type=non_negative_int, default=100, help="Phase-1 epochs.")
    p.add_argument("--linear_epochs", type=non_negative_int, default=100, help="Phase-2 epochs.")
    p.add_argument("--centering", action="store_true", help="Drop f(x; theta_t) in phase 2.")
    p.add_argument(
        "--save_models", action="store_true", help="Write parameters_final.pkl at the end."
    )
    p.add_argument(
        "--constant_save",
        action="store_true",
        help="Checkpoint at the start of each phase-1 epoch.",
    )
    p.add_argument(
        "--constant_save_linear",
        action="store_true",
        help="Checkpoint at the start of each phase-2 epoch.",
    )
    p.add_argument("--loose_bn_second", action="store_true", help="BatchNorm trains in phase 2.")
    p.add_argument(
        "--do_standard_second", action="store_true", help="Phase 2 with standard dynamics."
    )
    p.add_argument("--skip_first_test", action="store_true", help="Do not test after phase 1.")
    p.add_argument("--skip_second_test", action="store_true", help="Do not test after phase 2.")
    add_seed_flag(p, "initialisation, data order and attacks")
    p.add_argument(
        "--base_model_path", default="", help="Phase-1 checkpoint: skip phase 1, go to phase 2."
    )
    add_model_flags(p)
    p.add_argument(
        "--loaders", default="CC", help="Two letters of C/A/F: data of phase 1, of phase 2."
    )
    p.add_argument(
        "--second_lr",
        type=finite_float(0.0, inclusive=False),
        default=0.01,
        help="Phase-2 learning rate.",
    )
    add_eps_flag(p)
    p.add_argument("--save_path", default="./saved_models/", help="Output folder.")
    # added
    add_shared_flags(p)
    p.add_argument(
        "--n_test", type=positive_int, default=None, help="Evaluate on the first N test images."
    )
    p.add_argument(
        "--n_train",
        type=positive_int,
        default=None,
        help="Train on the first N training images (of --train_path's when given); for quick runs.",
    )
    p.add_argument("--batch_size", type=positive_int, default=128, help="Training batch size.")
    p.add_argument(
        "--resume", action="store_true", help=f"Continue from --save_path/{'resume_state.pkl'}."
    )
    p.add_argument(
        "--train_path",
        default="",
        help="Train on this adv_examples pickle (e.g. robustify_dataset.py's) instead of the "
        "dataset's training split; the test split stays.",
    )
    p.add_argument(
        "--pure_pgd",
        action="store_true",
        help="Adversarial step = one update on PGD examples (default: clean step, then PGD step).",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not re.fullmatch(r"[CAF]{2}", args.loaders):
        p.error(f"--loaders {args.loaders!r} must be two letters of C, A, F (e.g. CC, AC, CA)")
    return args


def resume_config(args) -> dict:
    """The flags an interrupted run and its --resume must agree on, by name."""
    return {name: getattr(args, name) for name in RESUME_CONFIG}


def train_phase(
    args, run, dynamics, state, *, phase, start_epoch, epochs, loader, lr_for_epoch, key,
    save_hook, results, adversarial_dynamics=None,
):  # fmt: skip
    """Train epochs start_epoch + 1 .. epochs of `phase` from the TrainState `state` with
    loader letter `loader`, saving the resume state after each."""
    optimizer = make_optimizer(lr_for_epoch(1))
    eps = args.eps_linf
    steps = {}
    for epoch in range(start_epoch + 1, epochs + 1):
        adversarial = is_adversarial_epoch(loader, epoch)
        if adversarial not in steps:
            steps[adversarial] = make_train_step(
                run.model,
                optimizer,
                dynamics,
                adversarial=adversarial,
                eps=eps,
                pure_pgd=args.pure_pgd,
                adversarial_dynamics=adversarial_dynamics,
            )
        set_learning_rate(state, lr_for_epoch(epoch))
        Position.at = (phase, epoch, 0)
        save_hook(epoch, None, lambda state=state: state)
        start = time.time()
        state, metrics = run_epoch(
            steps[adversarial],
            state,
            run.ds.x_train,
            run.ds.y_train,
            batch_size=args.batch_size,
            seed=(args.random_seed, phase, epoch),
            key=jax.random.fold_in(key, epoch),
            description=f"phase {phase} epoch {epoch}/{epochs}",
            on_step=lambda i, s, epoch=epoch: track_step(phase, epoch, i, s, save_hook),
        )
        save_resume_state(args.save_path, resume_config(args), phase, epoch, state, results)
        run.log.epoch(phase, epoch, adversarial, lr_for_epoch(epoch), metrics, time.time() - start)
        tqdm.write(
            f"phase {phase} epoch {epoch}/{epochs} {'adv' if adversarial else 'clean'} "
            f"lr {lr_for_epoch(epoch):g} loss {metrics['loss']:.4f} "
            f"train acc {metrics['accuracy']:.4f} ({time.time() - start:.1f}s)"
        )
    if epochs > start_epoch:  # the phase's curves while the next phase runs; none trained: same
        draw_curves(args, run)
    return state


def track_step(phase: int, epoch: int, step: int, get_state, save_hook) -> None:
    """Before step `step` of the epoch: note the position, then the phase's save hook."""
    Position.at = (phase, epoch, step)
    save_hook(epoch, step, get_state)


def draw_curves(args, run: Run) -> None:
    """training_curves.png from metrics.csv, beside it."""
    if run.log.rows:
        title = f"training curves of {os.path.basename(os.path.abspath(args.save_path))}: "
        title += f"{args.model} on {args.dataset}, --loaders {args.loaders}, eps {args.eps:g}/255"
        plot_training_curves(
            run.log.numeric(), title, os.path.join(args.save_path, "training_curves.png")
        )


def format_results(name: str, results: dict | None) -> str:
    if results is None:
        return f"{name}: not evaluated"
    return f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items())


class Run(NamedTuple):
    """What both phases share: the data, the network and the keys drawn from --random_seed."""

    model: hk.TransformedWithState
    ds: Dataset
    x_test: np.ndarray
    y_test: np.ndarray
    init_key: jax.Array
    train_key: jax.Array
    eval_key: jax.Array
    steps_per_epoch: int
    log: TrainingLog | None = None  # metrics.csv


def setup(args) -> tuple[argparse.Namespace, Run, LoadedModel | None]:
    """Data (--train_path replacing the training split), the network (--model, or the one of
    --base_model_path's checkpoint), the keys, the writable --save_path; and the
    --base_model_path checkpoint when given."""
    args, loaded = load_model_from_args(args, args.base_model_path)
    ds = load_dataset(args.dataset, args.data_root)
    if args.train_path:
        x_train, y_train = load_examples(
            args.train_path, ds.image_shape, ds.n_classes, args.trust_pickle
        )
        ds = dataclasses.replace(ds, x_train=x_train, y_train=y_train)
        print(f"training on the {len(x_train)} images of {args.train_path}")
    if args.n_train is not None:
        ds = dataclasses.replace(
            ds, x_train=ds.x_train[: args.n_train], y_train=ds.y_train[: args.n_train]
        )
    if len(ds.x_train) < args.batch_size:
        raise UserError(
            f"--batch_size {args.batch_size} exceeds the {len(ds.x_train)} training images"
        )
    try:
        os.makedirs(args.save_path, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --save_path {args.save_path}: {err.strerror}") from None
    if not os.access(args.save_path, os.W_OK):
        raise UserError(f"--save_path {args.save_path} is not writable")
    init_key, train_key, eval_key = jax.random.split(jax.random.PRNGKey(args.random_seed), 3)
    model = get_model(args.model, ds.n_classes) if loaded is None else loaded.model
    run = Run(
        model,
        ds,
        ds.x_test[: args.n_test],
        ds.y_test[: args.n_test],
        init_key,
        train_key,
        eval_key,
        num_batches(len(ds.x_train), args.batch_size),
    )
    return args, run, loaded


def phase1(args, run: Run, resume: dict | None, results: dict) -> TrainState:
    """Phase 1: standard dynamics, SGD on the original's schedule, from the initialisation
    drawn with --random_seed (or from an interrupted phase 1); with --constant_save a
    checkpoint before each epoch and at the original's fractional epochs. Returns its final
    state (w = theta_t, the network it ends at)."""
    params, net_state = init_model(run.model, run.init_key, run.ds.image_shape)
    fractions = fractional_saves(run.steps_per_epoch)
    # as in the original, phase-1 checkpoints keep lin_params at the initial parameters
    init_params = jax.tree.map(np.array, params)  # a copy: params' buffers are donated

    def save_phase1(epoch, step, get_state):
        if not args.constant_save:
            return
        if step is None:
            saves = [(epoch - 1, (epoch - 1) * run.steps_per_epoch)]
        else:
            saves = [
                (f, (epoch - 1) * run.steps_per_epoch + step)
                for f in fractions.get((epoch, step), [])
            ]
        for at_epoch, at_step in saves:
            state = get_state()
            save_checkpoint(
                os.path.join(args.save_path, checkpoint_name(at_epoch)),
                state.w,
                init_params,
                state.net_state,
                checkpoint_meta(args, 1, at_epoch, at_step),
            )

    return train_phase(
        args,
        run,
        PHASE1,
        init_train_state(
            make_optimizer(phase1_learning_rate(1, PHASE1_LR)), params, None, net_state
        )
        if resume is None
        else restore_train_state(resume),
        phase=1,
        start_epoch=0 if resume is None else resume["epoch"],
        epochs=args.standard_epochs,
        loader=args.loaders[0],
        lr_for_epoch=lambda e: phase1_learning_rate(e, PHASE1_LR),
        key=jax.random.fold_in(run.train_key, 1),
        save_hook=save_phase1,
        results=results,
    )


def phase2_dynamics(args) -> Dynamics:
    """Linearized (--centering: centered) dynamics, or standard with --do_standard_second;
    BatchNorm frozen unless --loose_bn_second."""
    return Dynamics(
        linear=not args.do_standard_second,
        centering=args.centering,
        bn_train=args.loose_bn_second,
    )


def start_phase2(
    args, run: Run, end: TrainState, results: dict, end_epoch: float | None
) -> TrainState:
    """Test the phase-1 network `end` (theta_t), then phase 2's starting state: w = theta_t,
    and SGD(--second_lr), or, as in the original, with --do_standard_second after phase 1,
    phase 1's optimizer continued (its last learning rate and momentum)."""
    params, net_state = end.w, end.net_state
    if not args.skip_first_test:
        results["standard"] = evaluate(
            run.model, PHASE1, params, None, net_state, run.x_test, run.y_test, run.eval_key,
            eps_linf=args.eps_linf, description="evaluate phase 1",
        )  # fmt: skip
        run.log.test(1, end_epoch, results["standard"])
    theta_t = jax.tree.map(jnp.asarray, params)
    w = jax.tree.map(jnp.copy, theta_t)  # a separate buffer: w is donated at each step
    state = init_train_state(
        make_optimizer(phase2_learning_rate(args)), w, theta_t, jax.tree.map(jnp.asarray, net_state)
    )
    if continues_phase1_optimizer(args):
        state = state._replace(opt_state=end.opt_state)
    save_resume_state(args.save_path, resume_config(args), 2, 0, state, results)
    return state


def continues_phase1_optimizer(args) -> bool:
    """--do_standard_second after phase 1 continues phase 1's optimizer, as the original does;
    after --base_model_path it is a fresh SGD(--second_lr)."""
    return args.do_standard_second and not args.base_model_path


def announce_phase2_optimizer(args) -> None:
    if continues_phase1_optimizer(args):
        print(
            f"--do_standard_second continues phase 1's optimizer (lr {phase2_learning_rate(args):g}"
            ", momentum kept), as the original does; --second_lr applies with --base_model_path"
        )


def phase2_learning_rate(args) -> float:
    if continues_phase1_optimizer(args):
        return phase1_learning_rate(args.standard_epochs + 1, PHASE1_LR)
    return args.second_lr


def phase2(args, run: Run, state: TrainState, start_epoch: int, results: dict) -> TrainState:
    """Phase 2: train w from theta_t under phase2_dynamics, lr phase2_learning_rate; with
    --constant_save_linear a checkpoint per epoch, with --save_models parameters_final.pkl;
    then test it."""
    dynamics = phase2_dynamics(args)
    spe = run.steps_per_epoch

    def save(path: str, state: TrainState, epoch: float, step: int) -> None:
        # the original trains `params` under --do_standard_second (lin_params = theta_t, the
        # centering reference) and `lin_params` under linearized dynamics (params = theta_t)
        w, theta_t = state.w, state.theta_t
        params, lin_params = (w, theta_t) if args.do_standard_second else (theta_t, w)
        meta = checkpoint_meta(args, 2, epoch, step)
        save_checkpoint(path, params, lin_params, state.net_state, meta)

    def save_phase2(epoch, step, get_state):
        # the original rewrites this file before every step of the epoch: what stays is the
        # state before the epoch's last step
        if args.constant_save_linear and step == spe - 1:
            path = os.path.join(args.save_path, checkpoint_name(epoch - 1, linear=True))
            save(path, get_state(), epoch - 1, (epoch - 1) * spe + step)

    state = train_phase(
        args,
        run,
        dynamics,
        state,
        phase=2,
        start_epoch=start_epoch,
        epochs=args.linear_epochs,
        loader=args.loaders[1],
        lr_for_epoch=lambda e: phase2_learning_rate(args),
        key=jax.random.fold_in(run.train_key, 2),
        save_hook=save_phase2,
        results=results,
        # the original makes phase 2's update on PGD examples with BatchNorm in inference mode
        adversarial_dynamics=dynamics._replace(bn_train=False),
    )
    if not args.skip_second_test:
        if args.linear_epochs == 0 and not args.centering and results["standard"] is not None:
            # w = theta_t: the phase-2 model is exactly the phase-1 model.
            print("phase 2 ran 0 epochs: its model equals the phase-1 model; results copied")
            results["linear"] = dict(results["standard"])
        else:
            results["linear"] = evaluate(
                run.model, dynamics, state.w, state.theta_t, state.net_state, run.x_test,
                run.y_test, run.eval_key, eps_linf=args.eps_linf,
                description="evaluate phase 2",
            )  # fmt: skip
        run.log.test(2, args.linear_epochs, results["linear"])
        print(format_results("phase 2 test accuracy", results["linear"]))
    if args.save_models:
        final = os.path.join(args.save_path, "parameters_final.pkl")
        if args.linear_epochs == 0 and args.standard_epochs > 0:
            # no phase 2 ran: the model is phase 1's last, and its meta says so (a kernel of it
            # must not read as epoch 0, the initialisation's)
            save_checkpoint(final, state.w, state.theta_t, state.net_state,
                            checkpoint_meta(args, 1, args.standard_epochs,
                                            args.standard_epochs * spe))  # fmt: skip
        else:
            save(final, state, args.linear_epochs, args.linear_epochs * spe)
    return state


def main(argv=None) -> dict:
    args = parse_args(argv)
    Position.at = Position.saved = None
    initialize(args)
    args, run, base = setup(args)
    # one run at a time per folder: a second one is refused, naming the first
    with folder_lock(args.save_path, "--save_path", argv, enabled=is_writer()):
        return train_and_test(args, run, base)


def train_and_test(args, run: Run, base: LoadedModel | None) -> dict:
    """Phase 1 (or --base_model_path, or the --resume point), phase 2, results.pkl."""
    resume = None
    if args.resume:
        resume = load_resume_state(
            args.save_path,
            resume_config(args),
            {name: build_parser().get_default(name) for name in RESUME_CONFIG},
            {1: args.standard_epochs, 2: args.linear_epochs},
            run.model,
            run.ds.image_shape,
        )
    resume_at = None if resume is None else (resume["phase"], resume["epoch"])
    run = run._replace(log=TrainingLog(os.path.join(args.save_path, METRICS_FILE), resume_at))
    results = (
        resume["results"]
        if resume is not None
        else {"standard": None, "linear": None, "standard_second": args.do_standard_second}
    )
    if resume is not None and resume["phase"] == 2:
        announce_phase2_optimizer(args)
        state, start_epoch = restore_train_state(resume), resume["epoch"]
    else:
        if base is not None:
            print(f"loaded theta_t from {args.base_model_path}; skipping phase 1")
            end = TrainState(base.params, None, base.net_state, None)
            end_epoch = checkpoint_epoch(base.meta, args.base_model_path)
        else:
            end, end_epoch = phase1(args, run, resume, results), args.standard_epochs
        announce_phase2_optimizer(args)
        state, start_epoch = start_phase2(args, run, end, results, end_epoch), 0
    print(format_results("phase 1 (standard dynamics) test accuracy", results["standard"]))
    phase2(args, run, state, start_epoch, results)
    results_path = os.path.join(args.save_path, "results.pkl")
    save_pickle(check_results(to_numpy(results), results_path), results_path)
    draw_curves(args, run)
    print(f"wrote results.pkl, {METRICS_FILE} and training_curves.png into {args.save_path}")
    return results


if __name__ == "__main__":
    run_main(main, on_interrupt=interrupt_message)
