"""The empirical NTK against its definition K(x1, x2) = J(x1) J(x2)^T (per logit, or averaged
over logits as neural-tangents' trace_axes=(-1,))."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_images, small_model, warm_bn_state

from ntk import empirical_ntk, explicit_ntk


@pytest.fixture(scope="module", params=["mlp_skinny", "cnn_small"])
def setup(request):
    model, params, net_state = small_model(request.param, n_classes=4)
    x1, x2 = random_images(7, seed=1), random_images(5, seed=2)
    net_state = warm_bn_state(model, params, net_state, x1)
    return model, params, net_state, x1, x2


def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("class_index", [-1, 2])
def test_kernel_matches_explicit_jacobian(setup, class_index):
    model, params, net_state, x1, x2 = setup
    square = empirical_ntk(model, params, net_state, x1, class_index=class_index, progress=False)
    cross = empirical_ntk(model, params, net_state, x1, x2, class_index=class_index, progress=False)
    assert square.dtype == np.float64 and cross.shape == (7, 5)
    assert rel_err(square, explicit_ntk(model, params, net_state, x1, x1, class_index)) < 1e-5
    assert rel_err(cross, explicit_ntk(model, params, net_state, x1, x2, class_index)) < 1e-5


def test_chunk_size_does_not_change_the_kernel(setup):
    model, params, net_state, x1, x2 = setup
    whole = empirical_ntk(model, params, net_state, x1, progress=False)
    for chunk in (1, 3):
        chunked = empirical_ntk(model, params, net_state, x1, chunk_size=chunk, progress=False)
        assert rel_err(chunked, whole) < 1e-6
    cross = empirical_ntk(model, params, net_state, x1, x2, chunk_size=2, progress=False)
    assert rel_err(cross, empirical_ntk(model, params, net_state, x1, x2, progress=False)) < 1e-6


def test_tiny_memory_budget_recomputes_columns_and_agrees(setup):
    model, params, net_state, x1, _ = setup
    whole = empirical_ntk(model, params, net_state, x1, progress=False)
    n_params = sum(p.size for p in __import__("jax").tree.leaves(params))
    tight_gb = 4 * n_params * 4 * 2 * 4 / 2**30  # room for about two 2-image chunks
    tight = empirical_ntk(model, params, net_state, x1, max_memory_gb=tight_gb, progress=False)
    assert rel_err(tight, whole) < 1e-6


def test_kernel_is_symmetric_positive_semidefinite(setup):
    model, params, net_state, x1, _ = setup
    kernel = empirical_ntk(model, params, net_state, x1, chunk_size=2, progress=False)
    np.testing.assert_array_equal(kernel, kernel.T)
    eigenvalues = np.linalg.eigvalsh(kernel)
    assert eigenvalues.min() > -1e-6 * eigenvalues.max()


def test_chunk_plan_respects_the_memory_budget():
    from ntk import plan_chunks

    gb = 2**30
    # all 500 column Jacobians (1 MB each) fit in half of 4 GB: cached, big chunks
    plan = plan_chunks(500, 500, 2**20, 4.0)
    assert plan.cache_columns and plan.chunk_size == 500
    # 100 MB per image: 500 images do not fit; a row, a column and working memory do
    plan = plan_chunks(500, 500, 100 * 2**20, 4.0)
    assert not plan.cache_columns
    assert 3 * plan.chunk_size * 100 * 2**20 <= 4 * gb
    with pytest.raises(ValueError, match="max_memory_gb"):
        plan_chunks(10, 10, 2 * gb, 1.0)


def test_accelerator_contraction_matches_the_cpu_blas_path(setup):
    """contract() (XLA, used off the CPU) and _gram_host() (BLAS, used on the CPU) agree,
    including single-row chunks."""
    import jax

    from ntk import _gram_host, contract, make_jacobian_fn

    model, params, net_state, x1, x2 = setup
    jacobian_fn = make_jacobian_fn(model, -1)
    rows, cols = jacobian_fn(params, net_state, x1), jacobian_fn(params, net_state, x2[:1])
    for a, b in ((rows, rows), (rows, cols), (cols, cols)):
        host = _gram_host(a, b)
        assert rel_err(np.asarray(contract(a, b)), host) < 1e-6
    assert jax.tree.leaves(rows)[0].shape[:2] == (7, 4)
