"""PyTorch networks for the CKA analyses of PyTorch users (Cianfarani et al. 2022): the
pre-activation Wide ResNets of that project (module names as in its checkpoints, so that their
`{'state_dict': ...}` files load), torchvision's ResNet-18/50 adapted to CIFAR, and the layer
features of any of them through forward hooks.

A checkpoint is a `torch.save`d dict with 'state_dict' (a DataParallel 'module.' prefix is
dropped), or a bare state dict; it is read with `torch.load(weights_only=True)`, which builds
tensors and containers only.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ntk_evolution.utils import UserError

# the module kinds whose outputs are layers for `--model0_layers all`: the CKA project's list
# (its pooling is average pooling; a max-pooling module is named to be included)
LAYER_TYPES = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Linear,
)
TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".tar")


def is_torch_checkpoint(path: str) -> bool:
    """Whether `path` names a PyTorch checkpoint (by its suffix)."""
    return path.endswith(TORCH_SUFFIXES)


class PreActBlock(nn.Module):
    """Wide ResNet basic block, pre-activation: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the input
    (or its 1x1 projection where the width or stride changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.same_shape = c_in == c_out
        self.convShortcut = (
            None if self.same_shape else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        # the projection takes the activated input; the identity takes the raw one
        return out + (x if self.same_shape else self.convShortcut(activated))


class Stage(nn.Module):
    """`n` blocks, the first with `stride` (the checkpoint's names: blockK.layer.i)."""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                PreActBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 images: conv3x3(16), three stages of (depth - 4) / 6 blocks of
    widths 16k, 32k, 64k (strides 1, 2, 2), BN-ReLU, 8x8 average pooling, linear."""

    def __init__(self, depth: int = 28, widen: int = 4, n_classes: int = 10):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = Stage(n, widths[0], widths[1], 1)
        self.block2 = Stage(n, widths[1], widths[2], 2)
        self.block3 = Stage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(widths[3], n_classes)
        for module in self.modules():  # He initialisation, as the CKA project's networks
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, float(np.sqrt(2.0 / fan_out)))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.avgpool(self.relu(self.bn1(out)))
        return self.fc(out.flatten(1))


def cifar_resnet(name: str, n_classes: int) -> nn.Module:
    """torchvision's ResNet-18/50 for 32x32 images: a 3x3 stride-1 first convolution and no
    max pooling (the usual CIFAR adaptation)."""
    import torchvision

    network = getattr(torchvision.models, name)(num_classes=n_classes)
    network.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    network.maxpool = nn.Identity()
    return network


TORCH_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "wrn_28_1": lambda c: WideResNet(28, 1, c),
    "wrn_28_4": lambda c: WideResNet(28, 4, c),
    "wrn_28_10": lambda c: WideResNet(28, 10, c),
    "resnet18": lambda c: cifar_resnet("resnet18", c),
    "resnet50": lambda c: cifar_resnet("resnet50", c),
}


def load_torch_model(name: str, path: str, n_classes: int) -> nn.Module:
    """The network `name` with the weights of the PyTorch checkpoint at `path`, in eval mode."""
    if name not in TORCH_MODELS:
        raise UserError(
            f"{path}: a PyTorch checkpoint needs --model one of {', '.join(TORCH_MODELS)} "
            f"(got {name})"
        )
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found (check the path)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise UserError(
            f"{path}: not a loadable PyTorch checkpoint, {first_line(err)} (pass a file saved "
            "with torch.save)"
        ) from None
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: holds no state dict of tensors (expected {{'state_dict': ...}})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    network = TORCH_MODELS[name](n_classes)
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(
            f"{path}: does not fit --model {name}: {detail} (pass the model it was trained as)"
        ) from None
    check_finite(network, path)
    return network.eval()


def first_line(err: Exception) -> str:
    """The first line of an exception's message (at most 200 characters), else its type."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def check_finite(network: nn.Module, where: str) -> None:
    """A one-line error if a parameter or buffer of `network` has a NaN or infinite value."""
    for key, value in network.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f"{where}: {key} has NaN or infinite values (use another checkpoint)")


# RobustBench's names of our datasets and of its threat models
ROBUSTBENCH_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100"}
THREAT_MODELS = ("Linf", "L2", "corruptions")


def import_robustbench():
    """The `robustbench` package. Its release 1.1.1 imports AutoAttack as `autoattack` (the
    GitHub package), which PyPI ships as `pyautoattack`: that module stands in for it."""
    import sys
    import warnings

    try:
        import autoattack  # noqa: F401 - the GitHub package, where it is installed
    except ImportError:
        try:
            import pyautoattack
            import pyautoattack.state
        except ImportError:
            pyautoattack = None
        if pyautoattack is not None:
            sys.modules["autoattack"] = pyautoattack
            sys.modules["autoattack.state"] = pyautoattack.state
    try:
        with warnings.catch_warnings():  # its imports' deprecation notices, not ours to act on
            warnings.simplefilter("ignore")
            import robustbench.utils
            from robustbench.model_zoo import model_dicts
            from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except ImportError as err:
        raise UserError(
            f"--robustbench needs the robustbench package ({err}; pip install -r requirements.txt)"
        ) from None
    return robustbench.utils, model_dicts, BenchmarkDataset, ThreatModel


def robustbench_files(name: str, model_dir: str, dataset: str, threat_model: str) -> list[str]:
    """The checkpoint files RobustBench's loader reads for the model `name` (a list: an
    ensemble has one per member), after checking that its model zoo knows the name."""
    import difflib

    if dataset not in ROBUSTBENCH_DATASETS:
        raise UserError(
            f"--robustbench: RobustBench has no {dataset} models (use --dataset "
            f"{' or '.join(ROBUSTBENCH_DATASETS)})"
        )
    _, model_dicts, BenchmarkDataset, ThreatModel = import_robustbench()
    zoo = model_dicts[BenchmarkDataset(ROBUSTBENCH_DATASETS[dataset])][ThreatModel(threat_model)]
    if name not in zoo:
        close = difflib.get_close_matches(name, list(zoo), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"{len(zoo)} models, e.g. Standard"
        raise UserError(
            f"--robustbench {name}: not a {dataset} {threat_model} model of RobustBench ({hint})"
        )
    folder = os.path.join(model_dir, ROBUSTBENCH_DATASETS[dataset], threat_model)
    base = os.path.join(folder, f"{name}.pt")
    ids = zoo[name]["gdrive_id"]
    if ids is None or served_by_timm(name, dataset, threat_model):
        raise UserError(
            f"--robustbench {name}: served by timm from the Hugging Face hub, which this "
            "script does not reach (pick a model RobustBench stores as a .pt file)"
        )
    if isinstance(ids, list):  # an ensemble: RobustBench names its members' files so
        return [f"{base}_m{i}.pt" for i in range(len(ids))]
    return [base]


def served_by_timm(name: str, dataset: str, threat_model: str) -> bool:
    """Whether RobustBench's loader takes `name` from timm (downloading its weights) rather
    than from a file: its own test, a timm model named <name>_<dataset>_<threat model>."""
    import timm

    lower = name.lower().replace("-", "_")
    return timm.is_model(f"{lower}_{ROBUSTBENCH_DATASETS[dataset]}_{threat_model.lower()}")


def load_robustbench_model(name: str, model_dir: str, dataset: str, threat_model: str):
    """RobustBench's model `name`, read by its own loader from the local file(s) under
    model_dir/<dataset>/<threat_model>/ (never downloaded: a missing file is an error naming
    it). Its torch.load keeps PyTorch's default weights_only=True. Inputs are images in [0, 1]
    (RobustBench models normalise inside). In eval mode."""
    files = robustbench_files(name, model_dir, dataset, threat_model)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UserError(
            f"--robustbench {name}: expected its checkpoint at {missing[0]}, which is missing "
            "(nothing is downloaded here: fetch it where there is internet, e.g. with "
            "robustbench.utils.load_model, and copy it there or pass its --model_dir)"
        )
    rb_utils = import_robustbench()[0]
    try:
        network = rb_utils.load_model(
            name, model_dir=model_dir, dataset=ROBUSTBENCH_DATASETS[dataset],
            threat_model=threat_model,
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - RobustBench raises many kinds for a bad file
        raise UserError(
            f"{files[0]}: RobustBench could not load {name}: {first_line(err)} (replace the file "
            "with the one RobustBench serves)"
        ) from None
    check_finite(network, files[0])
    return network.eval()


def layer_names(network: nn.Module, spec: str, flag: str) -> list[str]:
    """The layers `spec` names: 'all' (every Conv, BatchNorm, ReLU, pooling and Linear module,
    in named_modules order) or comma-separated names from named_modules (e.g.
    block1.layer.0.conv1,fc)."""
    modules = dict(network.named_modules())
    if spec == "all":
        return [name for name, m in modules.items() if name and isinstance(m, LAYER_TYPES)]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in modules or not n]
    if unknown:
        kinds = sorted(n for n, m in modules.items() if n and isinstance(m, LAYER_TYPES))
        raise UserError(
            f"{flag}: no module {unknown[0]!r} in the network (e.g. {', '.join(kinds[:4])}; "
            "'all' for every Conv, BatchNorm, ReLU, pooling and Linear module)"
        )
    return names


@torch.no_grad()
def hooked_forward(
    network: nn.Module,
    names: list[str],
    x: torch.Tensor,
    keep: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """keep(output) of each module in `names` on the batch x, in the order of `names`, applied
    when its hook fires (before an in-place operation could change the output). A module called
    twice keeps its last output."""
    modules = dict(network.named_modules())
    kept: dict[str, torch.Tensor] = {}
    hooks = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: kept.__setitem__(name, keep(out.detach()))
        )
        for name in names
    ]
    try:
        network(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [kept[name] for name in names]


def layer_features(network: nn.Module, names: list[str], x: torch.Tensor) -> list[np.ndarray]:
    """The outputs of the modules `names` on the batch x (N, C, H, W) as float64 NumPy arrays
    (N, features)."""
    outputs = hooked_forward(network, names, x, lambda out: out.flatten(1).double())
    return [out.cpu().numpy() for out in outputs]


def layer_grams(network: nn.Module, names: list[str], x: torch.Tensor) -> np.ndarray:
    """Gram matrices (len(names), N, N), float64, of the modules' outputs on the batch x, each
    made when its hook fires: memory holds N x N per layer, never all layers' features."""

    def gram(out: torch.Tensor) -> torch.Tensor:
        flat = out.flatten(1).double()
        return flat @ flat.T

    return np.stack([g.cpu().numpy() for g in hooked_forward(network, names, x, gram)])


def pgd_examples(
    network: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    eps: float,
    steps: int,
    seed: int,
    step_size: float | None = None,
) -> torch.Tensor:
    """PGD examples of x against `network` with torchattacks (random start; step `step_size`,
    default 2.5 eps / steps), in the L-inf or L2 ball of radius eps, images in [0, 1]."""
    import torchattacks

    torch.manual_seed(seed)
    attack_cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    alpha = step_size or 2.5 * eps / steps
    attack = attack_cls(network, eps=eps, alpha=alpha, steps=steps, random_start=True)
    return attack(x, y)
