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
import os

import numpy as np

from ntk_evolution.attacks.autoattack import AUTOATTACK
from ntk_evolution.attacks.evaluation import (
    NAMES,
    after,
    print_warnings,
)
from ntk_evolution.attacks.pgd import VARIANT_NAMES
from ntk_evolution.attacks.runner import evaluate_network, target_of
from ntk_evolution.cli import (
    Parser,
    add_attack_variant_flag,
    add_autoattack_flags,
    add_eps_flag,
    add_model_flags,
    add_robustness_flags,
    add_seed_flag,
    add_shared_flags,
    autoattack_eps,
    autoattack_threat,
    check_attack_variant,
    check_out_dir,
    initialize_from_args,
    model_and_dataset,
    positive_int,
    with_values,
)
from ntk_evolution.data import to_8_bits
from ntk_evolution.io.checkpoints import load_examples, load_transfer
from ntk_evolution.io.schemas import check_results
from ntk_evolution.utils import UserError, check_output, run_main, save_pickle, to_numpy

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


def default_save_name(test_path: str) -> str:
    """test_results, or transfer_<stem> for --test_path .../adv_examples_<stem>.pkl."""
    if not test_path:
        return "test_results"
    stem = os.path.splitext(os.path.basename(test_path))[0]
    return "transfer_" + (stem.removeprefix("adv_examples_") or stem)


def main(argv=None) -> dict:
    args = parse_args(argv)
    initialize_from_args(args)
    check_out_dir(
        os.path.join(os.path.dirname(os.path.abspath(args.model_path)), args.bonus_dir),
        "--bonus_dir",
    )
    if args.test_path and args.transfer_path:
        raise UserError(
            "--test_path and --transfer_path both give transfer examples; use one (--test_path "
            "evaluates on its images, --transfer_path adds them as an attack on the test set)"
        )
    check_attack_variant(args)
    args = with_values(args, save_name=args.save_name or default_save_name(args.test_path))
    args, loaded, ds = model_and_dataset(args)
    # As in the original: the linearized model is around params (theta_t) with weights
    # lin_params (w); without --linear the network is params, centered on lin_params.
    model, dynamics, w, theta_t, net_state = target_of(loaded, args.linear, args.centering)

    if args.test_path:
        x, y = load_examples(args.test_path, ds.image_shape, ds.n_classes, args.trust_pickle)
        x = to_8_bits(x)
    else:
        x, y = ds.x_test, ds.y_test
    n_test = args.n_test or (SHORT_N_TEST if args.short else None)
    x, y = x[:n_test], y[:n_test]
    if np.any((y < 0) | (y >= ds.n_classes)):
        raise UserError(f"labels must lie in 0..{ds.n_classes - 1} for {args.dataset}")

    transfer = None
    if args.transfer_path:
        transfer = load_transfer(
            args.transfer_path, x, y, ds.image_shape, ds.n_classes, args.trust_pickle
        )

    evaluation = evaluate_network(
        model,
        dynamics,
        w,
        theta_t,
        net_state,
        x,
        y,
        eps=args.eps_linf,
        seed=args.random_seed,
        adversarial=not args.no_adv,
        margin=args.margin,
        restarts=args.restarts,
        attack_variant=args.attack_variant,
        autoattack_norm=args.autoattack_norm if args.autoattack else None,
        eps_l2=args.eps_l2,
        each=args.autoattack_each,
        eps_sweep=args.eps_sweep,
        transfer=transfer,
    )
    accuracies = evaluation.accuracies
    results = {}
    for name in ("clean", "dirty"):
        if evaluation.outputs[name] is None:
            results.update({f"acc_{name}": None, f"predictions_{name}": None})
            results[f"components_{name}"] = None
            continue
        f, df = evaluation.outputs[name]
        results[f"acc_{name}"] = accuracies[name]
        # predicted labels, as the original stores them (the logits are in the components)
        results[f"predictions_{name}"] = np.argmax(df if args.centering else f + df, axis=1)
        results[f"components_{name}"] = {"f": f, "df": df}
    for name in ("margin", "transfer", *AUTOATTACK, *map(after, AUTOATTACK), "autoattack", "worst"):
        results[f"acc_{name}"] = accuracies.get(name)
    if args.test_path:
        # the "clean" pass ran on another model's examples: that is a transfer accuracy
        results["acc_transfer"], results["acc_clean"] = results["acc_clean"], None
    results["test_path"] = os.path.abspath(args.test_path) if args.test_path else None
    results["restarts"] = args.restarts
    results["autoattack"] = autoattack_threat(args)  # (norm, eps)
    results["autoattack_checks"] = evaluation.checks
    results["eps_sweep"] = evaluation.sweep
    results["warnings"] = warnings = evaluation.warnings

    out_dir = os.path.normpath(
        os.path.join(os.path.dirname(os.path.abspath(args.model_path)), args.bonus_dir)
    )
    results_path = os.path.join(out_dir, f"test_results_{args.save_name}.pkl")
    adv_images = evaluation.adv_images
    if adv_images is not None:
        check_output(adv_images, os.path.join(out_dir, f"adv_examples_{args.save_name}.pkl"))
    save_pickle(check_results(to_numpy(results), results_path), results_path)
    restarts = f", {args.restarts} restarts" if args.restarts > 1 else ""
    attack = VARIANT_NAMES[args.attack_variant]
    labels = {
        "acc_clean": "clean accuracy",
        "acc_dirty": f"{attack}-Linf (eps {args.eps:g}/255{restarts}) accuracy",
        "acc_margin": f"{attack}-margin accuracy",
        **{f"acc_{name}": f"{NAMES[name]} alone" for name in AUTOATTACK},
        "acc_autoattack": f"AutoAttack ({args.autoattack_norm}, eps {autoattack_eps(args):.4g})",
        "acc_transfer": (
            f"accuracy on {args.test_path}'s examples" if args.test_path else "transfer accuracy"
        ),
        "acc_worst": "worst case over all",
    }
    shown = [f"{text} {results[k]:.4f}" for k, text in labels.items() if results[k] is not None]
    print(", ".join(shown) + f" on {len(x)} images")
    print_warnings(warnings)
    print(f"wrote {results_path}")
    if args.save_examples and adv_images is not None:
        examples_path = os.path.join(out_dir, f"adv_examples_{args.save_name}.pkl")
        images = adv_images.transpose(0, 3, 1, 2)
        save_pickle({"images": images, "labels": y}, examples_path)
        print(f"wrote {examples_path}")
    return results


if __name__ == "__main__":
    run_main(main)
