"""Training and attack benchmark (`make bench`): each row runs our jitted step and its PyTorch
peer on the same inputs in this process; median seconds over --repeats after one warm-up.

Rows, for ResNet-18 on 32x32x3 and cnn_small on digits-shaped 8x8x1 inputs:
  phase-1 step       standard dynamics, one SGD step (momentum 0.9), BatchNorm in training mode
  adversarial step   the default: a clean SGD step, 20-step PGD-Linf against the updated model,
                     an SGD step on the PGD images (BatchNorm in training mode throughout)
  phase-2 step       linearized, centered dynamics: the loss of J(x; theta_t)(w - theta_t),
                     one SGD step on w (ours: jax.jvp; peer: torch.func.jvp), BatchNorm frozen
  eval PGD-Linf      100 steps of 2 eps / 100 from a random start, BatchNorm in inference mode

The peer: torchvision's ResNet-18 with a 3x3 stem and no max-pool (our cnn_small in torch),
channels-last, torch.set_num_threads(all cores). "share of bound": the row's FLOPs (from the
forward FLOPs F per image, XLA's cost analysis: 3F per image for a training update, 2F for a
PGD step's input gradient, 4F for the linearized update) over its time, divided by the float32
matmul rate measured here.

    python benchmarks/bench_train.py                    # both models, about 10 minutes on 2 cores
    python benchmarks/bench_train.py --models cnn_small
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from bench_ntk import forward_flops, matmul_gflops, torch_model

from ntk_evolution.attacks.evaluation import make_attack_fn
from ntk_evolution.attacks.pgd import (
    TRAIN_PGD_STEPS,
    attack_settings,
)
from ntk_evolution.dynamics import PHASE1, Dynamics
from ntk_evolution.models import get_model, init_model
from ntk_evolution.parallel import replicate, shard_batch
from ntk_evolution.training import init_train_state, make_optimizer, make_train_step, run_epoch

EPS = 8 / 255
PIPELINE_STEPS = {"resnet18": 3, "cnn_small": 50}  # steps in the input-pipeline epoch
SHAPES = {"resnet18": (32, 32, 3), "cnn_small": (8, 8, 1)}
PHASE2 = Dynamics(linear=True, centering=True, bn_train=False)
# FLOPs per image in units of the forward pass F
FLOP_MODEL = {
    "phase-1 step": lambda: 3,
    "adversarial step": lambda: 2 * 3 + TRAIN_PGD_STEPS * 2,
    "phase-2 step": lambda: 4,
    "eval PGD-Linf": lambda: 100 * 2,
}


def timed(fn: Callable[[], object], repeats: int, min_seconds: float = 1.0) -> float:
    """Median seconds of fn() after one warm-up call (compilation): over `repeats` calls, or
    more for short calls, as many as fill about `min_seconds` (at most 50)."""
    fn()
    start = time.perf_counter()
    fn()
    times = [time.perf_counter() - start]
    for _ in range(max(repeats, min(50, int(min_seconds / max(times[0], 1e-6)))) - 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pipeline_overhead(model, params, net_state, shape, batch: int, n_steps: int) -> dict:
    """training.run_epoch over n_steps batches (the loop run_exp.py uses: batches drawn, sent to
    the devices, keys, metrics) against n_steps times the median step on a batch already on the
    device: the share of the epoch's wall time spent outside the steps."""
    optimizer = make_optimizer(0.1)
    step = make_train_step(model, optimizer, PHASE1, adversarial=False, eps=EPS)
    copy = functools.partial(jax.tree.map, jnp.copy)
    state = init_train_state(optimizer, copy(params), None, copy(net_state))
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (batch * n_steps, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch * n_steps).astype(np.int32)
    key = jax.random.PRNGKey(0)
    box = {"state": state}

    def epoch():
        box["state"], _ = run_epoch(
            step, box["state"], x, y, batch_size=batch, seed=0, key=key, description="epoch"
        )

    epoch_s = timed(epoch, 1)
    xb, yb = shard_batch(x[:batch], y[:batch])

    def one_step():
        box["state"], metrics = step(box["state"], xb, yb, key)
        jax.block_until_ready((box["state"], metrics))

    steps_s = n_steps * timed(one_step, 3)
    return {"epoch_s": epoch_s, "steps_s": steps_s, "overhead": 1 - steps_s / epoch_s}


# ----------------------------------------------------------------------------- ours


def ours(model, params, net_state, x, y) -> dict[str, Callable[[], object]]:
    """Callables running one of each row with our code (blocking on the result)."""
    key = jax.random.PRNGKey(0)
    state = {}

    def train(name, dynamics, adversarial):
        optimizer = make_optimizer(0.1)
        step = make_train_step(model, optimizer, dynamics, adversarial=adversarial, eps=EPS)
        copy = functools.partial(jax.tree.map, jnp.copy)  # the step donates its state
        theta_t = copy(params) if dynamics.linear else None
        state[name] = replicate(init_train_state(optimizer, copy(params), theta_t, copy(net_state)))

        def run():
            xb, yb = shard_batch(x, y)
            state[name], metrics = step(state[name], xb, yb, key)
            return jax.block_until_ready(metrics["loss"])

        return run

    attack = make_attack_fn(model, PHASE1, **attack_settings(EPS)["linf"])
    replicated_params, replicated_state = replicate((params, net_state))

    def evaluate():
        xb, yb = shard_batch(x, y)
        return jax.block_until_ready(attack(replicated_params, None, replicated_state, xb, yb, key))

    return {
        "phase-1 step": train("phase1", PHASE1, False),
        "adversarial step": train("adversarial", PHASE1, True),
        "phase-2 step": train("phase2", PHASE2, False),
        "eval PGD-Linf": evaluate,
    }


# ----------------------------------------------------------------------------- PyTorch peer


def torch_pgd(net, x, y, eps, step_size, n_steps):
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(n_steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(net(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step_size * grad.sign()
            x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv.detach()


def peer(name, image_shape, x, y) -> dict[str, Callable[[], object]]:
    """The same rows in PyTorch (channels-last)."""
    from torch.func import functional_call, jvp

    fmt = torch.channels_last
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
    y = torch.from_numpy(y).long()
    nets = {}

    def make(train: bool):
        net = torch_model(name, 10, image_shape).to(memory_format=fmt)
        return net.train(train), torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    def update(net, opt, inputs):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(inputs), y)
        loss.backward()
        opt.step()
        return loss

    nets["phase1"] = make(True)
    nets["adversarial"] = make(True)

    def phase1():
        return update(*nets["phase1"], x).item()

    def adversarial():
        net, opt = nets["adversarial"]
        update(net, opt, x)
        x_adv = torch_pgd(net, x, y, EPS, 2 * EPS / TRAIN_PGD_STEPS, TRAIN_PGD_STEPS)
        return update(net, opt, x_adv).item()

    net2 = torch_model(name, 10, image_shape).to(memory_format=fmt).eval()
    buffers = {k: v.detach() for k, v in net2.named_buffers()}
    theta = {k: v.detach().clone() for k, v in net2.named_parameters()}
    w = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    opt2 = torch.optim.SGD(list(w.values()), lr=0.1, momentum=0.9)

    def phase2():
        opt2.zero_grad(set_to_none=True)
        delta = {k: w[k] - theta[k] for k in w}
        _, tangent_out = jvp(
            lambda p: functional_call(net2, (p, buffers), (x,)), (theta,), (delta,)
        )
        loss = F.cross_entropy(tangent_out, y)
        loss.backward()
        opt2.step()
        return loss.item()

    net_eval = torch_model(name, 10, image_shape).to(memory_format=fmt).eval()

    def evaluate():
        return torch_pgd(net_eval, x, y, EPS, 2 * EPS / 100, 100)

    return {
        "phase-1 step": phase1,
        "adversarial step": adversarial,
        "phase-2 step": phase2,
        "eval PGD-Linf": evaluate,
    }


# ----------------------------------------------------------------------------- main


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="resnet18,cnn_small")
    p.add_argument("--batch", type=int, default=128, help="phase-1 and phase-2 steps")
    p.add_argument(
        "--pgd_batch", default="resnet18=8,cnn_small=128", help="adversarial and eval rows"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows", default=",".join(FLOP_MODEL), help="comma-separated row names")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    pgd_batch = dict(item.split("=") for item in args.pgd_batch.split(","))
    rate = matmul_gflops()
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} "
        f"cores; torch {torch.__version__}, jax {jax.__version__}; float32 matmul "
        f"{rate:.0f} GFLOP/s"
    )
    header = (
        f"| {'model':<9} | {'row':<16} | batch | ours s | torch s | ours/torch | "
        f"ours img/s | share of bound |"
    )
    print(header + "\n|" + "|".join("---" for _ in range(8)) + "|", flush=True)
    table = []
    for name in args.models.split(","):
        shape = SHAPES[name]
        model = get_model(name, 10)
        params, net_state = init_model(model, jax.random.PRNGKey(0), shape)
        flops = forward_flops(model, params, net_state, shape)
        rng = np.random.default_rng(0)
        for row in args.rows.split(","):
            batch = (
                args.batch
                if "PGD" not in row and "adversarial" not in row
                else int(pgd_batch.get(name, args.batch))
            )
            x = rng.uniform(0, 1, (batch, *shape)).astype(np.float32)
            y = rng.integers(0, 10, batch).astype(np.int32)
            ours_s = timed(ours(model, params, net_state, x, y)[row], args.repeats)
            torch_s = timed(peer(name, shape, x, y)[row], args.repeats)
            share = FLOP_MODEL[row]() * flops * batch / ours_s / (rate * 1e9)
            result = {
                "model": name, "row": row, "batch": batch, "ours_s": ours_s,
                "torch_s": torch_s, "ratio": ours_s / torch_s, "share": share,
            }  # fmt: skip
            table.append(result)
            print(
                f"| {name:<9} | {row:<16} | {batch:>5} | {ours_s:6.3f} | {torch_s:7.3f} | "
                f"{ours_s / torch_s:10.2f} | {batch / ours_s:10.1f} | {share:14.1%} |",
                flush=True,
            )
    print("\n| model | input pipeline: epoch s | its steps s | outside the steps |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        model = get_model(name, 10)
        params, net_state = init_model(model, jax.random.PRNGKey(0), SHAPES[name])
        n_steps = PIPELINE_STEPS[name]
        result = pipeline_overhead(model, params, net_state, SHAPES[name], args.batch, n_steps)
        print(
            f"| {name} ({n_steps} steps of {args.batch}) | {result['epoch_s']:.3f} | "
            f"{result['steps_s']:.3f} | {result['overhead']:.1%} |",
            flush=True,
        )
    return table


if __name__ == "__main__":
    main()
