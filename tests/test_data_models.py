"""Datasets (digits, CIFAR through torchvision's parser on a fixture) and model shapes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_cifar10_fixture

from ntk_evolution.data import class_balanced_subset, iterate_batches, load_dataset, padded_batches
from ntk_evolution.models import MODELS, get_model, init_model
from ntk_evolution.utils import UserError


def test_digits_native_size_fixed_stratified_split():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
    assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    train_share = np.bincount(ds.y_train) / len(ds.y_train)
    test_share = np.bincount(ds.y_test) / len(ds.y_test)
    assert np.abs(train_share - test_share).max() < 0.01
    np.testing.assert_array_equal(load_dataset("digits").y_test, ds.y_test)


def test_digits_split_is_kept_in_the_cache_and_matches_scikit_learn(tmp_path, monkeypatch):
    from ntk_evolution import data

    monkeypatch.setenv("NTK_CACHE_DIR", str(tmp_path))
    fresh = data._split_digits()  # scikit-learn's split, computed here
    first = load_dataset("digits")  # computes it and keeps it
    assert os.path.isfile(data.digits_cache_path())
    cached = load_dataset("digits")  # read back
    for ds in (first, cached):
        for key in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(ds, key), getattr(fresh, key))
            assert getattr(ds, key).dtype == getattr(fresh, key).dtype
    with open(data.digits_cache_path(), "wb") as f:
        f.write(b"not an npz")  # a damaged cache is recomputed and replaced
    np.testing.assert_array_equal(load_dataset("digits").x_test, fresh.x_test)
    np.testing.assert_array_equal(load_dataset("digits").y_train, fresh.y_train)


@pytest.mark.slow
def test_cifar10_fixture_goes_through_torchvision_parser(tmp_path, skip_cifar_md5):
    write_cifar10_fixture(str(tmp_path), n_train=100, n_test=40)
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.x_train.shape == (100, 32, 32, 3) and ds.x_test.shape == (40, 32, 32, 3)
    assert ds.n_classes == 10 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    # channel-major rows became NHWC: row 0's first value is the red channel of pixel (0, 0)
    import pickle

    with open(os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_1"), "rb") as f:
        raw = pickle.load(f)["data"][0]
    assert ds.x_train[0, 0, 0, 0] == pytest.approx(raw[0] / 255)
    assert ds.x_train[0, 0, 0, 1] == pytest.approx(raw[1024] / 255)


def test_cifar_missing_offline_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="cifar-10-batches-py.*data_batch_1"):
        load_dataset("cifar10", str(tmp_path))


def test_class_balanced_subset_is_balanced_seeded_and_checked():
    labels = np.repeat(np.arange(10), 30)
    idx = class_balanced_subset(labels, 100, 10, seed=0)
    assert len(set(idx)) == 100
    np.testing.assert_array_equal(np.bincount(labels[idx]), 10)
    assert np.all(np.diff(labels[idx]) >= 0)  # ordered by class
    np.testing.assert_array_equal(idx, class_balanced_subset(labels, 100, 10, seed=0))
    assert not np.array_equal(idx, class_balanced_subset(labels, 100, 10, seed=1))
    with pytest.raises(UserError, match="multiple"):
        class_balanced_subset(labels, 105, 10, seed=0)
    with pytest.raises(UserError, match="only 30"):
        class_balanced_subset(labels, 400, 10, seed=0)


def test_batches_are_a_seeded_permutation():
    x = np.arange(10)[:, None]
    y = np.arange(10)
    first = [b[1] for b in iterate_batches(x, y, 4, np.random.default_rng(0))]
    again = [b[1] for b in iterate_batches(x, y, 4, np.random.default_rng(0))]
    assert len(first) == 2 and all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert len(set(np.concatenate(first))) == 8
    padded = list(padded_batches(x, y, 4))
    assert [n for _, _, n in padded] == [4, 4, 2] and padded[-1][0].shape == (4, 1)


@pytest.mark.parametrize(
    "name", [pytest.param(m, marks=pytest.mark.slow) if m == "resnet18" else m for m in MODELS]
)
@pytest.mark.parametrize("shape,n_classes", [((8, 8, 1), 10), ((32, 32, 3), 100)])
def test_models_take_both_image_sizes(name, shape, n_classes):
    model = get_model(name, n_classes)
    params, state = init_model(model, jax.random.PRNGKey(0), shape)
    logits, _ = model.apply(params, state, jnp.zeros((2, *shape)), False)
    assert logits.shape == (2, n_classes)
    assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("name", ["cnn_small", "mlp_skinny"])
@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_compiled_init_is_haikus_init_op_by_op(name, shape):
    """init_model runs Haiku's init as one compiled program: the same values as Haiku's init
    run op by op (then BatchNorm's running variance set to 1), to the last bit on this CPU."""
    model = get_model(name, 10)
    key = jax.random.PRNGKey(3)
    params, state = init_model(model, key, shape)
    ref_params, ref_state = model.init(key, jnp.zeros((1, *shape)), True)
    for ours, ref in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    for name_, values in ref_state.items():
        for field, ref in values.items():
            expected = (
                np.ones_like(ref) if name_.endswith("var_ema") and field == "average" else ref
            )
            np.testing.assert_array_equal(np.asarray(state[name_][field]), np.asarray(expected))


@pytest.mark.slow
def test_resnet18_is_the_cifar_variant():
    model = get_model("resnet18", 10)
    params, _ = init_model(model, jax.random.PRNGKey(0), (32, 32, 3))
    assert params["stem_conv"]["w"].shape == (3, 3, 3, 64)  # 3x3 stem
    n = sum(p.size for p in jax.tree.leaves(params))
    assert 11_100_000 < n < 11_200_000  # torchvision-style CIFAR ResNet-18: 11.17M


@pytest.mark.parametrize(
    "name", [pytest.param(m, marks=pytest.mark.slow) if m == "resnet18" else m for m in MODELS]
)
def test_inference_mode_at_initialisation_is_finite(name):
    """Running statistics start at mean 0, variance 1: BatchNorm is the identity at init."""
    model = get_model(name, 10)
    params, state = init_model(model, jax.random.PRNGKey(0), (8, 8, 1))
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1)), jnp.float32)
    logits, _ = model.apply(params, state, x, False)
    assert np.all(np.isfinite(np.asarray(logits)))
    assert np.abs(np.asarray(logits)).max() < 1e3


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 2), (1, 1)])
def test_conv_as_matmul_is_the_convolution_and_keeps_hk_conv2d_parameters(kernel, stride):
    import haiku as hk

    from ntk_evolution import models

    def forward(x, impl):
        models.CONV_IMPL = impl
        try:
            return models.Conv(16, kernel, stride, name="c")(x)
        finally:
            models.CONV_IMPL = "xla"

    def reference(x):
        pad = kernel // 2
        conv = hk.Conv2D(16, kernel, stride, padding=((pad, pad), (pad, pad)), with_bias=False)
        return conv(x)

    x = np.random.default_rng(0).normal(size=(3, 9, 9, 5)).astype(np.float32)
    ours = hk.without_apply_rng(hk.transform(forward))
    theirs = hk.without_apply_rng(hk.transform(reference))
    key = jax.random.PRNGKey(1)
    params = ours.init(key, x, "matmul")
    (w,) = jax.tree.leaves(theirs.init(key, x))  # same initial values as hk.Conv2D
    np.testing.assert_array_equal(params["c"]["w"], w)
    expected = theirs.apply({"conv2_d": {"w": w}}, x)
    for impl in ("matmul", "xla"):
        np.testing.assert_allclose(ours.apply(params, x, impl), expected, rtol=1e-5, atol=1e-5)
    # and its gradients (the backward pass is what training runs)
    grad = jax.grad(lambda p: jnp.sum(ours.apply(p, x, "matmul") ** 2))(params)["c"]["w"]
    grad_ref = jax.grad(lambda v: jnp.sum(theirs.apply({"conv2_d": {"w": v}}, x) ** 2))(w)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-4)
