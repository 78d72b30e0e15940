"""Kernel regression with neural tangent kernels (Tsilivis & Kempe 2022): the predictor, its
eigen-components, and the two kernels it is built on.

For a support set X (N images) with one-hot targets Y (N, C) and a kernel k:

    F(z)   = K(z, X) (K(X, X) + r I)^-1 Y                       the kernel-regression predictor
    F_i(z) = K(z, X) u_i u_i^T Y / (lambda_i + r)                its i-th eigen-component

where K(X, X) = sum_i lambda_i u_i u_i^T (eigenvalues in decreasing order) and the ridge r is
`ridge` times the mean of diag K(X, X). The components sum to F. Kernels:

- `empirical`: the empirical NTK of a network (ntk.py), at a checkpoint or at initialisation;
  K(z, X) A is a Jacobian-vector product with the features J(X)^T A (ntk.kernel_features).
- `relu_ntk`: the infinite-width NTK of a fully connected ReLU network in the NTK
  parameterisation, in closed form (arc-cosine recursion, `relu_ntk`).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attacks import EVAL_PGD_STEPS, pgd_restarts
from autoattack import ATTACK_FNS, AUTOATTACK
from data import DATASETS, Dataset, class_balanced_subset, examples_from_record
from evaluation import Tally, add_autoattack_flags, attacked_batches, hits
from models import MODELS, get_model, init_model
from ntk import empirical_ntk, kernel_features, kernel_times, make_jacobian_fn
from parallel import replicate, to_host
from utils import UserError, finite_float, load_checkpoint, load_pickle, positive_int

KERNELS = ("empirical", "relu_ntk")
RELU_W_STD = math.sqrt(2.0)
RELU_B_STD = 0.1


def relu_ntk(
    x1: jax.Array,
    x2: jax.Array,
    depth: int = 2,
    w_std: float = RELU_W_STD,
    b_std: float = RELU_B_STD,
) -> jax.Array:
    """Infinite-width NTK Theta(x1, x2) (n1, n2) of a ReLU MLP with `depth` hidden layers, every
    dense layer z = (w_std / sqrt(fan_in)) W h + b_std b with W, b ~ N(0, 1) (NTK
    parameterisation), one output. With Sigma_0 = w_std^2 x.x' / d + b_std^2 and Theta_0 =
    Sigma_0, each hidden layer maps, for rho = Sigma(x, x') / sqrt(Sigma(x, x) Sigma(x', x'))
    and t = arccos(rho):

        Sigma'   = w_std^2 sqrt(Sigma(x, x) Sigma(x', x')) (sin t + (pi - t) cos t) / (2 pi)
                   + b_std^2
        Sigma'_d = w_std^2 (pi - t) / (2 pi)                    (derivative of the ReLU)
        Theta'   = Sigma' + Sigma'_d Theta

    Inputs are flattened per example; float32, or float64 for float64 inputs with x64 enabled.
    Differentiable in both arguments."""
    dtype = jnp.promote_types(jnp.result_type(x1, x2), jnp.float32)
    a = jnp.reshape(x1, (x1.shape[0], -1)).astype(dtype)
    b = jnp.reshape(x2, (x2.shape[0], -1)).astype(dtype)
    dim = a.shape[1]
    cross = w_std**2 * (a @ b.T) / dim + b_std**2
    diag1 = w_std**2 * jnp.sum(a * a, axis=1) / dim + b_std**2
    diag2 = w_std**2 * jnp.sum(b * b, axis=1) / dim + b_std**2
    theta = cross
    for _ in range(depth):
        norms = jnp.sqrt(diag1[:, None] * diag2[None, :])
        rho = jnp.clip(cross / norms, -1.0 + 1e-7, 1.0 - 1e-7)
        angle = jnp.arccos(rho)
        cross = w_std**2 * norms * (jnp.sin(angle) + (jnp.pi - angle) * rho) / (2 * jnp.pi)
        cross = cross + b_std**2
        derivative = w_std**2 * (jnp.pi - angle) / (2 * jnp.pi)
        theta = cross + derivative * theta
        # E[relu(u)^2] = Sigma(x, x) / 2
        diag1 = w_std**2 * diag1 / 2 + b_std**2
        diag2 = w_std**2 * diag2 / 2 + b_std**2
    return theta


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[labels]


def ridge_value(kernel: np.ndarray, ridge: float) -> float:
    """The ridge r added to the diagonal: `ridge` times the mean of diag K."""
    return ridge * float(np.mean(np.diag(kernel)))


def regression_coefficients(kernel: np.ndarray, targets: np.ndarray, ridge: float) -> np.ndarray:
    """A = (K + r I)^-1 Y (N, C), so that F(z) = K(z, X) A."""
    r = ridge_value(kernel, ridge)
    return np.linalg.solve(kernel + r * np.eye(len(kernel)), targets)


def kernel_predictor(
    kernel_fn: Callable, support: jax.Array, targets: jax.Array, ridge: float
) -> Callable[[jax.Array], jax.Array]:
    """z -> F(z) = k(z, X) (k(X, X) + r I)^-1 Y in JAX (r as in ridge_value), differentiable in
    the support images X as well as in z: robustify_dataset.py optimises X through it. The
    solve happens once, here."""
    gram = kernel_fn(support, support)
    r = ridge * jnp.mean(jnp.diag(gram))
    coefficients = jnp.linalg.solve(gram + r * jnp.eye(len(gram), dtype=gram.dtype), targets)
    return lambda z: kernel_fn(z, support) @ coefficients


def jacobian_kernel_fn(model, params, net_state, class_index: int) -> Callable:
    """k(x1, x2), the empirical NTK of ntk.py from explicit per-example Jacobians (n, K, P):
    differentiable in the images (second order), memory O((n1 + n2) K P); for small networks
    and support sets, where the kernel itself has to be differentiated."""
    jacobian_fn = make_jacobian_fn(model, class_index)

    def flat(x):
        leaves = jax.tree.leaves(jacobian_fn(params, net_state, x))
        return jnp.concatenate([leaf.reshape(*leaf.shape[:2], -1) for leaf in leaves], axis=2)

    def kernel_fn(x1, x2):
        j1, j2 = flat(x1), flat(x2)
        return jnp.einsum("ikp,jkp->ij", j1, j2) / j1.shape[1]

    return kernel_fn


class Eigen(NamedTuple):
    """K(X, X) = U diag(values) U^T, values in decreasing order; `projections` = U^T Y / (values +
    r) (N, C): component i has coefficients u_i projections[i]."""

    values: np.ndarray
    vectors: np.ndarray
    projections: np.ndarray


def eigen_decomposition(kernel: np.ndarray, targets: np.ndarray, ridge: float) -> Eigen:
    values, vectors = np.linalg.eigh(kernel)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    projections = (vectors.T @ targets) / (values + ridge_value(kernel, ridge))[:, None]
    return Eigen(values, vectors, projections)


def component_factors(eigen: Eigen, components: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The predictor sum_{i in components} F_i as K(z, X) B P, with B = U[:, components] (N, m)
    and P = projections[components] (m, C); or, when m > C, B = U_S P_S (N, C) and P = I:
    fewer columns for K(z, X) B."""
    vectors, projections = eigen.vectors[:, components], eigen.projections[components]
    if len(components) > projections.shape[1]:
        return vectors @ projections, np.eye(projections.shape[1])
    return vectors, projections


class SupportKernel(NamedTuple):
    """A kernel on a support set: the images X (N, H, W, C), labels (N,), K(X, X) (N, N) float64,
    and `operator(B)` -> (fn, operand) with fn(z, operand) = K(z, X) B (n, m) for B (N, m),
    jax-traceable (the arrays travel as an argument, not as constants of a compiled function);
    `cross(z)` -> K(z, X) (n, N) float64 for NumPy images z."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    kernel: np.ndarray
    operator: Callable[[np.ndarray], tuple[Callable, Any]]
    cross: Callable[[np.ndarray], np.ndarray]
    description: str


def relu_support_kernel(images, labels, indices, depth: int) -> SupportKernel:
    x = jnp.asarray(images)
    kernel = np.asarray(jax.jit(lambda a: relu_ntk(a, a, depth))(x), np.float64)

    def apply(z, operand):
        support, b = operand
        return relu_ntk(z, support, depth) @ b

    def operator(coefficients):
        return apply, (x, jnp.asarray(coefficients, jnp.float32))

    def cross(z):
        return np.asarray(relu_ntk(jnp.asarray(z), x, depth), np.float64)

    description = f"infinite-width ReLU MLP NTK, depth {depth}"
    return SupportKernel(images, labels, indices, kernel, operator, cross, description)


def empirical_support_kernel(
    model, params, net_state, images, labels, indices, class_index, kernel=None, description=""
) -> SupportKernel:
    if kernel is None:
        kernel = empirical_ntk(model, params, net_state, images, class_index=class_index)

    def apply(z, operand):
        return kernel_times(model, *operand, z, class_index=class_index)

    def operator(coefficients):
        features = kernel_features(model, params, net_state, images, coefficients, class_index)
        return apply, (params, net_state, features)

    def cross(z):
        return empirical_ntk(
            model, params, net_state, z, images, class_index=class_index, progress=False
        )

    return SupportKernel(images, labels, indices, kernel, operator, cross, description)


# ----------------------------------------------------------------------------- command line


def add_kernel_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the kernel-predictor scripts (ntk_attack.py, eigen_features.py): the kernel, the
    support set, the test images and the attack."""
    p.add_argument("--dataset", default="cifar10", choices=DATASETS)
    p.add_argument("--random_seed", type=int, default=0)
    p.add_argument("--eps", type=finite_float(0.0), default=4.0, help="L-inf radius in 1/255")
    p.add_argument("--pgd_steps", type=positive_int, default=EVAL_PGD_STEPS)
    p.add_argument("--n_test", type=positive_int, default=None, help="first N test images")
    p.add_argument("--kernel", default="empirical", choices=KERNELS)
    p.add_argument("--model_path", default="", help="checkpoint; empty: the network at init")
    p.add_argument("--use_linear_params", action="store_true", help="kernel at lin_params (w)")
    p.add_argument("--kernel_path", default="", help="reuse calculate_kernel.py's K(X, X)")
    p.add_argument(
        "--support_path",
        default="",
        help="support set from an adv_examples pickle (e.g. robustify_dataset.py's output)",
    )
    p.add_argument("--model", default="resnet18", choices=MODELS)
    p.add_argument("--dataset_size", type=positive_int, default=500, help="support set size")
    p.add_argument("--class_index", type=int, default=-1, help="logit c, or -1: average")
    p.add_argument("--relu_depth", type=positive_int, default=2, help="hidden layers (relu_ntk)")
    p.add_argument(
        "--ridge", type=finite_float(0.0), default=1e-4, help="ridge, times mean(diag K)"
    )
    add_autoattack_flags(p)


def support_kernel_from_args(args: argparse.Namespace, ds: Dataset) -> SupportKernel:
    """The support set (class-balanced training subset drawn with --random_seed, or the images
    of --kernel_path) and its kernel, as the flags of add_kernel_flags say."""
    stored = None
    if args.kernel_path and args.support_path:
        raise UserError("pass --kernel_path or --support_path, not both")
    if args.support_path:
        saved = load_pickle(args.support_path, "--support_path file", args.trust_pickle)
        images, labels = examples_from_record(saved, args.support_path, ds.image_shape)
        indices = np.asarray(saved.get("indices", np.arange(len(images))))
    elif args.kernel_path:
        stored = load_pickle(args.kernel_path, "kernel pickle", args.trust_pickle)
        if not isinstance(stored, dict) or "indices" not in stored:
            raise UserError(
                f"{args.kernel_path} has no 'indices': recompute it with calculate_kernel.py"
            )
        checked = ["dataset"] + (["model", "class_index"] if args.kernel == "empirical" else [])
        for key in checked:
            if key in stored and stored[key] != getattr(args, key):
                raise UserError(
                    f"{args.kernel_path} was computed with --{key} {stored[key]}, not "
                    f"{getattr(args, key)}; pass --{key} {stored[key]}"
                )
        indices = np.asarray(stored["indices"])
    else:
        indices = class_balanced_subset(
            ds.y_train, args.dataset_size, ds.n_classes, args.random_seed
        )
    if not args.support_path:
        images, labels = ds.x_train[indices], ds.y_train[indices]
    stored_kernel = None if stored is None else np.asarray(stored["kernel"], np.float64)
    classes = getattr(args, "classes", None)
    if classes:
        keep = np.flatnonzero(np.isin(labels, classes))
        indices, images, labels = indices[keep], images[keep], labels[keep]
        stored_kernel = None if stored is None else stored_kernel[np.ix_(keep, keep)]
    return kernel_from_args(args, ds).support(images, labels, indices, stored_kernel)


class KernelChoice(NamedTuple):
    """The kernel the flags name: `kernel_fn(x1, x2)` (jax, differentiable in both image sets)
    and `support(images, labels, indices, kernel=None)` -> SupportKernel on those images."""

    kernel_fn: Callable[[jax.Array, jax.Array], jax.Array]
    support: Callable[..., SupportKernel]
    description: str


def kernel_from_args(args: argparse.Namespace, ds: Dataset) -> KernelChoice:
    """--kernel relu_ntk (--relu_depth) or empirical (--model at --model_path, or at
    initialisation with --random_seed; --class_index; --use_linear_params)."""
    if args.kernel == "relu_ntk":

        def relu_support(images, labels, indices, kernel=None):
            return relu_support_kernel(images, labels, indices, args.relu_depth)

        kernel_fn = functools.partial(relu_ntk, depth=args.relu_depth)
        return KernelChoice(
            kernel_fn, relu_support, f"infinite-width ReLU MLP NTK, depth {args.relu_depth}"
        )
    if not -1 <= args.class_index < ds.n_classes:
        raise UserError(
            f"--class_index {args.class_index} is out of range for {ds.name}: use -1 or "
            f"0..{ds.n_classes - 1}"
        )
    model = get_model(args.model, ds.n_classes)
    like = init_model(model, jax.random.PRNGKey(args.random_seed), ds.image_shape)
    if args.model_path:
        ckpt = load_checkpoint(args.model_path, like=like, trust=args.trust_pickle)
        params = ckpt["lin_params"] if args.use_linear_params else ckpt["params"]
        net_state, where = ckpt["net_state"], os.path.basename(args.model_path)
    else:
        (params, net_state), where = like, f"initialisation (seed {args.random_seed})"
    which = f"logit {args.class_index}" if args.class_index >= 0 else "averaged over logits"
    description = f"empirical NTK of {args.model} at {where}, {which}"

    def empirical_support(images, labels, indices, kernel=None):
        return empirical_support_kernel(
            model, params, net_state, images, labels, indices, args.class_index, kernel, description
        )

    kernel_fn = jacobian_kernel_fn(model, params, net_state, args.class_index)
    return KernelChoice(kernel_fn, empirical_support, description)


# ----------------------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=8)
def _predict_fn(apply: Callable) -> Callable:
    """Jitted predict(operand, P, z) = apply(z, operand) P, once per kernel (new coefficient
    shapes retrace, new values do not)."""
    return jax.jit(lambda operand, projection, z: apply(z, operand) @ projection)


@functools.lru_cache(maxsize=8)
def _attack_fn(apply: Callable, n_steps: int, loss: str, restarts: int) -> Callable:
    """Jitted PGD-Linf (on `loss`) against the predictor: attack(operand, P, x, y, key, eps)."""

    def attack(operand, projection, x, y, key, eps):
        return pgd_restarts(
            lambda z: apply(z, operand) @ projection,
            x,
            y,
            key,
            restarts=restarts,
            eps=eps,
            step_size=2 * eps / n_steps,
            n_steps=n_steps,
            loss=loss,
        )

    return jax.jit(attack)


@functools.lru_cache(maxsize=16)
def _autoattack_fn(apply: Callable, name: str, norm: str) -> Callable:
    """Jitted AutoAttack attack `name` against the predictor: attack(operand, P, x, y, key,
    eps)."""

    def attack(operand, projection, x, y, key, eps):
        return ATTACK_FNS[name](
            lambda z: apply(z, operand) @ projection,
            x,
            y,
            key,
            eps=eps,
            norm=norm,
            n_classes=projection.shape[1],
        )

    return jax.jit(attack)


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
    transfer: np.ndarray | None = None,
    description: str = "kernel predictor",
    autoattack: tuple[str, float] | None = None,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Accuracy of z -> K(z, X) B P on (x, y): clean, under each attack in `attacks` against
    this predictor itself (`linf`: PGD-Linf on the cross-entropy of its outputs; `margin`: on
    the margin loss; `n_steps` steps of 2 eps / n_steps from `restarts` random starts), on
    `transfer` (adversarial images of x made elsewhere), and 'worst' (correct on all of them)
    when there is more than one; with `autoattack` = (norm, eps), also AutoAttack's four
    attacks and 'autoattack' (robust to all four). Returns the accuracies and the first
    attack's adversarial images (None without attacks)."""
    apply, operand = support.operator(coefficients)
    operand, projection = replicate((operand, jnp.asarray(projection, jnp.float32)))
    predict = _predict_fn(apply)
    attack_fns = {
        name: functools.partial(
            _attack_fn(apply, n_steps, "ce" if name == "linf" else name, restarts),
            operand,
            projection,
            eps=eps_linf,
        )
        for name in attacks
    }
    if autoattack is not None:
        norm, eps = autoattack
        attack_fns.update(
            {
                name: functools.partial(
                    _autoattack_fn(apply, name, norm), operand, projection, eps=eps
                )
                for name in AUTOATTACK
            }
        )
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
    return tally.accuracies(), (np.concatenate(adversarial) if attacks else None)
