"""The six example commands of the README, run verbatim (plus scale-down flags appended) and
chained exactly as the README chains them: on digits, and on a CIFAR-10 fixture in
torchvision's on-disk layout."""

from __future__ import annotations

import glob
import os
import re
import shlex

import numpy as np
import pytest
from conftest import ROOT, write_cifar10_fixture

import calculate_kernel
import eval_and_make_adv
import run_exp
import visualize_ntk_features
from ntk_evolution.io.checkpoints import load_examples, load_kernel, load_model
from ntk_evolution.io.schemas import check_results
from ntk_evolution.utils import load_pickle

SCRIPTS = {
    "run_exp.py": run_exp.main,
    "eval_and_make_adv.py": eval_and_make_adv.main,
    "calculate_kernel.py": calculate_kernel.main,
    "visualize_ntk_features.py": visualize_ntk_features.main,
}


def readme_examples() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"<!-- examples.*?```\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("python3 ")]


def run_command(command: str, extra: str):
    argv = shlex.split(command) + shlex.split(extra)
    assert argv[0] == "python3"
    return SCRIPTS[argv[1]](argv[2:])


def load(path):
    return load_pickle(path)  # the safe loader: no --trust_pickle needed for our own files


# The six example commands of the original README (yolky/adversarial_ntk_evolution), verbatim:
# the contract our README must keep.
ORIGINAL_EXAMPLES = [
    "python3 run_exp.py --standard_epochs 101 --linear_epochs 0 --loaders CC --save_models "
    "--save_path ./saved_model_path_phase_1 --constant_save --random_seed 0",
    "python3 run_exp.py --standard_epochs 101 --linear_epochs 0 --loaders AC --save_models "
    "--save_path ./saved_model_path_phase_1 --constant_save --random_seed 0",
    "python3 run_exp.py --base_model_path ./saved_model_path_phase_1/parameters_checkpoint_20.pkl "
    "--loaders CC --linear_epochs 100 --second_lr 0.01 --save_models --centering --save_path "
    "./saved_model_loaded_centering_phase_2  --random_seed 0",
    "python3 run_exp.py --base_model_path ./saved_model_path_phase_1/parameters_checkpoint_20.pkl "
    "--loaders CA --linear_epochs 100 --second_lr 0.01 --save_models --centering --save_path "
    "./saved_model_loaded_centering_phase_2  --random_seed 0",
    "python3 eval_and_make_adv.py --model_path "
    "./saved_model_loaded_centering_phase_2/parameters_final.pkl --linear --centering "
    "--save_examples --bonus_dir test_results  --random_seed 0",
    "python3 calculate_kernel.py --model_path "
    "./saved_model_path_phase_1/parameters_checkpoint_20.pkl --dataset_size 500 --random_seed 0 "
    "--class_index 0 --dataset cifar10",
]


def test_readme_has_the_six_original_examples():
    assert readme_examples() == ORIGINAL_EXAMPLES


def check_outputs(data, n_test, kernel_size=500):
    """The files of the six examples hold what SPEC.md says, read as their consumers read them."""
    phase1 = "saved_model_path_phase_1"
    phase2 = "saved_model_loaded_centering_phase_2"
    names = set(os.listdir(phase1))
    for epoch in [*range(21), 0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5]:
        assert f"parameters_checkpoint_{epoch}.pkl" in names
    ckpt = load(f"{phase1}/parameters_checkpoint_20.pkl")
    assert set(ckpt) == {"params", "lin_params", "net_state", "meta"}
    arrays = {key: ckpt[key] for key in ("params", "lin_params", "net_state")}
    assert all(isinstance(v, np.ndarray) for v in _leaves(arrays))
    assert (ckpt["meta"]["phase"], ckpt["meta"]["epoch"]) == (1, 20)
    results = load(f"{phase2}/results.pkl")
    assert set(results) == {"standard", "linear", "standard_second"}
    assert set(results["linear"]) == {"clean", "linf", "l2"}
    assert 0 <= results["linear"]["clean"] <= 1 and results["standard_second"] is False
    final = load(f"{phase2}/parameters_final.pkl")
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(_leaves(final["params"]), _leaves(final["lin_params"]), strict=True)
    ]
    assert any(moved)  # phase 2 trained w away from theta_t
    test_results_path = f"{phase2}/test_results/test_results_test_results.pkl"
    test_results = load(test_results_path)
    for key in ("acc_clean", "acc_dirty", "predictions_clean", "predictions_dirty"):
        assert key in test_results
    assert test_results["predictions_dirty"].shape == (n_test,)  # labels, as the original's
    assert set(test_results["components_clean"]) == {"f", "df"}
    examples_path = f"{phase2}/test_results/adv_examples_test_results.pkl"
    examples = load(examples_path)
    h, w, c = data.image_shape
    assert examples["images"].shape == (n_test, c, h, w)
    clean = data.x_test[:n_test].transpose(0, 3, 1, 2)
    assert np.abs(examples["images"] - clean).max() <= 4 / 255 + 1e-6
    np.testing.assert_array_equal(examples["labels"], data.y_test[:n_test])
    kernel = load(f"{phase1}/saved_kernel_class_0_{kernel_size}.pkl")
    assert kernel["kernel"].shape == (kernel_size, kernel_size)
    assert kernel["kernel"].dtype == np.float64
    np.testing.assert_array_equal(kernel["labels"], data.y_train[kernel["indices"]])
    assert os.path.isfile(f"{phase1}/saved_kernel_class_0_{kernel_size}.png")
    # and through the loaders and schemas of the scripts that consume them
    for path in glob.glob(f"{phase1}/parameters_*.pkl") + glob.glob(f"{phase2}/parameters_*.pkl"):
        assert load_model(path).meta["dataset"] == data.name
    for path in (f"{phase1}/results.pkl", f"{phase2}/results.pkl", test_results_path):
        check_results(load(path), path)
    images, labels = load_examples(examples_path, data.image_shape, data.n_classes)
    assert images.shape == (n_test, *data.image_shape)
    np.testing.assert_array_equal(labels, data.y_test[:n_test])
    kernel = load_kernel(f"{phase1}/saved_kernel_class_0_{kernel_size}.pkl")
    assert kernel["class_index"] == 0 and kernel["dataset"] == data.name


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


@pytest.mark.slow
def test_readme_examples_on_digits(tmp_path, monkeypatch):
    from ntk_evolution.data import load_dataset

    monkeypatch.chdir(tmp_path)
    small = "--dataset digits --model cnn_small --n_test 50"
    extras = [
        f"{small} --standard_epochs 21",
        f"{small} --standard_epochs 2",
        f"{small} --linear_epochs 1",
        f"{small} --linear_epochs 1",
        small,
        "--dataset digits --model cnn_small",
    ]
    for command, extra in zip(readme_examples(), extras, strict=True):
        run_command(command, extra)
    check_outputs(load_dataset("digits"), 50)
    # transfer: the phase-2 model's adversarial examples, evaluated on the phase-1 model
    transfer = eval_and_make_adv.main(
        shlex.split(
            "--model_path saved_model_path_phase_1/parameters_final.pkl --no_adv "
            "--test_path "
            "saved_model_loaded_centering_phase_2/test_results/adv_examples_test_results.pkl "
            "--save_name transfer --dataset digits --model cnn_small"
        )
    )
    assert transfer["predictions_clean"].shape == (50,) and transfer["acc_dirty"] is None
    assert os.path.isfile("saved_model_path_phase_1/test_results_transfer.pkl")
    record = visualize_ntk_features.main(
        shlex.split(
            "--model_path saved_model_path_phase_1/parameters_checkpoint_20.pkl "
            "--kernel_path saved_model_path_phase_1/saved_kernel_class_0_500.pkl "
            "--dataset digits --model cnn_small --n_images 2"
        )
    )
    assert record["pos_images"].shape == (2, 8, 8, 1) and record["w_image"].shape == (8, 8, 1)
    start, end = record["cosines_start"], record["cosines"]
    assert np.all(end[:2] > start[:2]) and np.all(end[2:4] < start[2:4])  # pos up, neg down
    assert end[4] > start[4]  # w image: pos
    assert os.path.isfile("saved_model_path_phase_1/ntk_eig_images_class_0_500.png")


@pytest.mark.slow
def test_readme_examples_on_cifar10_fixture_and_the_transfer_of_example_5(
    tmp_path, monkeypatch, skip_cifar_md5
):
    """The six examples chained on colour images (3 x 32 x 32) with cnn_small, every output read
    back with the project's loaders, then example 5's examples evaluated on the phase-1 network
    with --test_path (the transfer the original's users run; its file was once unreadable)."""
    from ntk_evolution.data import load_dataset

    monkeypatch.chdir(tmp_path)
    # 5 training images per class (--dataset_size 50 takes them all), in 2 batches of 25
    write_cifar10_fixture("data", n_train=50, n_test=20)
    small = "--model cnn_small --n_test 10"
    train = f"{small} --batch_size 25"
    skip = "--skip_first_test --skip_second_test"
    extras = [
        f"{train} --standard_epochs 21 {skip}",
        f"{train} --standard_epochs 1 {skip}",
        f"{train} --linear_epochs 1 {skip}",
        f"{train} --linear_epochs 1 --skip_first_test",  # the last to write results.pkl
        small,
        "--model cnn_small --dataset_size 50",
    ]
    for command, extra in zip(readme_examples(), extras, strict=True):
        run_command(command, extra)
    data = load_dataset("cifar10", "data")
    check_outputs(data, 10, kernel_size=50)
    transfer = eval_and_make_adv.main(
        shlex.split(
            "--model_path saved_model_path_phase_1/parameters_checkpoint_20.pkl --test_path "
            "saved_model_loaded_centering_phase_2/test_results/adv_examples_test_results.pkl"
        )
    )
    assert transfer["acc_clean"] is None and 0 <= transfer["acc_transfer"] <= 1
    assert transfer["predictions_clean"].shape == (10,) and transfer["acc_dirty"] is not None
    stored = load("saved_model_path_phase_1/test_results_transfer_test_results.pkl")
    assert stored["acc_transfer"] == transfer["acc_transfer"]
