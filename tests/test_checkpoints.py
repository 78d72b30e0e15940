"""Checkpoints describe themselves: a run_exp.py checkpoint feeds every later script with no
--model or --dataset, a contradicting flag is an error, a checkpoint without meta still loads;
and every entry script's --help shows its defaults."""

from __future__ import annotations

import argparse
import os
import shlex

import jax
import numpy as np
import pytest

import analyze_kernels
import calculate_kernel
import cka
import eigen_features
import eval_and_make_adv
import ntk_attack
import robustify_dataset
import run_exp
import visualize_ntk_features
from ntk_evolution import __version__
from ntk_evolution.io.checkpoints import load_checkpoint, load_model
from ntk_evolution.utils import load_pickle, save_pickle

SCRIPTS = (
    run_exp,
    eval_and_make_adv,
    calculate_kernel,
    visualize_ntk_features,
    analyze_kernels,
    ntk_attack,
    eigen_features,
    cka,
    robustify_dataset,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("described")
    run_exp.main(
        shlex.split(
            "--dataset digits --model mlp_skinny --standard_epochs 1 --linear_epochs 1 "
            "--batch_size 128 --save_models --constant_save --skip_first_test "
            f"--skip_second_test --save_path {folder}"
        )
    )
    return str(folder)


def test_checkpoints_record_model_dataset_phase_epoch_and_flags(run_dir):
    start = load_checkpoint(os.path.join(run_dir, "parameters_checkpoint_0.pkl"))["meta"]
    assert start["model"] == "mlp_skinny" and start["dataset"] == "digits"
    assert start["n_classes"] == 10 and tuple(start["image_shape"]) == (8, 8, 1)
    assert (start["phase"], start["epoch"], start["step"]) == (1, 0, 0)
    assert start["flags"]["loaders"] == "CC" and start["flags"]["batch_size"] == 128
    assert start["version"] == __version__
    assert start["run"] == os.path.basename(run_dir)  # the run's name, read by calculate_kernel
    # the first fractional save: before step 2 of 11 (1437 images, batch 128), 2/11 > 0.125
    early = load_checkpoint(os.path.join(run_dir, "parameters_checkpoint_0.125.pkl"))["meta"]
    assert (early["phase"], early["epoch"], early["step"]) == (1, 0.125, 2)
    final = load_checkpoint(os.path.join(run_dir, "parameters_final.pkl"))["meta"]
    assert (final["phase"], final["epoch"], final["step"]) == (2, 1, 11)


def test_phase1_only_run_final_checkpoint_is_phase1_last_epoch(tmp_path):
    """Without phase 2 the final model is phase 1's last: its meta says so, and a kernel of it
    carries that epoch, not the initialisation's 0 (which made analyze_kernels refuse two
    "epoch 0" kernels of one run)."""
    run_exp.main(
        shlex.split(
            "--dataset digits --model mlp_skinny --standard_epochs 2 --linear_epochs 0 "
            f"--save_models --skip_first_test --skip_second_test --save_path {tmp_path}"
        )
    )
    final = load_checkpoint(str(tmp_path / "parameters_final.pkl"))
    assert (final["meta"]["phase"], final["meta"]["epoch"], final["meta"]["step"]) == (1, 2, 22)
    # w = theta_t: params and lin_params are the same phase-1 parameters
    for a, b in zip(
        jax.tree.leaves(final["params"]), jax.tree.leaves(final["lin_params"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    kernel = calculate_kernel.main(
        shlex.split(f"--model_path {tmp_path}/parameters_final.pkl --dataset_size 10 "
                    f"--bonus_dir {tmp_path}/k")
    )  # fmt: skip
    assert kernel["epoch"] == 2.0


@pytest.mark.slow
def test_later_scripts_need_no_model_or_dataset(run_dir, tmp_path):
    ckpt = os.path.join(run_dir, "parameters_final.pkl")
    kernel = calculate_kernel.main(
        shlex.split(f"--model_path {ckpt} --dataset_size 20 --class_index 0 --bonus_dir k")
    )
    assert kernel["model"] == "mlp_skinny" and kernel["dataset"] == "digits"
    assert kernel["kernel"].shape == (20, 20) and kernel["epoch"] == 1.0
    results = eval_and_make_adv.main(shlex.split(f"--model_path {ckpt} --n_test 20 --no_adv"))
    assert 0.0 <= results["acc_clean"] <= 1.0 and len(results["predictions_clean"]) == 20
    features = visualize_ntk_features.main(
        shlex.split(f"--model_path {ckpt} --dataset_size 20 --class_index 1 --n_images 1 --steps 5")
    )
    assert features["pos_images"].shape[1:] == (8, 8, 1)
    similarity = cka.main(
        shlex.split(f"--model_path {ckpt} --n_images 8 --savedir {tmp_path / 'cka'}")
    )
    assert similarity["linear"].shape[0] == similarity["linear"].shape[1] >= 2
    attacked = ntk_attack.main(
        shlex.split(
            f"--model_path {ckpt} --dataset_size 20 --n_test 10 --pgd_steps 2 "
            f"--out_dir {tmp_path / 'attack'}"
        )
    )
    assert "mlp_skinny" in attacked["kernel"] and 0.0 <= attacked["accuracy_clean"] <= 1.0


def test_a_flag_that_contradicts_the_meta_is_refused(run_dir):
    from ntk_evolution.utils import UserError

    ckpt = os.path.join(run_dir, "parameters_final.pkl")
    with pytest.raises(UserError, match="--dataset digits"):
        load_model(ckpt, dataset="cifar10")
    with pytest.raises(UserError, match="--model mlp_skinny"):
        load_model(ckpt, model="cnn_small")
    assert load_model(ckpt, "mlp_skinny", "digits").model_name == "mlp_skinny"


def test_a_checkpoint_without_meta_loads_with_its_flags(run_dir, tmp_path):
    record = load_pickle(os.path.join(run_dir, "parameters_final.pkl"))
    legacy = str(tmp_path / "legacy.pkl")
    save_pickle({key: record[key] for key in ("params", "lin_params", "net_state")}, legacy)
    loaded = load_model(legacy, "mlp_skinny", "digits")
    assert loaded.meta is None and loaded.dataset == "digits"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_help_shows_defaults_and_every_flag_has_help(script, capsys):
    parser = script.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: " in text
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default}" in " ".join(text.split()), action.option_strings


def test_eval_with_fgsm_moves_every_free_pixel_by_eps(run_dir, capsys):
    """eval_and_make_adv.py --attack_variant fgsm: one signed-gradient step of eps from each
    test image, named FGSM in the output."""
    from ntk_evolution.data import load_dataset

    ckpt = os.path.join(run_dir, "parameters_final.pkl")
    eval_and_make_adv.main(
        shlex.split(
            f"--model_path {ckpt} --n_test 20 --attack_variant fgsm --eps 8 --save_examples "
            "--save_name fgsm"
        )
    )
    assert "FGSM-Linf (eps 8/255) accuracy" in capsys.readouterr().out
    adv = load_pickle(os.path.join(run_dir, "adv_examples_fgsm.pkl"))["images"]
    x = load_dataset("digits").x_test[:20].transpose(0, 3, 1, 2)
    eps = 8 / 255
    free = (x > eps) & (x < 1 - eps) & (adv > 0) & (adv < 1)
    assert free.sum() > 100
    np.testing.assert_allclose(np.abs(adv - x)[free], eps, rtol=1e-4)
