"""`make reproduce`: the NTK-evolution study and its companion analyses, once per seed, then
REPORT.md with every figure's mean and 95% interval over the seeds and each claim of the
papers' abstracts judged on the interval of the effect it rests on.

Default: 3 seeds of digits (8x8) and cnn_small on a CPU, one after another (about 90 min on 2
cores: 30.6 min a seed, AutoAttack on the first 60 test images 5.5 of them). The paper's scale
on a GPU:
--dataset cifar10 --model resnet18 --eps 4 --epochs 100 --phase2_epochs 100 --kernel_size 500
--kernel_epochs 0,0.125,0.5,1,2,5,10,20,50,100 --phase2_from 0,1,5,20,100.

Each seed s runs the whole study in OUT/seed_<s> with --random_seed s (initialisation, data
order, kernel subsets, attacks):
  1. phase 1, benign (CC) and adversarial (AC), a checkpoint every epoch and at fractions;
  2. the empirical NTK (averaged over logits) at --kernel_epochs of both runs;
  3. kernel evolution (analyze_kernels.py);
  4. phase 2, benign centered linearized dynamics, from the kernels at --phase2_from of both
     runs; adversarial training on the fixed kernel (phase 2 on A) from the benign run's
     kernels at init and at the end;
  5. training-free NTK adversarial examples (ntk_attack.py) and their transfer to the phase-1
     networks (eval_and_make_adv.py --test_path);
  6. NTK eigen-features of the final benign and adversarial kernels (eigen_features.py);
  7. CKA between the final benign and adversarial networks (cka.py).
Every network, phase-2 model and the infinite-width NTK predictor is attacked by PGD (the
original's figure) and by AutoAttack on the first --aa_n_test test images (the empirical-NTK
predictors of the NTK attacks and eigen-features too with --predictor_autoattack, which takes
hours on a CPU); the claims are judged on both, and a gradient-masking warning is reported
where the gradient-free Square attack beats the gradient attacks together.

A seed's figures are written last, to OUT/seed_<s>/figures.json: a seed with that file is
finished and is not rerun, so an interrupted study continues from its last finished seed (an
unfinished seed's folder is removed and the seed rerun). OUT/settings.json holds the flags the
seeds were run with; an OUT run with other flags is refused. Beside REPORT.md: summary.json
(every figure and every claim's effect with its per-seed values, mean, interval, method and
verdict), figures.csv (one row per figure, one column per seed) and the pictures: claims.png
(each effect with its interval against zero), kernel_evolution.png, robustness.png and
eigen_features.png (means with 95% error bars); each seed's own pictures are in its folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import analyze_kernels
import calculate_kernel
import cka
import eigen_features
import eval_and_make_adv
import ntk_attack
import run_exp
from ntk_evolution.cli import Parser, finite_float, non_negative_int, positive_int
from ntk_evolution.io.checkpoints import format_epoch, load_kernel
from ntk_evolution.kernels.analysis import kernel_distance
from ntk_evolution.study import intervals
from ntk_evolution.study.reports import call, open_log
from ntk_evolution.study.reproduction import (
    KINDS,
    aggregate,
    draw,
    epochs_list,
    flatten,
    kernel_epochs,
    phase2_from,
    top_ks,
    warnings_of,
    write_figures_table,
    write_report,
)
from ntk_evolution.utils import UserError, atomic_file, check_out_dir, run_main

SETTINGS_FILE = "settings.json"
# settings added after studies were started, with the value those studies ran with: their
# settings.json lacks them and they continue
LATER_SETTINGS = {"batch_size": 128, "n_test": None}
FIGURES_FILE = "figures.json"  # a seed's figures, written last: it marks a finished seed
SUMMARY_FILE = "summary.json"
FIGURES_TABLE = "figures.csv"
NOT_SETTINGS = (
    "seeds",
    "out",
    "parallel",
    "only_seed",
    "data_root",
)  # flags a study may change on resuming


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data_root", default="./data", help="where CIFAR lives (passed to every step)")
    p.add_argument("--model", default="cnn_small")
    p.add_argument(
        "--eps", type=finite_float(0, inclusive=False), default=32.0, help="L-inf radius in 1/255"
    )
    p.add_argument("--epochs", type=positive_int, default=20, help="phase 1")
    p.add_argument(
        "--batch_size", type=positive_int, default=128, help="training batch, phases 1 and 2"
    )
    p.add_argument("--phase2_epochs", type=positive_int, default=20)
    p.add_argument("--kernel_size", type=positive_int, default=300)
    p.add_argument("--kernel_epochs", default="0,0.125,0.5,1,2,5,10,20")
    p.add_argument("--phase2_from", default="0,1,5,20")
    p.add_argument(
        "--attack_steps", type=positive_int, default=20, help="PGD steps on kernel predictors"
    )
    p.add_argument(
        "--n_test",
        type=positive_int,
        default=None,
        help="the networks' clean and PGD test figures on the first N test images (default: all)",
    )
    p.add_argument("--eigen_n_test", type=positive_int, default=100)
    p.add_argument(
        "--aa_n_test",
        type=positive_int,
        default=60,
        help="AutoAttack (and the PGD it is compared with) on the first N test images; 0 or "
        "none is not accepted: pass the test set's size for all of it",
    )
    p.add_argument(
        "--predictor_n_test",
        type=positive_int,
        default=100,
        help="test images of the NTK attacks (PGD and AutoAttack on kernel predictors)",
    )
    p.add_argument(
        "--predictor_autoattack",
        action="store_true",
        help="AutoAttack on the empirical-NTK predictors too: the NTK attacks' and every "
        "eigen-feature's (hours on a CPU)",
    )
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=3,
        help="run the study for seeds 0 .. K-1 (each in OUT/seed_<s>); intervals need 2 or more",
    )
    p.add_argument(
        "--parallel",
        type=positive_int,
        default=None,
        help="seeds run side by side, each in its own process on its own GPU (default: one per "
        "GPU; on a CPU 1, one after another, as side by side is slower there)",
    )
    p.add_argument(
        "--only_seed",
        type=non_negative_int,
        default=None,
        help="run this one seed's study and stop, without the report (what --parallel runs)",
    )
    p.add_argument("--out", default="reproduce_runs")
    args = p.parse_args(argv)
    for flag in ("kernel_epochs", "phase2_from"):
        try:
            values = epochs_list(getattr(args, flag))
        except ValueError:
            p.error(f"--{flag} {getattr(args, flag)!r} is not a comma-separated list of epochs")
        if not values or any(not math.isfinite(v) or v < 0 for v in values):
            p.error(f"--{flag} {getattr(args, flag)!r} must list epochs >= 0")
    if not [e for e in epochs_list(args.kernel_epochs) if e <= args.epochs]:
        p.error(f"--kernel_epochs lists no epoch within --epochs {args.epochs}")
    if not [e for e in epochs_list(args.phase2_from) if e <= args.epochs]:
        p.error(f"--phase2_from lists no epoch within --epochs {args.epochs}")
    return args


def checkpoint(run_dir: str, epoch: float, final_epoch: int) -> str:
    if epoch == final_epoch:
        return f"{run_dir}/parameters_final.pkl"
    return f"{run_dir}/parameters_checkpoint_{format_epoch(epoch)}.pkl"


def seed_dir(out: str, seed: int) -> str:
    return os.path.join(out, f"seed_{seed}")


def settings_of(args: argparse.Namespace) -> dict:
    """The flags that define the study: seeds run with other values cannot be pooled."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}


def check_settings(out: str, settings: dict) -> None:
    """Refuse, before anything is written, an output folder whose seeds were run with other
    settings, or a non-empty folder this script did not write."""
    path = os.path.join(out, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            saved = {**LATER_SETTINGS, **json.load(f)}
        differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
        if differ:
            changes = ", ".join(
                f"--{k} {saved.get(k)} there, {settings.get(k)} here" for k in differ
            )
            raise UserError(
                f"--out {out} holds seeds run with other settings ({changes}): pass the same "
                "flags to continue that study, or another --out"
            )
    elif os.path.isdir(out) and [n for n in os.listdir(out) if not n.startswith(".")]:
        raise UserError(
            f"--out {out} is not empty and has no {SETTINGS_FILE}: it was not written by "
            "reproduce.py --seeds (pass another --out)"
        )


def write_json(path: str, value) -> None:
    with atomic_file(path, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")


def gpu_count() -> int:
    """GPUs this process may use, without initialising JAX (which would take their memory)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())


# ----------------------------------------------------------------------------- one seed


def study(args: argparse.Namespace, seed: int, out: str) -> dict:
    """The whole study with --random_seed `seed` in folder `out`; returns its results."""
    log = open_log(out)
    dataset = shlex.join(["--dataset", args.dataset, "--data_root", args.data_root])
    common = f"{dataset} --model {args.model} --random_seed {seed}"
    training = f"{common} --batch_size {args.batch_size}"  # run_exp.py's
    if args.n_test is not None:
        training += f" --n_test {args.n_test}"
    epochs, starts = kernel_epochs(vars(args)), phase2_from(vars(args))
    aa_flags = f"--eps {args.eps} --autoattack --save_name autoattack --n_test {args.aa_n_test}"
    timings = {}

    # 1. phase 1
    t = time.time()
    phase1 = {}
    for kind, letter in KINDS:
        phase1[kind] = call(
            run_exp,
            f"{training} --eps {args.eps} --loaders {letter}C --standard_epochs {args.epochs} "
            f"--linear_epochs 0 --save_models --constant_save --skip_second_test "
            f"--save_path {out}/phase1_{kind}",
            log,
        )["standard"]
    timings["phase 1 (2 runs)"] = time.time() - t

    # 2-3. kernels and their evolution
    t = time.time()
    kernel_paths = {kind: {} for kind, _ in KINDS}
    for kind, _ in KINDS:
        for epoch in epochs:
            name = f"kernel_epoch_{format_epoch(epoch)}"
            call(
                calculate_kernel,
                f"{common} --model_path {checkpoint(f'{out}/phase1_{kind}', epoch, args.epochs)} "
                f"--dataset_size {args.kernel_size} --save_name {name}",
                log,
            )
            kernel_paths[kind][epoch] = f"{out}/phase1_{kind}/{name}_{args.kernel_size}.pkl"
    evolution = call(
        analyze_kernels,
        " ".join(p for kind, _ in KINDS for p in kernel_paths[kind].values())
        + f" --names benign adversarial --out_dir {out}/kernel_analysis",
        log,
    )
    timings["kernels and evolution"] = time.time() - t
    ends = {
        end: {kind: load_kernel(kernel_paths[kind][epochs[i]])["kernel"] for kind, _ in KINDS}
        for end, i in (("initial", 0), ("final", -1))
    }
    between = {
        end: kernel_distance(kernels["benign"], kernels["adversarial"])
        for end, kernels in ends.items()
    }

    # 4. phase 2 on frozen kernels
    t = time.time()
    phase2 = []
    for kind, _ in KINDS:
        for epoch in starts:
            path = checkpoint(f"{out}/phase1_{kind}", epoch, args.epochs)
            result = call(
                run_exp,
                f"{training} --eps {args.eps} --loaders CC --linear_epochs {args.phase2_epochs} "
                f"--base_model_path {path} --centering --second_lr 0.01 --skip_first_test "
                f"--save_models --save_path {out}/phase2_benign_from_{kind}_{format_epoch(epoch)}",
                log,
            )["linear"]
            phase2.append((kind, epoch, "benign", result))
    for epoch in sorted({starts[0], starts[-1]}):
        path = checkpoint(f"{out}/phase1_benign", epoch, args.epochs)
        result = call(
            run_exp,
            f"{training} --eps {args.eps} --loaders CA --linear_epochs {args.phase2_epochs} "
            f"--base_model_path {path} --centering --second_lr 0.01 --skip_first_test "
            f"--save_models --save_path {out}/phase2_adversarial_from_benign_{format_epoch(epoch)}",
            log,
        )["linear"]
        phase2.append(("benign", epoch, "adversarial", result))
    timings["phase 2 runs"] = time.time() - t

    # AutoAttack on every network and phase-2 model (the same test images for PGD and AA)
    t = time.time()
    for kind, _ in KINDS:
        phase1[kind]["aa"] = call(
            eval_and_make_adv,
            f"{common} --model_path {out}/phase1_{kind}/parameters_final.pkl {aa_flags}",
            log,
        )
    for kind, epoch, data, result in phase2:
        folder = f"phase2_{data}_from_{kind}_{format_epoch(epoch)}"
        result["aa"] = call(
            eval_and_make_adv,
            f"{common} --model_path {out}/{folder}/parameters_final.pkl --linear --centering "
            f"{aa_flags}",
            log,
        )
    timings["AutoAttack on the networks"] = time.time() - t

    # 5. NTK attack and transfer
    t = time.time()
    transfer = {}
    for name, flags in ntk_attacks(args, out).items():
        summary = call(
            ntk_attack,
            f"{dataset} --dataset_size {args.kernel_size} --eps {args.eps} "
            f"--random_seed {seed} --pgd_steps {args.attack_steps} "
            f"--n_test {args.predictor_n_test} --save_dir {out}/ntk_attack {flags} "
            f"--save_name {name}"
            + (" --autoattack" if name == "relu" or args.predictor_autoattack else ""),
            log,
        )
        row = {
            "clean": summary["accuracy_clean"],
            "pgd": summary["accuracy_linf"],
        }
        if "accuracy_autoattack" in summary:
            row["autoattack"] = summary["accuracy_autoattack"]
        for kind, _ in KINDS:
            evaluated = call(
                eval_and_make_adv,
                f"{common} --model_path {out}/phase1_{kind}/parameters_final.pkl --no_adv "
                f"--test_path {out}/ntk_attack/adv_examples_{name}.pkl --save_name ntk_{name}",
                log,
            )
            row[f"{kind}_net"] = evaluated["acc_transfer"]
        transfer[name] = row
    timings["NTK attacks and transfer"] = time.time() - t

    # 6. eigen-features
    t = time.time()
    eigen = {}
    for kind, _ in KINDS:
        eigen[kind] = call(
            eigen_features,
            f"{common} --model_path {out}/phase1_{kind}/parameters_final.pkl "
            f"--kernel_path {kernel_paths[kind][epochs[-1]]} --eps {args.eps} "
            f"--pgd_steps {args.attack_steps} --n_test {args.eigen_n_test} --components 10 "
            f"--top_k {top_ks(vars(args))} --save_dir {out}/eigen_features "
            + ("--autoattack " if args.predictor_autoattack else "")
            + f"--save_name {kind}",
            log,
        )
    timings["eigen-features"] = time.time() - t

    # 7. CKA
    t = time.time()
    final = {kind: f"{out}/phase1_{kind}/parameters_final.pkl" for kind, _ in KINDS}
    pair = f"{final['benign']} {final['adversarial']}"
    cka_results = {}
    for suffix, paths, adv in (
        ("benign_self", final["benign"], "0"),
        ("adversarial_self", final["adversarial"], "0"),
        ("benign_vs_adversarial", pair, "0 0"),
        ("benign_vs_adversarial_pgd_inputs", pair, "1 1"),
    ):
        cka_results[suffix] = call(
            cka,
            f"{dataset} --model {args.model} --model_path {paths} --adv {adv} "
            f"--eps {args.eps} --random_seed {seed} --savedir {out}/cka --suffix {suffix}",
            log,
        )
    timings["CKA"] = time.time() - t
    log.close()
    return {
        "phase1": phase1,
        "evolution": evolution,
        "between": between,
        "phase2": phase2,
        "transfer": transfer,
        "eigen": eigen,
        "cka": cka_results,
        "timings": timings,
    }


def ntk_attacks(args: argparse.Namespace, out: str) -> dict[str, str]:
    """The NTK attacks' kernel flags by save name (the infinite-width kernel first)."""
    final = f"{out}/phase1_benign/parameters_final.pkl"
    return {
        "relu": "--kernel relu_ntk",
        "init": f"--model {args.model}",
        "benign_final": f"--model {args.model} --model_path {final}",
    }


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    """One seed's study; its record (figures, warnings, timings) is written last, to
    OUT/seed_<s>/figures.json."""
    folder = seed_dir(args.out, seed)
    if os.path.isdir(folder):
        print(f"seed {seed}: removing the unfinished run in {folder} and running it again")
        shutil.rmtree(folder)
    start = time.time()
    print(f"seed {seed}: running the study in {folder}", flush=True)
    results = study(args, seed, folder)
    record = {
        "seed": seed,
        "figures": flatten(results),
        "warnings": warnings_of(results),
        "timings": results["timings"],
        "wall_s": time.time() - start,
    }
    write_json(os.path.join(folder, FIGURES_FILE), record)
    print(f"seed {seed}: done in {record['wall_s'] / 60:.1f} min", flush=True)
    return record


def default_workers() -> int:
    """Seeds side by side by default only where there are several GPUs, one per GPU. On a CPU
    one at a time: JAX already spreads one seed's study over the cores, and two seeds side by
    side on the 2-core machine took 53.7 min for the two, each step 1.6 to 2 times its time
    alone (one seed alone: 30.6 min; benchmarks/RESULTS.md)."""
    return max(gpu_count(), 1)


def run_side_by_side(argv: list[str], seeds: list[int], workers: int, out: str) -> None:
    """Each seed in its own process (`--only_seed s`), `workers` at a time, each on its own GPU
    when there are GPUs. A process's output goes to OUT/seed_<s>.log; its progress lines (the
    steps it starts) are printed here too, prefixed with its seed."""
    gpus = gpu_count()
    free = list(range(workers))

    def one(seed):
        slot = free.pop()
        env = dict(os.environ)
        if gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
            env["CUDA_VISIBLE_DEVICES"] = ids[slot % len(ids)].strip()
        log_path = os.path.join(out, f"seed_{seed}.log")
        print(f"seed {seed}: started in its own process (output in {log_path})", flush=True)
        command = [sys.executable, os.path.abspath(__file__), *argv, "--only_seed", str(seed)]
        try:
            with open(log_path, "w") as log:
                pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
                process = subprocess.Popen(command, text=True, env=env, **pipe)
                for line in process.stdout:
                    log.write(line)
                    log.flush()
                    if line.startswith(("$ ", "seed ", "error")):
                        print(f"[seed {seed}] {line.rstrip()}", flush=True)
                code = process.wait()
        finally:
            free.append(slot)
        print(f"seed {seed}: process ended with exit code {code}", flush=True)
        return code

    with ThreadPoolExecutor(max_workers=workers) as pool:
        codes = dict(zip(seeds, pool.map(one, seeds), strict=True))
    failed = [s for s, code in codes.items() if code != 0]
    if failed:
        raise UserError(
            f"seeds {failed} failed: see {', '.join(f'{out}/seed_{s}.log' for s in failed)}; "
            "rerun to continue from the finished seeds"
        )


def load_record(out: str, seed: int) -> dict:
    with open(os.path.join(seed_dir(out, seed), FIGURES_FILE)) as f:
        return json.load(f)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.time()
    out = check_out_dir(args.out, "--out")
    settings = settings_of(args)
    check_settings(out, settings)
    if args.only_seed is not None:
        run_seed(args, args.only_seed)
        return
    write_json(os.path.join(out, SETTINGS_FILE), settings)
    seeds = list(range(args.seeds))
    done = [s for s in seeds if os.path.exists(os.path.join(seed_dir(out, s), FIGURES_FILE))]
    pending = [s for s in seeds if s not in done]
    if done:
        print(f"seeds {done} finished already (their figures are reused); running {pending}")
    workers = min(args.parallel or default_workers(), max(len(pending), 1))
    if workers > 1:
        run_side_by_side(argv, pending, workers, out)
    else:
        for seed in pending:
            run_seed(args, seed)
    records = [load_record(out, s) for s in seeds]
    summary = aggregate(records, settings)
    summary = {
        "seeds": seeds,
        "settings": settings,
        "interval": {
            "level": intervals.LEVEL,
            "method": intervals.method_for(len(seeds)),
            "rule": "holds if the interval's low end > 0; contradicted if its high end <= 0; "
            "else not resolved (effects are oriented: > 0 is the claimed direction)",
            "bootstrap_from_seeds": intervals.BOOTSTRAP_FROM,
        },
        "seed_wall_s": [r["wall_s"] for r in records],
        "step_names": list(records[0]["timings"]),
        "step_minutes": [[r["seed"], list(r["timings"].values())] for r in records],
        "warnings": {str(r["seed"]): r["warnings"] for r in records},
        **summary,
    }
    write_json(os.path.join(out, SUMMARY_FILE), summary)
    write_figures_table(os.path.join(out, FIGURES_TABLE), seeds, summary["figures"])
    draw(summary, settings, out)
    report = write_report(summary, settings, out, time.time() - start)
    print(report)
    print(f"\nwrote {out}/REPORT.md, {SUMMARY_FILE}, {FIGURES_TABLE} and the pictures; wall time "
          f"{(time.time() - start) / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
    run_main(main)
