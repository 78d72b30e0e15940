"""Where a ResNet-18 training step's time goes on this machine: each distinct convolution of
the CIFAR ResNet-18 (batch 128 at 32x32), forward plus both gradients (input and weight), ours
(XLA's convolution, and models.conv_as_matmul) against PyTorch (channels-last), in one process;
then each part (forward, input gradient, weight gradient) of the commonest shape. Median seconds
of --repeats calls after a warm-up.

    python benchmarks/bench_conv.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ntk_evolution.models import conv_as_matmul

# (C_in, C_out, input side, kernel, stride, count in ResNet-18)
RESNET18_CONVS = (
    (3, 64, 32, 3, 1, 1),
    (64, 64, 32, 3, 1, 4),
    (64, 128, 32, 3, 2, 1),
    (128, 128, 16, 3, 1, 3),
    (64, 128, 32, 1, 2, 1),
    (128, 256, 16, 3, 2, 1),
    (256, 256, 8, 3, 1, 3),
    (128, 256, 16, 1, 2, 1),
    (256, 512, 8, 3, 2, 1),
    (512, 512, 4, 3, 1, 3),
    (256, 512, 8, 1, 2, 1),
)


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def xla_conv(x, w, stride):
    pad = w.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def ours(impl: str, part: str, x, w, dy, stride: int):
    """A jitted call of the forward, the input gradient, the weight gradient or all three."""
    conv = {"xla": xla_conv, "matmul": lambda x, w, s: conv_as_matmul(x, w, s, w.shape[0] // 2)}
    conv = conv[impl]
    parts = {
        "forward": lambda x, w, dy: conv(x, w, stride),
        "input grad": lambda x, w, dy: jax.vjp(lambda x: conv(x, w, stride), x)[1](dy)[0],
        "weight grad": lambda x, w, dy: jax.vjp(lambda w: conv(x, w, stride), w)[1](dy)[0],
        "all": lambda x, w, dy: jax.grad(
            lambda x, w: jnp.vdot(conv(x, w, stride), dy), argnums=(0, 1)
        )(x, w),
    }
    fn = jax.jit(parts[part])
    return lambda: jax.block_until_ready(fn(x, w, dy))


def theirs(part: str, x, w, dy, stride: int):
    pad = w.shape[-1] // 2
    conv = torch.nn.functional.conv2d
    grad = torch.nn.grad

    def all_parts():
        y = conv(x, w, stride=stride, padding=pad)
        y.backward(dy)

    parts = {
        "forward": lambda: conv(x.detach(), w.detach(), stride=stride, padding=pad),
        "input grad": lambda: grad.conv2d_input(x.shape, w, dy, stride=stride, padding=pad),
        "weight grad": lambda: grad.conv2d_weight(x, w.shape, dy, stride=stride, padding=pad),
        "all": all_parts,
    }
    return parts[part]


def inputs(c_in, c_out, side, kernel, stride, batch):
    rng = np.random.default_rng(0)
    out_side = (side + 2 * (kernel // 2) - kernel) // stride + 1
    x = rng.normal(size=(batch, side, side, c_in)).astype(np.float32)
    w = (rng.normal(size=(kernel, kernel, c_in, c_out)) / np.sqrt(kernel**2 * c_in)).astype(
        np.float32
    )
    dy = rng.normal(size=(batch, out_side, out_side, c_out)).astype(np.float32)
    x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(memory_format=torch.channels_last)
    w_t = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).to(memory_format=torch.channels_last)
    dy_t = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy()).to(memory_format=torch.channels_last)
    flops = 2 * batch * out_side**2 * kernel**2 * c_in * c_out
    return (
        (jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)),
        (x_t.requires_grad_(), w_t.requires_grad_(), dy_t),
        flops,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"device {jax.devices()[0].device_kind}, {os.cpu_count()} cores, batch {args.batch}")
    print("\n| conv (C_in->C_out, side, k, stride) x count | XLA s | matmul s | torch s | "
          "best ours/torch |")  # fmt: skip
    print("|---|---|---|---|---|")
    totals = np.zeros(3)
    for c_in, c_out, side, kernel, stride, count in RESNET18_CONVS:
        ours_in, torch_in, _ = inputs(c_in, c_out, side, kernel, stride, args.batch)
        row = [
            median_time(ours("xla", "all", *ours_in, stride), args.repeats),
            median_time(ours("matmul", "all", *ours_in, stride), args.repeats),
            median_time(theirs("all", *torch_in, stride), args.repeats),
        ]
        totals += count * np.array(row)
        print(
            f"| {c_in}->{c_out}, {side}, {kernel}, {stride} x{count} | {row[0]:.3f} | "
            f"{row[1]:.3f} | {row[2]:.3f} | {min(row[:2]) / row[2]:.2f} |"
        )
    print(
        f"| all 20, weighted by count | {totals[0]:.2f} | {totals[1]:.2f} | {totals[2]:.2f} | "
        f"{min(totals[:2]) / totals[2]:.2f} |"
    )
    ours_in, torch_in, flops = inputs(64, 64, 32, 3, 1, args.batch)
    print(f"\nparts of the 64->64 3x3 convolution at 32x32 ({flops / 1e9:.1f} GFLOP each):")
    print("\n| part | XLA s | matmul s | torch s | XLA GFLOP/s | torch GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for part in ("forward", "input grad", "weight grad"):
        row = [
            median_time(ours("xla", part, *ours_in, 1), args.repeats),
            median_time(ours("matmul", part, *ours_in, 1), args.repeats),
            median_time(theirs(part, *torch_in, 1), args.repeats),
        ]
        print(
            f"| {part} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | {flops / row[0] / 1e9:.0f}"
            f" | {flops / row[2] / 1e9:.0f} |"
        )


if __name__ == "__main__":
    main()
