"""Representation similarity (CKA) between the layers of Haiku models (Kornblith et al. 2019;
the debiased estimator of Nguyen et al. 2021, as used by Cianfarani et al. 2022).

For representations X (n, p) and Y (n, q) of the same n inputs, with Gram matrices K = X X^T,
L = Y Y^T and the centering matrix H = I - 11^T / n:

    HSIC(K, L)   = tr(K H L H) / (n - 1)^2                                      (biased)
    HSIC_u(K, L) = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1]
                   / (n (n - 3))                 (unbiased; K~, L~ have zero diagonals)
    CKA(K, L)    = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))   (with HSIC_u: debiased CKA)

A layer is the output of every ReLU (models.ReLU) in call order, then the logits.
"""

from __future__ import annotations

from collections.abc import Callable

import haiku as hk
import jax
import numpy as np

from ntk_evolution.data import padded_batches
from ntk_evolution.kernels.analysis import center
from ntk_evolution.models import ReLU

ESTIMATORS = ("linear", "debiased")


def gram(features: np.ndarray) -> np.ndarray:
    """K = X X^T in float64 for X (n, ...) flattened per example."""
    flat = np.asarray(features, np.float64).reshape(len(features), -1)
    return flat @ flat.T


def hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 (the paper's name)
    """Biased HSIC: tr(K H L H) / (n - 1)^2."""
    return float(np.sum(center(k) * l) / (len(k) - 1) ** 2)


def unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """HSIC_u of Song et al. (2012), as in the module docstring; needs n > 3."""
    n = len(k)
    if n <= 3:
        raise ValueError(f"the unbiased HSIC needs more than 3 examples, got {n}")
    k = k - np.diag(np.diag(k))
    l = l - np.diag(np.diag(l))  # noqa: E741
    ones_k, ones_l = k.sum(axis=0), l.sum(axis=0)
    trace = np.sum(k * l)
    total = ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * ones_k @ ones_l
    return float((trace + total - cross) / (n * (n - 3)))


def unbiased_hsic_matrix(grams0: np.ndarray, grams1: np.ndarray) -> np.ndarray:
    """HSIC_u (module docstring) between every Gram matrix of grams0 (a, n, n) and every one of
    grams1 (b, n, n), as an (a, b) array: the same formula as unbiased_hsic, with the traces
    and sums of all pairs as matrix products."""
    a, n, _ = grams0.shape
    if n <= 3:
        raise ValueError(f"the unbiased HSIC needs more than 3 examples, got {n}")
    off = 1.0 - np.eye(n)
    k, l = grams0 * off, grams1 * off  # noqa: E741 (zero diagonals)
    trace = k.reshape(a, -1) @ l.reshape(len(l), -1).T  # tr(K~ L~) = sum(K~ * L~), symmetric
    rows_k, rows_l = k.sum(axis=2), l.sum(axis=2)  # K~ 1, L~ 1
    total = np.outer(rows_k.sum(axis=1), rows_l.sum(axis=1)) / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * rows_k @ rows_l.T
    return (trace + total - cross) / (n * (n - 3))


class MinibatchCKA:
    """Debiased CKA accumulated over minibatches (Nguyen, Raghu & Kornblith, ICLR 2021): for
    minibatches i of the same images through both sides,

        CKA(layer a, layer b) = sum_i HSIC_u(K_a,i, L_b,i)
                                / sqrt(sum_i HSIC_u(K_a,i, K_a,i) * sum_i HSIC_u(L_b,i, L_b,i)),

    so the memory held is the (a, b) sums and each batch's Gram matrices, whatever the number of
    images. With one batch of all the images it is cka_matrix(..., 'debiased')."""

    def __init__(self, n_layers0: int, n_layers1: int):
        self.cross = np.zeros((n_layers0, n_layers1))
        self.self0 = np.zeros(n_layers0)
        self.self1 = np.zeros(n_layers1)
        self.batches = 0

    def update(self, features0: list[np.ndarray], features1: list[np.ndarray]) -> None:
        """One minibatch: each layer's features (batch, ...) on side 0 and side 1."""
        self.update_grams(
            np.stack([gram(f) for f in features0]), np.stack([gram(f) for f in features1])
        )

    def update_grams(self, grams0: np.ndarray, grams1: np.ndarray) -> None:
        """One minibatch given by its Gram matrices: (a, batch, batch) and (b, batch, batch)."""
        self.cross += unbiased_hsic_matrix(grams0, grams1)
        self.self0 += [unbiased_hsic(g, g) for g in grams0]
        self.self1 += [unbiased_hsic(g, g) for g in grams1]
        self.batches += 1

    def result(self) -> np.ndarray:
        """The (a, b) CKA matrix of the batches so far (NaN where a side's HSIC is not > 0)."""
        denominator = np.sqrt(np.maximum(np.outer(self.self0, self.self1), 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, self.cross / denominator, np.nan)


def _normalised(cross: float, self_k: float, self_l: float) -> float:
    denominator = np.sqrt(self_k * self_l)
    return float(cross / denominator) if denominator > 0 else float("nan")


def cka(k: np.ndarray, l: np.ndarray, estimator: str = "linear") -> float:  # noqa: E741
    """CKA between two Gram matrices of the same inputs ('linear': biased HSIC, 'debiased':
    unbiased HSIC)."""
    measure = hsic if estimator == "linear" else unbiased_hsic
    return _normalised(measure(k, l), measure(k, k), measure(l, l))


def cka_matrix(grams0: list[np.ndarray], grams1: list[np.ndarray], estimator: str) -> np.ndarray:
    """CKA between every layer of side 0 (rows) and every layer of side 1 (columns); each
    layer's HSIC with itself is computed once."""
    measure = hsic if estimator == "linear" else unbiased_hsic
    self0 = [measure(k, k) for k in grams0]
    self1 = self0 if grams1 is grams0 else [measure(l, l) for l in grams1]  # noqa: E741
    return np.array(
        [
            [_normalised(measure(k, l), sk, sl) for l, sl in zip(grams1, self1, strict=True)]  # noqa: E741
            for k, sk in zip(grams0, self0, strict=True)
        ]
    )


def make_layer_fn(model: hk.TransformedWithState) -> tuple[Callable, list[str]]:
    """Jitted fn(params, net_state, x) -> list of layer outputs (BatchNorm in inference mode),
    and the list of their names, filled in call order when the function is first traced."""
    names: list[str] = []

    def layer_fn(params, net_state, x):
        outputs = []

        def record(next_f, args, kwargs, context):
            out = next_f(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(context.module, ReLU):
                outputs.append((context.module.module_name, out))
            return out

        with hk.experimental.intercept_methods(record):
            logits, _ = model.apply(params, net_state, x, False)
        outputs.append(("logits", logits))
        names[:] = [name for name, _ in outputs]
        return [out for _, out in outputs]

    return jax.jit(layer_fn), names


def layer_grams(
    model: hk.TransformedWithState,
    params: hk.Params,
    net_state: hk.State,
    images: np.ndarray,
    batch_size: int = 100,
) -> tuple[list[str], list[np.ndarray]]:
    """Names and Gram matrices (n, n) of every layer's output on `images`."""
    layer_fn, names = make_layer_fn(model)
    per_layer: list[list[np.ndarray]] = []
    labels = np.zeros(len(images), np.int32)
    for xb, _, n_real in padded_batches(images, labels, batch_size):
        outputs = layer_fn(params, net_state, xb)
        per_layer = per_layer or [[] for _ in outputs]
        for parts, out in zip(per_layer, outputs, strict=True):
            parts.append(np.asarray(out)[:n_real])
    return list(names), [gram(np.concatenate(parts)) for parts in per_layer]
