"""Colour images everywhere: the nine NTK/CKA entry scripts chained on the CIFAR-format fixture
(3 channels, 32x32, torchvision's on-disk layout) with cnn_small, and the same chain on digits
(one channel). Every file kind a script writes is read back with the project's own loader and,
where another script consumes it, by that script (the chain itself does that: --resume,
--test_path, --transfer_path, --kernel_path, --train_path, analyze_kernels).

The RNN files of the automata system (no images) are read back in test_automata.py; the
CKA project's PyTorch checkpoints and `.pt` outputs on the CIFAR fixture in
test_torch_models.py; every array layout the loader must take in test_file_formats.py.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shlex
from typing import NamedTuple

import matplotlib.image
import numpy as np
import pytest
from conftest import write_cifar10_fixture
from helpers import SCRIPTS, one_line_error

import run_exp
from ntk_evolution.data import Dataset, load_dataset
from ntk_evolution.io.checkpoints import load_examples, load_kernel, load_model
from ntk_evolution.io.schemas import check_results, check_resume_state
from ntk_evolution.utils import load_pickle

pytestmark = pytest.mark.slow

EPS = 16  # in 1/255
RUN = (
    "--model cnn_small --loaders AC --standard_epochs 2 --centering --constant_save "
    f"--constant_save_linear --save_models --n_test 16 --eps {EPS} --save_path run"
)
# training batches: digits' 1437 training images in 23 steps per epoch, the CIFAR fixture's 60 in 2
BATCH = {"digits": 64, "cifar10": 30}
CKPT = "run/parameters_checkpoint_1.pkl"  # phase 1, the start of epoch 2
EXAMPLES = "run/eval/adv_examples_test_results.pkl"


class Chain(NamedTuple):
    folder: str
    ds: Dataset
    returned: dict  # what each step's main() returned, by step name


def chain_steps(data: str, batch: int) -> dict[str, tuple[str, str]]:
    """{step: (script, flags)}, in order; `data` is the dataset's flags, `batch` the training
    batch size of the first run."""
    run = f"{RUN} --batch_size {batch}"
    return {
        # phase 1 (adversarial) and one epoch of centered linearized phase 2, then --resume for
        # a second: the resume state and metrics.csv consumed
        # (tests skipped: the resumed run tests phase 2, PGD-Linf and PGD-L2)
        "train": (
            "run_exp",
            f"{data} {run} --linear_epochs 1 --skip_first_test --skip_second_test",
        ),
        "resume": ("run_exp", f"{data} {run} --linear_epochs 2 --resume"),
        "eval": (
            "eval_and_make_adv",
            f"{data} --model_path run/parameters_final.pkl --linear --centering --save_examples "
            f"--n_test 16 --eps {EPS} --bonus_dir eval",
        ),
        # example 5's examples: transfer to the phase-1 network, as images and as an attack
        "test_path": (
            "eval_and_make_adv",
            f"{data} --model_path {CKPT} --no_adv --test_path {EXAMPLES}",
        ),  # noqa: E501
        "transfer_path": (
            "eval_and_make_adv",
            f"{data} --model_path {CKPT} --n_test 16 --eps {EPS} --transfer_path {EXAMPLES} "
            "--attack_variant fgsm --margin --save_name fgsm",
        ),
        "pgd_no_start": (
            "eval_and_make_adv",
            f"{data} --model_path {CKPT} --n_test 16 --eps {EPS} --attack_variant pgd_no_start "
            "--save_name no_start --save_examples",
        ),
        "kernels": (
            "calculate_kernel",
            f"{data} --model_path run/parameters_checkpoint_0.pkl {CKPT} --dataset_size 20 "
            "--save_name k --bonus_dir kernels",
        ),
        "class_kernel": (
            "calculate_kernel",
            f"{data} --model_path {CKPT} --dataset_size 20 --class_index 0 --bonus_dir kernels",
        ),
        "full_kernel": (
            "calculate_kernel",
            f"{data} --model_path {CKPT} --dataset_size 20 --full --bonus_dir kernels",
        ),
        "features": (
            "visualize_ntk_features",
            f"{data} --model_path {CKPT} --kernel_path run/kernels/saved_kernel_class_0_20.pkl "
            "--n_images 1 --steps 40",
        ),
        "analysis": (
            "analyze_kernels",
            "run/kernels/k_epoch_0_20.pkl run/kernels/k_epoch_1_20.pkl "
            "run/kernels/saved_kernel_20_full.pkl --out_dir analysis",
        ),
        "ntk_attack": (
            "ntk_attack",
            f"{data} --kernel empirical --model_path {CKPT} "
            f"--kernel_path run/kernels/k_epoch_1_20.pkl --n_test 16 --pgd_steps 2 --eps {EPS} "
            "--out_dir ntk",
        ),
        "ntk_transfer": (
            "eval_and_make_adv",
            f"{data} --model_path {CKPT} --no_adv --test_path ntk/adv_examples_ntk.pkl",
        ),
        "eigen_features": (
            "eigen_features",
            f"{data} --kernel relu_ntk --dataset_size 20 --n_test 10 --components 2 --top_k 1,5 "
            f"--pgd_steps 2 --eps {EPS} --classes 3 8 --gradient_images 2 --out_dir eig",
        ),
        "robustify": (
            "robustify_dataset",
            f"{data} --kernel relu_ntk --dataset_size 20 --steps 2 --n_test 10 --pgd_steps 2 "
            f"--eps {EPS} --out_dir robust --save_name colour",
        ),
        "train_on_robust": (
            "run_exp",
            f"{data} --model cnn_small --train_path robust/robust_colour.pkl --standard_epochs 1 "
            "--linear_epochs 0 --batch_size 10 --skip_first_test --skip_second_test "
            "--save_path from_robust",
        ),
        "cka": (
            "cka",
            f"{data} --model cnn_small --model_path run/parameters_checkpoint_0.pkl {CKPT} "
            f"--n_images 20 --adv 0 1 --eps {EPS} --savedir cka --suffix colour",
        ),
    }


@pytest.fixture(scope="module", params=["digits", "cifar10"])
def chain(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        if request.param == "cifar10":
            write_cifar10_fixture("data", n_train=60, n_test=20)
            import torchvision.datasets.cifar as cifar  # only the md5 check is bypassed

            patch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
            data, ds = "--dataset cifar10 --data_root data", load_dataset("cifar10", "data")
        else:
            data, ds = "--dataset digits", load_dataset("digits")
        returned = {
            step: SCRIPTS[script](shlex.split(flags))
            for step, (script, flags) in chain_steps(data, BATCH[request.param]).items()
        }
        yield Chain(folder, ds, returned)


def path(chain: Chain, *parts: str) -> str:
    return os.path.join(chain.folder, *parts)


def written(chain: Chain, pattern: str) -> list[str]:
    found = sorted(glob.glob(path(chain, "**", pattern), recursive=True))
    return [f for f in found if "/data/" not in f]  # not the fixture's own files


def test_the_chain_runs_on_the_datasets_own_images(chain):
    h, w, c = chain.ds.image_shape
    expected = (32, 32, 3) if chain.ds.name == "cifar10" else (8, 8, 1)
    assert (h, w, c) == expected


def test_n_train_keeps_the_first_training_images(chain, capsys):
    """run_exp.py --n_train N trains on the first N images of the dataset's training split, or
    of --train_path's set: fewer than a batch is refused, naming N, before anything is written;
    otherwise the run's training images are those N."""
    data = f"--dataset {chain.ds.name}" + (
        " --data_root data" if chain.ds.name == "cifar10" else ""
    )
    out = path(chain, "n_train")
    for source, n in (("", 20), ("--train_path robust/robust_colour.pkl", 5)):
        message = one_line_error(
            SCRIPTS["run_exp"],
            f"{data} --model cnn_small {source} --n_train {n} --batch_size 30 --save_path {out}",
            capsys,
        )
        assert f"--batch_size 30 exceeds the {n} training images" in message
    assert not os.path.exists(out)
    # enough for a batch: the run's training images are the source's first N, in order
    robust = load_examples("robust/robust_colour.pkl", chain.ds.image_shape, chain.ds.n_classes)
    for source, (x, y) in (("", (chain.ds.x_train, chain.ds.y_train)),
                           ("--train_path robust/robust_colour.pkl", robust)):  # fmt: skip
        argv = f"{data} --model cnn_small {source} --n_train 3 --batch_size 2 --save_path {out}"
        ds = run_exp.training_data(run_exp.parse_args(shlex.split(argv)))
        np.testing.assert_array_equal(ds.x_train, x[:3])
        np.testing.assert_array_equal(ds.y_train, y[:3])


# every kind of file the chain writes: each must be present, and each is read back below
FILE_KINDS = {
    "phase-1 checkpoint": "parameters_checkpoint_[0-9]*.pkl",
    "fractional checkpoint": "parameters_checkpoint_0.125.pkl",
    "linear checkpoint": "parameters_checkpoint_linear_*.pkl",
    "final checkpoint": "parameters_final.pkl",
    "resume state": "resume_state.pkl",
    "run results": "results.pkl",
    "metrics": "metrics.csv",
    "test results": "test_results_*.pkl",
    "adversarial examples": "adv_examples_*.pkl",
    "averaged kernel": "k_epoch_*_20.pkl",
    "class kernel": "saved_kernel_class_0_20.pkl",
    "full kernel": "saved_kernel_20_full.pkl",
    "eigen-feature images": "ntk_eig_images_class_0_20.pkl",
    "kernel evolution table": "kernel_evolution.csv",
    "kernel evolution JSON": "kernel_evolution.json",
    "kernel distances": "kernel_distances.json",
    "NTK attack summary": "ntk_attack_*.json",
    "eigen-feature table": "eigen_features_*.csv",
    "eigen-feature JSON": "eigen_features_*.json",
    "eigen-feature gradients": "eigen_features_*_gradients.pkl",
    "robust set": "robust_colour.pkl",
    "CKA result": "cka_colour.pkl",
    "picture": "*.png",
}


@pytest.mark.parametrize("kind", sorted(FILE_KINDS))
def test_every_file_kind_is_written(chain, kind):
    assert written(chain, FILE_KINDS[kind]), f"no {kind} ({FILE_KINDS[kind]}) was written"


def test_every_pickle_written_loads_with_the_safe_loader(chain):
    pickles = written(chain, "*.pkl")
    assert len(pickles) > 25
    for file in pickles:
        load_pickle(file)  # no --trust_pickle: only arrays and plain containers


def test_checkpoints_read_back_as_the_network(chain):
    checkpoints = written(chain, "parameters_*.pkl")
    assert len(checkpoints) >= 6
    for file in checkpoints:
        loaded = load_model(file)  # every tree checked against a cnn_small of these images
        assert tuple(loaded.meta["image_shape"]) == tuple(chain.ds.image_shape)
        assert loaded.meta["dataset"] == chain.ds.name


def test_resume_state_and_metrics_read_back_and_were_resumed(chain):
    state = check_resume_state(load_pickle(path(chain, "run", "resume_state.pkl")), "resume")
    assert (state["phase"], state["epoch"]) == (2, 2)
    with open(path(chain, "run", "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = [(r["phase"], r["epoch"]) for r in rows if r["loss"]]
    assert epochs == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]  # kept, then appended


def test_results_read_back(chain):
    for file in written(chain, "results.pkl") + written(chain, "test_results_*.pkl"):
        results = check_results(load_pickle(file), file)
        for key, value in results.items():
            if key.startswith("acc_") and value is not None:
                assert 0 <= value <= 1, (file, key)
    run = load_pickle(path(chain, "run", "results.pkl"))
    assert set(run["linear"]) == {"clean", "linf", "l2"}  # PGD-Linf and PGD-L2 on colour
    assert run == chain.returned["resume"]


def test_examples_read_back_in_nchw_within_the_eps_ball(chain):
    h, w, c = chain.ds.image_shape
    for file in written(chain, "adv_examples_*.pkl"):
        raw = load_pickle(file)
        assert raw["images"].shape[1:] == (c, h, w), file
        images, labels = load_examples(file, chain.ds.image_shape, chain.ds.n_classes)
        n = len(images)
        np.testing.assert_array_equal(labels, chain.ds.y_test[:n])
        delta = images - chain.ds.x_test[:n]
        assert np.abs(delta).max() <= EPS / 255 + 1e-6, file
        assert np.abs(delta).max() > 0.5 * EPS / 255, file  # it moved
    transfer = chain.returned["test_path"]
    assert transfer["acc_clean"] is None and 0 <= transfer["acc_transfer"] <= 1
    assert len(transfer["predictions_clean"]) == 16
    assert chain.returned["transfer_path"]["acc_transfer"] is not None
    assert 0 <= chain.returned["ntk_transfer"]["acc_transfer"] <= 1


def test_kernels_read_back_and_feed_the_analyses(chain):
    kernels = path(chain, "run", "kernels")
    for name in ("k_epoch_0_20.pkl", "k_epoch_1_20.pkl", "saved_kernel_class_0_20.pkl"):
        record = load_kernel(os.path.join(kernels, name))
        assert record["kernel"].shape == (20, 20) and record["dataset"] == chain.ds.name
        np.testing.assert_array_equal(record["labels"], chain.ds.y_train[record["indices"]])
    full = load_kernel(os.path.join(kernels, "saved_kernel_20_full.pkl"), allow_full=True)
    assert full["kernel"].shape == (200, 200)
    np.testing.assert_allclose(
        full["kernel"].reshape(10, 20, 10, 20)[0, :, 0],
        load_kernel(os.path.join(kernels, "saved_kernel_class_0_20.pkl"))["kernel"],
        rtol=1e-5,
        atol=1e-6 * np.abs(full["kernel"]).max(),
    )
    assert len(json.loads(open(path(chain, "analysis", "kernel_evolution.json")).read())) == 2


def test_eigen_feature_images_are_the_datasets_shape(chain):
    record = load_pickle(path(chain, "run", "ntk_eig_images_class_0_20.pkl"))
    assert record["pos_images"].shape == (1, *chain.ds.image_shape)
    assert record["w_image"].shape == chain.ds.image_shape
    for images in (record["pos_images"], record["neg_images"], record["w_image"]):
        assert images.min() >= 0 and images.max() <= 1


def test_robust_set_reads_back_and_trains_a_network(chain):
    images, labels = load_examples(
        path(chain, "robust", "robust_colour.pkl"), chain.ds.image_shape, chain.ds.n_classes
    )
    assert images.shape == (20, *chain.ds.image_shape) and len(labels) == 20
    history = load_pickle(path(chain, "robust", "robust_colour.pkl"))["history"]
    assert np.all(np.array(history["adversarial_loss"]) >= history["clean_loss"])
    state = check_resume_state(load_pickle(path(chain, "from_robust", "resume_state.pkl")), "")
    assert (state["phase"], state["epoch"]) == (2, 0)  # phase 1 ran on the robust set


def test_cka_result_reads_back(chain):
    record = load_pickle(path(chain, "cka", "cka_colour.pkl"))
    n = len(record["layers0"])
    assert record["debiased"].shape == (n, n) and n >= 3


def test_tables_and_json_read_back(chain):
    for file in written(chain, "*.json"):
        with open(file) as f:
            assert json.load(f), file
    for file in written(chain, "*.csv"):
        with open(file, newline="") as f:
            assert list(csv.DictReader(f)), file


def test_pictures_read_back(chain):
    pictures = written(chain, "*.png")
    assert len(pictures) >= 10
    for file in pictures:
        image = matplotlib.image.imread(file)
        assert image.ndim == 3 and min(image.shape[:2]) > 100, file
