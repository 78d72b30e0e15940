"""The library from Python: docs/library.md's code blocks run as written, in one process, and
give what the scripts give with the same settings; a run without a folder writes nothing;
bad values raise the scripts' one-line errors; no argparse below the scripts."""

from __future__ import annotations

import ast
import os
import re

import jax
import numpy as np
import pytest
from conftest import ROOT, write_cifar10_fixture
from helpers import explicit_ntk

import calculate_kernel
import eval_and_make_adv
import run_exp
from ntk_evolution import attacks, data, experiment, kernels
from ntk_evolution.io.checkpoints import load_model
from ntk_evolution.utils import UserError, load_pickle

PAGE = os.path.join(ROOT, "docs", "library.md")
COMMON = "--dataset digits --model cnn_small --eps 32 --random_seed 0"


def python_blocks() -> list[str]:
    with open(PAGE) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)


def arrays(checkpoint) -> list[np.ndarray]:
    return jax.tree.leaves((checkpoint.params, checkpoint.lin_params, checkpoint.net_state))


def same_arrays(a, b) -> bool:
    leaves_a, leaves_b = arrays(a), arrays(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(x, y) and np.asarray(x).dtype == np.asarray(y).dtype
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page's blocks run in order in one namespace, in a folder of their own."""
    folder = tmp_path_factory.mktemp("library")
    here = os.getcwd()
    os.chdir(folder)
    try:
        namespace: dict = {}
        for block in python_blocks():
            exec(compile(block, PAGE, "exec"), namespace)
    finally:
        os.chdir(here)
    return folder, namespace


@pytest.mark.slow
def test_the_notebook_gives_what_the_four_scripts_give(page, tmp_path):
    folder, nb = page
    assert len(python_blocks()) >= 2
    scripts = tmp_path / "scripts"
    # phase 1: the same files, the checkpoints byte for byte (same folder name: same meta)
    run_exp.main(
        f"{COMMON} --loaders AC --standard_epochs 3 --linear_epochs 0 --save_models "
        f"--constant_save --save_path {scripts}/adv".split()
    )
    written = sorted(os.listdir(folder / "nb" / "adv"))
    assert written == sorted(os.listdir(scripts / "adv"))
    for name in written:
        if name.endswith(".pkl"):
            mine = (folder / "nb" / "adv" / name).read_bytes()
            assert mine == (scripts / "adv" / name).read_bytes(), name
    # adv.checkpoint(2) is parameters_checkpoint_2.pkl
    assert same_arrays(nb["theta"], load_model(str(scripts / "adv/parameters_checkpoint_2.pkl")))
    assert nb["theta"].meta["epoch"] == 2
    # phase 2 from that checkpoint: the same final network and results
    base = folder / "nb/adv/parameters_checkpoint_2.pkl"
    run_exp.main(
        f"{COMMON} --loaders AC --linear_epochs 2 --base_model_path {base} --centering "
        f"--second_lr 0.01 --save_models --save_path {scripts}/lin".split()
    )
    final = load_model(str(folder / "nb/lin/parameters_final.pkl"))
    assert same_arrays(final, load_model(str(scripts / "lin/parameters_final.pkl")))
    assert same_arrays(final, nb["lin"].final)
    assert load_pickle(str(folder / "nb/lin/results.pkl")) == load_pickle(
        str(scripts / "lin/results.pkl")
    )
    # the kernel
    kernel = calculate_kernel.main(
        f"--dataset_size 100 --class_index 0 --random_seed 0 --model_path {base}".split()
    )["kernel"]
    np.testing.assert_array_equal(nb["K"], kernel)
    # the robustness figures
    results = eval_and_make_adv.main(
        f"--model_path {scripts}/lin/parameters_final.pkl --linear --centering --autoattack "
        "--n_test 60 --eps 32 --random_seed 0".split()
    )
    r = nb["r"]
    assert (r["clean"], r["pgd"], r["autoattack"]) == (
        results["acc_clean"],
        results["acc_dirty"],
        results["acc_autoattack"],
    )
    assert r["warnings"] == results["warnings"]
    # the second block: the phase-1 network from its file, PGD and PGD-margin
    assert 0 <= nb["r1"]["margin"] <= nb["r1"]["clean"] and "autoattack" not in nb["r1"]


@pytest.mark.slow
def test_a_run_without_a_folder_writes_nothing_and_keeps_its_checkpoints(page, tmp_path):
    folder, nb = page
    os.chdir(tmp_path)
    ds = data.load_dataset("digits")
    run = experiment.phase1(ds, model="cnn_small", adversarial=True, eps=32 / 255, epochs=3)
    assert os.listdir(tmp_path) == []
    assert run.save_dir is None and run.results == nb["adv"].results
    assert [row["loss"] for row in run.metrics] == [row["loss"] for row in nb["adv"].metrics]
    for epoch in (0, 0.125, 1, 2):
        kept = run.checkpoint(epoch)
        assert kept.path is None
        saved = load_model(str(folder / f"nb/adv/parameters_checkpoint_{epoch}.pkl"))
        assert same_arrays(kept, saved) and kept.meta["epoch"] == saved.meta["epoch"]
    assert same_arrays(run.final, nb["adv"].final)
    with pytest.raises(UserError, match="saved no parameters_checkpoint_7.pkl"):
        run.checkpoint(7)


def test_bad_values_raise_the_scripts_one_line_errors(tmp_path):
    ds = data.load_dataset("digits")
    with pytest.raises(UserError, match="--loaders 'XC' must be two letters of C, A, F"):
        experiment.run(ds, model="cnn_small", loaders="XC", standard_epochs=0, linear_epochs=0)
    with pytest.raises(UserError, match="--batch_size 5000 exceeds the 1437 training images"):
        experiment.phase1(ds, model="cnn_small", epochs=1, batch_size=5000)
    checkpoint = experiment.phase1(
        ds, model="cnn_small", epochs=0, constant_save=False, test=False
    ).final
    with pytest.raises(UserError, match=r"--class_index 10 is out of range for digits"):
        kernels.empirical_ntk(checkpoint, ds.x_train[:4], class_index=10)
    with pytest.raises(UserError, match="unknown attack 'fgsm'"):
        attacks.robustness(checkpoint, ds.x_test[:4], ds.y_test[:4], eps=0.1, attacks=("fgsm",))
    with pytest.raises(UserError, match="cannot evaluate a str"):
        attacks.robustness("model.pkl", ds.x_test[:4], ds.y_test[:4], eps=0.1)


def test_the_public_api_is_exported_from_the_package():
    import ntk_evolution

    for name in ntk_evolution.__all__:
        assert getattr(ntk_evolution, name) is not None, name
    assert ntk_evolution.phase1 is experiment.phase1
    assert ntk_evolution.robustness is attacks.robustness
    assert ntk_evolution.empirical_ntk is kernels.empirical_ntk


def library_files() -> list[str]:
    package = os.path.join(ROOT, "ntk_evolution")
    return [
        os.path.join(folder, name)
        for folder, _, names in os.walk(package)
        for name in names
        if name.endswith(".py")
    ]


def test_no_namespace_below_the_scripts_and_io_does_not_import_cli():
    """Only cli.py sees argparse: no other module of the package imports it or takes a
    Namespace, and io/ does not import cli."""
    for path in library_files():
        relative = os.path.relpath(path, ROOT)
        tree = ast.parse(open(path).read())
        imports = [
            alias.name if isinstance(node, ast.Import) else node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (node.names if isinstance(node, ast.Import) else [None])
        ]
        if relative != os.path.join("ntk_evolution", "cli.py"):
            assert "argparse" not in imports, relative
            assert "Namespace" not in open(path).read(), relative
        if os.sep + "io" + os.sep in path:
            assert "ntk_evolution.cli" not in imports, relative


def test_the_librarys_run_flags_are_run_exps_flags_with_its_defaults():
    """experiment.RUN_FLAGS (what a library run records in its checkpoints) names every flag
    of run_exp.py's own with the same default, so a library run and the script record alike."""
    parser = run_exp.build_parser()
    defaults = {action.dest: action.default for action in parser._actions}
    assert {name: defaults[name] for name in experiment.RUN_FLAGS} == experiment.RUN_FLAGS
    shared = {"data_root", "trust_pickle", "coordinator_address", "num_processes", "process_id"}
    assert set(defaults) - {"help"} == set(experiment.RUN_FLAGS) | shared | {
        "compile_cache",
        "no_compile_cache",
    }


def test_the_library_on_the_cifar_format_fixture(tmp_path, skip_cifar_md5):
    """The notebook's calls on 3-channel 32x32 images: a phase-1 run written and read back,
    phase 2 from one of its checkpoints kept in memory, the kernel against the explicit Jacobian
    product, and the robustness figures against eval_and_make_adv.py's on the same file."""
    write_cifar10_fixture(str(tmp_path / "data"), n_train=60, n_test=20)
    ds = data.load_dataset("cifar10", str(tmp_path / "data"))
    assert ds.image_shape == (32, 32, 3)
    adv = experiment.phase1(
        ds, model="mlp_skinny", adversarial=True, eps=8 / 255, epochs=2, batch_size=30,
        n_test=10, save_dir=str(tmp_path / "adv"),
    )  # fmt: skip
    theta = adv.checkpoint(1)
    assert same_arrays(theta, load_model(str(tmp_path / "adv/parameters_checkpoint_1.pkl")))
    lin = experiment.phase2(theta, ds, centering=True, lr=0.01, epochs=1, batch_size=30, n_test=10)
    assert lin.save_dir is None and lin.linear and lin.centering
    assert lin.results["linear"]["clean"] is not None
    images = ds.x_train[:4]
    kernel = kernels.empirical_ntk(theta, images, class_index=2)
    reference = explicit_ntk(theta.model, theta.params, theta.net_state, images, images, 2)
    np.testing.assert_allclose(kernel, reference, rtol=1e-4, atol=1e-6)
    r = attacks.robustness(adv, ds.x_test[:10], ds.y_test[:10], eps=8 / 255, attacks=("pgd",))
    results = eval_and_make_adv.main(
        f"--model_path {tmp_path}/adv/parameters_final.pkl --n_test 10 --eps 8 "
        f"--data_root {tmp_path}/data".split()
    )
    assert (r["clean"], r["pgd"]) == (results["acc_clean"], results["acc_dirty"])
    assert r["pgd"] <= r["clean"]
