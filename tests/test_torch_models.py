"""PyTorch networks for CKA (ntk_evolution/similarity/torch_models.py): checkpoints in the CKA
project's format, layer features by forward hooks, and torchattacks' PGD in its eps-balls."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ntk_evolution.data import load_dataset
from ntk_evolution.similarity.torch_models import (
    LAYER_TYPES,
    TORCH_MODELS,
    layer_features,
    layer_names,
    load_torch_model,
    pgd_examples,
)
from ntk_evolution.utils import UserError


@pytest.fixture(scope="module")
def wrn_checkpoint(tmp_path_factory):
    """A random WRN-28-1 saved as the CKA project saves it: {'state_dict'} of a DataParallel
    model ('module.' prefixes), in a .pth.tar file."""
    torch.manual_seed(0)
    network = TORCH_MODELS["wrn_28_1"](10)
    for module in network.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("wrn") / "cifar10_wrn_28_1_last.pth.tar"
    state = {f"module.{k}": v for k, v in network.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, path)
    return str(path), network.eval()


def test_checkpoint_in_the_cka_projects_format_loads_to_the_same_network(wrn_checkpoint):
    path, network = wrn_checkpoint
    loaded = load_torch_model("wrn_28_1", path, 10)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), network(x))
    assert sum(p.numel() for p in TORCH_MODELS["wrn_28_4"](10).parameters()) == pytest.approx(
        5.85e6, rel=0.01
    )  # WRN-28-4's size


def test_hooked_features_are_the_modules_outputs(wrn_checkpoint):
    _, network = wrn_checkpoint
    x = torch.rand(3, 3, 32, 32)
    names = ["conv1", "block1.layer.0.relu1", "block3.layer.3.bn2", "avgpool", "fc"]
    features = layer_features(network, names, x)
    with torch.no_grad():
        conv = network.conv1(x)
        block = network.block1.layer[0]
        expected_relu = torch.relu(block.bn1(conv))
        logits = network(x)
    np.testing.assert_allclose(features[0], conv.flatten(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(features[1], expected_relu.flatten(1).numpy(), rtol=1e-6)
    assert features[2].shape == (3, 64 * 8 * 8) and features[3].shape == (3, 64)
    np.testing.assert_allclose(features[4], logits.numpy(), rtol=1e-5, atol=1e-6)


def test_all_layers_are_every_conv_bn_relu_pool_and_linear_module(wrn_checkpoint):
    _, network = wrn_checkpoint
    names = layer_names(network, "all", "--model0_layers")
    modules = dict(network.named_modules())
    assert all(isinstance(modules[n], LAYER_TYPES) for n in names)
    assert names[0] == "conv1" and names[-1] == "fc" and "avgpool" in names
    # WRN-28: 12 blocks of 2 BN, 2 ReLU, 2 conv; 2 shortcuts; stem conv, final BN, ReLU, pool, fc
    assert len(names) == 12 * 6 + 2 + 5
    assert layer_names(network, "fc, block1.layer.0.conv1", "--x") == ["fc", "block1.layer.0.conv1"]
    with pytest.raises(UserError, match="no module 'fc2'"):
        layer_names(network, "fc2", "--model0_layers")


def test_bad_torch_checkpoints_are_one_sentence(wrn_checkpoint, tmp_path):
    path, _ = wrn_checkpoint
    with pytest.raises(UserError, match="does not fit --model wrn_28_4"):
        load_torch_model("wrn_28_4", path, 10)
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable PyTorch checkpoint"):
        load_torch_model("wrn_28_1", str(garbage), 10)
    nan = tmp_path / "nan.pth.tar"
    state = torch.load(path, weights_only=True)["state_dict"]
    state["module.fc.weight"] = torch.full_like(state["module.fc.weight"], float("nan"))
    torch.save({"state_dict": state}, nan)
    with pytest.raises(UserError, match="fc.weight has NaN"):
        load_torch_model("wrn_28_1", str(nan), 10)


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_torchattacks_pgd_stays_in_its_ball_and_raises_the_loss(wrn_checkpoint, norm, eps):
    _, network = wrn_checkpoint
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        y = network(x).argmax(1)
    adversarial = pgd_examples(network, x, y, norm, eps, steps=5, seed=0)
    delta = (adversarial - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-5
    assert float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(network(adversarial), y) > loss(network(x), y)


def load_script(relative: str):
    """A script of scripts/ as a module."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("script", os.path.join(root, relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_cka_checkpoint(network: torch.nn.Module, path) -> None:
    """As the CKA project saves: {'state_dict'} of a DataParallel model ('module.' prefixes)."""
    state = {f"module.{k}": v for k, v in network.state_dict().items()}
    torch.save({"state_dict": state}, path)


def train_briefly(network: torch.nn.Module, ds, steps: int, batch: int = 32) -> list[float]:
    """A few steps of L-inf PGD adversarial training (eps 8/255, 3 steps) on the fixture's
    training images; returns each step's clean loss on its batch, in eval mode, before the step."""
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy
    losses = []
    for step in range(steps):
        rows = slice(step * batch, (step + 1) * batch)
        x = torch.from_numpy(np.ascontiguousarray(ds.x_train[rows].transpose(0, 3, 1, 2)))
        y = torch.from_numpy(ds.y_train[rows].astype(np.int64))
        network.eval()
        adversarial = pgd_examples(network, x, y, "linf", 8 / 255, steps=3, seed=step)
        with torch.no_grad():
            losses.append(float(loss_fn(network(x), y)))
        network.train()
        optimizer.zero_grad()
        loss_fn(network(adversarial), y).backward()
        optimizer.step()
    return losses


# The CKA project's README commands, verbatim (its seed README in the project's history)
SEED_COMMANDS = [
    "CUDA_VISIBLE_DEVICES=0 python cka.py --model wrn_28_4 --dataset cifar10 --model0_layers all "
    "--model1_layers all --model_path ./pretrained/cifar10_wrn_28_4_nonrobust_last.pth.tar "
    "--savedir ./results",
    "CUDA_VISIBLE_DEVICES=0 python cka.py --model wrn_28_4 --dataset cifar10 --model0_layers all "
    "--model1_layers all --model_path ./pretrained/cifar10_wrn_28_4_robust_linf_last.pth.tar "
    "--savedir ./results --suffix adv_model",
    "CUDA_VISIBLE_DEVICES=0 python cka.py --model wrn_28_4 --dataset cifar10 --model0_layers all "
    "--model1_layers all --model_path ./pretrained/cifar10_wrn_28_4_nonrobust_last.pth.tar "
    "./pretrained/cifar10_wrn_28_4_robust_linf_last.pth.tar --savedir ./results --suffix "
    "cross_model",
]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# docs/similarity.md's example of a RobustBench model against a CKA-project checkpoint
ROBUSTBENCH_COMMAND = (
    "CUDA_VISIBLE_DEVICES=0 python cka.py --model wrn_28_4 --model_path "
    "./pretrained/cifar10_wrn_28_4_nonrobust_last.pth.tar --robustbench Ding2020MMA "
    "--threat_model Linf --model_dir ./models --savedir ./results --suffix robustbench"
)
# the names of the CKA project's output files that its utils/plots.py reads
ORIGINAL_NAMES = [
    "Model_wrn_28_4_wrn_28_4-Adv_False_False-layers_all_all-reuse_adv_False-identical_models_"
    "True-identical_attacks_True-batchsize_1024.pt",
    "Model_wrn_28_4_wrn_28_4-Adv_False_False-layers_all_all-reuse_adv_False-identical_models_"
    "True-identical_attacks_True-batchsize_1024_adv_model.pt",
    "Model_wrn_28_4_wrn_28_4-Adv_False_False-layers_all_all-reuse_adv_False-identical_models_"
    "False-identical_attacks_False-batchsize_1024_cross_model.pt",
]


def test_the_cka_projects_commands_run_as_written_and_match_an_independent_cka(
    tmp_path, monkeypatch, skip_cifar_md5
):
    from conftest import write_cifar10_fixture

    import cka
    from ntk_evolution.similarity.cka import cka_matrix, gram

    monkeypatch.chdir(tmp_path)
    write_cifar10_fixture("data")  # the default --data_root
    (tmp_path / "pretrained").mkdir()
    torch.manual_seed(0)
    robust = TORCH_MODELS["wrn_28_4"](10)
    save_cka_checkpoint(robust, "pretrained/cifar10_wrn_28_4_nonrobust_last.pth.tar")  # random
    # batches of 8: WRN-28-4's adversarial steps are most of this test's time (batches of 32
    # took 27 s, of 8 take 7 s on the 2-core machine), and learning is all that is needed
    losses = train_briefly(robust, load_dataset("cifar10", "data"), steps=6, batch=8)
    assert losses[-1] < losses[0]  # it learned something of the fixture's tints
    save_cka_checkpoint(robust, "pretrained/cifar10_wrn_28_4_robust_linf_last.pth.tar")
    results = []
    for command in SEED_COMMANDS:
        words = command.split()
        assert words[:3] == ["CUDA_VISIBLE_DEVICES=0", "python", "cka.py"]
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        results.append(cka.main([*words[3:], "--n_images", "12"]))  # scaled down for a CPU
    for suffix in ("", "_adv_model", "_cross_model"):
        assert (tmp_path / "results" / f"cka{suffix}.png").is_file()
    # the CKA project's own files, under the names its utils/plots.py reads
    for result, name in zip(results, ORIGINAL_NAMES, strict=True):
        legacy = torch.load(tmp_path / "results" / name, weights_only=False)
        np.testing.assert_array_equal(legacy["cka"], result["debiased"])
        assert legacy["model0_keys"] == result["layers0"]
        assert legacy["args"]["model"] == ["wrn_28_4"]
    # the project's plotting step: the three analyses in one figure
    plot_cka = load_script("scripts/plot_cka.py")
    assert plot_cka.main([]) == "./results/cka_plot.png"
    assert (tmp_path / "results" / "cka_plot.png").is_file()

    # independently: every layer's features by a plain forward pass per module, then the
    # full-batch debiased CKA of their Gram matrices
    x = load_dataset("cifar10", "data").x_test[:12].transpose(0, 3, 1, 2)
    networks = [
        load_torch_model("wrn_28_4", f"pretrained/cifar10_wrn_28_4_{n}_last.pth.tar", 10)
        for n in ("nonrobust", "robust_linf")
    ]
    names = layer_names(networks[0], "all", "--model0_layers")
    grams = [
        [gram(f) for f in layer_features(net, names, torch.from_numpy(np.ascontiguousarray(x)))]
        for net in networks
    ]
    for result, (a, b) in zip(results, [(0, 0), (1, 1), (0, 1)], strict=True):
        assert result["layers0"] == names and result["linear"] is None
        expected = cka_matrix(grams[a], grams[b], "debiased")
        np.testing.assert_allclose(result["debiased"], expected, rtol=1e-6, atol=1e-9)
    assert np.allclose(np.diag(results[0]["debiased"]), 1.0)


def test_robustbench_models_are_read_offline_by_robustbench_and_compared_by_cka(
    wrn_checkpoint, tmp_path, monkeypatch, skip_cifar_md5
):
    """--robustbench NAME: a missing file is one error naming it; a present one (here a random
    Ding2020MMA, a WRN-28-4 of RobustBench's zoo, saved as RobustBench serves it) is read by
    RobustBench's own loader, and its CKA against a CKA-project checkpoint, with L2 PGD inputs
    on its side, equals an independent full-batch CKA of the same features."""
    from conftest import write_cifar10_fixture

    import cka
    from ntk_evolution.similarity.cka import cka_matrix, gram
    from ntk_evolution.similarity.torch_models import import_robustbench, load_robustbench_model

    monkeypatch.chdir(tmp_path)
    write_cifar10_fixture("data")
    expected_file = "models/cifar10/Linf/Ding2020MMA.pt"
    with pytest.raises(UserError, match=f"expected its checkpoint at {expected_file}, which is"):
        load_robustbench_model("Ding2020MMA", "models", "cifar10", "Linf")
    with pytest.raises(UserError, match="did you mean Ding2020MMA"):
        load_robustbench_model("Ding2020MM", "models", "cifar10", "Linf")
    with pytest.raises(UserError, match="served by timm"):  # its loader would download it
        load_robustbench_model("Debenedetti2022Light_XCiT-S12", "models", "cifar10", "Linf")
    with pytest.raises(UserError, match="no digits models"):
        load_robustbench_model("Standard", "models", "digits", "Linf")

    _, model_dicts, BenchmarkDataset, ThreatModel = import_robustbench()
    torch.manual_seed(0)
    served = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]["Ding2020MMA"]["model"]()
    (tmp_path / "models/cifar10/Linf").mkdir(parents=True)
    save_cka_checkpoint(served.eval(), expected_file)
    loaded = load_robustbench_model("Ding2020MMA", "models", "cifar10", "Linf")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), served(x))

    path, _ = wrn_checkpoint
    layers = ["conv1", "block2.layer.0.relu1", "fc"]
    result = cka.main(
        ["--model", "wrn_28_1", "--model_path", path, "--robustbench", "Ding2020MMA",
         "--model_dir", "models", "--model0_layers", *layers, "--model1_layers", "all",
         "--adv", "0", "1", "--attack", "l2", "--eps_l2", "0.5", "--pgd_steps", "2",
         "--pgd_step_size", "0.3", "--n_images", "12",
         "--dataset_passes", "1", "--savedir", "results"]
    )  # fmt: skip
    assert result["model_paths"] == [path, expected_file]
    assert result["models"] == ["wrn_28_1", "robustbench:Ding2020MMA"]
    assert (tmp_path / "results" / "cka.png").is_file()

    # independently: side 0's clean features, side 1's on the same PGD examples (the script's
    # seed for side 1, batch 0), both by a plain hooked forward pass
    ds = load_dataset("cifar10", "data")
    images = torch.from_numpy(np.ascontiguousarray(ds.x_test[:12].transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(ds.y_test[:12].astype(np.int64))
    order = np.random.default_rng([0, 0]).permutation(12)  # the script's batch order
    images, labels = images[order], labels[order]
    adversarial = pgd_examples(loaded, images, labels, "l2", 0.5, 2, seed=0 + 1000, step_size=0.3)
    names1 = layer_names(loaded, "all", "--model1_layers")
    assert result["layers0"] == layers and result["layers1"] == names1
    grams0 = [
        gram(f) for f in layer_features(load_torch_model("wrn_28_1", path, 10), layers, images)
    ]
    grams1 = [gram(f) for f in layer_features(loaded, names1, adversarial)]
    expected = cka_matrix(grams0, grams1, "debiased")
    np.testing.assert_allclose(result["debiased"], expected, rtol=1e-6, atol=1e-9)

    # docs/similarity.md's RobustBench command, against a random WRN-28-4 as the non-robust one
    readme = open(os.path.join(ROOT, "docs", "similarity.md")).read()
    assert ROBUSTBENCH_COMMAND in readme
    (tmp_path / "pretrained").mkdir()
    torch.manual_seed(2)
    nonrobust = TORCH_MODELS["wrn_28_4"](10).eval()
    save_cka_checkpoint(nonrobust, "pretrained/cifar10_wrn_28_4_nonrobust_last.pth.tar")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    result = cka.main([*ROBUSTBENCH_COMMAND.split()[3:], "--n_images", "12"])
    legacy = (
        tmp_path
        / "results"
        / (
            "Model_wrn_28_4_Ding2020MMA-Adv_False_False-layers_all_all-reuse_adv_False-identical_"
            "models_False-identical_attacks_False-batchsize_1024_robustbench.pt"
        )
    )
    assert legacy.is_file() and (tmp_path / "results" / "cka_robustbench.png").is_file()
    names0 = layer_names(nonrobust, "all", "--model0_layers")
    grams0 = [gram(f) for f in layer_features(nonrobust, names0, images)]
    grams1 = [gram(f) for f in layer_features(loaded, names1, images)]
    expected = cka_matrix(grams0, grams1, "debiased")
    np.testing.assert_allclose(result["debiased"], expected, rtol=1e-6, atol=1e-9)


def test_reuse_adv_feeds_side_1_the_pgd_examples_of_side_0(
    wrn_checkpoint, tmp_path, monkeypatch, skip_cifar_md5
):
    """--adv 1 1 --reuse_adv on one network: both sides see the same PGD examples, so the
    matrix is symmetric with a unit diagonal; without it, each side draws its own."""
    from conftest import write_cifar10_fixture

    import cka

    monkeypatch.chdir(tmp_path)
    write_cifar10_fixture("data")
    path, _ = wrn_checkpoint
    flags = ["--model", "wrn_28_1", "--model_path", path, "--adv", "1", "1", "--pgd_steps",
             "2", "--n_images", "10", "--model0_layers", "conv1", "block2.layer.0.conv1", "fc",
             "--model1_layers", "conv1,block2.layer.0.conv1,fc"]  # fmt: skip
    shared = cka.main([*flags, "--reuse_adv", "--suffix", "reuse"])["debiased"]
    np.testing.assert_allclose(np.diag(shared), 1.0, rtol=1e-9)
    np.testing.assert_allclose(shared, shared.T, rtol=1e-9)
    separate = cka.main([*flags, "--suffix", "separate"])["debiased"]
    assert np.abs(np.diag(separate) - 1.0).max() > 1e-6
