"""Evaluate a checkpoint of run_exp.py on the test set (or on saved examples, --test_path) and
optionally save its L-inf PGD adversarial examples.

Writes into dirname(model_path)/<bonus_dir>/:
  test_results_<save_name>.pkl  {acc_clean, acc_dirty, predictions_clean, predictions_dirty,
                                 components_clean, components_dirty}  (components: {'f', 'df'})
                                 plus acc_margin, acc_transfer, acc_worst, restarts (added)

With --test_path (another model's adversarial examples) the accuracy on those images is
acc_transfer (acc_clean None; predictions_clean and components_clean are on those images), and
the default --save_name is transfer_<stem> for .../adv_examples_<stem>.pkl, so that the next
ordinary evaluation does not overwrite it.
  adv_examples_<save_name>.pkl  {images: (N, C, H, W) in [0, 1], labels: (N,)}  (--save_examples)

"dirty" is L-inf PGD on the cross-entropy. Added for an honest robustness figure: --margin
(the same PGD on the Carlini-Wagner margin loss), --restarts (random restarts of each attack; an
example is robust only if every restart fails), --transfer_path (another model's adversarial
examples of the same test images), --autoattack (AutoAttack's standard version: APGD-CE,
APGD-T, FAB-T and Square in turn, each on the images still robust; acc_after_apgd_ce ...
acc_after_square the robust accuracy after each, acc_autoattack the last, autoattack_checks the
reference's checks; --autoattack_each also each attack alone on every image: acc_apgd_ce,
acc_apgd_t, acc_fab_t, acc_square), --eps_sweep (the worst-case accuracy at several radii,
eps_sweep), and acc_worst: correct on the clean image and under every attack run. Warnings
name gradient masking when Square finds what the gradient attacks together missed, when input
gradients vanish, or when robust accuracy does not fall towards zero as eps grows; and a
randomised model or probability outputs.
"""

from __future__ import annotations

import argparse

from ntk_evolution.attacks.runner import evaluate_checkpoint_file
from ntk_evolution.cli import (
    Parser,
    add_attack_variant_flag,
    add_autoattack_flags,
    add_eps_flag,
    add_model_flags,
    add_robustness_flags,
    add_seed_flag,
    add_shared_flags,
    initialize_from_args,
    positive_int,
)
from ntk_evolution.utils import run_main

SHORT_N_TEST = 1000


def build_parser() -> Parser:
    p = Parser(__doc__)
    p.add_argument("--model_path", required=True, help="Checkpoint of run_exp.py to evaluate.")
    p.add_argument(
        "--save_name",
        default=None,
        help="Outputs are <kind>_<save_name>.pkl; default test_results, or with --test_path "
        "transfer_<its file stem, less adv_examples_>.",
    )
    p.add_argument("--linear", action="store_true", help="Evaluate the linearized model.")
    p.add_argument("--centering", action="store_true", help="Drop f(x; theta_t).")
    p.add_argument(
        "--test_path",
        default="",
        help="adv_examples pickle to evaluate on (transfer): stored as acc_transfer.",
    )
    p.add_argument("--bonus_dir", default=".", help="Output folder, under the model's folder.")
    p.add_argument("--no_adv", action="store_true", help="Clean evaluation only.")
    p.add_argument(
        "--save_examples", action="store_true", help="Write adv_examples_<save_name>.pkl."
    )
    p.add_argument("--short", action="store_true", help=f"First {SHORT_N_TEST} test images.")
    add_seed_flag(p, "attacks")
    add_model_flags(p)
    add_eps_flag(p)
    # added
    add_shared_flags(p)
    p.add_argument("--n_test", type=positive_int, default=None, help="First N test images.")
    add_robustness_flags(p)
    add_attack_variant_flag(p)
    add_autoattack_flags(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    initialize_from_args(args)
    return evaluate_checkpoint_file(
        args.model_path,
        model=args.model,
        dataset=args.dataset,
        data_root=args.data_root,
        trust_pickle=args.trust_pickle,
        save_name=args.save_name,
        linear=args.linear,
        centering=args.centering,
        test_path=args.test_path,
        bonus_dir=args.bonus_dir,
        no_adv=args.no_adv,
        save_examples=args.save_examples,
        n_test=args.n_test or (SHORT_N_TEST if args.short else None),
        seed=args.random_seed,
        eps_255=args.eps,
        margin=args.margin,
        restarts=args.restarts,
        transfer_path=args.transfer_path,
        attack_variant=args.attack_variant,
        autoattack=args.autoattack,
        autoattack_each=args.autoattack_each,
        autoattack_norm=args.autoattack_norm,
        eps_l2=args.eps_l2,
        eps_sweep=args.eps_sweep,
    )


if __name__ == "__main__":
    run_main(main)
