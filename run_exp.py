"""Train a network in two phases and evaluate it after each (Loo et al., NeurIPS 2022).

Phase 1: standard dynamics, SGD (lr 0.1 -> 0.01 after epoch 100 -> 0.001 after epoch 150).
Phase 2: from theta_t (end of phase 1, or --base_model_path), train w under linearized
dynamics (--centering: centered) or standard dynamics (--do_standard_second), lr --second_lr,
BatchNorm frozen unless --loose_bn_second. --loaders XY picks clean (C), adversarial (A) or
clean-then-adversarial (F) data for phase 1 (X) and phase 2 (Y).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from data import DATASETS, load_dataset, load_examples, num_batches
from dynamics import PHASE1, Dynamics
from evaluation import evaluate
from models import MODELS, get_model, init_model
from training import (
    TrainState,
    init_train_state,
    is_adversarial_epoch,
    make_optimizer,
    make_train_step,
    phase1_learning_rate,
    run_epoch,
    set_learning_rate,
)
from utils import (
    Parser,
    UserError,
    add_shared_flags,
    checkpoint_name,
    finite_float,
    load_checkpoint,
    load_pickle,
    non_negative_int,
    positive_int,
    run_main,
    save_checkpoint,
    save_pickle,
)

FRACTIONAL_EPOCHS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5)
PHASE1_LR = 0.1


def build_parser() -> Parser:
    p = Parser(__doc__)
    p.add_argument("--data_path", default="./X_nothing", help="accepted for compatibility; unused")
    p.add_argument("--standard_epochs", type=non_negative_int, default=100)
    p.add_argument("--linear_epochs", type=non_negative_int, default=100)
    p.add_argument("--centering", action="store_true", help="drop f(x; theta_t) in phase 2")
    p.add_argument("--save_models", action="store_true", help="write parameters_final.pkl")
    p.add_argument(
        "--constant_save", action="store_true", help="checkpoint at the start of each phase-1 epoch"
    )
    p.add_argument(
        "--constant_save_linear",
        action="store_true",
        help="checkpoint at the start of each phase-2 epoch",
    )
    p.add_argument("--loose_bn_second", action="store_true", help="BatchNorm trains in phase 2")
    p.add_argument(
        "--do_standard_second", action="store_true", help="phase 2 with standard dynamics"
    )
    p.add_argument("--skip_first_test", action="store_true")
    p.add_argument("--skip_second_test", action="store_true")
    p.add_argument("--random_seed", type=int, default=0)
    p.add_argument("--base_model_path", default="", help="phase-1 checkpoint: go to phase 2")
    p.add_argument("--model", default="resnet18", choices=MODELS)
    p.add_argument("--loaders", default="CC", help="two letters of C/A/F: phase 1, phase 2")
    p.add_argument("--dataset", default="cifar10", choices=DATASETS)
    p.add_argument("--second_lr", type=finite_float(0.0, inclusive=False), default=0.01)
    p.add_argument("--eps", type=finite_float(0.0), default=4.0, help="L-inf radius in 1/255")
    p.add_argument("--save_path", default="./saved_models/")
    # added
    add_shared_flags(p)
    p.add_argument("--n_test", type=positive_int, default=None, help="evaluate on N test images")
    p.add_argument("--batch_size", type=positive_int, default=128)
    p.add_argument(
        "--resume", action="store_true", help=f"continue from --save_path/{'resume_state.pkl'}"
    )
    p.add_argument(
        "--train_path",
        default="",
        help="train on this adv_examples pickle (e.g. robustify_dataset.py's) instead of the "
        "dataset's training split; the test split stays",
    )
    p.add_argument(
        "--pure_pgd",
        action="store_true",
        help="adversarial step = one update on PGD examples (default: clean step, then PGD step)",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not re.fullmatch(r"[CAF]{2}", args.loaders):
        p.error(f"--loaders {args.loaders!r} must be two letters of C, A, F (e.g. CC, AC, CA)")
    return args


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
# flags that must agree between an interrupted run and its --resume
RESUME_CONFIG = (
    "centering", "loose_bn_second", "do_standard_second",
    "random_seed", "base_model_path", "model", "loaders", "dataset", "second_lr", "eps",
    "batch_size", "pure_pgd", "train_path",
)  # fmt: skip


def save_resume_state(args, phase: int, epoch: int, state: TrainState, results: dict) -> None:
    """Everything needed to continue after `epoch` epochs of `phase`: parameters, BatchNorm and
    optimizer state, results so far. Data order and PRNG keys derive from (seed, phase, epoch)."""
    record = {
        "config": {name: getattr(args, name) for name in RESUME_CONFIG},
        "phase": phase,
        "epoch": epoch,
        "w": state.w,
        "theta_t": state.theta_t,
        "net_state": state.net_state,
        "opt_state_leaves": jax.tree.leaves(state.opt_state),
        "results": results,
    }
    save_pickle(record, os.path.join(args.save_path, RESUME_FILE))


def load_resume_state(args) -> dict | None:
    path = os.path.join(args.save_path, RESUME_FILE)
    if not os.path.exists(path):
        print(f"--resume: no {RESUME_FILE} in {args.save_path}; starting from the beginning")
        return None
    record = load_pickle(path, "resume state")
    parser = build_parser()
    for name in RESUME_CONFIG:  # a flag added since the file was written: its default
        value = record["config"].get(name, parser.get_default(name))
        if getattr(args, name) != value:
            raise UserError(
                f"--resume: {path} was written with --{name} {value!r}, not "
                f"{getattr(args, name)!r}; use the interrupted run's flags"
            )
    epochs = args.standard_epochs if record["phase"] == 1 else args.linear_epochs
    if record["epoch"] > epochs:
        raise UserError(
            f"--resume: {path} is past phase {record['phase']} epoch {record['epoch']}, more "
            f"than the {epochs} epochs asked for"
        )
    print(f"--resume: continuing after phase {record['phase']} epoch {record['epoch']}")
    return record


def restore_train_state(record: dict) -> TrainState:
    """The TrainState saved by save_resume_state (the optimizer state's tree structure does not
    depend on the learning rate)."""
    w = jax.tree.map(jnp.asarray, record["w"])
    opt_state = make_optimizer(0.0).init(w)
    if record["opt_state_leaves"] is not None:
        leaves = [jnp.asarray(leaf) for leaf in record["opt_state_leaves"]]
        opt_state = jax.tree.unflatten(jax.tree.structure(opt_state), leaves)
    theta_t = None if record["theta_t"] is None else jax.tree.map(jnp.asarray, record["theta_t"])
    return TrainState(w, theta_t, jax.tree.map(jnp.asarray, record["net_state"]), opt_state)


def train_phase(
    args, model, ds, dynamics, state, *, phase, start_epoch, epochs, loader, lr_for_epoch, key,
    save_hook, results, adversarial_dynamics=None,
):  # fmt: skip
    """Train epochs start_epoch + 1 .. epochs of `phase` with loader letter `loader`, saving the
    resume state after each; `state` is a TrainState or (w, theta_t, net_state) to start."""
    optimizer = make_optimizer(lr_for_epoch(1))
    if not isinstance(state, TrainState):
        state = init_train_state(optimizer, *state)
    eps = args.eps / 255.0
    steps = {}
    for epoch in range(start_epoch + 1, epochs + 1):
        adversarial = is_adversarial_epoch(loader, epoch)
        if adversarial not in steps:
            steps[adversarial] = make_train_step(
                model,
                optimizer,
                dynamics,
                adversarial=adversarial,
                eps=eps,
                pure_pgd=args.pure_pgd,
                adversarial_dynamics=adversarial_dynamics,
            )
        set_learning_rate(state, lr_for_epoch(epoch))
        save_hook(epoch, None, lambda state=state: state)
        start = time.time()
        state, metrics = run_epoch(
            steps[adversarial],
            state,
            ds.x_train,
            ds.y_train,
            batch_size=args.batch_size,
            seed=(args.random_seed, phase, epoch),
            key=jax.random.fold_in(key, epoch),
            description=f"phase {phase} epoch {epoch}/{epochs}",
            on_step=lambda i, s, epoch=epoch: save_hook(epoch, i, s),
        )
        save_resume_state(args, phase, epoch, state, results)
        tqdm.write(
            f"phase {phase} epoch {epoch}/{epochs} {'adv' if adversarial else 'clean'} "
            f"lr {lr_for_epoch(epoch):g} loss {metrics['loss']:.4f} "
            f"train acc {metrics['accuracy']:.4f} ({time.time() - start:.1f}s)"
        )
    return state


def format_results(name: str, results: dict | None) -> str:
    if results is None:
        return f"{name}: not evaluated"
    return f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items())


def main(argv=None) -> dict:
    args = parse_args(argv)
    ds = load_dataset(args.dataset, args.data_root)
    if args.train_path:
        x_train, y_train = load_examples(args.train_path, ds.image_shape, args.trust_pickle)
        if np.any((y_train < 0) | (y_train >= ds.n_classes)):
            raise UserError(f"{args.train_path}: labels must lie in 0..{ds.n_classes - 1}")
        ds = dataclasses.replace(ds, x_train=x_train, y_train=y_train)
        print(f"training on the {len(x_train)} images of {args.train_path}")
    if len(ds.x_train) < args.batch_size:
        raise UserError(
            f"--batch_size {args.batch_size} exceeds the {len(ds.x_train)} training images"
        )
    x_test, y_test = ds.x_test[: args.n_test], ds.y_test[: args.n_test]
    model = get_model(args.model, ds.n_classes)
    init_key, train_key, eval_key = jax.random.split(jax.random.PRNGKey(args.random_seed), 3)
    params, net_state = init_model(model, init_key, ds.image_shape)
    save_path = args.save_path
    try:
        os.makedirs(save_path, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --save_path {save_path}: {err.strerror}") from None
    if not os.access(save_path, os.W_OK):
        raise UserError(f"--save_path {save_path} is not writable")
    eps = args.eps / 255.0
    steps_per_epoch = num_batches(len(ds.x_train), args.batch_size)
    resume = load_resume_state(args) if args.resume else None
    results = {"standard": None, "linear": None, "standard_second": args.do_standard_second}

    if resume is not None:
        results = resume["results"]
    phase1_opt_state = None  # set when phase 1 runs in this process
    if args.base_model_path and (resume is None or resume["phase"] == 1):
        like = (params, net_state)
        ckpt = load_checkpoint(args.base_model_path, like=like, trust=args.trust_pickle)
        params, net_state = ckpt["params"], ckpt["net_state"]
        print(f"loaded theta_t from {args.base_model_path}; skipping phase 1")
        resume = None
    elif resume is None or resume["phase"] == 1:
        fractions = fractional_saves(steps_per_epoch)
        # as in the original, phase-1 checkpoints keep lin_params at the initial parameters
        init_params = jax.tree.map(np.array, params)  # a copy: params' buffers are donated

        def save_phase1(epoch, step, get_state):
            if not args.constant_save:
                return
            if step is None:
                names = [checkpoint_name(epoch - 1)]
            else:
                names = [checkpoint_name(f) for f in fractions.get((epoch, step), [])]
            for name in names:
                state = get_state()
                save_checkpoint(
                    os.path.join(save_path, name), state.w, init_params, state.net_state
                )

        state = train_phase(
            args,
            model,
            ds,
            PHASE1,
            (params, None, net_state) if resume is None else restore_train_state(resume),
            phase=1,
            start_epoch=0 if resume is None else resume["epoch"],
            epochs=args.standard_epochs,
            loader=args.loaders[0],
            lr_for_epoch=lambda e: phase1_learning_rate(e, PHASE1_LR),
            key=jax.random.fold_in(train_key, 1),
            save_hook=save_phase1,
            results=results,
        )
        params, net_state = state.w, state.net_state
        phase1_opt_state = state.opt_state
        resume = None

    # As in the original, --do_standard_second after phase 1 continues phase 1's optimizer (its
    # last learning rate, its momentum); after --base_model_path it is a fresh SGD(--second_lr).
    continue_phase1_optimizer = args.do_standard_second and not args.base_model_path
    if continue_phase1_optimizer:
        second_lr = phase1_learning_rate(args.standard_epochs + 1, PHASE1_LR)
        print(
            f"--do_standard_second continues phase 1's optimizer (lr {second_lr:g}, momentum "
            "kept), as the original does; --second_lr applies with --base_model_path"
        )
    else:
        second_lr = args.second_lr

    if resume is None:  # phase 1 done (or loaded): test it, then start phase 2 afresh
        if not args.skip_first_test:
            results["standard"] = evaluate(
                model, PHASE1, params, None, net_state, x_test, y_test, eval_key,
                eps_linf=eps, description="evaluate phase 1",
            )  # fmt: skip
        theta_t = jax.tree.map(jnp.asarray, params)
        w = jax.tree.map(jnp.copy, theta_t)  # a separate buffer: w is donated at each step
        phase2_state = init_train_state(
            make_optimizer(second_lr), w, theta_t, jax.tree.map(jnp.asarray, net_state)
        )
        if continue_phase1_optimizer:
            phase2_state = phase2_state._replace(opt_state=phase1_opt_state)
        start_epoch = 0
        save_resume_state(args, 2, 0, phase2_state, results)
    else:
        phase2_state = restore_train_state(resume)
        start_epoch = resume["epoch"]
    print(format_results("phase 1 (standard dynamics) test accuracy", results["standard"]))

    dynamics2 = Dynamics(
        linear=not args.do_standard_second,
        centering=args.centering,
        bn_train=args.loose_bn_second,
    )

    def save_phase2_checkpoint(path: str, state: TrainState) -> None:
        # the original trains `params` under --do_standard_second (lin_params = theta_t, the
        # centering reference) and `lin_params` under linearized dynamics (params = theta_t)
        if args.do_standard_second:
            save_checkpoint(path, state.w, state.theta_t, state.net_state)
        else:
            save_checkpoint(path, state.theta_t, state.w, state.net_state)

    def save_phase2(epoch, step, get_state):
        # the original rewrites this file before every step of the epoch: what stays is the
        # state before the epoch's last step
        if args.constant_save_linear and step == steps_per_epoch - 1:
            path = os.path.join(save_path, checkpoint_name(epoch - 1, linear=True))
            save_phase2_checkpoint(path, get_state())

    state = train_phase(
        args,
        model,
        ds,
        dynamics2,
        phase2_state,
        phase=2,
        start_epoch=start_epoch,
        epochs=args.linear_epochs,
        loader=args.loaders[1],
        lr_for_epoch=lambda e: second_lr,
        key=jax.random.fold_in(train_key, 2),
        save_hook=save_phase2,
        results=results,
        # the original makes phase 2's update on PGD examples with BatchNorm in inference mode
        adversarial_dynamics=dynamics2._replace(bn_train=False),
    )
    w, theta_t, net_state = state.w, state.theta_t, state.net_state

    if not args.skip_second_test:
        if args.linear_epochs == 0 and not args.centering and results["standard"] is not None:
            # w = theta_t: the phase-2 model is exactly the phase-1 model.
            print("phase 2 ran 0 epochs: its model equals the phase-1 model; results copied")
            results["linear"] = dict(results["standard"])
        else:
            results["linear"] = evaluate(
                model, dynamics2, w, theta_t, net_state, x_test, y_test, eval_key,
                eps_linf=eps, description="evaluate phase 2",
            )  # fmt: skip
        print(format_results("phase 2 test accuracy", results["linear"]))

    if args.save_models:
        save_phase2_checkpoint(os.path.join(save_path, "parameters_final.pkl"), state)
    save_pickle(results, os.path.join(save_path, "results.pkl"))
    print(f"wrote {os.path.join(save_path, 'results.pkl')}")
    return results


if __name__ == "__main__":
    run_main(main)
