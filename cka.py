"""CKA between the layers of one checkpoint (cross-layer) or of two (robust vs. non-robust),
on benign or adversarial inputs for each side (Cianfarani et al. 2022's `cka.py`).

This project's checkpoints (.pkl): a layer is every ReLU output, in call order, then the logits
(similarity.py). With --adv 1 for a side, that side sees L-inf PGD examples (100 steps, eps
--eps/255) made against its own model from the same test images, so rows stay paired.

PyTorch models (torch_models.py): the CKA project's checkpoints (.pth, .pth.tar, .pt with
--model) and RobustBench's models (--robustbench NAME, read offline from --model_dir). Layers
are modules hooked by name; --adv 1 uses torchattacks' PGD with that project's settings; the
CKA is online with that project's defaults (10000 images, batches of 1024, 3 passes), and its
own output file, Model_..._<suffix>.pt, is written as well.

Writes into --savedir:
  cka_<suffix>.pkl  {'linear', 'debiased': (layers0, layers1) matrices, 'layers0', 'layers1',
                     'model_paths', 'adv', 'n_images', ...}
  cka_<suffix>.png  the heatmaps

With --batch_size B the CKA is computed online (similarity.MinibatchCKA: unbiased HSIC
accumulated over minibatches, Nguyen et al. 2021) over --dataset_passes shuffled passes of the
first --num_images test images, in batches of B; memory then stays constant in the number of
images, and only the debiased estimator exists ('linear' is None in the pickle).
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
import torch

from ntk_evolution.attacks.evaluation import attacked_batches, make_attack_fn
from ntk_evolution.attacks.pgd import attack_settings, eps_from_255
from ntk_evolution.cli import (
    Parser,
    add_eps_flag,
    add_seed_flag,
    add_shared_flags,
    finite_float,
    initialize_from_args,
    positive_int,
    with_values,
)
from ntk_evolution.data import DATASETS, SHAPES, load_dataset
from ntk_evolution.dynamics import Dynamics
from ntk_evolution.io.checkpoints import Checkpoint, load_model
from ntk_evolution.models import MODELS
from ntk_evolution.similarity.cka import (
    ESTIMATORS,
    MinibatchCKA,
    cka_matrix,
    gram,
    layer_grams,
    make_layer_fn,
)
from ntk_evolution.similarity.plots import plot_cka
from ntk_evolution.similarity.torch_models import (
    THREAT_MODELS,
    TORCH_MODELS,
    is_torch_checkpoint,
    layer_names,
    load_robustbench_model,
    load_torch_model,
    pgd_examples,
    robustbench_files,
)
from ntk_evolution.similarity.torch_models import layer_grams as torch_layer_grams
from ntk_evolution.utils import (
    UserError,
    atomic_file,
    check_out_dir,
    progress_bar,
    run_main,
    save_pickle,
    to_host,
)


def build_parser() -> Parser:
    p = Parser(__doc__)
    p.add_argument(
        "--model",
        nargs="+",
        default=None,
        choices=sorted(set(MODELS) | set(TORCH_MODELS)),
        help="Network of each side (1 or 2); default: each checkpoint's, else resnet18. For a "
        "PyTorch checkpoint (.pth, .pth.tar, .pt): " + ", ".join(TORCH_MODELS) + ".",
    )
    p.add_argument(
        "--dataset",
        default=None,
        choices=DATASETS,
        help="Dataset; default: the first checkpoint's, else cifar10.",
    )
    p.add_argument(
        "--model_path",
        nargs="+",
        default=[],
        help="1 or 2 checkpoints: this project's (.pkl) or PyTorch ones (.pth, .pth.tar, .pt).",
    )
    p.add_argument(
        "--robustbench",
        nargs="+",
        default=[],
        metavar="NAME",
        help="1 or 2 RobustBench models (e.g. Standard), read by RobustBench's loader from "
        "<--model_dir>/<dataset>/<--threat_model>/NAME.pt; after a --model_path, the second side.",
    )
    p.add_argument(
        "--threat_model", default="Linf", choices=THREAT_MODELS, help="RobustBench's threat model."
    )
    p.add_argument(
        "--model_dir", default="./models", help="RobustBench's model folder (its default)."
    )
    for side in (0, 1):
        p.add_argument(
            f"--model{side}_layers",
            nargs="+",
            default=["all"],
            help="'all', or layers: indices for this project's checkpoints, module names (as "
            "named_modules gives them) for PyTorch ones; space- or comma-separated.",
        )
    p.add_argument(
        "--adv", type=int, nargs="+", default=[0], choices=(0, 1), help="PGD inputs, per side."
    )
    p.add_argument("--savedir", default="./results", help="Output folder.")
    p.add_argument(
        "--attack",
        default="linf",
        choices=("linf", "l2"),
        help="PyTorch models: the PGD of --adv 1 (torchattacks), radius --eps/255 or --eps_l2.",
    )
    p.add_argument(
        "--eps_l2",
        type=finite_float(0.0, inclusive=False),
        default=1.0,
        help="--attack l2's radius (the CKA project's 1.0).",
    )
    p.add_argument(
        "--pgd_steps",
        type=positive_int,
        default=20,
        help="PyTorch models: PGD steps (the CKA project's 20).",
    )
    p.add_argument(
        "--pgd_step_size",
        type=finite_float(0.0, inclusive=False),
        default=None,
        help="PyTorch models: PGD step; default the CKA project's, 0.0078 (linf) or 0.1 (l2).",
    )
    p.add_argument(
        "--reuse_adv",
        action="store_true",
        help="PyTorch models: side 1 sees side 0's PGD examples (needs --adv 1 1).",
    )
    p.add_argument("--suffix", default="", help="Outputs are cka_<suffix>.pkl and .png.")
    p.add_argument(
        "--names",
        nargs="+",
        default=None,
        help="A name per side for the heatmap (1 or 2); default: each checkpoint's folder.",
    )
    p.add_argument(
        "--n_images",
        "--num_images",
        type=positive_int,
        default=None,
        help="First N test images; default 10000 for PyTorch models (the CKA project's), else 500.",
    )
    p.add_argument(
        "--batch_size",
        type=positive_int,
        default=None,
        help="Online minibatch CKA in batches of this size (> 3); default 1024 for PyTorch models "
        "(the CKA project's), else one full batch.",
    )
    p.add_argument(
        "--dataset_passes",
        type=positive_int,
        default=None,
        help="Shuffled passes over the images of the online CKA; default 3 for PyTorch models "
        "(the CKA project's), else 1.",
    )
    add_eps_flag(
        p,
        default=None,  # per kind of model
        help="L-inf radius in 1/255; default 4 for this project's checkpoints, and for PyTorch "
        "models the CKA project's 0.031 (7.9/255).",
    )
    add_seed_flag(p, "attacks")
    add_shared_flags(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("model_path", "robustbench", "model", "adv", "names"):
        if len(getattr(args, name) or []) > 2:
            p.error(f"--{name} takes one or two values")
    if not 0 < len(args.model_path) + len(args.robustbench) <= 2:
        p.error("give one or two models in all, by --model_path and/or --robustbench")
    if args.reuse_adv and (args.adv * 2)[:2] != [1, 1]:
        p.error("--reuse_adv needs --adv 1 1 (both sides on PGD examples)")
    # the CKA project's space-separated lists, or ours with commas
    layers = {
        f"model{side}_layers": ",".join(getattr(args, f"model{side}_layers")) for side in (0, 1)
    }
    return with_values(args, **layers)


def select_layers(spec: str, names: list[str], flag: str) -> list[int]:
    if spec == "all":
        return list(range(len(names)))
    try:
        chosen = [int(v) for v in spec.split(",")]
    except ValueError:
        raise UserError(f"{flag} must be 'all' or comma-separated layer indices") from None
    if min(chosen) < 0 or max(chosen) >= len(names):
        raise UserError(f"{flag}: layer indices go from 0 to {len(names) - 1}")
    return chosen


def side_grams(loaded: Checkpoint, adversarial: bool, x, y, args):
    """Layer names and Gram matrices of one side: its checkpoint's network on x, or with
    `adversarial` on L-inf PGD examples of x made against it (attacked_batches' keys)."""
    model, params, net_state = loaded.model, loaded.params, loaded.net_state
    if adversarial:
        settings = attack_settings(args.eps_linf)["linf"]
        attack = make_attack_fn(model, Dynamics(), **settings)
        batches = attacked_batches(
            x,
            y,
            jax.random.PRNGKey(args.random_seed),
            {"adv": lambda xb, yb, key: attack(params, params, net_state, xb, yb, key)},
            description="PGD inputs",
        )
        x = np.concatenate([to_host(inputs["adv"])[:n_real] for inputs, _, n_real in batches])
    return layer_grams(model, params, net_state, x)


def torch_cka(args, adv: list[int]) -> dict:
    """CKA between the layers of PyTorch networks (torch_models: the CKA project's checkpoints,
    or RobustBench's models): debiased CKA accumulated over batches of --batch_size images and
    --dataset_passes shuffled passes, with the CKA project's defaults (10000 images, batches
    of 1024, 3 passes); each layer's Gram matrix is made in its forward hook, so memory holds
    batch^2 numbers per layer."""
    sides = [("path", p) for p in args.model_path] + [("robustbench", n) for n in args.robustbench]
    sides = (sides * 2)[:2]  # one model: compare it with itself
    if any(kind == "path" for kind, _ in sides) and not args.model:
        raise UserError(f"a PyTorch checkpoint needs --model: one of {', '.join(TORCH_MODELS)}")
    models = (args.model * 2)[:2] if args.model else [None, None]
    args = with_values(args, dataset=args.dataset or "cifar10")
    n_classes = SHAPES[args.dataset][1]

    def load(side: int):
        """(network, file, model name, label) of a side."""
        kind, what = sides[side]
        if kind == "path":
            network = load_torch_model(models[side], what, n_classes)
            return network, what, models[side], run_name(what)
        file = robustbench_files(what, args.model_dir, args.dataset, args.threat_model)[0]
        network = load_robustbench_model(what, args.model_dir, args.dataset, args.threat_model)
        return network, file, f"robustbench:{what}", f"{what} ({args.threat_model})"

    loaded = [load(0)]
    same = sides[1] == sides[0] and models[1] == models[0]
    loaded.append(loaded[0] if same else load(1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    networks = [network.to(device) for network, *_ in loaded]
    paths = [file for _, file, _, _ in loaded]
    models = [model for _, _, model, _ in loaded]
    args = with_values(args, names=args.names or [label for *_, label in loaded])
    names = [
        layer_names(networks[0], args.model0_layers, "--model0_layers"),
        layer_names(networks[1], args.model1_layers, "--model1_layers"),
    ]
    args = with_values(
        args, n_images=args.n_images or 10000, dataset_passes=args.dataset_passes or 3
    )
    ds = load_dataset(args.dataset, args.data_root)
    x, y = ds.x_test[: args.n_images], ds.y_test[: args.n_images]
    requested_batch = args.batch_size or 1024  # the CKA project's; fewer images: one batch
    args = with_values(args, batch_size=min(requested_batch, len(x)))
    # the CKA project's L-inf radius is 0.031 (7.9/255); --eps (in 1/255) replaces it
    linf_eps = args.eps_linf if args.eps is not None else 0.031
    eps = linf_eps if args.attack == "linf" else args.eps_l2
    step = args.pgd_step_size or {"linf": 0.0078, "l2": 0.1}[args.attack]
    print(f"{len(names[0])} x {len(names[1])} layers on {device}")

    def batch_grams(x_batch, y_batch, index):
        xb = torch.from_numpy(np.ascontiguousarray(x_batch.transpose(0, 3, 1, 2))).to(device)
        yb = torch.from_numpy(y_batch.astype(np.int64)).to(device)
        grams, inputs = [], xb
        for side in range(2):
            if adv[side] and not (side == 1 and args.reuse_adv):
                seed = args.random_seed + 1000 * side + index
                inputs = pgd_examples(
                    networks[side], xb, yb, args.attack, eps, args.pgd_steps, seed, step
                )
            elif not adv[side]:
                inputs = xb
            grams.append(torch_layer_grams(networks[side], names[side], inputs))
        return grams

    accumulator, batch_size = accumulate(args, x, y, batch_grams)
    result = online_result(
        args,
        accumulator,
        names[0],
        names[1],
        adv,
        len(x),
        batch_size,
        models=models,
        attack=args.attack,
        eps=eps,
        pgd_step_size=step,
        pgd_steps=args.pgd_steps,
        reuse_adv=args.reuse_adv,
        threat_model=args.threat_model if args.robustbench else None,
    )
    result = finish(args, result, paths, adv, range(len(names[0])), range(len(names[1])))
    models = [m.removeprefix("robustbench:") for m in models]
    save_original_format(args, result, models, paths, requested_batch)
    return result


def save_original_format(args, result: dict, models: list[str], paths: list[str], batch: int):
    """The CKA project's own output beside ours, for its users' scripts (its utils/plots.py
    reads these names): torch.save of {'cka', 'model0_keys', 'model1_keys', 'args'} in
    Model_<m0>_<m1>-Adv_<a0>_<a1>-layers_...-batchsize_<batch>_<suffix>.pt, `batch` being the
    --batch_size asked for, as there. 'cka' is a NumPy array, as there (torch.load needs
    weights_only=False for it). Returns the path."""
    adv = [bool(a) for a in result["adv"]]
    identical_models = models[0] == models[1] and paths[0] == paths[1]
    identical_attacks = identical_models and adv[0] == adv[1]

    def keyword(spec: str) -> str:  # 'all', the one layer's name, or the number of layers
        layers = spec.split(",")
        return layers[0] if len(layers) == 1 else str(len(layers))

    suffix = f"_{args.suffix}" if args.suffix else ""
    name = (
        f"Model_{models[0]}_{models[1]}-Adv_{adv[0]}_{adv[1]}-layers_"
        f"{keyword(args.model0_layers)}_{keyword(args.model1_layers)}-reuse_adv_"
        f"{args.reuse_adv}-identical_models_{identical_models}-identical_attacks_"
        f"{identical_attacks}-batchsize_{batch}{suffix}.pt"
    )
    path = os.path.join(args.savedir, name)
    saved = {
        "cka": np.asarray(result["debiased"]),
        "model0_keys": list(result["layers0"]),
        "model1_keys": list(result["layers1"]),
        "args": dict(vars(args)),
    }
    with atomic_file(path) as f:
        torch.save(saved, f)
    print(f"wrote {path} (the CKA project's format)")
    return path


def run_name(path: str) -> str:
    """A checkpoint's folder and, unless it is parameters_final.pkl, its file stem."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    stem = os.path.basename(path).removesuffix(".tar")
    stem = os.path.splitext(stem)[0]
    return folder if stem == "parameters_final" else f"{folder}/{stem}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_out_dir(args.savedir, "--savedir")
    initialize_from_args(args)
    kinds = {is_torch_checkpoint(path) for path in args.model_path} | (
        {True} if args.robustbench else set()
    )
    if len(kinds) > 1:
        raise UserError(
            "--model_path: this project's checkpoints (.pkl) compare with each other only, not "
            "with PyTorch or RobustBench models"
        )
    if kinds == {True}:
        return torch_cka(args, (args.adv * 2)[:2])
    paths = args.model_path * (3 - len(args.model_path))  # one checkpoint: compare with itself
    args = with_values(  # this project's defaults
        args,
        eps=4.0 if args.eps is None else args.eps,
        eps_linf=eps_from_255(4.0) if args.eps is None else args.eps_linf,
        n_images=args.n_images or 500,
        dataset_passes=args.dataset_passes or 1,
    )
    if any(model not in MODELS for model in args.model or []):
        raise UserError(
            f"--model {' '.join(args.model)}: this project's checkpoints (.pkl) take "
            f"{', '.join(MODELS)}"
        )
    models = (args.model * 2)[:2] if args.model else [None, None]
    adv = (args.adv * 2)[:2]
    loaded0 = load_model(paths[0], models[0], args.dataset, args.trust_pickle)
    args = with_values(args, dataset=loaded0.dataset)
    same = paths[1] == paths[0] and models[1] == models[0]
    loaded1 = loaded0 if same else load_model(paths[1], models[1], args.dataset, args.trust_pickle)
    args = with_values(args, model=[loaded0.model_name, loaded1.model_name])
    ds = load_dataset(args.dataset, args.data_root)
    x, y = ds.x_test[: args.n_images], ds.y_test[: args.n_images]
    if len(x) < 4:
        raise UserError("--n_images must be at least 4 for the debiased estimator")
    if args.batch_size is not None:
        result, rows, cols = online_cka(args, loaded0, loaded1, adv, x, y)
        return finish(args, result, paths, adv, rows, cols)

    names0, grams0 = side_grams(loaded0, adv[0], x, y, args)
    if same and adv[1] == adv[0]:
        names1, grams1 = names0, grams0
    else:
        names1, grams1 = side_grams(loaded1, adv[1], x, y, args)
    rows = select_layers(args.model0_layers, names0, "--model0_layers")
    cols = select_layers(args.model1_layers, names1, "--model1_layers")
    result = {
        estimator: cka_matrix([grams0[i] for i in rows], [grams1[j] for j in cols], estimator)
        for estimator in ESTIMATORS
    }
    result.update(
        {
            "layers0": [names0[i] for i in rows],
            "layers1": [names1[j] for j in cols],
            "model_paths": paths[:2],
            "adv": adv,
            "n_images": len(x),
        }
    )
    return finish(args, result, paths, adv, rows, cols)


def online_cka(args, loaded0: Checkpoint, loaded1: Checkpoint, adv, x, y):
    """Debiased CKA of this project's checkpoints over minibatches (accumulate); each side's
    layer outputs (on its own PGD examples with --adv 1) are computed a batch at a time.
    Returns the result and the (rows, columns) layer indices."""
    pairs = zip((loaded0, loaded1), adv, strict=True)
    sides = [side_batch_fn(loaded, adversarial, args) for loaded, adversarial in pairs]
    key = jax.random.PRNGKey(args.random_seed)
    chosen = {}  # the layers, once the first batch has named them

    def batch_grams(x_batch, y_batch, step):
        (names0, f0), (names1, f1) = (
            side(x_batch, y_batch, jax.random.fold_in(key, step)) for side in sides
        )
        if not chosen:
            chosen["rows"] = select_layers(args.model0_layers, names0, "--model0_layers")
            chosen["cols"] = select_layers(args.model1_layers, names1, "--model1_layers")
            chosen["names"] = (names0, names1)
        grams0 = np.stack([gram(f0[i]) for i in chosen["rows"]])
        return grams0, np.stack([gram(f1[j]) for j in chosen["cols"]])

    accumulator, batch_size = accumulate(args, x, y, batch_grams)
    rows, cols, (names0, names1) = chosen["rows"], chosen["cols"], chosen["names"]
    layers0, layers1 = [names0[i] for i in rows], [names1[j] for j in cols]
    return online_result(args, accumulator, layers0, layers1, adv, len(x), batch_size), rows, cols


def accumulate(args, x, y, batch_grams) -> tuple[MinibatchCKA, int]:
    """similarity.MinibatchCKA over --dataset_passes passes of the images x in batches of
    --batch_size (default: one batch of all), each pass in an order drawn from
    (--random_seed, pass); a last, smaller batch is used as the CKA project's loader does, when
    it has the 4 images the estimator needs. batch_grams(x_batch, y_batch, step) gives the
    batch's Gram matrices of both sides. Returns the accumulator and the batch size."""
    batch_size = args.batch_size or len(x)
    if not 3 < batch_size <= len(x):
        raise UserError(f"--batch_size must lie in 4..{len(x)} (the images)")
    starts = [s for s in range(0, len(x), batch_size) if len(x) - s > 3]
    rest = len(x) % batch_size
    last = f" (the last of {rest})" if rest > 3 else f" ({rest} left over)" if rest else ""
    print(f"{args.dataset_passes} pass(es) of {len(starts)} batches of {batch_size} images{last}")
    accumulator = None
    bar = progress_bar(desc="CKA batches", total=len(starts) * args.dataset_passes)
    for p in range(args.dataset_passes):
        order = np.random.default_rng([args.random_seed, p]).permutation(len(x))
        for b, start in enumerate(starts):
            batch = order[start : start + batch_size]
            grams0, grams1 = batch_grams(x[batch], y[batch], p * len(starts) + b)
            if accumulator is None:
                accumulator = MinibatchCKA(len(grams0), len(grams1))
            accumulator.update_grams(grams0, grams1)
            bar.update()
    bar.close()
    return accumulator, batch_size


def online_result(args, accumulator, layers0, layers1, adv, n_images, batch_size, **extra):
    """The pickle of an online CKA ('linear' is None: only the debiased estimator exists)."""
    return {
        "linear": None,
        "debiased": accumulator.result(),
        "layers0": layers0,
        "layers1": layers1,
        "adv": adv,
        "n_images": n_images,
        "batch_size": batch_size,
        "dataset_passes": args.dataset_passes,
        "batches": accumulator.batches,
        **extra,
    }


def side_batch_fn(loaded: Checkpoint, adversarial: bool, args):
    """fn(x, y, key) -> (layer names, layer outputs as NumPy arrays) of one side on a batch: its
    checkpoint's network on x, or with `adversarial` on L-inf PGD examples of x."""
    layer_fn, names = make_layer_fn(loaded.model)
    model, params, net_state = loaded.model, loaded.params, loaded.net_state
    attack = None
    if adversarial:
        settings = attack_settings(args.eps_linf)["linf"]
        attack = make_attack_fn(model, Dynamics(), **settings)

    def features(x, y, key):
        if attack is not None:
            x = attack(params, params, net_state, x, y, key)
        outputs = [np.asarray(to_host(out)) for out in layer_fn(params, net_state, x)]
        return list(names), outputs  # names are known once layer_fn has been traced

    return features


def finish(args, result: dict, paths, adv, rows, cols) -> dict:
    """Write cka_<suffix>.pkl and .png, print the diagonal."""
    result["model_paths"] = paths[:2]
    suffix = f"_{args.suffix}" if args.suffix else ""
    path = os.path.join(args.savedir, f"cka{suffix}.pkl")
    undefined = [
        f"{estimator} CKA of {result['layers0'][i]} vs {result['layers1'][j]}"
        for estimator in ESTIMATORS
        if result[estimator] is not None
        for i, j in zip(*np.nonzero(np.isnan(result[estimator])), strict=True)
    ]
    if undefined:  # a layer whose features are constant on these images: CKA is 0/0
        print(
            f"warning: {len(undefined)} values are undefined (NaN: a constant layer), e.g. "
            f"{undefined[0]}"
        )
    save_pickle(result, path, allow_nan=bool(undefined))
    names = (args.names * 2)[:2] if args.names else [run_name(p) for p in paths[:2]]
    sides = [n + (" (PGD inputs)" if a else "") for n, a in zip(names, adv, strict=True)]
    plot_cka(result, sides, path[:-4] + ".png", (rows, cols))
    estimator = "linear" if result["linear"] is not None else "debiased"
    if len(rows) == len(cols):
        diagonal = np.diag(result[estimator])
        print(f"{estimator} CKA, layer i vs layer i:", " ".join(f"{v:.3f}" for v in diagonal))
    print(f"wrote {path} and {path[:-4]}.png")
    return result


if __name__ == "__main__":
    run_main(main)
