"""The analysis suite against its definitions: kernel regression and its eigen-components, the
closed-form infinite-width NTK, kernel-evolution metrics, CKA, and the scripts end to end."""

from __future__ import annotations

import itertools
import json
import math
import os

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_images, small_model, warm_bn_state

import analyze_kernels
import calculate_kernel
import cka
import eigen_features
import eval_and_make_adv
import ntk_attack
from ntk_evolution.data import load_dataset
from ntk_evolution.io.checkpoints import load_kernel, save_checkpoint
from ntk_evolution.kernels.analysis import (
    centered_alignment,
    distance_matrix,
    eigenspace_part,
    evolution,
    kernel_distance,
    polar_dynamics,
    spectral_energy,
    squared_mass,
    target_matrix,
)
from ntk_evolution.kernels.ntk import empirical_ntk, kernel_features, kernel_times
from ntk_evolution.kernels.predictors import evaluate_predictor
from ntk_evolution.kernels.regression import (
    RELU_B_STD,
    RELU_W_STD,
    component_factors,
    eigen_decomposition,
    one_hot,
    regression_coefficients,
    relu_ntk,
    relu_support_kernel,
)
from ntk_evolution.similarity.cka import (
    MinibatchCKA,
    cka_matrix,
    gram,
    hsic,
    make_layer_fn,
    unbiased_hsic,
    unbiased_hsic_matrix,
)
from ntk_evolution.similarity.cka import cka as cka_value
from ntk_evolution.utils import UserError, load_pickle

# ----------------------------------------------------------------------------- kernels


def ntk_parameterised_mlp(width: int, depth: int):
    """The finite network whose NTK relu_ntk describes as width -> infinity."""

    def forward(x, is_training):
        del is_training
        h = x.reshape(x.shape[0], -1)
        for i in range(depth + 1):
            fan_in, fan_out = h.shape[1], 1 if i == depth else width
            w = hk.get_parameter(f"w{i}", (fan_in, fan_out), init=hk.initializers.RandomNormal())
            b = hk.get_parameter(f"b{i}", (fan_out,), init=hk.initializers.RandomNormal())
            h = RELU_W_STD / math.sqrt(fan_in) * h @ w + RELU_B_STD * b
            h = jax.nn.relu(h) if i < depth else h
        return h

    return hk.without_apply_rng(hk.transform_with_state(forward))


@pytest.mark.slow
def test_relu_ntk_matches_average_empirical_ntk_of_wide_mlps():
    """Mean empirical NTK of 32 width-1024 MLPs at initialisation vs the closed form: measured
    relative (Frobenius) error 1.0%; the tolerance 3% leaves room for the seed noise, while a
    missing derivative term or a wrong arc-cosine moment is off by tens of percent."""
    x = random_images(6, (4, 4, 1), seed=3)
    exact = np.asarray(relu_ntk(jnp.asarray(x), jnp.asarray(x), depth=2), np.float64)
    model = ntk_parameterised_mlp(1024, 2)
    kernels = []
    for seed in range(32):
        params, state = model.init(jax.random.PRNGKey(seed), jnp.asarray(x), True)
        kernels.append(empirical_ntk(model, params, state, x, class_index=0, progress=False))
    error = np.linalg.norm(np.mean(kernels, 0) - exact) / np.linalg.norm(exact)
    assert error < 0.03


@pytest.mark.slow
def test_kernel_times_is_cross_kernel_times_coefficients():
    model, params, net_state = small_model("cnn_small", n_classes=4)
    x, z = random_images(9, seed=1), random_images(5, seed=2)
    net_state = warm_bn_state(model, params, net_state, x)
    coefficients = np.random.default_rng(0).normal(size=(9, 3))
    for class_index in (-1, 1):
        features = kernel_features(model, params, net_state, x, coefficients, class_index)
        got = jax.jit(lambda f, q: kernel_times(model, params, net_state, f, q, class_index))(  # noqa: B023
            features, jnp.asarray(z)
        )
        cross = empirical_ntk(
            model, params, net_state, z, x, class_index=class_index, progress=False
        )
        expected = cross @ coefficients
        assert np.abs(np.asarray(got) - expected).max() < 1e-5 * np.abs(expected).max()


def test_kept_jacobians_give_the_same_features_without_a_second_pass(monkeypatch):
    """kernel_features with a `kept` list: the first call stores the support set's Jacobians,
    later calls (other coefficients) reuse them and give bit for bit what a fresh pass gives;
    over KEPT_JACOBIAN_BYTES nothing is kept."""
    import ntk_evolution.kernels.ntk as ntk

    model, params, net_state = small_model("mlp_skinny", n_classes=4, image_shape=(32, 32, 3))
    x = random_images(6, (32, 32, 3), seed=3)
    rng = np.random.default_rng(1)
    first, second = rng.normal(size=(6, 1)), rng.normal(size=(6, 3))
    kept = []
    kernel_features(model, params, net_state, x, first, -1, kept)
    assert len(kept) == 1
    passes = []
    make = ntk.make_jacobian_fn
    monkeypatch.setattr(
        ntk, "make_jacobian_fn", lambda *a: lambda *b: passes.append(b) or make(*a)(*b)
    )
    reused = kernel_features(model, params, net_state, x, second, -1, kept)
    assert passes == []
    monkeypatch.undo()
    fresh = kernel_features(model, params, net_state, x, second, -1)
    for a, b in zip(jax.tree.leaves(reused), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    monkeypatch.setattr(ntk, "KEPT_JACOBIAN_BYTES", 1000)
    too_big = []
    kernel_features(model, params, net_state, x, first, -1, too_big)
    assert too_big == []


def test_eigen_components_sum_to_kernel_regression_predictor():
    x, z = random_images(30, seed=4), random_images(7, seed=5)
    labels = np.arange(30) % 3
    support = relu_support_kernel(x, labels, np.arange(30), depth=2)
    targets = one_hot(labels, 3)
    full = support.cross(z) @ regression_coefficients(support.kernel, targets, 1e-3)
    eigen = eigen_decomposition(support.kernel, targets, 1e-3)
    components = [
        support.cross(z) @ eigen.vectors[:, [i]] @ eigen.projections[[i]] for i in range(30)
    ]
    assert np.allclose(np.sum(components, axis=0), full, rtol=1e-6, atol=1e-9 * abs(full).max())
    # the factorised form used by the attacks, with fewer and with more components than classes
    for chosen in (np.arange(2), np.arange(30)):
        b, p = component_factors(eigen, chosen)
        assert np.allclose(support.cross(z) @ b @ p, np.sum([components[i] for i in chosen], 0))


def test_attack_on_kernel_predictor_stays_in_ball_and_lowers_accuracy():
    from ntk_evolution.data import load_dataset

    ds = load_dataset("digits")
    support = relu_support_kernel(ds.x_train[:200], ds.y_train[:200], np.arange(200), depth=2)
    coefficients = regression_coefficients(support.kernel, one_hot(support.labels, 10), 1e-4)
    eps = 48 / 255
    accuracies, adversarial, _ = evaluate_predictor(
        support, coefficients, np.eye(10), ds.x_test[:100], ds.y_test[:100],
        jax.random.PRNGKey(0), eps_linf=eps, n_steps=20,
    )  # fmt: skip
    assert np.abs(adversarial - ds.x_test[:100]).max() <= eps + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert accuracies["clean"] > 0.8
    assert accuracies["linf"] < accuracies["clean"] - 0.2
    # FGSM against the predictor: one signed-gradient step of eps from each image
    _, fgsm, _ = evaluate_predictor(
        support, coefficients, np.eye(10), ds.x_test[:100], ds.y_test[:100],
        jax.random.PRNGKey(0), eps_linf=eps, variant="fgsm",
    )  # fmt: skip
    steps = np.abs(fgsm - ds.x_test[:100])
    moved = (fgsm > 0) & (fgsm < 1) & (ds.x_test[:100] > eps) & (ds.x_test[:100] < 1 - eps)
    np.testing.assert_allclose(steps[moved], eps, rtol=1e-4)  # every unclipped pixel moved eps


def test_component_input_gradients_match_finite_differences(tmp_path):
    """eigen_features.component_gradients: d F_i(z)_y / dz of a single eigen-component's
    predictor against central differences of F_i along random directions; and the script's
    --components range (the bottom 3) and its gradient outputs."""
    from ntk_evolution.data import load_dataset

    ds = load_dataset("digits")
    support = relu_support_kernel(ds.x_train[:40], ds.y_train[:40], np.arange(40), depth=2)
    eigen = eigen_decomposition(support.kernel, one_hot(support.labels, 10), 1e-4)
    x, y = ds.x_test[:3], ds.y_test[:3]
    grads = eigen_features.component_gradients(support, eigen, [0, 39], x, y)
    assert grads.shape == (2, 3, 8, 8, 1)
    rng = np.random.default_rng(0)
    h = 1e-2  # the kernel is float32 inside: smaller steps drown in its rounding
    for g, i in enumerate((0, 39)):
        factor = eigen.vectors[:, [i]] @ eigen.projections[[i]]  # (N, C)
        directions = rng.normal(size=(3, *x.shape[1:]))
        analytic = np.sum(grads[g] * directions, axis=(1, 2, 3))
        numeric = [
            (float((support.cross((x[n] + h * v)[None]) @ factor)[0, y[n]])
             - float((support.cross((x[n] - h * v)[None]) @ factor)[0, y[n]])) / (2 * h)
            for n, v in enumerate(directions)
        ]  # fmt: skip
        np.testing.assert_allclose(analytic, numeric, rtol=1e-2, atol=1e-2 * np.abs(analytic).max())

    result = eigen_features.main(
        ["--dataset", "digits", "--kernel", "relu_ntk", "--dataset_size", "50", "--n_test", "20",
         "--components=-3:", "--top_k", "1,5", "--no_adv", "--gradient_images", "2",
         "--save_dir", str(tmp_path / "eig")]
    )  # fmt: skip
    assert [r["k"] for r in result["rows"] if r["kind"] == "component"] == [48, 49, 50]
    saved = load_pickle(str(tmp_path / "eig" / "eigen_features_ntk_gradients.pkl"))
    assert saved["components"] == [48, 49, 50] and saved["gradients"].shape == (3, 2, 8, 8, 1)
    assert (tmp_path / "eig" / "eigen_features_ntk_gradients.png").is_file()


# ----------------------------------------------------------------------------- evolution


def test_kernel_distance_alignment_and_energy_follow_their_definitions():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(12, 5))
    k = features @ features.T
    assert kernel_distance(k, 3.0 * k) == pytest.approx(0.0, abs=1e-12)
    other = rng.normal(size=(12, 12))
    other = other @ other.T
    expected = 1 - np.trace(k @ other) / (np.linalg.norm(k) * np.linalg.norm(other))
    assert kernel_distance(k, other) == pytest.approx(expected)

    labels = np.arange(12) % 3
    target = target_matrix(labels, 3)
    h = np.eye(12) - 1 / 12
    kc, lc = h @ k @ h, h @ target @ h
    assert centered_alignment(k, target) == pytest.approx(
        np.trace(kc @ lc) / np.sqrt(np.trace(kc @ kc) * np.trace(lc @ lc))
    )
    assert centered_alignment(target, target) == pytest.approx(1.0)
    eigenvalues = np.linalg.eigvalsh(k)
    assert spectral_energy(eigenvalues, 5) == pytest.approx(1.0)  # rank 5
    assert spectral_energy(eigenvalues, 1) == pytest.approx(eigenvalues.max() / eigenvalues.sum())

    rows = evolution([k, other, 2 * other], [0.0, 0.5, 2.0], target)
    assert rows[1]["velocity"] == pytest.approx(kernel_distance(k, other) / 0.5)
    assert rows[2]["velocity"] == pytest.approx(0.0, abs=1e-12)
    assert rows[2]["polar_radius"] == pytest.approx(1.0)


def test_adversarial_ntk_measures_follow_their_definitions():
    """Tsilivis & Kempe's measures: Frobenius radius and angle to K_0 (whole and within each
    kernel's top / bottom eigenspace), squared-eigenvalue mass, the epoch distance matrix."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(9, 9))
    k0 = a @ a.T
    b = rng.normal(size=(9, 9))
    k1, k2 = k0 + 0.5 * (b @ b.T), k0 + 2.0 * (b @ b.T)
    radius, angle = polar_dynamics([k0, k1, k2])
    assert radius == pytest.approx([0.0, np.linalg.norm(k1 - k0) / np.linalg.norm(k2 - k0), 1.0])
    cos = np.sum(k1 * k0) / (np.linalg.norm(k1) * np.linalg.norm(k0))
    assert angle[0] == pytest.approx(0.0, abs=1e-7) and angle[1] == pytest.approx(np.arccos(cos))
    # orthogonal kernels are a right angle apart; a scaled kernel is at angle 0, radius 1
    assert polar_dynamics([np.diag([1.0, 0]), np.diag([0, 1.0])])[1][1] == pytest.approx(np.pi / 2)
    # arccos near 1 turns a rounding error of 1e-16 in the cosine into 1e-8 in the angle
    zero = pytest.approx(0.0, abs=1e-7)
    assert polar_dynamics([k0, 3 * k0]) == ([0.0, 1.0], [zero, zero])

    w, v = np.linalg.eigh(k0)
    top, bottom = eigenspace_part(w, v, 3, True), eigenspace_part(w, v, 6, False)
    np.testing.assert_allclose(top + bottom, k0, atol=1e-10)
    np.testing.assert_allclose(np.linalg.eigvalsh(top)[-3:], w[-3:], rtol=1e-10)
    assert np.linalg.matrix_rank(top) == 3

    assert squared_mass(np.array([1.0, 3.0, 2.0]), 1) == pytest.approx(9 / 14)
    assert squared_mass(np.array([1.0, 3.0, 2.0]), 3) == pytest.approx(1.0)
    d = distance_matrix([k0, k1, k2])
    assert d[0, 0] == 0 and d[1, 2] == d[2, 1] == pytest.approx(kernel_distance(k1, k2))

    labels = np.arange(9) % 3
    rows = evolution([k0, k1, k2], [0, 1, 2], target_matrix(labels, 3), top_space=3)
    assert rows[1]["tk_radius"] == pytest.approx(radius[1])
    assert rows[2]["mass_top10"] == pytest.approx(1.0)
    assert (rows[0]["top_space"], rows[0]["bottom_space"]) == (3, 6)
    parts = [eigenspace_part(*np.linalg.eigh(k), 3, True) for k in (k0, k1, k2)]
    assert rows[1]["tk_angle_top"] == pytest.approx(polar_dynamics(parts)[1][1])
    whole = evolution([k0, k1, k2], [0, 1, 2], target_matrix(labels, 3), top_space=9)
    assert whole[1]["tk_radius_top"] == pytest.approx(whole[1]["tk_radius"])
    assert whole[1]["tk_radius_bottom"] is None  # no bottom space left

    # a full kernel's target: t t^T with t[k N + i] = 1 where image i has label k
    t = target_matrix(np.array([1, 0]), 2, full=True)
    np.testing.assert_array_equal(np.diag(t), [0, 1, 1, 0])


# ----------------------------------------------------------------------------- CKA


def brute_force_unbiased_hsic(k, l):  # noqa: E741
    """Song et al.'s U-statistic: the mean over ordered 4-tuples of distinct indices of
    h = (1/24) sum over their orderings (t, u, v, w) of k_tu l_tu + k_tu l_vw - 2 k_tu l_tv."""
    n = len(k)
    total, count = 0.0, 0
    for quad in itertools.permutations(range(n), 4):
        h = 0.0
        for t, u, v, w in itertools.permutations(quad):
            h += k[t, u] * l[t, u] + k[t, u] * l[v, w] - 2 * k[t, u] * l[t, v]
        total += h / 24
        count += 1
    return total / count


def test_cka_definitions_and_invariances():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 4))
    kx, ky = gram(x), gram(y)
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct = np.linalg.norm(yc.T @ xc) ** 2 / (
        np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    )
    assert cka_value(kx, ky, "linear") == pytest.approx(direct)
    assert hsic(kx, ky) == pytest.approx(
        np.trace(kx @ (np.eye(7) - 1 / 7) @ ky @ (np.eye(7) - 1 / 7)) / 36
    )
    assert unbiased_hsic(kx, ky) == pytest.approx(brute_force_unbiased_hsic(kx, ky))

    rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    for estimator in ("linear", "debiased"):
        assert cka_value(kx, kx, estimator) == pytest.approx(1.0)
        base = cka_value(kx, ky, estimator)
        assert cka_value(gram(x @ rotation), ky, estimator) == pytest.approx(base)
        assert cka_value(gram(3.7 * x), ky, estimator) == pytest.approx(base)


def test_minibatch_cka_against_its_definition_and_the_full_batch_estimator():
    rng = np.random.default_rng(2)
    n, batch = 40, 8
    side0 = [rng.normal(size=(n, 6)), rng.normal(size=(n, 3, 2))]  # two layers
    mixed = side0[0] @ rng.normal(size=(6, 5)) + 0.3 * rng.normal(size=(n, 5))
    side1 = [mixed, rng.normal(size=(n, 4)), np.abs(side0[1].reshape(n, -1))]
    grams0, grams1 = [gram(f) for f in side0], [gram(f) for f in side1]

    # every pair at once equals the brute-force U-statistic
    pairs = unbiased_hsic_matrix(np.stack(grams0)[:, :7, :7], np.stack(grams1)[:, :7, :7])
    for (a, b), value in np.ndenumerate(pairs):
        expected = brute_force_unbiased_hsic(grams0[a][:7, :7], grams1[b][:7, :7])
        assert value == pytest.approx(expected)

    # one batch of all the images: the full-batch debiased CKA
    online = MinibatchCKA(2, 3)
    online.update(side0, side1)
    np.testing.assert_allclose(online.result(), cka_matrix(grams0, grams1, "debiased"))

    # several batches: sum of HSIC_u over batches, normalised by the sums of the self terms
    online = MinibatchCKA(2, 3)
    batches = [slice(i, i + batch) for i in range(0, n, batch)]
    for b in batches:
        online.update([f[b] for f in side0], [f[b] for f in side1])
    for a, b in np.ndindex(2, 3):

        def total(x, y):
            return sum(unbiased_hsic(gram(x[s]), gram(y[s])) for s in batches)

        expected = total(side0[a], side1[b]) / np.sqrt(
            total(side0[a], side0[a]) * total(side1[b], side1[b])
        )
        assert online.result()[a, b] == pytest.approx(expected)
    assert online.result()[0, 0] > 0.5 > abs(online.result()[0, 1])  # related vs independent
    assert online.cross.shape == (2, 3) and online.batches == len(batches)


def test_layer_outputs_are_every_relu_then_the_logits():
    model, params, net_state = small_model("cnn_small", n_classes=10)
    layer_fn, names = make_layer_fn(model)
    x = jnp.asarray(random_images(3))
    outputs = layer_fn(params, net_state, x)
    assert names == ["relu0", "relu1", "relu2", "logits"]
    assert all(float(out.min()) >= 0 for out in outputs[:3])
    logits, _ = model.apply(params, net_state, x, False)
    assert np.array_equal(np.asarray(outputs[-1]), np.asarray(logits))


# ----------------------------------------------------------------------------- scripts


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two digits cnn_small checkpoints of one 'run' (init and a perturbed copy)."""
    run = tmp_path_factory.mktemp("run")
    model, params, net_state = small_model("cnn_small", n_classes=10)
    moved = jax.tree.map(lambda p: p * 1.3 + 0.01, params)
    paths = []
    for epoch, p in ((0, params), (1.5, moved)):
        path = os.path.join(run, f"parameters_checkpoint_{epoch}.pkl")
        save_checkpoint(path, p, p, net_state)
        paths.append(path)
    return paths


def test_full_kernel_script_holds_the_class_and_averaged_kernels(checkpoints, tmp_path):
    """calculate_kernel.py --full: (C N, C N), logit-major; its diagonal blocks are the class
    kernels the script writes, their mean the averaged kernel; its own name; refused where an
    N x N kernel is needed."""
    common = ["--dataset", "digits", "--model", "cnn_small", "--model_path", checkpoints[1],
              "--dataset_size", "20", "--bonus_dir", str(tmp_path)]  # fmt: skip
    full = calculate_kernel.main([*common, "--full"])
    assert full["kernel"].shape == (200, 200) and full["n_logits"] == 10 and full["full"]
    assert os.path.isfile(tmp_path / "saved_kernel_20_full.png")
    stored = load_kernel(str(tmp_path / "saved_kernel_20_full.pkl"), allow_full=True)
    np.testing.assert_array_equal(stored["kernel"], full["kernel"])
    blocks = full["kernel"].reshape(10, 20, 10, 20)
    class_3 = calculate_kernel.main([*common, "--class_index", "3"])["kernel"]
    np.testing.assert_allclose(blocks[3, :, 3], class_3, rtol=1e-5, atol=1e-6 * class_3.max())
    averaged = calculate_kernel.main(common)["kernel"]
    mean = np.mean([blocks[c, :, c] for c in range(10)], axis=0)
    np.testing.assert_allclose(mean, averaged, rtol=1e-5, atol=1e-6 * averaged.max())
    with pytest.raises(UserError, match="a full kernel"):
        load_kernel(str(tmp_path / "saved_kernel_20_full.pkl"))

    # analyze_kernels.py takes full kernels as they are: here epochs 0 and 1.5 of one run
    common[common.index("--model_path") + 1] = checkpoints[0]
    first = calculate_kernel.main([*common, "--full", "--save_name", "first"])["kernel"]
    out = tmp_path / "analysis"
    table = analyze_kernels.main(
        [str(tmp_path / "first_20_full.pkl"), str(tmp_path / "saved_kernel_20_full.pkl"),
         "--out_dir", str(out), "--top_space", "15"]
    )  # fmt: skip
    (rows,) = table.values()
    assert [r["epoch"] for r in rows] == [0.0, 1.5] and rows[1]["tk_radius"] == pytest.approx(1)
    assert (rows[0]["top_space"], rows[0]["bottom_space"]) == (15, 185)
    assert rows[1]["tk_angle"] == pytest.approx(polar_dynamics([first, full["kernel"]])[1][1])
    distances = json.loads((out / "kernel_distances.json").read_text())
    (run,) = distances.values()
    assert run["distance"][0][1] == pytest.approx(kernel_distance(first, full["kernel"]))
    for name in ("kernel_polar.png", "kernel_distances.png", "kernel_grid.png"):
        assert (out / name).is_file()


@pytest.mark.slow
def test_analysis_scripts_run_end_to_end(checkpoints, tmp_path):
    common = ["--dataset", "digits", "--model", "cnn_small"]
    bonus = os.path.dirname(checkpoints[0])  # the original's default: beside the model
    out = tmp_path / "analysis"
    kernels = []
    for epoch, path in zip((0, 1.5), checkpoints, strict=True):
        calculate_kernel.main(
            [*common, "--model_path", path, "--dataset_size", "40", "--save_name", f"k_{epoch}"]
        )
        kernels.append(os.path.join(bonus, f"k_{epoch}_40.pkl"))
    # one call for both checkpoints (a glob): the same kernels, each named by its epoch
    records = calculate_kernel.main(
        [*common, "--model_path", os.path.join(bonus, "parameters_checkpoint_*.pkl"),
         "--dataset_size", "40", "--save_name", "many"]
    )  # fmt: skip
    assert [r["epoch"] for r in records] == [0.0, 1.5]
    for epoch, single in zip(("0", "1.5"), kernels, strict=True):
        many = load_pickle(os.path.join(bonus, f"many_epoch_{epoch}_40.pkl"))
        np.testing.assert_array_equal(many["kernel"], load_pickle(single)["kernel"])
        assert os.path.isfile(os.path.join(bonus, f"many_epoch_{epoch}_40.png"))
    table = analyze_kernels.main([*kernels, "--out_dir", str(out)])
    (rows,) = table.values()
    assert [r["epoch"] for r in rows] == [0.0, 1.5]
    assert rows[0]["distance_to_first"] == 0 and rows[1]["distance_to_first"] > 0
    assert (out / "kernel_evolution.png").exists() and (out / "kernel_evolution.csv").exists()
    assert (out / "kernel_polar.png").exists() and (out / "kernel_distances.png").exists()

    attack_dir = tmp_path / "attack"
    summary = ntk_attack.main(
        [*common, "--model_path", checkpoints[1], "--kernel_path", kernels[1], "--n_test", "30",
         "--pgd_steps", "3", "--eps", "32", "--save_dir", str(attack_dir)]
    )  # fmt: skip
    assert summary["support_size"] == 40
    examples = attack_dir / "adv_examples_ntk.pkl"
    transfer = eval_and_make_adv.main(
        [*common, "--model_path", checkpoints[1], "--test_path", str(examples), "--no_adv"]
    )
    assert 0 <= transfer["acc_transfer"] <= 1 and len(transfer["predictions_clean"]) == 30
    assert transfer["acc_clean"] is None  # the images were another model's, not the test set
    saved = os.path.join(os.path.dirname(checkpoints[1]), "test_results_transfer_ntk.pkl")
    assert load_pickle(saved)["acc_transfer"] == transfer["acc_transfer"]
    assert not os.path.exists(saved.replace("transfer_ntk", "test_results"))

    result = eigen_features.main(
        ["--dataset", "digits", "--kernel", "relu_ntk", "--dataset_size", "50", "--n_test", "20",
         "--components", "2", "--top_k", "1,5,50", "--pgd_steps", "2", "--classes", "3", "8",
         "--save_dir", str(tmp_path / "eig")]
    )  # fmt: skip
    assert result["classes"] == [3, 8] and result["support_size"] == 10
    assert json.loads((tmp_path / "eig" / "eigen_features_ntk.json").read_text())["rows"]

    matrix = cka.main(
        [*common, "--model_path", *checkpoints, "--n_images", "20", "--adv", "0", "1",
         "--savedir", str(tmp_path / "cka")]
    )  # fmt: skip
    assert matrix["linear"].shape == (4, 4) and (tmp_path / "cka" / "cka.png").exists()


def test_online_cka_script_against_the_full_batch_run_and_its_definition(tmp_path):
    model, params, net_state = small_model("cnn_small")
    ckpt = str(tmp_path / "run" / "parameters_final.pkl")
    save_checkpoint(ckpt, params, params, net_state)
    common = ["--model", "cnn_small", "--dataset", "digits", "--model_path", ckpt, "--n_images"]

    def run(*flags):
        return cka.main([*common, "24", *flags, "--savedir", str(tmp_path / "cka")])

    full = run()
    one_batch = run("--batch_size", "24", "--suffix", "one")
    np.testing.assert_allclose(one_batch["debiased"], full["debiased"], rtol=1e-5, atol=1e-7)
    assert one_batch["linear"] is None and (tmp_path / "cka" / "cka_one.png").exists()

    # 22 images in batches of 8: each pass ends with a batch of 6, as the CKA project's loader
    online = run("--num_images", "22", "--batch_size", "8", "--dataset_passes", "2")
    assert online["batches"] == 6 and online["n_images"] == 22
    # independently: every layer on all the images, then the definition over the same batches
    layer_fn, _ = make_layer_fn(model)
    x = load_dataset("digits").x_test[:22]
    features = [np.asarray(f, np.float64).reshape(22, -1) for f in layer_fn(params, net_state, x)]
    batches = [
        order[i : i + 8]
        for p in range(2)
        for order in [np.random.default_rng([0, p]).permutation(22)]
        for i in range(0, 22, 8)
    ]
    assert [len(b) for b in batches] == [8, 8, 6] * 2

    def total(a, b):
        return sum(unbiased_hsic(gram(a[s]), gram(b[s])) for s in batches)

    for (i, j), value in np.ndenumerate(online["debiased"]):
        a, b = features[i], features[j]
        expected = total(a, b) / np.sqrt(total(a, a) * total(b, b))
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-6)
