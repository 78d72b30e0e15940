"""Kernel predictors as the flags of cli.add_kernel_flags choose them (ntk_attack.py,
eigen_features.py, robustify_dataset.py, scripts/reproduce.py), and their accuracy under attack.

The math (kernels, the regression, eigen-components) is in kernel_regression.py; this module
turns --kernel, --model_path, --kernel_path, --support_path, ... into a SupportKernel and runs
PGD and AutoAttack against z -> K(z, X) B P.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_evolution.attacks.autoattack import AUTOATTACK_FNS
from ntk_evolution.attacks.evaluation import (
    Tally,
    attacked_batches,
    hits,
    masking_warnings,
    run_autoattack,
)
from ntk_evolution.attacks.pgd import EVAL_PGD_STEPS, pgd_restarts, variant_schedule
from ntk_evolution.data import Dataset, class_balanced_subset
from ntk_evolution.io.checkpoints import DEFAULT_MODEL, Checkpoint, load_kernel
from ntk_evolution.io.schemas import check_examples
from ntk_evolution.kernels.regression import (
    SupportKernel,
    cntk_blocked,
    cntk_support_kernel,
    empirical_support_kernel,
    jacobian_kernel_fn,
    relu_ntk,
    relu_support_kernel,
)
from ntk_evolution.models import get_model, init_model
from ntk_evolution.parallel import replicate, shard_batch
from ntk_evolution.utils import UserError, load_pickle, to_host


class KernelChoice(NamedTuple):
    """The kernel the flags name: `kernel_fn(x1, x2)` (jax, differentiable in both image sets)
    and `support(images, labels, indices, kernel=None)` -> SupportKernel on those images."""

    kernel_fn: Callable[[jax.Array, jax.Array], jax.Array]
    support: Callable[..., SupportKernel]
    description: str


def support_kernel(
    choice: KernelChoice,
    ds: Dataset,
    *,
    dataset_size: int = 500,
    seed: int = 0,
    kernel_path: str = "",
    support_path: str = "",
    classes: list[int] | None = None,
    trust: bool = False,
    expect: dict | None = None,
) -> SupportKernel:
    """The support set and `choice`'s kernel on it: the class-balanced subset of `dataset_size`
    training images drawn with `seed`, or the images of calculate_kernel.py's kernel pickle at
    `kernel_path` (its kernel reused; `expect` = {key: value} its recorded dataset, model and
    class_index must match), or the examples at `support_path`; only `classes` when given."""
    stored = None
    if kernel_path and support_path:
        raise UserError("pass --kernel_path or --support_path, not both")
    if support_path:
        saved = load_pickle(support_path, "--support_path file", trust)
        images, labels = check_examples(saved, support_path, ds.image_shape, ds.n_classes)
        indices = np.asarray(saved.get("indices", np.arange(len(images))))
    elif kernel_path:
        stored = load_kernel(kernel_path, trust, expect or {})
        if "indices" not in stored:
            raise UserError(
                f"{kernel_path} has no 'indices': recompute it with calculate_kernel.py"
            )
        indices = np.asarray(stored["indices"])
    else:
        indices = class_balanced_subset(ds.y_train, dataset_size, ds.n_classes, seed)
    if not support_path:
        images, labels = ds.x_train[indices], ds.y_train[indices]
    stored_kernel = None if stored is None else stored["kernel"]
    if classes:
        keep = np.flatnonzero(np.isin(labels, classes))
        indices, images, labels = indices[keep], images[keep], labels[keep]
        stored_kernel = None if stored is None else stored_kernel[np.ix_(keep, keep)]
    return choice.support(images, labels, indices, stored_kernel)


def kernel_choice(
    ds: Dataset,
    kernel: str = "empirical",
    *,
    checkpoint: Checkpoint | None = None,
    model: str = DEFAULT_MODEL,
    class_index: int = -1,
    use_linear_params: bool = False,
    relu_depth: int = 2,
    seed: int = 0,
) -> KernelChoice:
    """The kernel `kernel`: relu_ntk or cntk (`relu_depth`), or empirical: the NTK of the network
    at `checkpoint` (its lin_params with `use_linear_params`), or of `model` at its
    initialisation drawn with `seed`, for logit `class_index` (-1: averaged over logits)."""
    if kernel in ("cntk", "relu_ntk"):
        cntk_kernel = kernel == "cntk"
        make_support = cntk_support_kernel if cntk_kernel else relu_support_kernel

        def closed_form_support(images, labels, indices, kernel=None):
            return make_support(images, labels, indices, relu_depth)

        kernel_fn = functools.partial(cntk_blocked if cntk_kernel else relu_ntk, depth=relu_depth)
        network = "convolutional NTK" if cntk_kernel else "ReLU MLP NTK"
        description = f"infinite-width {network}, depth {relu_depth}"
        return KernelChoice(kernel_fn, closed_form_support, description)
    check_class_index(class_index, ds.name, ds.n_classes)
    if checkpoint is not None:
        network, model = checkpoint.model, checkpoint.model_name
        params = checkpoint.lin_params if use_linear_params else checkpoint.params
        net_state, where = checkpoint.net_state, os.path.basename(checkpoint.path or "")
    else:
        network = get_model(model, ds.n_classes)
        params, net_state = init_model(network, jax.random.PRNGKey(seed), ds.image_shape)
        where = f"initialisation (seed {seed})"
    which = f"logit {class_index}" if class_index >= 0 else "averaged over logits"
    description = f"empirical NTK of {model} at {where}, {which}"

    def empirical_support(images, labels, indices, kernel=None):
        return empirical_support_kernel(
            network, params, net_state, images, labels, indices, class_index, kernel, description
        )

    kernel_fn = jacobian_kernel_fn(network, params, net_state, class_index)
    return KernelChoice(kernel_fn, empirical_support, description)


def check_full_kernel(full: bool, class_index: int) -> None:
    """The full kernel takes every logit: only with class index -1."""
    if full and class_index != -1:
        raise UserError("--full computes every pair of logits: drop --class_index")


def check_class_index(class_index: int, dataset: str, n_classes: int) -> None:
    """-1 (averaged over logits) or a logit of `dataset`'s n_classes, else the scripts'
    one-line error."""
    if not -1 <= class_index < n_classes:
        raise UserError(
            f"--class_index {class_index} is out of range for {dataset}: use -1 or "
            f"0..{n_classes - 1}"
        )


# ----------------------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=8)
def _predict_fn(apply: Callable) -> Callable:
    """Jitted predict(operand, P, z) = apply(z, operand) P, once per kernel (new coefficient
    shapes retrace, new values do not)."""
    return jax.jit(lambda operand, projection, z: apply(z, operand) @ projection)


@functools.lru_cache(maxsize=8)
def _attack_fn(
    apply: Callable, n_steps: int, loss: str, restarts: int, variant: str = "pgd"
) -> Callable:
    """Jitted PGD-Linf (on `loss`; attacks.variant_schedule's `variant`) against the predictor:
    attack(operand, P, x, y, key, eps)."""

    def attack(operand, projection, x, y, key, eps):
        return pgd_restarts(
            lambda z: apply(z, operand) @ projection,
            x,
            y,
            key,
            restarts=restarts,
            eps=eps,
            loss=loss,
            **variant_schedule(variant, eps, n_steps),
        )

    return jax.jit(attack)


@functools.lru_cache(maxsize=16)
def _autoattack_fn(apply: Callable, name: str, norm: str) -> Callable:
    """Jitted AutoAttack attack `name` (or its 'zero_gradient' check) against the predictor:
    attack(operand, P, x, y, key, eps)."""

    def attack(operand, projection, x, y, key, eps):
        return AUTOATTACK_FNS[name](
            lambda z: apply(z, operand) @ projection,
            x,
            y,
            key,
            eps=eps,
            norm=norm,
            n_classes=projection.shape[1],
        )

    return jax.jit(attack)


def predicted_labels(
    support: SupportKernel, coefficients: np.ndarray, projection: np.ndarray, x: np.ndarray
) -> np.ndarray:
    """argmax of z -> K(z, X) B P on the images x (a few: one padded batch)."""
    apply, operand = support.operator(coefficients)
    operand, projection = replicate((operand, jnp.asarray(projection, jnp.float32)))
    (z,) = shard_batch(x, pad=True)
    return np.argmax(to_host(_predict_fn(apply)(operand, projection, z))[: len(x)], axis=1)


def evaluate_predictor(
    support: SupportKernel,
    coefficients: np.ndarray,
    projection: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    key: jax.Array,
    *,
    eps_linf: float,
    n_steps: int = EVAL_PGD_STEPS,
    attacks: tuple[str, ...] = ("linf",),
    restarts: int = 1,
    variant: str = "pgd",
    transfer: np.ndarray | None = None,
    description: str = "kernel predictor",
    autoattack: tuple[str, float] | None = None,
    autoattack_each: bool = False,
) -> tuple[dict[str, float], np.ndarray | None, list[str]]:
    """Accuracy of z -> K(z, X) B P on (x, y): clean, under each attack in `attacks` against
    this predictor itself (`linf`: PGD-Linf on the cross-entropy of its outputs; `margin`: on
    the margin loss; `n_steps` steps of 2 eps / n_steps from `restarts` random starts, or as
    `variant` says: attacks.variant_schedule), on
    `transfer` (adversarial images of x made elsewhere), and 'worst' (correct on all of them)
    when there is more than one; with `autoattack` = (norm, eps), also AutoAttack's standard
    version (evaluation.run_autoattack; `autoattack_each`: every attack on every image too):
    the accuracy after each of its attacks and 'autoattack'. Returns the accuracies, the first
    attack's adversarial images (None without attacks) and the gradient-masking and
    AutoAttack-check warnings (evaluation.masking_warnings)."""
    apply, operand = support.operator(coefficients)
    operand, projection = replicate((operand, jnp.asarray(projection, jnp.float32)))
    predict = _predict_fn(apply)
    attack_fns = {
        name: functools.partial(
            _attack_fn(apply, n_steps, "ce" if name == "linf" else name, restarts, variant),
            operand,
            projection,
            eps=eps_linf,
        )
        for name in attacks
    }
    tally = Tally()
    adversarial = []
    for inputs, yb, n_real in attacked_batches(
        x, y, key, attack_fns, transfer=transfer, description=description
    ):
        if attacks:
            adversarial.append(to_host(inputs[attacks[0]])[:n_real])
        tally.add(
            {name: hits(predict(operand, projection, z), yb, n_real) for name, z in inputs.items()}
        )
    checks = None
    if autoattack is not None:
        norm, eps = autoattack
        autoattack_fns = {
            name: functools.partial(_autoattack_fn(apply, name, norm), operand, projection, eps=eps)
            for name in AUTOATTACK_FNS
        }
        flags, checks = run_autoattack(
            autoattack_fns,
            lambda z: predict(operand, projection, z),
            x,
            y,
            tally.flags("clean"),
            key,
            each=autoattack_each,
        )
        tally.add(flags)
    accuracies = tally.accuracies()
    warnings = masking_warnings(accuracies, checks)
    return accuracies, (np.concatenate(adversarial) if attacks else None), warnings
