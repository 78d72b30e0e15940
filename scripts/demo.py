"""`make demo`: the paper's main experiment in miniature on the embedded digits dataset.

Phase 1 trains cnn_small adversarially (--loaders AC) and, for contrast, benignly (CC), saving
a checkpoint every epoch; phase 2 then trains with centered linearized dynamics on benign data
from each run's epoch-10 checkpoint (the kernel is frozen; only w moves). L-inf eps is 32/255:
two of the 16 grey levels of the 8x8 digits, enough to take a benignly trained net from ~98%
to ~20% accuracy. Prints clean and PGD-Linf accuracy after each phase.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_exp  # noqa: E402

OUT = "demo_runs"
COMMON = "--dataset digits --model cnn_small --eps 32 --random_seed 0"
PHASE1_EPOCHS = 20
PHASE2_FROM_EPOCH = 10
PHASE2_EPOCHS = 20


def run(command: str) -> dict:
    print(f"\n$ python {command}", flush=True)
    return run_exp.main(shlex.split(command)[1:])


def main() -> None:
    start = time.time()
    rows = []
    for loader, name in (("A", "adversarial"), ("C", "benign")):
        phase1_dir = f"{OUT}/phase1_{name}"
        phase1 = run(
            f"run_exp.py {COMMON} --loaders {loader}C --standard_epochs {PHASE1_EPOCHS} "
            f"--linear_epochs 0 --save_models --constant_save --skip_second_test "
            f"--save_path {phase1_dir}"
        )
        phase2 = run(
            f"run_exp.py {COMMON} --loaders {loader}C --linear_epochs {PHASE2_EPOCHS} "
            f"--base_model_path {phase1_dir}/parameters_checkpoint_{PHASE2_FROM_EPOCH}.pkl "
            f"--centering --second_lr 0.01 --save_models --skip_first_test "
            f"--save_path {OUT}/phase2_centered_from_{name}"
        )
        rows.append((f"phase 1, {name} training, {PHASE1_EPOCHS} epochs", phase1["standard"]))
        rows.append(
            (
                f"phase 2, benign centered linearized, from {name} epoch {PHASE2_FROM_EPOCH}",
                phase2["linear"],
            )
        )
    print("\n\ndigits (8x8), cnn_small, L-inf eps 32/255, PGD 100 steps, 360 test images\n")
    print(f"| {'run':<62} | clean  | PGD-Linf |")
    print(f"|{'-' * 64}|--------|----------|")
    for label, result in rows:
        print(f"| {label:<62} | {result['clean']:.4f} | {result['linf']:.4f}   |")
    print(f"\noutputs in {OUT}/; wall time {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
