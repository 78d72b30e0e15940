"""Kernels: the empirical NTK and its memory plan (ntk), kernel regression and the closed-form
ReLU NTK (regression), kernel predictors and their attacks (predictors), NTK eigen-features
(features), kernel evolution measures (analysis).

From plain values (a notebook): `empirical_ntk(checkpoint, images)`, the kernel
calculate_kernel.py computes, and `kernel_predictor(ds, checkpoint=...)`, the kernel-regression
predictor of ntk_attack.py and eigen_features.py.
"""

from __future__ import annotations

import numpy as np

from ntk_evolution.data import SHAPES, Dataset
from ntk_evolution.io.checkpoints import DEFAULT_MODEL, Checkpoint
from ntk_evolution.kernels import ntk as _ntk
from ntk_evolution.kernels.predictors import (
    check_class_index,
    check_full_kernel,
    kernel_choice,
    support_kernel,
)
from ntk_evolution.kernels.regression import SupportKernel
from ntk_evolution.parallel import use_default_compile_cache


def empirical_ntk(
    checkpoint: Checkpoint,
    images: np.ndarray,
    images2: np.ndarray | None = None,
    *,
    class_index: int = -1,
    use_linear_params: bool = False,
    full: bool = False,
    max_memory_gb: float | None = None,
) -> np.ndarray:
    """K(x1, x2) = J_c(x1) J_c(x2)^T (N1, N2) float64, J_c the Jacobian of logit `class_index`
    of the network at `checkpoint` (its params, or with `use_linear_params` its lin_params;
    BatchNorm in inference mode) with respect to its parameters; with class_index -1 the mean
    over the logits (neural-tangents' trace_axes=(-1,)); with `full` every pair of logits,
    (C N1, C N2) logit-major. `images2` None: K(images, images). calculate_kernel.py's kernel,
    bit for bit, on the same images."""
    use_default_compile_cache()
    check_class_index(class_index, checkpoint.dataset, SHAPES[checkpoint.dataset][1])
    check_full_kernel(full, class_index)
    params = checkpoint.lin_params if use_linear_params else checkpoint.params
    return _ntk.empirical_ntk(
        checkpoint.model, params, checkpoint.net_state, np.asarray(images, np.float32),
        None if images2 is None else np.asarray(images2, np.float32),
        class_index=class_index, max_memory_gb=max_memory_gb, full=full,
    )  # fmt: skip


def kernel_predictor(
    ds: Dataset,
    kernel: str = "empirical",
    *,
    checkpoint: Checkpoint | None = None,
    model: str = DEFAULT_MODEL,
    class_index: int = -1,
    use_linear_params: bool = False,
    relu_depth: int = 2,
    dataset_size: int = 500,
    seed: int = 0,
    kernel_path: str = "",
    support_path: str = "",
) -> SupportKernel:
    """The kernel-regression predictor of ntk_attack.py and eigen_features.py: `kernel`
    (empirical: the NTK of `checkpoint`'s network, or of `model` at its initialisation drawn
    with `seed`; relu_ntk or cntk of depth `relu_depth`) on its support set, the class-balanced
    `dataset_size` training images drawn with `seed` (or kernel_path's images and kernel, or
    support_path's examples)."""
    use_default_compile_cache()
    choice = kernel_choice(
        ds, kernel, checkpoint=checkpoint, model=model, class_index=class_index,
        use_linear_params=use_linear_params, relu_depth=relu_depth, seed=seed,
    )  # fmt: skip
    model_name = checkpoint.model_name if checkpoint is not None else model
    expect = {"dataset": ds.name}
    if kernel == "empirical":
        expect.update(model=model_name, class_index=class_index)
    return support_kernel(
        choice, ds, dataset_size=dataset_size, seed=seed, kernel_path=kernel_path,
        support_path=support_path, expect=expect,
    )  # fmt: skip
