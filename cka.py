"""CKA between the layers of one checkpoint (cross-layer) or of two (robust vs. non-robust),
on benign or adversarial inputs for each side (Cianfarani et al. 2022's `cka.py`).

A layer is every ReLU output, in call order, then the logits (similarity.py). With --adv 1 for a
side, that side sees L-inf PGD examples (100 steps, eps --eps/255) made against its own model
from the same test images, so rows stay paired. Writes into --savedir:
  cka_<suffix>.pkl  {'linear', 'debiased': (layers0, layers1) matrices, 'layers0', 'layers1',
                     'model_paths', 'adv', 'n_images'}
  cka_<suffix>.png  the heatmaps
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from data import DATASETS, load_dataset, padded_batches
from dynamics import Dynamics
from evaluation import TEST_BATCH, attack_settings, make_attack_fn
from models import MODELS, get_model, init_model
from plots import plot_cka
from similarity import ESTIMATORS, cka_matrix, layer_grams
from utils import (
    Parser,
    UserError,
    add_shared_flags,
    finite_float,
    load_checkpoint,
    positive_int,
    run_main,
    save_pickle,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument("--model", nargs="+", default=["resnet18"], choices=MODELS, help="1 or 2")
    p.add_argument("--dataset", default="cifar10", choices=DATASETS)
    p.add_argument("--model_path", nargs="+", required=True, help="1 or 2 checkpoints")
    p.add_argument("--model0_layers", default="all", help="'all' or comma-separated indices")
    p.add_argument("--model1_layers", default="all", help="'all' or comma-separated indices")
    p.add_argument("--adv", type=int, nargs="+", default=[0], choices=(0, 1), help="per side")
    p.add_argument("--savedir", default="./results")
    p.add_argument("--suffix", default="")
    p.add_argument("--n_images", type=positive_int, default=500, help="first N test images")
    p.add_argument("--eps", type=finite_float(0.0), default=4.0, help="L-inf radius in 1/255")
    p.add_argument("--random_seed", type=int, default=0)
    add_shared_flags(p)
    args = p.parse_args(argv)
    for name in ("model_path", "model", "adv"):
        if len(getattr(args, name)) > 2:
            p.error(f"--{name} takes one or two values")
    return args


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


def side_grams(model_name, path, adversarial, ds, x, y, args):
    """Layer names and Gram matrices of one side."""
    model = get_model(model_name, ds.n_classes)
    like = init_model(model, jax.random.PRNGKey(0), ds.image_shape)
    ckpt = load_checkpoint(path, like=like, trust=args.trust_pickle)
    params, net_state = ckpt["params"], ckpt["net_state"]
    if adversarial:
        attack = make_attack_fn(model, Dynamics(), **attack_settings(args.eps / 255.0)["linf"])
        key = jax.random.PRNGKey(args.random_seed)
        batches = []
        for i, (xb, yb, n_real) in enumerate(padded_batches(x, y, TEST_BATCH)):
            adv = attack(params, params, net_state, xb, yb, jax.random.fold_in(key, i))
            batches.append(np.asarray(adv)[:n_real])
        x = np.concatenate(batches)
    return layer_grams(model, params, net_state, x)


def main(argv=None) -> dict:
    args = parse_args(argv)
    ds = load_dataset(args.dataset, args.data_root)
    paths = args.model_path * (3 - len(args.model_path))  # one checkpoint: compare with itself
    models = (args.model * 2)[:2]
    adv = (args.adv * 2)[:2]
    x, y = ds.x_test[: args.n_images], ds.y_test[: args.n_images]
    if len(x) < 4:
        raise UserError("--n_images must be at least 4 for the debiased estimator")

    names0, grams0 = side_grams(models[0], paths[0], adv[0], ds, x, y, args)
    if paths[1] == paths[0] and models[1] == models[0] and adv[1] == adv[0]:
        names1, grams1 = names0, grams0
    else:
        names1, grams1 = side_grams(models[1], paths[1], adv[1], ds, x, y, args)
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
    suffix = f"_{args.suffix}" if args.suffix else ""
    path = os.path.join(args.savedir, f"cka{suffix}.pkl")
    save_pickle(result, path)
    sides = [
        f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}/{os.path.basename(p)}"
        + (" (PGD inputs)" if a else "")
        for p, a in zip(paths[:2], adv, strict=True)
    ]
    plot_cka(result, sides, path[:-4] + ".png")
    diagonal = np.diag(result["linear"]) if len(rows) == len(cols) else None
    if diagonal is not None:
        print("linear CKA, layer i vs layer i:", " ".join(f"{v:.3f}" for v in diagonal))
    print(f"wrote {path} and {path[:-4]}.png")
    return result


if __name__ == "__main__":
    run_main(main)
