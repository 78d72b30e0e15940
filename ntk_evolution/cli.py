"""The command line: the parser every entry script uses, each shared flag defined once, and the
argparse value types. Scripts build their parser here, parse, then call
`initialize_from_args(args)` themselves (joining several hosts is not a side effect of parsing).
Only this module and the scripts' `main` see an argparse.Namespace: what follows from the flags
(the checkpoint of --model_path, its dataset) is turned into plain values here.

Flags keep the original's names (`--save_path`, `--bonus_dir`, `--savedir`); flags this project
added name an output folder `--out_dir`.
"""

from __future__ import annotations

import argparse
import glob
import math
import sys
from collections.abc import Callable

import numpy as np

from ntk_evolution.attacks.pgd import (
    ATTACK_VARIANTS,
    DEFAULT_EPS_255,
    EVAL_PGD_STEPS,
    L2_EPS,
    eps_from_255,
)
from ntk_evolution.attacks.runner import check_restarts
from ntk_evolution.data import DATASETS, Dataset, load_dataset
from ntk_evolution.io.checkpoints import (
    DEFAULT_DATASET,
    DEFAULT_MODEL,
    Checkpoint,
    load_model,
    resolve_model_flags,
)
from ntk_evolution.kernels.predictors import KernelChoice, kernel_choice, support_kernel
from ntk_evolution.kernels.regression import SupportKernel
from ntk_evolution.models import MODELS
from ntk_evolution.parallel import default_compile_cache, initialize
from ntk_evolution.utils import UserError

# the kernels of the kernel predictors (kernels/predictors.py): the network's empirical NTK, the
# closed-form ReLU NTK of an infinite-width MLP, the convolutional NTK
KERNELS = ("empirical", "relu_ntk", "cntk")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and every flag's default after its help."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose help shows defaults and whose errors are one line on stderr (exit
    code 2), without the usage."""

    def __init__(self, description: str | None = None):
        super().__init__(description=description, formatter_class=_HelpFormatter)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args=None, namespace=None):
        """The flags, with --eps (in 1/255, as the original's flag and as recorded) also as
        `eps_linf` in image units: converted here, once."""
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "eps", None) is not None:
            parsed.eps_linf = eps_from_255(parsed.eps)
        return parsed


# ----------------------------------------------------------------------------- output folders


# ----------------------------------------------------------------------------- value types


def finite_float(min_value: float = -math.inf, inclusive: bool = True) -> Callable[[str], float]:
    """argparse type: a finite float >= min_value (or > when not inclusive)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = value >= min_value if inclusive else value > min_value
        if not math.isfinite(value) or not ok:
            sign = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {sign} {min_value}")
        return value

    return parse


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def expand_paths(patterns: list[str], what: str) -> list[str]:
    """Paths and (quoted) globs, in order, each glob sorted, duplicates dropped; a glob that
    matches nothing is an error naming it."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"no {what} matches {pattern!r}")
        paths.extend(matches)
    return list(dict.fromkeys(paths))


# ----------------------------------------------------------------------------- shared flags


def add_shared_flags(p: argparse.ArgumentParser) -> None:
    """Flags every entry script adds to the original's: --data_root, --trust_pickle, the
    several-host flags and the compilation cache (both read by parallel.initialize)."""
    p.add_argument("--data_root", default="./data", help="Where CIFAR lives or is downloaded.")
    p.add_argument(
        "--trust_pickle",
        action="store_true",
        help="Fully unpickle input files you trust (e.g. written by the original code).",
    )
    p.add_argument(
        "--coordinator_address",
        default="",
        help="Several hosts: host:port of process 0 (jax.distributed.initialize).",
    )
    p.add_argument("--num_processes", type=int, default=None, help="Several hosts: their count.")
    p.add_argument("--process_id", type=int, default=None, help="Several hosts: this one's index.")
    p.add_argument(
        "--compile_cache",
        default=default_compile_cache(),
        help="Folder of JAX's persistent compilation cache: a second run of a script reuses the "
        "first one's compiled functions ($NTK_CACHE_DIR moves the default).",
    )
    p.add_argument(
        "--no_compile_cache",
        action="store_true",
        help="Compile everything afresh and write nothing to --compile_cache.",
    )


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model and --dataset: when not given, what the script's checkpoint records in its meta,
    else resnet18 on cifar10, the original's defaults (checkpoints.resolve_model_flags)."""
    p.add_argument(
        "--model",
        default=None,
        choices=MODELS,
        help=f"Network; default: the checkpoint's, else {DEFAULT_MODEL}.",
    )
    p.add_argument(
        "--dataset",
        default=None,
        choices=DATASETS,
        help=f"Dataset; default: the checkpoint's, else {DEFAULT_DATASET}.",
    )


def add_seed_flag(
    p: argparse.ArgumentParser, what: str = "data order, subsets and attacks"
) -> None:
    p.add_argument("--random_seed", type=int, default=0, help=f"Seed of the {what}.")


def add_eps_flag(
    p: argparse.ArgumentParser,
    default: float | None = DEFAULT_EPS_255,
    help: str = "L-inf radius in 1/255 (attacks.eps_from_255).",
) -> None:
    p.add_argument("--eps", type=finite_float(0.0), default=default, help=help)


def with_values(args: argparse.Namespace, **values) -> argparse.Namespace:
    """A copy of the parsed flags with `values` filled in (defaults that depend on the inputs):
    the caller's namespace is left as parsed."""
    return argparse.Namespace(**{**vars(args), **values})


def add_kernel_subset_flags(
    p: argparse.ArgumentParser, class_help: str = "Kernel of logit c, or -1: averaged over logits."
) -> None:
    """The empirical NTK's support set and logit: --dataset_size, --class_index and
    --use_linear_params (calculate_kernel.py, visualize_ntk_features.py, the kernel scripts)."""
    p.add_argument(
        "--dataset_size", type=positive_int, default=500, help="Training images in the subset."
    )
    p.add_argument("--class_index", type=int, default=-1, help=class_help)
    p.add_argument(
        "--use_linear_params", action="store_true", help="Kernel at lin_params (w), not params."
    )


def add_out_dir_flag(p: argparse.ArgumentParser, default: str, alias: str | None = None) -> None:
    """--out_dir, the output folder of the scripts this project added (`alias`: the flag's
    earlier spelling, still accepted)."""
    names = ["--out_dir"] + ([alias] if alias else [])
    p.add_argument(*names, dest="out_dir", default=default, help="Folder for the outputs.")


# ----------------------------------------------------------------------------- attacks


def add_robustness_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the honest robustness evaluation (eval_and_make_adv.py, ntk_attack.py)."""
    p.add_argument("--margin", action="store_true", help="also PGD on the margin (CW) loss")
    p.add_argument("--restarts", type=positive_int, default=1, help="random restarts per attack")
    p.add_argument(
        "--transfer_path",
        default="",
        help="adv_examples pickle of the same test images (another model's) to transfer",
    )


def add_attack_variant_flag(p: argparse.ArgumentParser) -> None:
    """--attack_variant (attacks.apply_variant) of every script that attacks with PGD."""
    p.add_argument(
        "--attack_variant",
        default="pgd",
        choices=ATTACK_VARIANTS,
        help="PGD from a random start (pgd), from the image (pgd_no_start), or FGSM: one step "
        "of eps (fgsm).",
    )


def check_attack_variant(args: argparse.Namespace) -> None:
    """--restarts draw new random starts: only --attack_variant pgd has one."""
    check_restarts(args.restarts, args.attack_variant)


def add_autoattack_flags(p: argparse.ArgumentParser) -> None:
    """--autoattack and its threat model, and --eps_sweep (every attacking script)."""
    p.add_argument(
        "--autoattack",
        action="store_true",
        help="also AutoAttack's standard version: APGD-CE, APGD-T, FAB-T and Square (5000 "
        "queries) in turn, each on the images still robust, as the reference runs them",
    )
    p.add_argument(
        "--autoattack_each",
        action="store_true",
        help="with --autoattack, run every attack on every image too, for each attack's own "
        "accuracy (acc_apgd_ce, ...; slower); the AutoAttack figure is the same",
    )
    p.add_argument(
        "--autoattack_norm",
        default="linf",
        choices=("linf", "l2"),
        help="threat model of --autoattack: linf (radius --eps/255) or l2 (radius --eps_l2)",
    )
    p.add_argument(
        "--eps_l2",
        type=finite_float(0.0, inclusive=False),
        default=L2_EPS,
        help="L2 radius of --autoattack_norm l2",
    )
    p.add_argument(
        "--eps_sweep",
        type=eps_list,
        default=None,
        help="also the worst-case L-inf accuracy at these radii in 1/255 (e.g. 8,16,32,64,128): "
        "it must fall towards zero, else gradients are masked",
    )


def eps_list(text: str) -> list[float]:
    """argparse type: comma-separated positive radii."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None
    if not values or any(not np.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: radii must be positive numbers")
    return sorted(values)


def autoattack_eps(args) -> float:
    """The radius of --autoattack in image units."""
    return args.eps_linf if args.autoattack_norm == "linf" else args.eps_l2


def autoattack_threat(args) -> tuple[str, float] | None:
    """(norm, radius) of --autoattack, or None without it."""
    return (args.autoattack_norm, autoattack_eps(args)) if args.autoattack else None


# ----------------------------------------------------------------------------- kernels


def add_kernel_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the kernel-predictor scripts (ntk_attack.py, eigen_features.py,
    robustify_dataset.py): the kernel, the support set, the test images and the attack."""
    add_model_flags(p)
    add_seed_flag(p, "support subset and the attacks")
    add_eps_flag(p)
    p.add_argument(
        "--pgd_steps", type=positive_int, default=EVAL_PGD_STEPS, help="PGD steps (2 eps / n each)."
    )
    add_attack_variant_flag(p)
    p.add_argument("--n_test", type=positive_int, default=None, help="First N test images.")
    p.add_argument(
        "--kernel", default="empirical", choices=KERNELS, help="Kernel of the predictor."
    )
    p.add_argument(
        "--model_path", default="", help="Checkpoint of the empirical NTK; empty: the net at init."
    )
    add_kernel_subset_flags(p)
    p.add_argument("--kernel_path", default="", help="Reuse calculate_kernel.py's K(X, X).")
    p.add_argument(
        "--support_path",
        default="",
        help="Support set from an adv_examples pickle (e.g. robustify_dataset.py's output).",
    )
    p.add_argument(
        "--relu_depth",
        type=positive_int,
        default=2,
        help="Hidden layers of relu_ntk's network (conv layers of cntk's).",
    )
    p.add_argument(
        "--ridge", type=finite_float(0.0), default=1e-4, help="Ridge, times mean(diag K)."
    )
    add_autoattack_flags(p)


# ----------------------------------------------------------------------------- from flags to values


def initialize_from_args(args: argparse.Namespace) -> None:
    """parallel.initialize with the shared flags' values (--compile_cache, --no_compile_cache and
    the several-host flags)."""
    initialize(
        compile_cache=None if getattr(args, "no_compile_cache", True) else args.compile_cache,
        coordinator_address=getattr(args, "coordinator_address", ""),
        num_processes=getattr(args, "num_processes", None),
        process_id=getattr(args, "process_id", None),
    )


def load_model_from_args(
    args: argparse.Namespace, path: str | None = None
) -> tuple[argparse.Namespace, Checkpoint | None]:
    """load_model(`path`, default --model_path) with the script's --model, --dataset and
    --trust_pickle; and a copy of the flags whose --model and --dataset are what the checkpoint
    is (the parsed flags are left as they are). Without a path: None, and the two flags get
    their defaults where not given."""
    path = getattr(args, "model_path", "") if path is None else path
    if not path:
        model, dataset = resolve_model_flags(args.model, args.dataset, None, "")
        return with_values(args, model=model, dataset=dataset), None
    loaded = load_model(path, args.model, args.dataset, args.trust_pickle)
    return with_values(args, model=loaded.model_name, dataset=loaded.dataset), loaded


def model_and_dataset(
    args: argparse.Namespace,
) -> tuple[argparse.Namespace, Checkpoint | None, Dataset]:
    """The flags with --model and --dataset filled in, the --model_path checkpoint
    (load_model_from_args) and the dataset it was trained on."""
    args, loaded = load_model_from_args(args)
    return args, loaded, load_dataset(args.dataset, args.data_root)


def kernel_from_args(
    args: argparse.Namespace, ds: Dataset, loaded: Checkpoint | None = None
) -> KernelChoice:
    """predictors.kernel_choice with --kernel, --class_index, --use_linear_params, --relu_depth,
    --model and --random_seed; `loaded` the --model_path checkpoint (load_model_from_args)."""
    return kernel_choice(
        ds,
        args.kernel,
        checkpoint=loaded,
        model=args.model,
        class_index=args.class_index,
        use_linear_params=args.use_linear_params,
        relu_depth=args.relu_depth,
        seed=args.random_seed,
    )


def support_kernel_from_args(
    args: argparse.Namespace, ds: Dataset, loaded: Checkpoint | None = None
) -> SupportKernel:
    """predictors.support_kernel of kernel_from_args' kernel, with --dataset_size,
    --random_seed, --kernel_path (its dataset, and for the empirical NTK its model and
    --class_index, checked), --support_path, --classes and --trust_pickle."""
    checked = ["dataset"] + (["model", "class_index"] if args.kernel == "empirical" else [])
    return support_kernel(
        kernel_from_args(args, ds, loaded),
        ds,
        dataset_size=args.dataset_size,
        seed=args.random_seed,
        kernel_path=args.kernel_path,
        support_path=args.support_path,
        classes=getattr(args, "classes", None),
        trust=args.trust_pickle,
        expect={key: getattr(args, key) for key in checked},
    )
