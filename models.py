"""Haiku models. Every model is `forward(x, is_training) -> logits` with x NHWC in [0, 1],
transformed with state (BatchNorm running statistics live in `net_state`).

- resnet18: CIFAR variant (3x3 stride-1 stem, no max-pool), BatchNorm, 4 stages of 2 blocks.
- mlp_skinny / mlp_wide: two hidden ReLU layers of 256 / 2048.
- cnn_small: three 3x3 conv + BatchNorm + ReLU layers, global average pool, linear; trains in
  seconds per epoch on digits on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp

from utils import UserError

MODELS = ("resnet18", "mlp_skinny", "mlp_wide", "cnn_small")
BN_DECAY = 0.9  # PyTorch's BatchNorm momentum 0.1


def _batch_norm(name: str | None = None) -> hk.BatchNorm:
    return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=BN_DECAY, name=name)


class ReLU(hk.Module):
    """ReLU as a parameter-free module: the parameter tree is unchanged, and every layer's output
    can be recorded with hk.experimental.intercept_methods (see similarity.py)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


def _conv(channels: int, kernel: int, stride: int = 1, name: str | None = None) -> hk.Conv2D:
    # PyTorch-style symmetric padding (k // 2 on each side), also for stride 2.
    pad = kernel // 2
    return hk.Conv2D(
        channels,
        kernel,
        stride=stride,
        padding=((pad, pad), (pad, pad)),
        with_bias=False,
        name=name,
    )


class BasicBlock(hk.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus (projected) shortcut, then ReLU."""

    def __init__(self, channels: int, stride: int, name: str | None = None):
        super().__init__(name=name)
        self.channels = channels
        self.stride = stride

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        out = _conv(self.channels, 3, self.stride, name="conv1")(x)
        out = ReLU(name="relu1")(_batch_norm("bn1")(out, is_training))
        out = _conv(self.channels, 3, 1, name="conv2")(out)
        out = _batch_norm("bn2")(out, is_training)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.channels:
            shortcut = _conv(self.channels, 1, self.stride, name="shortcut_conv")(x)
            shortcut = _batch_norm("shortcut_bn")(shortcut, is_training)
        return ReLU(name="relu_out")(out + shortcut)


def resnet18(n_classes: int) -> Callable:
    def forward(x: jax.Array, is_training: bool) -> jax.Array:
        out = _conv(64, 3, 1, name="stem_conv")(x)
        out = ReLU(name="stem_relu")(_batch_norm("stem_bn")(out, is_training))
        for stage, channels in enumerate((64, 128, 256, 512)):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                out = BasicBlock(channels, stride, name=f"stage{stage}_block{block}")(
                    out, is_training
                )
        out = jnp.mean(out, axis=(1, 2))
        return hk.Linear(n_classes, name="classifier")(out)

    return forward


def mlp(n_classes: int, width: int) -> Callable:
    def forward(x: jax.Array, is_training: bool) -> jax.Array:
        del is_training  # no BatchNorm
        out = hk.Flatten()(x)
        out = ReLU(name="relu1")(hk.Linear(width, name="hidden1")(out))
        out = ReLU(name="relu2")(hk.Linear(width, name="hidden2")(out))
        return hk.Linear(n_classes, name="classifier")(out)

    return forward


def cnn_small(n_classes: int) -> Callable:
    def forward(x: jax.Array, is_training: bool) -> jax.Array:
        out = x
        for i, (channels, stride) in enumerate(((32, 1), (64, 2), (64, 2))):
            out = _conv(channels, 3, stride, name=f"conv{i}")(out)
            out = ReLU(name=f"relu{i}")(_batch_norm(f"bn{i}")(out, is_training))
        out = jnp.mean(out, axis=(1, 2))
        return hk.Linear(n_classes, name="classifier")(out)

    return forward


def get_model(name: str, n_classes: int) -> hk.TransformedWithState:
    """The Haiku model `name` with `n_classes` outputs; apply(params, state, None, x, train)."""
    builders = {
        "resnet18": resnet18,
        "mlp_skinny": lambda n: mlp(n, 256),
        "mlp_wide": lambda n: mlp(n, 2048),
        "cnn_small": cnn_small,
    }
    if name not in builders:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return hk.without_apply_rng(hk.transform_with_state(builders[name](n_classes)))


def init_model(
    model: hk.TransformedWithState, key: jax.Array, image_shape: tuple[int, ...]
) -> tuple[hk.Params, hk.State]:
    """Initial (params, net_state) for images of `image_shape` (H, W, C). BatchNorm's running
    variance starts at 1 as in PyTorch (Haiku's starts at 0, which makes inference mode divide by
    sqrt(1e-5) per layer and overflow in ResNet-18 at initialisation)."""
    params, net_state = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), True)
    net_state = {
        name: {**state, "average": jnp.ones_like(state["average"])}
        if name.endswith("var_ema")
        else state
        for name, state in net_state.items()
    }
    return params, net_state
