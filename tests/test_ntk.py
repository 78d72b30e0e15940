"""The empirical NTK against its definition K(x1, x2) = J(x1) J(x2)^T (per logit, or averaged
over logits as neural-tangents' trace_axes=(-1,))."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import explicit_ntk, random_images, small_model, warm_bn_state

from ntk_evolution.kernels.ntk import empirical_ntk


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


def test_full_kernel_matches_explicit_jacobian_and_holds_the_class_kernels(setup):
    """The full kernel (every pair of logits, logit-major) against J_k(x_i) . J_l(x_j), square
    in chunks (mirrored blocks) and cross; its diagonal blocks are the class kernels, their mean
    the averaged kernel."""
    model, params, net_state, x1, x2 = setup
    reference = explicit_ntk(model, params, net_state, x1, x1, full=True)
    for chunk in (None, 3):
        square = empirical_ntk(
            model, params, net_state, x1, full=True, chunk_size=chunk, progress=False
        )
        assert square.shape == (4 * 7, 4 * 7) and rel_err(square, reference) < 1e-5
        np.testing.assert_array_equal(square, square.T)
    cross = empirical_ntk(model, params, net_state, x1, x2, full=True, progress=False)
    assert rel_err(cross, explicit_ntk(model, params, net_state, x1, x2, full=True)) < 1e-5
    blocks = square.reshape(4, 7, 4, 7)
    averaged = empirical_ntk(model, params, net_state, x1, progress=False)
    assert rel_err(np.mean([blocks[c, :, c] for c in range(4)], axis=0), averaged) < 1e-6
    class_2 = empirical_ntk(model, params, net_state, x1, class_index=2, progress=False)
    assert rel_err(blocks[2, :, 2], class_2) < 1e-6
    with pytest.raises(ValueError, match="every logit"):
        empirical_ntk(model, params, net_state, x1, class_index=1, full=True, progress=False)


@pytest.mark.slow
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


def test_averaged_kernel_in_passes_over_groups_of_logits(setup):
    """Budgets that hold every image's Jacobians for 2 of the 4 logits, or for 1, but not for
    all 4: the averaged kernel is the weighted sum of passes over groups of logits, each keeping
    its column chunks (and, tighter still, one logit per pass with columns recomputed). Each is
    still the mean over logits of J_k J_k^T, square and cross."""
    from ntk_evolution.kernels import ntk

    model, params, net_state, x1, x2 = setup
    square_ref = explicit_ntk(model, params, net_state, x1, x1, -1)
    cross_ref = explicit_ntk(model, params, net_state, x1, x2, -1)
    budgets = {}
    for gb in np.geomspace(1e-5, 1.0, 120):
        try:
            plan = ntk.plan_kernel(model, params, net_state, x1, x1, -1, max_memory_gb=gb)
        except ValueError:  # not even one image fits
            continue
        budgets.setdefault((plan.logit_group, plan.cache_columns), gb)
    assert {(4, True), (2, True), (1, True), (1, False)} <= set(budgets)
    # whatever budget fits a class kernel fits the averaged one, one logit per pass if need be
    for gb in np.geomspace(1e-5, 1e-2, 40):
        try:
            ntk.plan_kernel(model, params, net_state, x1, x1, 0, max_memory_gb=gb)
        except ValueError:
            with pytest.raises(ValueError, match="max_memory_gb"):
                ntk.plan_kernel(model, params, net_state, x1, x1, -1, max_memory_gb=gb)
            continue
        ntk.plan_kernel(model, params, net_state, x1, x1, -1, max_memory_gb=gb)
    assert (3, True) not in budgets  # groups divide the logits: one compiled shape per kernel
    for group, cached in ((2, True), (1, True), (1, False)):
        gb = budgets[(group, cached)]
        messages = []
        square = empirical_ntk(
            model, params, net_state, x1, max_memory_gb=gb, progress=False,
            describe=messages.append,
        )  # fmt: skip
        cross = empirical_ntk(model, params, net_state, x1, x2, max_memory_gb=gb, progress=False)
        assert rel_err(square, square_ref) < 1e-5 and rel_err(cross, cross_ref) < 1e-5
        np.testing.assert_array_equal(square, square.T)
        passes = {m.split(" block")[0] for m in messages}
        assert passes == {f"logits {c}:{c + group}" for c in range(0, 4, group)}


def test_kernel_is_symmetric_positive_semidefinite(setup):
    model, params, net_state, x1, _ = setup
    kernel = empirical_ntk(model, params, net_state, x1, chunk_size=2, progress=False)
    np.testing.assert_array_equal(kernel, kernel.T)
    eigenvalues = np.linalg.eigvalsh(kernel)
    assert eigenvalues.min() > -1e-6 * eigenvalues.max()


def test_chunk_plan_respects_the_memory_budget():
    from ntk_evolution.kernels.ntk import plan_chunks

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


@pytest.mark.slow
def test_accelerator_contraction_matches_the_cpu_blas_path(setup):
    """contract() (XLA, used off the CPU) and _gram_host() (BLAS, used on the CPU) agree,
    including single-row chunks."""
    import jax

    from ntk_evolution.kernels.ntk import _gram_host, contract, make_jacobian_fn

    model, params, net_state, x1, x2 = setup
    jacobian_fn = make_jacobian_fn(model, -1)
    rows, cols = jacobian_fn(params, net_state, x1), jacobian_fn(params, net_state, x2[:1])
    for a, b in ((rows, rows), (rows, cols), (cols, cols)):
        host = _gram_host(a, b)
        assert rel_err(np.asarray(contract(a, b)), host) < 1e-6
    assert jax.tree.leaves(rows)[0].shape[:2] == (7, 4)


@pytest.fixture(scope="module")
def conv_setup():
    model, params, net_state = small_model("cnn_small", n_classes=4)
    x1, x2 = random_images(7, seed=3), random_images(5, seed=4)
    return model, params, warm_bn_state(model, params, net_state, x1), x1, x2


@pytest.mark.slow
@pytest.mark.parametrize("class_index", [-1, 1])
def test_factored_convolutions_match_explicit_jacobian(conv_setup, class_index, monkeypatch):
    """Every convolution through its factors (patches and output gradients), in row slices of
    the factor products (a tiny FACTOR_BLOCK) and odd chunks: still J J^T."""
    from ntk_evolution.kernels import ntk

    model, params, net_state, x1, x2 = conv_setup
    monkeypatch.setattr(ntk, "FACTOR_BLOCK", 200)
    plan = ntk.plan_kernel(model, params, net_state, x1, x1, class_index, factor_convs="all")
    assert len(plan.factored) == 3
    explicit_square = explicit_ntk(model, params, net_state, x1, x1, class_index)
    explicit_cross = explicit_ntk(model, params, net_state, x1, x2, class_index)
    for chunk in (None, 3):
        square = empirical_ntk(
            model, params, net_state, x1, class_index=class_index, chunk_size=chunk,
            factor_convs="all", progress=False,
        )  # fmt: skip
        cross = empirical_ntk(
            model, params, net_state, x1, x2, class_index=class_index, chunk_size=chunk,
            factor_convs="all", progress=False,
        )  # fmt: skip
        assert rel_err(square, explicit_square) < 1e-5
        assert rel_err(cross, explicit_cross) < 1e-5


def test_factored_convolutions_in_the_full_kernel(conv_setup, monkeypatch):
    """Every convolution through its factors, every pair of logits, row-sliced factor products
    and odd chunks: still J_k J_l^T; and the XLA contraction agrees with the host's."""
    from ntk_evolution.kernels import ntk

    model, params, net_state, x1, x2 = conv_setup
    monkeypatch.setattr(ntk, "FACTOR_BLOCK", 2000)
    reference = explicit_ntk(model, params, net_state, x1, x2, full=True)
    for chunk in (None, 3):
        cross = empirical_ntk(
            model, params, net_state, x1, x2, full=True, chunk_size=chunk, factor_convs="all",
            progress=False,
        )  # fmt: skip
        assert rel_err(cross, reference) < 1e-5
    layers = ntk.conv_layers(model, params, net_state, x1.shape[1:])
    factor_fn = ntk.make_factor_fn(model, -1, ntk.factored_layers(layers, 4, "all"))
    rows, cols = factor_fn(params, net_state, x1), factor_fn(params, net_state, x2)
    host = ntk._factor_gram_host(rows, cols, full=True)
    assert host.shape == (7, 4, 5, 4)
    assert rel_err(np.asarray(ntk.contract_factors(rows, cols, full=True)), host) < 1e-6


@pytest.mark.slow
def test_factored_contraction_on_accelerators_matches_the_host(conv_setup):
    """contract_factors() (XLA, used off the CPU) agrees with _factor_gram_host() (BLAS)."""
    from ntk_evolution.kernels import ntk

    model, params, net_state, x1, x2 = conv_setup
    layers = ntk.conv_layers(model, params, net_state, x1.shape[1:])
    factored = ntk.factored_layers(layers, 4, "all")
    factor_fn = ntk.make_factor_fn(model, -1, factored)
    rows, cols = factor_fn(params, net_state, x1), factor_fn(params, net_state, x2)
    assert rows.patches["conv1"].shape == (7, 16, 9 * 32)  # 8x8 -> 4x4, 3x3 x 32 channels
    assert rows.grads["conv1"].shape == (7, 4, 16, 64)
    for a, b in ((rows, rows), (rows, cols)):
        host = ntk._factor_gram_host(a, b)
        assert rel_err(np.asarray(ntk.contract_factors(a, b)), host) < 1e-6


def test_auto_factors_only_where_cheaper():
    """ResNet-18 on 32x32: "auto" factors the 4x4 last stage (most parameters), where S^2 (D + C)
    < D C; cnn_small on 8x8 digits: its last, 2x2 convolution only. The plan's memory per image
    follows."""
    from ntk_evolution.kernels import ntk

    model, params, net_state = small_model("resnet18", 10, image_shape=(32, 32, 3))
    x = random_images(2, image_shape=(32, 32, 3))
    layers = ntk.conv_layers(model, params, net_state, x.shape[1:])
    assert len(layers) == 20  # stem, 16 block convolutions, 3 shortcuts
    factored = ntk.factored_layers(layers, 1, "auto")
    assert factored and all(layer.name.startswith("stage3") for layer in factored)
    for layer in factored:
        assert layer.positions**2 * (layer.patch + layer.channels) < layer.patch * layer.channels
    n_params = sum(p.size for p in __import__("jax").tree.leaves(params))
    share = sum(layer.patch * layer.channels for layer in factored) / n_params
    assert share > 0.7
    plan = ntk.plan_kernel(model, params, net_state, x, x, class_index=0, max_memory_gb=8.0)
    assert plan.bytes_per_image < 0.3 * 4 * n_params
    cnn, cnn_params, cnn_state = small_model("cnn_small", 10)
    cnn_layers = ntk.conv_layers(cnn, cnn_params, cnn_state, (8, 8, 1))
    assert [layer.name for layer in ntk.factored_layers(cnn_layers, 10, "auto")] == ["conv2"]
