"""Haiku models. Every model is `forward(x, is_training) -> logits` with x NHWC in [0, 1],
transformed with state (BatchNorm running statistics live in `net_state`).

- resnet18: CIFAR variant (3x3 stride-1 stem, no max-pool), BatchNorm, 4 stages of 2 blocks.
- mlp_skinny / mlp_wide: two hidden ReLU layers of 256 / 2048.
- cnn_small: three 3x3 conv + BatchNorm + ReLU layers, global average pool, linear; trains in
  seconds per epoch on digits on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from ntk_evolution.utils import UserError

MODELS = ("resnet18", "mlp_skinny", "mlp_wide", "cnn_small")
BN_DECAY = 0.9  # PyTorch's BatchNorm momentum 0.1


def _batch_norm(name: str | None = None) -> hk.BatchNorm:
    return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=BN_DECAY, name=name)


class ReLU(hk.Module):
    """ReLU as a parameter-free module: the parameter tree is unchanged, and every layer's output
    can be recorded with hk.experimental.intercept_methods (see similarity.py)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


# How convolutions are computed: "xla" (lax.conv_general_dilated, the default) or "matmul" (the
# k*k shifted views of the input side by side, times the kernel as one matrix; "auto": matmul
# on CPUs). Both use the same parameters, so checkpoints do not depend on it. On this project's
# CPU, matmul makes a ResNet-18 training step 1.3x faster, but the test suite (mostly kernels
# and attacks on small networks) ran 1.17x slower with it (benchmarks/RESULTS.md).
CONV_IMPL = os.environ.get("NTK_CONV_IMPL", "xla")


_override: list[str] = []  # set while tracing under use_conv_impl


def conv_impl() -> str:
    impl = _override[-1] if _override else CONV_IMPL
    if impl not in ("auto", "matmul", "xla"):
        raise UserError(f"NTK_CONV_IMPL={impl!r}: use auto, matmul or xla")
    if impl == "auto":
        return "matmul" if jax.default_backend() == "cpu" else "xla"
    return impl


@contextlib.contextmanager
def use_conv_impl(impl: str):
    """Convolutions traced inside this context use `impl` (auto, matmul or xla), whatever
    NTK_CONV_IMPL says; ntk.py uses it inside the functions it jits."""
    _override.append(impl)
    try:
        yield
    finally:
        _override.pop()


def conv_patches(x: jax.Array, kernel: int, stride: int, pad: int) -> jax.Array:
    """(N, H', W', k*k*C): the k*k strided views of x (N, H, W, C), zero-padded by `pad` on each
    side, concatenated along channels in (row, column, channel) order, which is the HWIO order of
    a (k, k, C, O) kernel reshaped to (k*k*C, O). A convolution is patches @ that matrix."""
    n, h, width, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h_out = (h + 2 * pad - kernel) // stride + 1
    w_out = (width + 2 * pad - kernel) // stride + 1
    views = [
        padded[
            :, i : i + stride * (h_out - 1) + 1 : stride, j : j + stride * (w_out - 1) + 1 : stride
        ]
        for i in range(kernel)
        for j in range(kernel)
    ]
    return views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)


def conv_as_matmul(x: jax.Array, w: jax.Array, stride: int, pad: int) -> jax.Array:
    """The convolution of x (N, H, W, C) with w (k, k, C, O) (stride, symmetric zero padding) as
    one matrix product of conv_patches with w reshaped to (k*k*C, O)."""
    k, _, c, _ = w.shape
    return conv_patches(x, k, stride, pad) @ w.reshape(k * k * c, -1)


class Conv(hk.Module):
    """A k x k convolution without bias, PyTorch-style symmetric padding (k // 2 on each side,
    also for stride 2). Parameter "w" (k, k, C_in, C_out) is initialised as hk.Conv2D does
    (truncated normal, stddev 1 / sqrt(fan_in)), so the parameter tree and values are those of
    hk.Conv2D."""

    def __init__(self, channels: int, kernel: int, stride: int = 1, name: str | None = None):
        super().__init__(name=name)
        self.channels, self.kernel, self.stride = channels, kernel, stride

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel, self.kernel, x.shape[-1], self.channels)
        init = hk.initializers.TruncatedNormal(stddev=1.0 / np.sqrt(np.prod(shape[:-1])))
        w = hk.get_parameter("w", shape, x.dtype, init=init)
        pad = self.kernel // 2
        if conv_impl() == "matmul":
            return conv_as_matmul(x, w, self.stride, pad)
        return jax.lax.conv_general_dilated(
            x,
            w,
            window_strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


def _conv(channels: int, kernel: int, stride: int = 1, name: str | None = None) -> Conv:
    return Conv(channels, kernel, stride, name=name)


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
        # zero output weights, as the original's ResNet (logits w_init=zeros): at initialisation
        # the logits are 0 and the NTK is the kernel of the last layer's features alone
        return hk.Linear(n_classes, w_init=jnp.zeros, name="classifier")(out)

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


@functools.cache
def get_model(name: str, n_classes: int) -> hk.TransformedWithState:
    """The Haiku model `name` with `n_classes` outputs; apply(params, state, None, x, train).
    The same object for the same arguments, so that functions compiled for it (keyed by the
    model, e.g. ntk.make_factor_fn) are reused across checkpoints."""
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
    return _compiled_init(model, tuple(image_shape))(key)


@functools.lru_cache(maxsize=32)
def _compiled_init(model: hk.TransformedWithState, image_shape: tuple[int, ...]) -> Callable:
    """init_model as one compiled program per model and image shape: run op by op, Haiku's
    initialisers compile dozens of small programs (one per shape of each random draw). The
    values are bit-identical to the op-by-op ones (every model, both image sizes, checked on
    the 2-core machine; tests/test_data_models.py checks it)."""

    def init(key):
        params, net_state = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), True)
        net_state = {
            name: {**state, "average": jnp.ones_like(state["average"])}
            if name.endswith("var_ema")
            else state
            for name, state in net_state.items()
        }
        return params, net_state

    return jax.jit(init)
