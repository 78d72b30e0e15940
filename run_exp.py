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
import re

from ntk_evolution import experiment
from ntk_evolution.cli import (
    Parser,
    add_eps_flag,
    add_model_flags,
    add_seed_flag,
    add_shared_flags,
    finite_float,
    initialize_from_args,
    load_model_from_args,
    non_negative_int,
    positive_int,
)
from ntk_evolution.data import Dataset, load_dataset
from ntk_evolution.io.checkpoints import load_examples
from ntk_evolution.io.resume import interrupt_message
from ntk_evolution.utils import run_main


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


def training_data(args: argparse.Namespace) -> Dataset:
    """The dataset, --train_path's images replacing its training split, the first --n_train
    of them kept."""
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
    return ds


def main(argv=None) -> dict:
    args = parse_args(argv)
    initialize_from_args(args)
    args, base = load_model_from_args(args, args.base_model_path)
    run = experiment.run(
        training_data(args),
        model=args.model,
        base=base,
        loaders=args.loaders,
        eps=args.eps_linf,
        standard_epochs=args.standard_epochs,
        linear_epochs=args.linear_epochs,
        seed=args.random_seed,
        centering=args.centering,
        second_lr=args.second_lr,
        loose_bn_second=args.loose_bn_second,
        do_standard_second=args.do_standard_second,
        skip_first_test=args.skip_first_test,
        skip_second_test=args.skip_second_test,
        constant_save=args.constant_save,
        constant_save_linear=args.constant_save_linear,
        save_models=args.save_models,
        save_dir=args.save_path,
        batch_size=args.batch_size,
        pure_pgd=args.pure_pgd,
        n_test=args.n_test,
        resume=args.resume,
        flags=vars(args),
        command=argv,
    )
    return run.results


if __name__ == "__main__":
    run_main(main, on_interrupt=interrupt_message)
