"""One robustness evaluation of a network or its linearized model: clean accuracy, L-inf PGD on
the cross-entropy (the original's "dirty" accuracy), optionally PGD on the margin loss, random
restarts, another model's examples (transfer), AutoAttack's standard version with the
reference's checks, and the worst case over all of them at several radii (the eps sweep), with
warnings that name gradient masking where the figures show its signs.

`evaluate_network` is the evaluation; `evaluate_checkpoint_file` is eval_and_make_adv.py's run
(a checkpoint file in, its test_results pickle out); `robustness` is the same from plain
values (a run of experiment.py, or a checkpoint), for a notebook:

    r = attacks.robustness(lin, x, y, eps=32 / 255, attacks=("pgd", "autoattack"))
    r["clean"], r["pgd"], r["autoattack"], r["warnings"]
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import haiku as hk
import jax
import numpy as np

from ntk_evolution.attacks.autoattack import AUTOATTACK
from ntk_evolution.attacks.evaluation import (
    NAMES,
    Tally,
    after,
    attacked_batches,
    hits,
    make_attack_fn,
    make_autoattack_fns,
    make_components_fn,
    masking_warnings,
    print_warnings,
    run_autoattack,
    sweep_warnings,
)
from ntk_evolution.attacks.pgd import (
    DEFAULT_EPS_255,
    L2_EPS,
    VARIANT_NAMES,
    apply_variant,
    attack_settings,
    eps_from_255,
)
from ntk_evolution.data import load_dataset, to_8_bits
from ntk_evolution.dynamics import Dynamics
from ntk_evolution.io.checkpoints import Checkpoint, load_examples, load_model, load_transfer
from ntk_evolution.io.schemas import check_results
from ntk_evolution.parallel import replicate, shard_batch, use_default_compile_cache
from ntk_evolution.utils import (
    UserError,
    check_out_dir,
    check_output,
    save_pickle,
    to_host,
    to_numpy,
)

ATTACKS = ("pgd", "margin", "autoattack")  # what `robustness` can run, beside the clean pass


@dataclasses.dataclass
class Evaluation:
    """What evaluate_network measured: `accuracies` by kind (clean, dirty = PGD-Linf, margin,
    transfer, AutoAttack's attacks and the robust accuracy after each, autoattack, worst),
    `outputs` {'clean', 'dirty': (f, df) on the real rows, or None}, `adv_images` (the PGD-Linf
    examples, NHWC, or None), `checks` (AutoAttack's, or None), `sweep` {eps in 1/255: worst
    case} or None, `warnings`."""

    accuracies: dict[str, float]
    outputs: dict[str, tuple[np.ndarray, np.ndarray] | None]
    adv_images: np.ndarray | None
    checks: dict | None
    sweep: dict[float, float] | None
    warnings: list[str]


def evaluate_network(
    model: hk.TransformedWithState,
    dynamics: Dynamics,
    w: hk.Params,
    theta_t: hk.Params | None,
    net_state: hk.State,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    seed: int = 0,
    adversarial: bool = True,
    margin: bool = False,
    restarts: int = 1,
    attack_variant: str = "pgd",
    autoattack_norm: str | None = None,
    eps_l2: float = L2_EPS,
    each: bool = False,
    eps_sweep: Sequence[float] | None = None,
    transfer: np.ndarray | None = None,
) -> Evaluation:
    """The model under `dynamics` (BatchNorm in inference mode) on the test images (x, y):
    clean, and with `adversarial` L-inf PGD of radius `eps` (image units; 100 steps of
    2 eps / 100 from a random start, `restarts` of them, `attack_variant`), with `margin` the
    same on the margin loss, with `autoattack_norm` ('linf': radius eps, 'l2': eps_l2)
    AutoAttack's cascade on the images correct when clean (`each`: every attack on every image
    too), `transfer` another model's examples of the same images; `eps_sweep` (radii in 1/255):
    the worst case at each radius. Keys drawn from `seed` as eval_and_make_adv.py draws them.
    The logits are f + df, or df alone for a centered model (dynamics.components)."""
    check_restarts(restarts, attack_variant)
    components_fn = make_components_fn(model, dynamics)
    w, theta_t, net_state = replicate((w, theta_t, net_state))
    key = jax.random.PRNGKey(seed)

    def logits_of(f, df):
        return df if dynamics.centering else f + df

    def attack_fns(eps_linf: float) -> dict:
        """{result name: attack(x, y, key)}: PGD-Linf ('dirty'), with margin PGD-margin."""
        settings = attack_settings(eps_linf)
        kinds = {"dirty": "linf", **({"margin": "margin"} if margin else {})}
        fns = {
            name: make_attack_fn(
                model, dynamics, restarts, **apply_variant(settings[kind], attack_variant)
            )
            for name, kind in kinds.items()
        }
        return {name: functools.partial(fn, w, theta_t, net_state) for name, fn in fns.items()}

    def batch_hits(x_in, yb, n_real):
        f, df = (to_host(v) for v in components_fn(w, theta_t, net_state, x_in))
        return f[:n_real], df[:n_real], hits(logits_of(f, df), yb, n_real)

    def add_autoattack(tally: Tally, eps_linf: float) -> dict:
        """AutoAttack (run_autoattack) on the images correct when clean; its checks."""
        radius = eps_linf if autoattack_norm == "linf" else eps_l2
        n_classes = outputs["clean"][0][0].shape[-1]  # the model's logits
        fns = make_autoattack_fns(
            model, dynamics, eps=radius, norm=autoattack_norm, n_classes=n_classes
        )
        fns = {name: functools.partial(fn, w, theta_t, net_state) for name, fn in fns.items()}
        flags, checks = run_autoattack(
            fns,
            lambda xs: logits_of(*components_fn(w, theta_t, net_state, xs)),
            x,
            y,
            tally.flags("clean"),
            key,
            each=each,
        )
        tally.add(flags)
        return checks

    fns = attack_fns(eps) if adversarial else {}
    outputs = {"clean": [], "dirty": []}
    adv_images = []
    tally = Tally()
    for inputs, yb, n_real in attacked_batches(x, y, key, fns, transfer=transfer):
        if "dirty" in inputs:
            adv_images.append(to_host(inputs["dirty"])[:n_real])
        correct = {}
        for name, x_in in inputs.items():
            f, df, correct[name] = batch_hits(x_in, yb, n_real)
            if name in outputs:
                outputs[name].append((f, df))
        tally.add(correct)
    checks = None
    if autoattack_norm is not None and adversarial:
        checks = add_autoattack(tally, eps)
    accuracies = tally.accuracies()
    warnings = masking_warnings(accuracies, checks)
    sweep = None
    if eps_sweep and adversarial:
        sweep = {}
        for radius in eps_sweep:
            sweep_tally = Tally()
            for inputs, yb, n_real in attacked_batches(
                x, y, key, attack_fns(eps_from_255(radius)), description=f"eps {radius:g}/255"
            ):
                sweep_tally.add({k: batch_hits(v, yb, n_real)[2] for k, v in inputs.items()})
            if autoattack_norm == "linf":
                add_autoattack(sweep_tally, eps_from_255(radius))
            sweep[radius] = sweep_tally.accuracies()["worst"]
            print(f"eps {radius:g}/255: worst-case accuracy {sweep[radius]:.4f}")
        grey = np.full((1, *x.shape[1:]), 0.5, np.float32)
        (grey_in,) = shard_batch(grey, pad=True)
        f, df = (to_host(v)[:1] for v in components_fn(w, theta_t, net_state, grey_in))
        grey_label = int(np.argmax(logits_of(f, df)))
        warnings += sweep_warnings(sweep, float(np.mean(y == grey_label)))
    joined = {
        name: (np.concatenate([o[0] for o in kept]), np.concatenate([o[1] for o in kept]))
        if kept
        else None
        for name, kept in outputs.items()
    }
    images = np.concatenate(adv_images) if adv_images else None
    return Evaluation(accuracies, joined, images, checks, sweep, warnings)


def check_restarts(restarts: int, attack_variant: str) -> None:
    """Restarts draw new random starts: only the variant 'pgd' has one."""
    if restarts > 1 and attack_variant != "pgd":
        raise UserError(
            f"--restarts {restarts} needs --attack_variant pgd (the others start from the "
            "image, so every restart would be the same)"
        )


def target_of(
    target: Any, linear: bool | None = None, centering: bool | None = None
) -> tuple[hk.TransformedWithState, Dynamics, Any, Any, Any]:
    """(network, dynamics, w, theta_t, net_state) of a run of experiment.py (its final network,
    evaluated as its phase trained it) or a Checkpoint (the network, or with `linear` its
    linearized model: w = lin_params around theta_t = params; `centering`: drop f(x; theta_t)),
    as eval_and_make_adv.py's --linear and --centering read a checkpoint."""
    checkpoint = getattr(target, "final", target)
    if not isinstance(checkpoint, Checkpoint):
        raise UserError(
            f"cannot evaluate a {type(target).__name__}: pass a run of experiment.py or a "
            "Checkpoint (io.checkpoints.load_model)"
        )
    if linear is None:
        linear = bool(getattr(target, "linear", False))
    if centering is None:
        centering = bool(getattr(target, "centering", False))
    params, lin_params = checkpoint.params, checkpoint.lin_params
    w, theta_t = (lin_params, params) if linear else (params, lin_params)
    dynamics = Dynamics(linear=linear, centering=centering)
    return checkpoint.model, dynamics, w, theta_t, checkpoint.net_state


def robustness(
    target: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    attacks: Sequence[str] = ("pgd",),
    seed: int = 0,
    restarts: int = 1,
    attack_variant: str = "pgd",
    norm: str = "linf",
    eps_l2: float = L2_EPS,
    each: bool = False,
    eps_sweep: Sequence[float] | None = None,
    transfer: np.ndarray | None = None,
    linear: bool | None = None,
    centering: bool | None = None,
) -> dict[str, Any]:
    """The robustness of `target` (a run of experiment.py, or a Checkpoint with `linear` and
    `centering` as eval_and_make_adv.py's flags) on the test images (x, y) at L-inf radius
    `eps` (image units): {'clean', and for each of `attacks` ('pgd': 100-step PGD-Linf; 'margin':
    the same on the margin loss; 'autoattack': AutoAttack's standard version in the `norm` ball,
    radius eps or eps_l2) its accuracy, plus with AutoAttack each attack's robust accuracy
    ('after_apgd_ce' ... 'after_square'; with `each` also 'apgd_ce' ...), 'transfer' with
    `transfer` examples, 'worst' (correct under everything at once), 'eps_sweep' {radius in
    image units: worst case} with `eps_sweep`, 'checks', 'warnings'}. The same numbers as
    eval_and_make_adv.py with the same settings (--random_seed `seed`)."""
    use_default_compile_cache()
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise UserError(f"unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
    if norm not in ("linf", "l2"):
        raise UserError(f"--autoattack_norm {norm!r} must be linf or l2")
    model, dynamics, w, theta_t, net_state = target_of(target, linear, centering)
    x, y = np.asarray(x, np.float32), np.asarray(y)
    evaluation = evaluate_network(
        model, dynamics, w, theta_t, net_state, x, y, eps=eps, seed=seed,
        adversarial=bool(attacks), margin="margin" in attacks, restarts=restarts,
        attack_variant=attack_variant,
        autoattack_norm=norm if "autoattack" in attacks else None, eps_l2=eps_l2, each=each,
        eps_sweep=None if eps_sweep is None else [radius * 255 for radius in eps_sweep],
        transfer=transfer,
    )  # fmt: skip
    accuracies = evaluation.accuracies
    result: dict[str, Any] = {"clean": accuracies["clean"]}
    if "dirty" in accuracies:  # PGD-Linf runs whenever any attack does, as in the script
        result["pgd"] = accuracies["dirty"]
    for name in ("margin", "transfer", *AUTOATTACK, *map(after, AUTOATTACK), "autoattack"):
        if name in accuracies:
            result[name] = accuracies[name]
    result["worst"] = accuracies.get("worst", accuracies["clean"])
    if evaluation.sweep is not None:
        result["eps_sweep"] = {radius / 255: value for radius, value in evaluation.sweep.items()}
    result["checks"] = evaluation.checks
    result["warnings"] = evaluation.warnings
    return result


def default_save_name(test_path: str) -> str:
    """test_results, or transfer_<stem> for --test_path .../adv_examples_<stem>.pkl."""
    if not test_path:
        return "test_results"
    stem = os.path.splitext(os.path.basename(test_path))[0]
    return "transfer_" + (stem.removeprefix("adv_examples_") or stem)


def evaluate_checkpoint_file(
    model_path: str,
    *,
    model: str | None = None,
    dataset: str | None = None,
    data_root: str = "./data",
    trust_pickle: bool = False,
    save_name: str | None = None,
    linear: bool = False,
    centering: bool = False,
    test_path: str = "",
    bonus_dir: str = ".",
    no_adv: bool = False,
    save_examples: bool = False,
    n_test: int | None = None,
    seed: int = 0,
    eps_255: float = DEFAULT_EPS_255,
    margin: bool = False,
    restarts: int = 1,
    transfer_path: str = "",
    attack_variant: str = "pgd",
    autoattack: bool = False,
    autoattack_each: bool = False,
    autoattack_norm: str = "linf",
    eps_l2: float = L2_EPS,
    eps_sweep: Sequence[float] | None = None,
) -> dict:
    """eval_and_make_adv.py with these values (its flags of the same names; `eps_255` is --eps
    in 1/255, `seed` --random_seed): evaluate_network on the checkpoint at `model_path`, on the
    first `n_test` test images or on `test_path`'s examples (a transfer accuracy), and write
    test_results_<save_name>.pkl (and with `save_examples` adv_examples_<save_name>.pkl) into
    dirname(model_path)/<bonus_dir>/. Returns the results dict that file holds."""
    check_out_dir(
        os.path.join(os.path.dirname(os.path.abspath(model_path)), bonus_dir),
        "--bonus_dir",
    )
    if test_path and transfer_path:
        raise UserError(
            "--test_path and --transfer_path both give transfer examples; use one (--test_path "
            "evaluates on its images, --transfer_path adds them as an attack on the test set)"
        )
    check_restarts(restarts, attack_variant)
    save_name = save_name or default_save_name(test_path)
    loaded = load_model(model_path, model, dataset, trust_pickle)
    ds = load_dataset(loaded.dataset, data_root)
    # As in the original: the linearized model is around params (theta_t) with weights
    # lin_params (w); without --linear the network is params, centered on lin_params.
    model, dynamics, w, theta_t, net_state = target_of(loaded, linear, centering)

    if test_path:
        x, y = load_examples(test_path, ds.image_shape, ds.n_classes, trust_pickle)
        x = to_8_bits(x)
    else:
        x, y = ds.x_test, ds.y_test
    x, y = x[:n_test], y[:n_test]
    if np.any((y < 0) | (y >= ds.n_classes)):
        raise UserError(f"labels must lie in 0..{ds.n_classes - 1} for {ds.name}")

    transfer = None
    if transfer_path:
        transfer = load_transfer(transfer_path, x, y, ds.image_shape, ds.n_classes, trust_pickle)

    evaluation = evaluate_network(
        model,
        dynamics,
        w,
        theta_t,
        net_state,
        x,
        y,
        eps=eps_from_255(eps_255),
        seed=seed,
        adversarial=not no_adv,
        margin=margin,
        restarts=restarts,
        attack_variant=attack_variant,
        autoattack_norm=autoattack_norm if autoattack else None,
        eps_l2=eps_l2,
        each=autoattack_each,
        eps_sweep=eps_sweep,
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
        results[f"predictions_{name}"] = np.argmax(df if centering else f + df, axis=1)
        results[f"components_{name}"] = {"f": f, "df": df}
    for name in ("margin", "transfer", *AUTOATTACK, *map(after, AUTOATTACK), "autoattack", "worst"):
        results[f"acc_{name}"] = accuracies.get(name)
    if test_path:
        # the "clean" pass ran on another model's examples: that is a transfer accuracy
        results["acc_transfer"], results["acc_clean"] = results["acc_clean"], None
    results["test_path"] = os.path.abspath(test_path) if test_path else None
    results["restarts"] = restarts
    radius = eps_from_255(eps_255) if autoattack_norm == "linf" else eps_l2
    results["autoattack"] = (autoattack_norm, radius) if autoattack else None  # (norm, eps)
    results["autoattack_checks"] = evaluation.checks
    results["eps_sweep"] = evaluation.sweep
    results["warnings"] = warnings = evaluation.warnings

    out_dir = os.path.normpath(
        os.path.join(os.path.dirname(os.path.abspath(model_path)), bonus_dir)
    )
    results_path = os.path.join(out_dir, f"test_results_{save_name}.pkl")
    adv_images = evaluation.adv_images
    if adv_images is not None:
        check_output(adv_images, os.path.join(out_dir, f"adv_examples_{save_name}.pkl"))
    save_pickle(check_results(to_numpy(results), results_path), results_path)
    restarts_text = f", {restarts} restarts" if restarts > 1 else ""
    attack = VARIANT_NAMES[attack_variant]
    labels = {
        "acc_clean": "clean accuracy",
        "acc_dirty": f"{attack}-Linf (eps {eps_255:g}/255{restarts_text}) accuracy",
        "acc_margin": f"{attack}-margin accuracy",
        **{f"acc_{name}": f"{NAMES[name]} alone" for name in AUTOATTACK},
        "acc_autoattack": f"AutoAttack ({autoattack_norm}, eps {radius:.4g})",
        "acc_transfer": (
            f"accuracy on {test_path}'s examples" if test_path else "transfer accuracy"
        ),
        "acc_worst": "worst case over all",
    }
    shown = [f"{text} {results[k]:.4f}" for k, text in labels.items() if results[k] is not None]
    print(", ".join(shown) + f" on {len(x)} images")
    print_warnings(warnings)
    print(f"wrote {results_path}")
    if save_examples and adv_images is not None:
        examples_path = os.path.join(out_dir, f"adv_examples_{save_name}.pkl")
        images = adv_images.transpose(0, 3, 1, 2)
        save_pickle({"images": images, "labels": y}, examples_path)
        print(f"wrote {examples_path}")
    return results
