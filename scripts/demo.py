"""`make demo`: the paper's main experiment in miniature on the embedded digits dataset.

Phase 1 trains cnn_small adversarially (--loaders AC) and, for contrast, benignly (CC), saving
a checkpoint every epoch; phase 2 then trains with centered linearized dynamics on benign data
from each run's epoch-10 checkpoint (the kernel is frozen; only w moves). L-inf eps is 32/255:
two of the 16 grey levels of the 8x8 digits, enough to take a benignly trained net from ~98%
to ~20% accuracy. Each final model is then evaluated by eval_and_make_adv.py --autoattack on
the first 100 test images (--aa_n_test; 0 for all 360, about 6 minutes instead of 3 on 2
cores): the table gives clean accuracy and the original's PGD-Linf figure on all test images,
and the AutoAttack figure (robust to APGD-CE, APGD-T, FAB-T and Square, run in turn as the
reference runs them) beside PGD-Linf on the same images; the reference's checks print their
warnings, such as gradient masking where Square finds what the gradient attacks missed.

`--quick` (about a minute on 2 cores) trains the same runs for 11 epochs, evaluates on 100
test images and skips AutoAttack: the state the README's first-hour commands need, not
figures to report.
"""

from __future__ import annotations

import argparse
import time

from ntk_evolution import data, experiment
from ntk_evolution.attacks.runner import evaluate_checkpoint_file
from ntk_evolution.io.checkpoints import load_model

OUT = "demo_runs"
EPS_255 = 32.0
PHASE1_EPOCHS = 20
PHASE2_FROM_EPOCH = 10
PHASE2_EPOCHS = 20
AA_N_TEST = 100  # test images AutoAttack runs on (0: all); 100 keeps `make demo` near 3 min


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="11 phase-1 and 2 phase-2 epochs, 100 test images, no AutoAttack.",
    )
    p.add_argument(
        "--aa_n_test",
        type=int,
        default=AA_N_TEST,
        help="test images AutoAttack runs on, the first ones (0: all 360)",
    )
    return p.parse_args(argv)


def step(what: str) -> float:
    """Say what runs next (the log shows each step and its time); its start time."""
    print(f"\n== {what}", flush=True)
    return time.time()


def autoattack(model_path: str, n_test: int = AA_N_TEST, **dynamics) -> dict:
    """eval_and_make_adv.py --autoattack (as a library call) on a final model's first `n_test`
    test images (0: all; test_results_autoattack.pkl beside it); `dynamics`: linear, centering."""
    start = step(f"AutoAttack on {model_path}")
    results = evaluate_checkpoint_file(
        model_path, save_name="autoattack", n_test=n_test or None, eps_255=EPS_255, seed=0,
        autoattack=True, **dynamics,
    )  # fmt: skip
    print(f"({time.time() - start:.0f}s)")
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    phase1_epochs, phase2_epochs = (11, 2) if args.quick else (PHASE1_EPOCHS, PHASE2_EPOCHS)
    n_test = 100 if args.quick else None
    ds = data.load_dataset("digits")
    eps = EPS_255 / 255
    rows = []
    for loader, name in (("A", "adversarial"), ("C", "benign")):
        phase1_dir = f"{OUT}/phase1_{name}"
        start = step(f"phase 1, {name}, {phase1_epochs} epochs -> {phase1_dir}")
        phase1 = experiment.run(
            ds, model="cnn_small", loaders=f"{loader}C", eps=eps, standard_epochs=phase1_epochs,
            linear_epochs=0, seed=0, save_models=True, constant_save=True,
            skip_second_test=True, n_test=n_test, save_dir=phase1_dir,
        )  # fmt: skip
        print(f"({time.time() - start:.0f}s)")
        phase2_dir = f"{OUT}/phase2_centered_from_{name}"
        start = step(
            f"phase 2 from epoch {PHASE2_FROM_EPOCH}, {phase2_epochs} epochs -> {phase2_dir}"
        )
        phase2 = experiment.run(
            ds, base=load_model(f"{phase1_dir}/parameters_checkpoint_{PHASE2_FROM_EPOCH}.pkl"),
            loaders=f"{loader}C", eps=eps, linear_epochs=phase2_epochs, seed=0, centering=True,
            second_lr=0.01, save_models=True, skip_first_test=True, n_test=n_test,
            save_dir=phase2_dir,
        )  # fmt: skip
        print(f"({time.time() - start:.0f}s)")
        aa1 = aa2 = {"acc_autoattack": None, "acc_dirty": None, "warnings": []}
        if not args.quick:
            aa1 = autoattack(f"{phase1_dir}/parameters_final.pkl", args.aa_n_test)
            aa2 = autoattack(
                f"{phase2_dir}/parameters_final.pkl", args.aa_n_test, linear=True, centering=True
            )
        rows.append(
            (f"phase 1, {name} training, {phase1_epochs} epochs", phase1.results["standard"], aa1)
        )
        label = f"phase 2, benign centered linearized, from {name} epoch {PHASE2_FROM_EPOCH}"
        rows.append((label, phase2.results["linear"], aa2))
    n_test = n_test or len(ds.x_test)
    aa_n = args.aa_n_test or n_test
    print(
        f"\n\ndigits (8x8), cnn_small, L-inf eps 32/255; clean and PGD-Linf (100 steps, "
        f"run_exp.py's figure) on {n_test} test images; AutoAttack (APGD-CE, APGD-T, FAB-T, "
        f"Square in turn) and PGD-Linf on the same images: the first {aa_n}\n"
    )
    head = f"AA, {aa_n} img"
    print(f"| {'run':<62} | clean  | PGD-Linf | {head:<11} | PGD, same |")
    print(f"|{'-' * 64}|--------|----------|-------------|-----------|")
    for label, result, aa in rows:
        not_run = aa["acc_autoattack"] is None
        print(
            f"| {label:<62} | {result['clean']:.4f} | {result['linf']:.4f}   | "
            + ("not run    " if not_run else f"{aa['acc_autoattack']:.4f}     ")
            + " | "
            + ("not run  " if not_run else f"{aa['acc_dirty']:.4f}   ")
            + " |"
        )
    for label, _, aa in rows:
        for warning in aa["warnings"]:
            print(f"warning: {label}: {warning}")
    print(f"\noutputs in {OUT}/; wall time {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
