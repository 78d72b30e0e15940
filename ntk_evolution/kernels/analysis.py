"""How a kernel moves during training (Loo et al. 2022; Fort et al. 2020; Baratin et al. 2021).

For kernels K1, K2 (N, N) on the same images, one-hot labels Y and H = I - 11^T / N:

    distance(K1, K2) = 1 - <K1, K2>_F / (|K1|_F |K2|_F)           0 for parallel kernels
    velocity_t       = distance(K_{t-1}, K_t) / (epoch_t - epoch_{t-1})
    alignment(K)     = <HKH, HLH>_F / (|HKH|_F |HLH|_F),  L = Y Y^T   (centered kernel-target
                       alignment; for a class kernel of logit c, Y is the indicator of class c)
    energy_k(K)      = sum of the k largest eigenvalues / sum of all positive eigenvalues
    polar view       = radius distance(K_0, K_t) / distance(K_0, K_final) at angle
                       arccos(alignment(K_t))

and, as the adversarial-NTK code defines them (Tsilivis & Kempe 2022, its measurements.py),
with cos(K1, K2) = <K1, K2>_F / (|K1|_F |K2|_F):

    tk_radius        = |K_t - K_0|_F / |K_final - K_0|_F     (Frobenius radius, 1 at the end)
    tk_angle         = arccos(cos(K_t, K_0))                 (angle to the initial kernel)
    ..._top          = the same for P_k(K) = V_k diag(w_k) V_k^T, the part of each kernel in its
                       own k = top_space largest eigenvalues (..._bottom: its bottom_space
                       smallest)
    mass_top{k}      = sum of the k largest eigenvalues squared / sum of all squared
    distance matrix  = D[s, t] = 1 - cos(K_s, K_t) over every pair of epochs

For a full kernel ((C N, C N), every pair of logits) the label target is t t^T with
t[k N + i] = 1 where image i has label k.
"""

from __future__ import annotations

import numpy as np

TOP_K = (10, 20)


def kernel_distance(k1: np.ndarray, k2: np.ndarray) -> float:
    """1 - <K1, K2>_F / (|K1|_F |K2|_F)."""
    inner = float(np.sum(k1 * k2))
    # clipped: rounding makes the distance of a kernel to itself about -1e-16
    return max(0.0, 1.0 - inner / (np.linalg.norm(k1) * np.linalg.norm(k2)))


def center(matrix: np.ndarray) -> np.ndarray:
    """H M H with H = I - 11^T / N, without forming H."""
    return (
        matrix
        - matrix.mean(axis=0, keepdims=True)
        - matrix.mean(axis=1, keepdims=True)
        + (matrix.mean())
    )


def target_matrix(
    labels: np.ndarray, n_classes: int, class_index: int = -1, full: bool = False
) -> np.ndarray:
    """L = Y Y^T for one-hot Y (class_index -1), or t t^T for the indicator t of class c; for
    a full kernel, t t^T with t the one-hot targets in its logit-major order."""
    if full:
        targets = np.eye(n_classes)[labels].T.reshape(-1, 1)
    elif class_index >= 0:
        targets = (labels == class_index).astype(np.float64)[:, None]
    else:
        targets = np.eye(n_classes)[labels]
    return targets @ targets.T


def centered_alignment(kernel: np.ndarray, target: np.ndarray) -> float:
    """<HKH, HLH>_F / (|HKH|_F |HLH|_F) for a target matrix L."""
    kc, lc = center(kernel), center(target)
    return float(np.sum(kc * lc) / (np.linalg.norm(kc) * np.linalg.norm(lc)))


def spectrum(kernel: np.ndarray) -> np.ndarray:
    """Eigenvalues in decreasing order."""
    return np.linalg.eigvalsh(kernel)[::-1]


def cosine(k1: np.ndarray, k2: np.ndarray) -> float:
    """<K1, K2>_F / (|K1|_F |K2|_F), clipped to [-1, 1]."""
    value = float(np.sum(k1 * k2) / (np.linalg.norm(k1) * np.linalg.norm(k2)))
    return min(1.0, max(-1.0, value))


def eigenspace_part(eigenvalues: np.ndarray, vectors: np.ndarray, k: int, top: bool) -> np.ndarray:
    """V_k diag(w_k) V_k^T over the k largest (top) or k smallest eigenvalues, from eigh's
    (ascending) eigenvalues and eigenvectors."""
    chosen = slice(len(eigenvalues) - k, None) if top else slice(0, k)
    v = vectors[:, chosen]
    return (v * eigenvalues[chosen]) @ v.T


def polar_dynamics(kernels: list[np.ndarray]) -> tuple[list[float | None], list[float]]:
    """(radius, angle) of each kernel, as the adversarial-NTK code measures them: radius
    |K_t - K_0|_F / |K_final - K_0|_F (None when the last kernel is the first), angle
    arccos(cos(K_t, K_0))."""
    first = kernels[0]
    total = float(np.linalg.norm(kernels[-1] - first))
    radius = [float(np.linalg.norm(k - first)) / total if total > 0 else None for k in kernels]
    return radius, [float(np.arccos(cosine(k, first))) for k in kernels]


def squared_mass(eigenvalues: np.ndarray, k: int) -> float:
    """sum of the k largest eigenvalues squared / sum of all eigenvalues squared."""
    ordered = np.sort(eigenvalues)[::-1]
    return float(np.sum(ordered[:k] ** 2) / np.sum(ordered**2))


def distance_matrix(kernels: list[np.ndarray]) -> np.ndarray:
    """D[s, t] = 1 - cos(K_s, K_t) for every pair of kernels (0 on the diagonal)."""
    n = len(kernels)
    out = np.zeros((n, n))
    for s in range(n):
        for t in range(s):
            out[s, t] = out[t, s] = 1.0 - cosine(kernels[s], kernels[t])
    return out


def spectral_energy(eigenvalues: np.ndarray, k: int) -> float:
    """Share of the positive spectrum in the k largest eigenvalues."""
    positive = np.clip(eigenvalues, 0.0, None)
    return float(np.sum(np.sort(positive)[::-1][:k]) / np.sum(positive))


def evolution(
    kernels: list[np.ndarray],
    epochs: list[float],
    target: np.ndarray,
    top_space: int = 20,
    bottom_space: int | None = None,
) -> list[dict[str, float | None]]:
    """One row per kernel (ordered by epoch) with every quantity of the module docstring; the
    subspace variants over the top_space largest and the bottom_space (default: all but
    top_space) smallest eigenvalues of each kernel."""
    n = len(kernels[0])
    top_space = min(top_space, n)
    bottom_space = n - top_space if bottom_space is None else min(bottom_space, n)
    first, last = kernels[0], kernels[-1]
    total = kernel_distance(first, last)
    decompositions = [np.linalg.eigh(k) for k in kernels]
    polar = {"": polar_dynamics(kernels)}
    for name, k, top in (("_top", top_space, True), ("_bottom", bottom_space, False)):
        parts = [eigenspace_part(w, v, k, top) for w, v in decompositions]
        polar[name] = polar_dynamics(parts) if k > 0 else ([None] * len(kernels),) * 2
    rows = []
    for i, (kernel, epoch) in enumerate(zip(kernels, epochs, strict=True)):
        eigenvalues = decompositions[i][0][::-1]
        alignment = centered_alignment(kernel, target)
        to_first = kernel_distance(first, kernel)
        velocity = None
        if i > 0 and epoch > epochs[i - 1]:
            velocity = kernel_distance(kernels[i - 1], kernel) / (epoch - epochs[i - 1])
        row = {
            "epoch": float(epoch),
            "distance_to_first": to_first,
            "distance_to_last": kernel_distance(kernel, last),
            "velocity": velocity,
            "alignment": alignment,
            **{f"energy_top{k}": spectral_energy(eigenvalues, k) for k in TOP_K},
            "polar_radius": to_first / total if total > 0 else None,
            "polar_angle": float(np.arccos(np.clip(alignment, -1.0, 1.0))),
            **{f"mass_top{k}": squared_mass(eigenvalues, k) for k in TOP_K},
        }
        for name, (radius, angle) in polar.items():
            row[f"tk_radius{name}"] = radius[i]
            row[f"tk_angle{name}"] = angle[i]
        row.update(top_space=top_space, bottom_space=bottom_space)
        rows.append(row)
    return rows
