"""How a kernel moves during training (Loo et al. 2022; Fort et al. 2020; Baratin et al. 2021).

For kernels K1, K2 (N, N) on the same images, one-hot labels Y and H = I - 11^T / N:

    distance(K1, K2) = 1 - <K1, K2>_F / (|K1|_F |K2|_F)           0 for parallel kernels
    velocity_t       = distance(K_{t-1}, K_t) / (epoch_t - epoch_{t-1})
    alignment(K)     = <HKH, HLH>_F / (|HKH|_F |HLH|_F),  L = Y Y^T   (centered kernel-target
                       alignment; for a class kernel of logit c, Y is the indicator of class c)
    energy_k(K)      = sum of the k largest eigenvalues / sum of all positive eigenvalues
    polar view       = radius distance(K_0, K_t) / distance(K_0, K_final) at angle
                       arccos(alignment(K_t))
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


def target_matrix(labels: np.ndarray, n_classes: int, class_index: int = -1) -> np.ndarray:
    """L = Y Y^T for one-hot Y (class_index -1), or t t^T for the indicator t of class c."""
    if class_index >= 0:
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


def spectral_energy(eigenvalues: np.ndarray, k: int) -> float:
    """Share of the positive spectrum in the k largest eigenvalues."""
    positive = np.clip(eigenvalues, 0.0, None)
    return float(np.sum(np.sort(positive)[::-1][:k]) / np.sum(positive))


def evolution(
    kernels: list[np.ndarray], epochs: list[float], target: np.ndarray
) -> list[dict[str, float | None]]:
    """One row per kernel (ordered by epoch) with every quantity of the module docstring."""
    first, last = kernels[0], kernels[-1]
    total = kernel_distance(first, last)
    rows = []
    for i, (kernel, epoch) in enumerate(zip(kernels, epochs, strict=True)):
        eigenvalues = spectrum(kernel)
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
        }
        rows.append(row)
    return rows
